//! "Did you mean": the closest known name to a misspelt one.

/// The candidate nearest to `typo`, if it is close enough to be a likely misspelling.
pub(crate) fn closest<'a>(typo: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|candidate| (edit_distance(typo, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= (candidate.len() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_misses_only() {
        let options = ["key", "ttl", "lease", "cache_errors", "on_conflict"];
        assert_eq!(closest("tll", &options), Some("ttl"));
        assert_eq!(closest("leas", &options), Some("lease"));
        assert_eq!(closest("cache_error", &options), Some("cache_errors"));
        assert_eq!(closest("onconflict", &options), Some("on_conflict"));
        assert_eq!(closest("banana", &options), None);
    }
}
