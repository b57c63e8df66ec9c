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

/// Edit distance over chars, counting a swap of two neighbours as one edit ("wiat" → "wait").
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // rows[i][j]: distance between a[..i] and b[..j].
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = rows[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitution.min(rows[i - 1][j] + 1).min(rows[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
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
        assert_eq!(closest("wiat", &["wait", "reject"]), Some("wait"));
        assert_eq!(closest("rejcet", &["wait", "reject"]), Some("reject"));
    }
}
