//! Where the memory store reads the time, so that tests can move it without sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonic clock: the time elapsed since an origin fixed when the clock was made.
///
/// Only the in-memory store reads a [`Clock`]; the networked stores use their server's clock so
/// that skew between application servers cannot break leases.
///
/// ```
/// use idempotent_core::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), Duration::from_secs(5));
/// ```
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since this clock's origin. Never goes backwards.
    fn now(&self) -> Duration;

    /// [`now`](Clock::now), or a reading that is cheaper to take and at most one clock tick
    /// (a few milliseconds) older; never ahead of `now`. The memory store checks whether a
    /// completed record is still live with it, because a replay is its hottest path and a
    /// record replayed a few milliseconds past its ttl is harmless. Leases are always read
    /// with `now`. The provided method returns `now()`.
    ///
    /// ```
    /// use idempotent_core::{Clock, SystemClock};
    ///
    /// let clock = SystemClock::new();
    /// let coarse = clock.now_coarse();
    /// assert!(coarse <= clock.now());
    /// ```
    fn now_coarse(&self) -> Duration {
        self.now()
    }
}

/// The real monotonic clock, the memory store's default: `CLOCK_MONOTONIC` (as
/// `std::time::Instant` reads it) and, for [`Clock::now_coarse`], `CLOCK_MONOTONIC_COARSE` on
/// Linux, which costs about a quarter of it and lags by at most one tick; `Instant` for both
/// elsewhere.
///
/// ```
/// use idempotent_core::{Clock, SystemClock};
///
/// let clock = SystemClock::new();
/// assert!(clock.now() <= clock.now());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: monotonic::Reading,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: monotonic::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        monotonic::since(self.origin, monotonic::now())
    }

    fn now_coarse(&self) -> Duration {
        monotonic::since(self.origin, monotonic::coarse())
    }
}

/// Readings of the monotonic clock, precise and coarse, on one time base.
#[cfg(any(target_os = "linux", target_os = "android"))]
mod monotonic {
    use std::time::Duration;

    use rustix::time::{ClockId, Timespec, clock_gettime};

    pub(super) type Reading = Timespec;

    pub(super) fn now() -> Reading {
        clock_gettime(ClockId::Monotonic)
    }

    /// The time at the last tick: read without the cycle counter, so much cheaper.
    pub(super) fn coarse() -> Reading {
        clock_gettime(ClockId::MonotonicCoarse)
    }

    /// `now - origin`, or zero when a coarse `now` is still behind a precise origin.
    pub(super) fn since(origin: Reading, now: Reading) -> Duration {
        let nanos = (i128::from(now.tv_sec) - i128::from(origin.tv_sec)) * 1_000_000_000
            + (i128::from(now.tv_nsec) - i128::from(origin.tv_nsec));
        u64::try_from(nanos).map_or(Duration::ZERO, Duration::from_nanos)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod monotonic {
    use std::time::{Duration, Instant};

    pub(super) type Reading = Instant;

    pub(super) fn now() -> Reading {
        Instant::now()
    }

    pub(super) fn coarse() -> Reading {
        Instant::now()
    }

    pub(super) fn since(origin: Reading, now: Reading) -> Duration {
        now.saturating_duration_since(origin)
    }
}

/// A clock that moves only when told to: for tests of leases and expiry without sleeping.
///
/// Clones share one time, so a test keeps a clone and advances the store's clock through it.
///
/// ```
/// use idempotent_core::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let seen_by_store = clock.clone();
/// clock.advance(Duration::from_millis(1500));
/// assert_eq!(seen_by_store.now(), Duration::from_millis(1500));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by` (saturating at about 584 years).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update keeps concurrent advances from losing each other's time.
        let _ = self
            .nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Some(now.saturating_add(by))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }
}
