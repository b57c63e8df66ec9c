//! Durations as the stores that count in milliseconds hold them: one conversion for all of
//! them, so a lease, a ttl or a lease left means the same on every store.

use std::time::Duration;

use crate::store::held_millis;

/// A lease or ttl in whole ms, by the one rule of [`held_millis`]: rounded up, 1 ms to
/// [`MAX_DURATION`](crate::MAX_DURATION). As Redis's `PX` takes it.
#[cfg(feature = "redis")]
pub(crate) fn held_u64(duration: Duration) -> u64 {
    held_millis(duration)
}

/// The same whole ms as a signed 64-bit integer, as a PostgreSQL `bigint` or an SQLite `INTEGER`
/// holds it. [`MAX_DURATION`](crate::MAX_DURATION) in ms is far below `i64::MAX`, so every
/// value fits; the clamp is never reached.
#[cfg(any(
    feature = "postgres",
    feature = "sqlite",
    feature = "sqlx-postgres",
    feature = "sqlx-sqlite"
))]
pub(crate) fn held_i64(duration: Duration) -> i64 {
    i64::try_from(held_millis(duration)).unwrap_or(i64::MAX)
}

/// What is left of a live lease, `left` whole ms as the store measured it, as a
/// `retry_after` or a waiter's limit: at least 1 ms (a lease with less than a millisecond
/// left is still live, and a store that rounds down reports it as 0), and a negative count
/// (a clock that moved) is 1 ms too.
pub(crate) fn left(left: i64) -> Duration {
    Duration::from_millis(u64::try_from(left).unwrap_or(0).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_DURATION;

    #[test]
    fn a_held_duration_is_whole_ms_rounded_up_within_bounds_in_both_types() {
        let max: u64 = 36_500 * 86_400 * 1000;
        let cases: [(Duration, u64); 7] = [
            (Duration::ZERO, 1),
            (Duration::from_nanos(1), 1),
            (Duration::from_micros(1500), 2),
            (Duration::from_millis(2000), 2000),
            (MAX_DURATION, max),
            (MAX_DURATION + Duration::from_nanos(1), max),
            (Duration::MAX, max),
        ];
        for (duration, ms) in cases {
            #[cfg(feature = "redis")]
            assert_eq!(held_u64(duration), ms, "{duration:?}");
            #[cfg(any(feature = "postgres", feature = "sqlite", feature = "sqlx-sqlite"))]
            assert_eq!(
                held_i64(duration),
                i64::try_from(ms).unwrap(),
                "{duration:?}"
            );
            let _ = (duration, ms);
        }
    }

    #[test]
    fn a_lease_left_is_at_least_one_ms() {
        assert_eq!(left(1500), Duration::from_millis(1500));
        assert_eq!(left(1), Duration::from_millis(1));
        assert_eq!(left(0), Duration::from_millis(1));
        assert_eq!(left(-5), Duration::from_millis(1));
        assert_eq!(left(i64::MIN), Duration::from_millis(1));
        assert_eq!(
            left(i64::MAX),
            Duration::from_millis(u64::try_from(i64::MAX).unwrap())
        );
    }
}
