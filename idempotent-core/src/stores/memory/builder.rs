//! [`MemoryStoreBuilder`]: a memory store's capacity, byte budget and clock.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use super::{Clock, MIN_MAX_BYTES, MemoryStore, SHARDS, SeededKeys, Shard};
#[cfg(doc)]
use super::{ManualClock, RECORD_OVERHEAD_BYTES};
#[cfg(doc)]
use crate::error::StoreError;

/// Builds a [`MemoryStore`] with a capacity, a byte budget or a clock other than the
/// defaults.
///
/// ```
/// use idempotent_core::{MemoryStore, SystemClock};
///
/// let store = MemoryStore::builder()
///     .capacity(100)
///     .max_bytes(1024 * 1024)
///     .clock(SystemClock::new())
///     .build();
/// assert_eq!(store.capacity(), 100);
/// assert_eq!(store.max_bytes(), 1024 * 1024);
/// ```
#[derive(Debug)]
pub struct MemoryStoreBuilder {
    pub(super) capacity: usize,
    pub(super) max_bytes: usize,
    pub(super) clock: Arc<dyn Clock>,
}

impl MemoryStoreBuilder {
    /// The most records held at once (live or not yet purged); at least 1.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The most bytes of records held at once (live or not yet purged); at least one record
    /// with the longest kept arguments ([`RECORD_OVERHEAD_BYTES`] +
    /// [`MAX_EXACT_ARGUMENTS`](crate::MAX_EXACT_ARGUMENTS)).
    ///
    /// A record counts its output, its arguments when they are kept exactly (at most
    /// [`MAX_EXACT_ARGUMENTS`](crate::MAX_EXACT_ARGUMENTS) bytes) and
    /// [`RECORD_OVERHEAD_BYTES`]. The budget is checked when a key is claimed: a claim that
    /// would take the store past it is refused with [`StoreError::ByteBudgetFull`] before the
    /// body runs. A body's output is not known until it completes, and by then the body has
    /// run: refusing to record it would let a retry run it again. So `complete` always records
    /// the output, even past the budget, and new keys are refused until the store is back
    /// under it. The store can therefore exceed its budget by the outputs of the calls running
    /// when it was reached, each at most the engine's
    /// [`max_output_bytes`](crate::Options::max_output_bytes) (1 MiB by default).
    ///
    /// ```
    /// use idempotent_core::MemoryStore;
    ///
    /// let store = MemoryStore::builder().max_bytes(64 * 1024 * 1024).build();
    /// assert_eq!(store.max_bytes(), 64 * 1024 * 1024);
    /// ```
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes.max(MIN_MAX_BYTES);
        self
    }

    /// The clock leases and expiry are measured on, e.g. a [`ManualClock`]
    /// in tests.
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The store.
    pub fn build(self) -> MemoryStore {
        let keys = SeededKeys::new();
        MemoryStore {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(keys.clone())))
                .collect(),
            clock: self.clock,
            capacity: self.capacity,
            len: AtomicUsize::new(0),
            max_bytes: self.max_bytes,
            bytes: AtomicUsize::new(0),
            next_fence: AtomicU64::new(1),
            next_room_shard: AtomicUsize::new(0),
            #[cfg(test)]
            examined: AtomicU64::new(0),
        }
    }
}
