//! The in-memory store: one process, the embedded default.
//!
//! A sharded map behind short `std::sync::Mutex` sections (no lock is held across an `.await`).
//! Expired records are replaced when their key is claimed again, and removed a few at a time
//! by the claims that add records (each looks at the next few records of its shard), by a
//! claim that finds the store full (it looks at a bounded number more) and by
//! `purge_expired`. No claim walks the whole store. A live record is never evicted to make
//! room: dropping one would let its key run twice, so a full store refuses new keys instead.
//!
//! A claim that finds the store full looks at up to 1,024 records for dead ones, from where
//! the previous such claim stopped, and is refused if it found none: a store that is full may
//! still hold a few dead records that no claim has reached yet, and the claims after it look
//! further. In a store whose keys keep arriving, dead records are at most about an eighth of
//! it (each new key's claim looks at the next 8 records of its shard).
//!
//! The store is bounded twice: in records ([`DEFAULT_CAPACITY`]) and in bytes
//! ([`DEFAULT_MAX_BYTES`]), whichever it reaches first. A record counts its output, the
//! arguments it keeps and [`RECORD_OVERHEAD_BYTES`] for its key and bookkeeping.
//!
//! # Durability
//!
//! None beyond the process: records live in its memory and are gone when it exits, so a
//! retry after a restart runs the body again. For records that outlive the process use the
//! SQLite store (one machine) or a networked store.
//!
//! # Time
//!
//! Leases and expiry are measured on the store's [`Clock`] (the system's monotonic clock by
//! default, a [`ManualClock`] in tests). A replay judges a completed record's expiry on
//! [`Clock::now_coarse`] (on Linux `CLOCK_MONOTONIC_COARSE`, a few milliseconds coarse, much
//! cheaper than the precise clock), so a record may replay up to one tick past its ttl;
//! leases, takeovers and fenced writes read the precise clock. Fences come from a store-wide
//! counter and only grow.
//!
//! # Waiting
//!
//! A waiter gets a `tokio::sync::Notify` made lazily under the shard's lock (an uncontended
//! call allocates none), woken by `complete`, `release`, a takeover or a purge of the record,
//! and also when the holder's lease would end. Nothing polls.
//!
//! # Schema
//!
//! 32 shards, each a hash map from the storage key (already a digest, hashed with a folded
//! multiply by a random per-store seed) to a record: its arguments (exact when short, else
//! their fingerprint), its fence, and its state (in progress with its lease's end, or
//! completed with its output and expiry), beside a list of every record's deadline that the
//! expiry sweep walks (`memory/shard.rs`). Nothing is versioned: nothing outlives the process.
//!
//! # A flood of unique keys
//!
//! The process-wide [`default_store`](crate::default_store) is a `MemoryStore` with these
//! defaults. Callers who send a new key with every request (or an attacker who does) fill it
//! until one of the bounds is reached: about 512 MiB (plus the outputs of the calls running at
//! that moment) or a million records. From then on every call with a **new** key fails with
//! [`StoreError::Full`] or [`StoreError::ByteBudgetFull`] before its body runs, until records
//! expire (their ttl) and are purged; calls whose key is already recorded still replay. The
//! process's memory stays bounded, but new work of every idempotent function sharing the store
//! is refused for up to a ttl. Where keys come from untrusted clients, size a store for the
//! load ([`MemoryStoreBuilder::max_bytes`], shorter ttls) and set it with
//! [`set_default_store`](crate::set_default_store), rate-limit key creation, or use a
//! networked store.

use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::StoreError;
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};

mod builder;
mod clock;
mod record;
mod shard;

pub use builder::MemoryStoreBuilder;
use record::{KeptArguments, Record, State};

pub use clock::{Clock, ManualClock, SystemClock};

use shard::{Shard, Swept};

/// A lease or ttl as every store holds it: whole milliseconds, rounded up, at most
/// [`MAX_DURATION`](crate::MAX_DURATION) (see [`held_millis`](crate::held_millis)).
fn held(duration: Duration) -> Duration {
    Duration::from_millis(crate::store::held_millis(duration))
}

/// How many records a [`MemoryStore`] holds by default before it refuses new keys.
pub const DEFAULT_CAPACITY: usize = 1_000_000;

/// How many bytes of records a [`MemoryStore`] holds by default before it refuses new keys:
/// 512 MiB. See [`MemoryStoreBuilder::max_bytes`] for what counts.
pub const DEFAULT_MAX_BYTES: usize = 512 * 1024 * 1024;

/// What a record counts besides its output and its kept arguments: its key, the record
/// itself, its entry in the expiry sweep's list and its share of the hash table's slack,
/// rounded up.
pub const RECORD_OVERHEAD_BYTES: usize = 256;

const SHARDS: usize = 32;

/// How many records a claim that adds one looks at for expiry, at most: the next few of its
/// shard's sweep, which keeps dead records a small share of the store.
const SWEEP_STEP: usize = 8;

/// How many more a claim that finds the store full looks at for dead records to make room,
/// at most, before it is refused.
const ROOM_SEARCH: usize = 1024;

/// How many records `purge_expired` looks at per hold of a shard's lock.
const PURGE_PART: usize = 1024;

/// The smallest byte budget: one record with the longest kept arguments.
const MIN_MAX_BYTES: usize = RECORD_OVERHEAD_BYTES + crate::MAX_EXACT_ARGUMENTS;

/// An in-process store: records live as long as the process.
///
/// ```
/// use std::sync::Arc;
/// use idempotent_core::{ManualClock, MemoryStore, Store};
///
/// let clock = ManualClock::new();
/// let store: Arc<dyn Store> = Arc::new(
///     MemoryStore::builder().capacity(10_000).clock(clock.clone()).build(),
/// );
/// ```
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    clock: Arc<dyn Clock>,
    capacity: usize,
    len: AtomicUsize,
    max_bytes: usize,
    /// The bytes of every record held ([`Record::bytes`]).
    bytes: AtomicUsize,
    // Store-wide, so a key's fences keep growing even after its record was purged.
    next_fence: AtomicU64,
    /// Where a claim that finds the store full starts looking for dead records, so that
    /// successive ones look in different shards.
    next_room_shard: AtomicUsize,
    /// How many records expiry has looked at, for the tests of how much a claim does.
    #[cfg(test)]
    examined: AtomicU64,
}

impl MemoryStore {
    /// A store with [`DEFAULT_CAPACITY`] and the system clock.
    ///
    /// ```
    /// let store = idempotent_core::MemoryStore::new();
    /// assert_eq!(store.len(), 0);
    /// ```
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, to set the capacity or the clock.
    ///
    /// ```
    /// let store = idempotent_core::MemoryStore::builder().capacity(5).build();
    /// assert_eq!(store.capacity(), 5);
    /// ```
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            capacity: DEFAULT_CAPACITY,
            max_bytes: DEFAULT_MAX_BYTES,
            clock: Arc::new(SystemClock::new()),
        }
    }

    /// How many records the store may hold.
    ///
    /// ```
    /// assert_eq!(idempotent_core::MemoryStore::new().capacity(), idempotent_core::stores::memory::DEFAULT_CAPACITY);
    /// ```
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many bytes of records the store may hold (see [`MemoryStoreBuilder::max_bytes`]).
    ///
    /// ```
    /// use idempotent_core::stores::memory::DEFAULT_MAX_BYTES;
    /// assert_eq!(idempotent_core::MemoryStore::new().max_bytes(), DEFAULT_MAX_BYTES);
    /// ```
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// How many bytes of records the store holds now, as counted against
    /// [`max_bytes`](Self::max_bytes), including expired records not yet purged.
    ///
    /// ```
    /// assert_eq!(idempotent_core::MemoryStore::new().bytes(), 0);
    /// ```
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// How many records the store holds now, including expired ones not yet purged.
    ///
    /// ```
    /// assert_eq!(idempotent_core::MemoryStore::new().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// `true` when the store holds no record.
    ///
    /// ```
    /// assert!(idempotent_core::MemoryStore::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &StorageKey) -> MutexGuard<'_, Shard> {
        // Keys are SHA-256 digests, so any byte spreads them evenly.
        let index = usize::from(key.as_bytes()[31]) % self.shards.len();
        // A panic while holding the lock cannot leave a record half-written (every update is a
        // single assignment), so a poisoned shard is still consistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn new_fence(&self) -> Fence {
        Fence::new(self.next_fence.fetch_add(1, Ordering::Relaxed))
    }

    /// Takes a slot and `bytes` for a new record, or says which bound it would cross.
    fn reserve_record(&self, bytes: usize) -> Result<(), ClaimStep> {
        self.reserve_bytes(bytes)?;
        let slot = self
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |len| {
                (len < self.capacity).then_some(len + 1)
            });
        if slot.is_err() {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(ClaimStep::Full);
        }
        Ok(())
    }

    /// Takes `bytes` more of the budget, or says it would cross it.
    fn reserve_bytes(&self, bytes: usize) -> Result<(), ClaimStep> {
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes)
                    .filter(|&total| total <= self.max_bytes)
            })
            .map(drop)
            .map_err(|_| ClaimStep::BytesFull)
    }

    /// Moves the byte count from a record's old size to its new one. Growing never checks the
    /// budget: only claims do (see [`MemoryStoreBuilder::max_bytes`]).
    fn resize(&self, old: usize, new: usize) {
        if new >= old {
            self.bytes.fetch_add(new - old, Ordering::AcqRel);
        } else {
            self.bytes.fetch_sub(old - new, Ordering::AcqRel);
        }
    }

    fn claim_now(
        &self,
        key: &StorageKey,
        arguments: &CanonicalArguments,
        lease: Duration,
    ) -> ClaimStep {
        // A replay, the hot path, judges the record's expiry on the coarse clock (a record may
        // replay up to one tick past its ttl); a lease is judged on `now`.
        let coarse = self.clock.now_coarse();
        let mut shard = self.shard(key);
        if let Some((record, deadline)) = shard.get_mut(key) {
            let live = match &record.state {
                State::Completed { output, expires_at } => {
                    (coarse < *expires_at).then(|| Claim::Completed {
                        output: output.clone(),
                    })
                }
                State::InProgress { lease_until, .. } => {
                    let now = self.clock.now();
                    (now < *lease_until).then(|| Claim::InProgress {
                        retry_after: *lease_until - now,
                    })
                }
            };
            if let Some(claim) = live {
                return ClaimStep::Done(if record.arguments.matches(arguments) {
                    claim
                } else {
                    Claim::Mismatch
                });
            }
            let now = self.clock.now();
            // Expired: take it over in place, waking anyone waiting on the old holder. The
            // new record must fit where the old one was, or in the budget.
            let (old, new) = (record.bytes(), KeptArguments::record_bytes(arguments));
            if new > old {
                if let Err(full) = self.reserve_bytes(new - old) {
                    return full;
                }
            } else {
                self.resize(old, new);
            }
            record.wake_waiters();
            let fence = self.new_fence();
            *record = Record {
                arguments: KeptArguments::of(arguments),
                fence,
                state: State::InProgress {
                    lease_until: now.saturating_add(held(lease)),
                    waiters: None,
                },
                slot: record.slot,
            };
            *deadline = record.deadline();
            return ClaimStep::Done(Claim::Acquired { fence });
        }
        #[cfg(test)]
        tests::race_point();
        let now = self.clock.now();
        // A new record: first look at the next few of this shard for dead ones, so that
        // records are removed as fast as keys arrive and the store does not fill with them.
        let swept = shard.sweep(now, SWEEP_STEP, |_| false);
        self.forget(&swept);
        if let Err(full) = self.reserve_record(KeptArguments::record_bytes(arguments)) {
            return full;
        }
        let fence = self.new_fence();
        #[cfg(test)]
        tests::race_point();
        shard.insert(
            *key,
            Record {
                arguments: KeptArguments::of(arguments),
                fence,
                state: State::InProgress {
                    lease_until: now.saturating_add(held(lease)),
                    waiters: None,
                },
                slot: 0,
            },
        );
        ClaimStep::Done(Claim::Acquired { fence })
    }

    /// Counts the records a sweep removed out of the store's totals.
    fn forget(&self, swept: &Swept) {
        #[cfg(test)]
        self.examined
            .fetch_add(swept.examined as u64, Ordering::Relaxed);
        if swept.records > 0 {
            self.len.fetch_sub(swept.records, Ordering::AcqRel);
            self.bytes.fetch_sub(swept.bytes, Ordering::AcqRel);
        }
    }

    /// Whether a record of `bytes` would fit, were the `swept` records not counted.
    fn has_room(&self, bytes: usize, swept: &Swept) -> bool {
        // The swept records are still in the totals (they are subtracted after the sweep).
        self.len().saturating_sub(swept.records) < self.capacity
            && (self.bytes().saturating_sub(swept.bytes)).saturating_add(bytes) <= self.max_bytes
    }

    /// Looks at up to [`ROOM_SEARCH`] records, shard after shard, for dead ones, until a new
    /// record of `bytes` would fit.
    fn make_room(&self, bytes: usize) {
        let now = self.clock.now();
        let start = self.next_room_shard.fetch_add(1, Ordering::Relaxed);
        let mut budget = ROOM_SEARCH;
        for i in 0..self.shards.len() {
            if budget == 0 || self.has_room(bytes, &Swept::default()) {
                return;
            }
            let index = start.wrapping_add(i) % self.shards.len();
            let mut shard = self.shards[index]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let swept = shard.sweep(now, budget, |swept| self.has_room(bytes, swept));
            drop(shard);
            self.forget(&swept);
            budget -= swept.examined;
        }
    }

    /// Removes every record dead now, shard after shard, [`PURGE_PART`] entries per hold
    /// of a shard's lock, so that claims on that shard wait for a part, not for the shard.
    fn purge_now(&self) -> u64 {
        let now = self.clock.now();
        let mut purged = 0;
        for shard in self.shards.iter() {
            let mut at = 0;
            loop {
                let (swept, done) = shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .purge_part(&mut at, now, PURGE_PART);
                self.forget(&swept);
                purged += swept.records as u64;
                if done {
                    break;
                }
            }
        }
        purged
    }

    /// Removes `key`'s record, waking its waiters; whether there was one.
    fn remove_record(&self, shard: &mut Shard, key: &StorageKey) -> bool {
        let Some(record) = shard.remove(key) else {
            return false;
        };
        record.wake_waiters();
        self.len.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(record.bytes(), Ordering::AcqRel);
        true
    }

    fn claim_or_purge(
        &self,
        key: &StorageKey,
        arguments: &CanonicalArguments,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        match self.claim_now(key, arguments, lease) {
            ClaimStep::Done(claim) => Ok(claim),
            ClaimStep::Full | ClaimStep::BytesFull => {
                // Make room only from records that are already dead, looking at a bounded
                // number of them, then try once more.
                self.make_room(KeptArguments::record_bytes(arguments));
                match self.claim_now(key, arguments, lease) {
                    ClaimStep::Done(claim) => Ok(claim),
                    ClaimStep::Full => Err(StoreError::Full {
                        capacity: self.capacity,
                    }),
                    ClaimStep::BytesFull => Err(StoreError::ByteBudgetFull {
                        max_bytes: self.max_bytes,
                    }),
                }
            }
        }
    }
}

enum ClaimStep {
    Done(Claim),
    /// At capacity.
    Full,
    /// The new record would take the store past its byte budget.
    BytesFull,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("bytes", &self.bytes())
            .field("max_bytes", &self.max_bytes)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(std::future::ready(
            self.claim_or_purge(key, arguments, lease),
        ))
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        let now = self.clock.now();
        let mut shard = self.shard(key);
        let write = match shard.get_mut(key) {
            Some((record, deadline)) if record.held_by(fence, now) => {
                record.wake_waiters();
                let old = record.bytes();
                record.state = State::Completed {
                    output,
                    expires_at: now.saturating_add(held(ttl)),
                };
                *deadline = record.deadline();
                // Recorded even past the budget: the body has run (see `max_bytes`).
                self.resize(old, record.bytes());
                FencedWrite::Applied
            }
            _ => FencedWrite::Fenced,
        };
        drop(shard);
        Box::pin(std::future::ready(Ok(write)))
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        let now = self.clock.now();
        let mut shard = self.shard(key);
        let write = match shard.get(key) {
            Some(record) if record.held_by(fence, now) => {
                self.remove_record(&mut shard, key);
                FencedWrite::Applied
            }
            _ => FencedWrite::Fenced,
        };
        drop(shard);
        Box::pin(std::future::ready(Ok(write)))
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        let now = self.clock.now();
        let mut shard = self.shard(key);
        let write = match shard.get_mut(key) {
            Some((record, deadline)) if record.held_by(fence, now) => {
                if let State::InProgress { lease_until, .. } = &mut record.state {
                    *lease_until = now.saturating_add(held(lease));
                }
                *deadline = record.deadline();
                FencedWrite::Applied
            }
            _ => FencedWrite::Fenced,
        };
        drop(shard);
        Box::pin(std::future::ready(Ok(write)))
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let now = self.clock.now();
        let mut shard = self.shard(key);
        let Some((record, _)) = shard.get_mut(key) else {
            return Box::pin(std::future::ready(Ok(())));
        };
        let State::InProgress {
            lease_until,
            waiters,
        } = &mut record.state
        else {
            return Box::pin(std::future::ready(Ok(())));
        };
        if now >= *lease_until {
            return Box::pin(std::future::ready(Ok(())));
        }
        // The notified future is made under the shard lock: a completion that takes the lock
        // after us is guaranteed to wake it, even before it is first polled.
        let notified = Arc::clone(waiters.get_or_insert_with(Default::default)).notified_owned();
        let until_lease_ends = lease_until.saturating_sub(now);
        drop(shard);
        Box::pin(async move {
            let _ = tokio::time::timeout(max.min(until_lease_ends), notified).await;
            Ok(())
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(std::future::ready(Ok(self.purge_now())))
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        let existed = self.remove_record(&mut self.shard(key), key);
        Box::pin(std::future::ready(Ok(existed)))
    }
}

/// How a shard hashes its keys. Storage keys are already SHA-256 digests, so their first 8
/// bytes spread them evenly, but a caller who picks the raw keys could grind digests whose
/// low bits collide and slow every lookup of a shard. The bytes are therefore mixed with a
/// random seed of the store's (a folded multiply, as foldhash does): a few nanoseconds,
/// against SipHash's twenty.
#[derive(Clone)]
struct SeededKeys {
    seed: [u64; 2],
}

impl SeededKeys {
    fn new() -> Self {
        let random = RandomState::new();
        Self {
            // Odd, so the multiplication loses no bits of the key.
            seed: [random.hash_one(0u8), random.hash_one(1u8) | 1],
        }
    }
}

impl BuildHasher for SeededKeys {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            seed: self.seed,
            bytes: 0,
        }
    }
}

struct KeyHasher {
    seed: [u64; 2],
    bytes: u64,
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let product = u128::from(self.bytes ^ self.seed[0]) * u128::from(self.seed[1]);
        (product as u64) ^ ((product >> 64) as u64)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut first = [0u8; 8];
        let len = bytes.len().min(8);
        first[..len].copy_from_slice(&bytes[..len]);
        self.bytes ^= u64::from_le_bytes(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;
    use std::cell::RefCell;
    use std::sync::mpsc;

    thread_local! {
        /// What a claim on this thread does at its race points, if a test set it.
        static RACE_POINT: RefCell<Option<Box<dyn FnMut()>>> = RefCell::new(None);
    }

    /// Called by `claim_now` twice between finding no live record and inserting its own: once
    /// right after the look-up, once right before the insert. A test makes another claim run
    /// there; the shard lock, held throughout, must keep it out until the insert is done.
    pub(super) fn race_point() {
        let action = RACE_POINT.with(|point| point.borrow_mut().take());
        if let Some(mut action) = action {
            action();
            RACE_POINT.with(|point| *point.borrow_mut() = Some(action));
        }
    }

    /// Check-then-act, made to race every time: a claim pauses at each of its race points
    /// while a second claim of the same key runs on another thread. Under the shard lock the
    /// second claim cannot finish until the first has inserted its record (the pauses time
    /// out), and it then finds that record in progress. Were the lock dropped anywhere between
    /// the look-up and the insert, the second claim would finish inside a pause and both would
    /// acquire the key.
    #[test]
    fn a_claim_paused_between_look_up_and_insert_leaves_one_winner() {
        let store = Arc::new(MemoryStore::new());
        let key = StorageKey::from_bytes([7; 32]);
        let arguments = CanonicalArguments::from(Fingerprint::of(&1).unwrap());
        let lease = Duration::from_secs(30);
        let second: Arc<Mutex<Option<std::thread::JoinHandle<ClaimStep>>>> = Arc::default();
        let (finished, second_finished) = mpsc::channel();
        let mut heard = false;
        let (racer, racing_arguments, racing) =
            (Arc::clone(&store), arguments.clone(), Arc::clone(&second));
        RACE_POINT.with(|point| {
            *point.borrow_mut() = Some(Box::new(move || {
                let mut racing = racing.lock().unwrap();
                if racing.is_none() {
                    let (store, arguments, finished) = (
                        Arc::clone(&racer),
                        racing_arguments.clone(),
                        finished.clone(),
                    );
                    *racing = Some(std::thread::spawn(move || {
                        let step = store.claim_now(&key, &arguments, lease);
                        let _ = finished.send(());
                        step
                    }));
                }
                drop(racing);
                // Long enough for the second claim to finish many times over if it can.
                if !heard {
                    heard = second_finished
                        .recv_timeout(Duration::from_millis(200))
                        .is_ok();
                }
            }));
        });
        let first = store.claim_now(&key, &arguments, lease);
        RACE_POINT.with(|point| point.borrow_mut().take());
        let second = second
            .lock()
            .unwrap()
            .take()
            .expect("the first claim reached its race points")
            .join()
            .expect("the second claim does not panic");
        let acquired = [&first, &second]
            .iter()
            .filter(|step| matches!(step, ClaimStep::Done(Claim::Acquired { .. })))
            .count();
        assert_eq!(
            acquired,
            1,
            "two claims of one key both acquired it (first: {}, second: {})",
            describe(&first),
            describe(&second)
        );
        assert!(
            matches!(second, ClaimStep::Done(Claim::InProgress { .. })),
            "the second claim, let in only after the insert, finds the first in progress: {}",
            describe(&second)
        );
    }

    fn describe(step: &ClaimStep) -> &'static str {
        match step {
            ClaimStep::Done(Claim::Acquired { .. }) => "acquired",
            ClaimStep::Done(Claim::InProgress { .. }) => "in progress",
            ClaimStep::Done(Claim::Completed { .. }) => "completed",
            ClaimStep::Done(Claim::Mismatch) => "mismatch",
            ClaimStep::Full | ClaimStep::BytesFull => "full",
        }
    }

    /// Keys spread over every shard, so that claims of different keys rarely wait on one lock.
    #[test]
    fn keys_spread_over_every_shard() {
        let store = MemoryStore::new();
        let arguments = CanonicalArguments::from(Fingerprint::of(&1).unwrap());
        for n in 0..=255u8 {
            let key = StorageKey::derive("spread", None, &[n]).unwrap();
            assert!(matches!(
                store.claim_now(&key, &arguments, Duration::from_secs(60)),
                ClaimStep::Done(Claim::Acquired { .. })
            ));
        }
        let used = store
            .shards
            .iter()
            .filter(|shard| shard.lock().unwrap().len() > 0)
            .count();
        assert_eq!(used, SHARDS, "256 keys used {used} of {SHARDS} shards");
    }

    /// Each bit of a key's hash is set for about half of the keys: the table's buckets (low
    /// bits) and its control bytes (high bits) are both spread. Over 2,000 keys, a fair bit is
    /// set 40-60% of the time with overwhelming odds.
    #[test]
    fn every_hash_bit_is_set_about_half_the_time() {
        let keys = SeededKeys::new();
        const KEYS: u32 = 2000;
        let mut set = [0u32; 64];
        for n in 0..KEYS {
            let hash = keys.hash_one(numbered_key(n));
            for (bit, count) in set.iter_mut().enumerate() {
                *count += u32::from(hash >> bit & 1 == 1);
            }
        }
        for (bit, count) in set.iter().enumerate() {
            assert!(
                (KEYS * 2 / 5..=KEYS * 3 / 5).contains(count),
                "bit {bit} was set for {count} of {KEYS} keys"
            );
        }
    }

    /// Keys ground to share their low bits would share a bucket under a pass-through hash;
    /// mixed with the store's seed, they spread.
    #[test]
    fn keys_with_equal_low_bits_spread() {
        let keys = SeededKeys::new();
        let buckets: std::collections::HashSet<u64> = (0..64u8)
            .map(|high| {
                let mut bytes = [0u8; 32];
                bytes[0] = 0x5a; // the same low bits for all
                bytes[7] = high;
                keys.hash_one(StorageKey::from_bytes(bytes)) & 0xffff
            })
            .collect();
        assert!(buckets.len() > 32, "only {} of 64 buckets", buckets.len());
    }

    /// A manual clock whose coarse reading lags by `lag`, as a real one may by up to a tick.
    #[derive(Debug, Clone)]
    struct LaggingClock {
        manual: crate::ManualClock,
        lag: Duration,
    }

    impl Clock for LaggingClock {
        fn now(&self) -> Duration {
            self.manual.now()
        }

        fn now_coarse(&self) -> Duration {
            self.manual.now().saturating_sub(self.lag)
        }
    }

    fn lagging_store(lag: Duration) -> (MemoryStore, crate::ManualClock) {
        let manual = crate::ManualClock::new();
        let clock = LaggingClock {
            manual: manual.clone(),
            lag,
        };
        (MemoryStore::builder().clock(clock).build(), manual)
    }

    fn claim(store: &MemoryStore, key: &StorageKey, lease: Duration) -> Claim {
        let arguments = CanonicalArguments::of("order-7").unwrap();
        match store.claim_or_purge(key, &arguments, lease) {
            Ok(claim) => claim,
            Err(error) => panic!("the claim failed: {error}"),
        }
    }

    /// A replay may see a completed record up to the coarse clock's lag past its ttl, and no
    /// longer; a lease is judged on the precise clock, lag or not.
    #[tokio::test]
    async fn only_replays_read_the_coarse_clock() {
        let ms = Duration::from_millis;
        let (store, clock) = lagging_store(ms(3));
        let key = StorageKey::from_bytes([1; 32]);
        let Claim::Acquired { fence } = claim(&store, &key, ms(1000)) else {
            panic!("a fresh key is free");
        };
        let write = store
            .complete(&key, fence, Bytes::from_static(b"r"), ms(10_000))
            .await;
        assert_eq!(
            write.ok(),
            Some(FencedWrite::Applied),
            "the holder completes"
        );
        clock.advance(ms(10_001));
        assert!(
            matches!(claim(&store, &key, ms(1000)), Claim::Completed { .. }),
            "1 ms past the ttl, within the coarse clock's lag: replayed"
        );
        clock.advance(ms(3));
        assert!(
            matches!(claim(&store, &key, ms(1000)), Claim::Acquired { .. }),
            "past the ttl by more than the lag: the key runs again"
        );

        let leased = StorageKey::from_bytes([2; 32]);
        assert!(matches!(
            claim(&store, &leased, ms(1000)),
            Claim::Acquired { .. }
        ));
        clock.advance(ms(1001));
        assert!(
            matches!(claim(&store, &leased, ms(1000)), Claim::Acquired { .. }),
            "an expired lease is taken over at once, whatever the coarse clock says"
        );
    }

    #[test]
    fn system_clock_coarse_readings_trail_the_precise_ones() {
        let clock = SystemClock::new();
        for _ in 0..1000 {
            let coarse = clock.now_coarse();
            let now = clock.now();
            assert!(coarse <= now, "coarse {coarse:?} ahead of {now:?}");
            // A tick is 1-10 ms; the bound leaves room for a descheduled thread.
            assert!(
                now - coarse < Duration::from_millis(500),
                "{coarse:?} against {now:?}"
            );
        }
    }

    /// The overhead a record counts covers what it takes: its key and record in the table,
    /// the table's control byte, with room for the table's slack, and its deadline entry.
    #[test]
    fn the_counted_overhead_covers_a_record() {
        let entry = size_of::<(StorageKey, Record)>() + 1;
        assert!(
            entry * 3 / 2 + shard::DEADLINE_BYTES <= RECORD_OVERHEAD_BYTES,
            "a record takes {entry} bytes in the table (count half as much again for its slack) and {} in the deadline list",
            shard::DEADLINE_BYTES
        );
    }

    /// The value of a future the memory store returns, which is ready at once.
    fn ready<T>(mut future: BoxFuture<'_, T>) -> T {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => panic!("a memory store future was pending"),
        }
    }

    fn numbered_key(i: u32) -> StorageKey {
        StorageKey::derive("memory::tests", None, &i.to_le_bytes()).expect("a valid key")
    }

    /// A store on a manual clock holding `records` completed records that have just expired.
    fn store_of_expired(records: u32) -> (MemoryStore, crate::ManualClock) {
        let clock = crate::ManualClock::new();
        let store = MemoryStore::builder()
            .capacity(records as usize)
            .clock(clock.clone())
            .build();
        let ttl = Duration::from_secs(60);
        for i in 0..records {
            let key = numbered_key(i);
            let Claim::Acquired { fence } = claim(&store, &key, ttl) else {
                panic!("a new key in a store with room");
            };
            let write = ready(store.complete(&key, fence, Bytes::from_static(b"{}"), ttl));
            assert_eq!(write.ok(), Some(FencedWrite::Applied));
        }
        assert_eq!(store.len(), records as usize);
        clock.advance(ttl);
        (store, clock)
    }

    /// A store full of expired records turns over its whole capacity with no claim looking at
    /// more than a bounded number of records: none purges the whole store to make room.
    #[test]
    fn no_claim_sweeps_the_whole_store() {
        const RECORDS: u32 = 20_000;
        let (store, _clock) = store_of_expired(RECORDS);
        let mut most = 0;
        for i in RECORDS..2 * RECORDS {
            let before = store.examined.load(Ordering::Relaxed);
            let got = claim(&store, &numbered_key(i), Duration::from_secs(60));
            assert!(matches!(got, Claim::Acquired { .. }), "claim {i}: {got:?}");
            most = most.max(store.examined.load(Ordering::Relaxed) - before);
        }
        assert!(
            most <= (2 * SWEEP_STEP + ROOM_SEARCH) as u64,
            "a claim looked at {most} records for expiry, of {RECORDS} in the store; at most {} allowed",
            2 * SWEEP_STEP + ROOM_SEARCH
        );
        assert_eq!(store.len(), RECORDS as usize, "every dead record made room");
        // Now full of live records: a new key is refused, after as bounded a search.
        let before = store.examined.load(Ordering::Relaxed);
        let refused = store.claim_or_purge(
            &numbered_key(2 * RECORDS),
            &CanonicalArguments::of("order-7").unwrap(),
            Duration::from_secs(60),
        );
        assert!(
            matches!(refused, Err(StoreError::Full { .. })),
            "{refused:?}"
        );
        let examined = store.examined.load(Ordering::Relaxed) - before;
        assert!(
            examined <= (2 * SWEEP_STEP + ROOM_SEARCH) as u64,
            "a refused claim looked at {examined} records"
        );
        let kept = CanonicalArguments::of("order-7")
            .unwrap()
            .exact()
            .unwrap()
            .len();
        assert_eq!(
            store.bytes(),
            RECORDS as usize * (RECORD_OVERHEAD_BYTES + kept)
        );
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// A key whose shard is `shard` (the store picks a shard by the key's last byte).
    fn key_in_shard(shard: u8, n: u8) -> StorageKey {
        let mut bytes = [n; 32];
        bytes[31] = shard + n * SHARDS as u8;
        StorageKey::from_bytes(bytes)
    }

    /// A claim that finds the store full makes room by removing dead records from other
    /// shards, only as many as it needs: here one of three, not all of them.
    #[test]
    fn a_full_store_makes_only_the_room_it_needs() {
        let clock = crate::ManualClock::new();
        let store = MemoryStore::builder()
            .capacity(4)
            .clock(clock.clone())
            .build();
        let short = Duration::from_secs(1);
        for n in 0..3 {
            assert!(matches!(
                claim(&store, &key_in_shard(1, n), short),
                Claim::Acquired { .. }
            ));
        }
        let live = key_in_shard(0, 0);
        assert!(matches!(claim(&store, &live, HOUR), Claim::Acquired { .. }));
        clock.advance(short * 2);
        // The new key's shard holds only the live record: its own sweep finds nothing dead.
        let got = claim(&store, &key_in_shard(0, 1), HOUR);
        assert!(matches!(got, Claim::Acquired { .. }), "{got:?}");
        assert_eq!(
            store.len(),
            4,
            "one dead record made room; the other two are left"
        );
        let kept = CanonicalArguments::of("order-7")
            .unwrap()
            .exact()
            .unwrap()
            .len();
        assert_eq!(store.bytes(), 4 * (RECORD_OVERHEAD_BYTES + kept));
    }

    /// A dead record taken over by a claim with longer arguments grows by the difference, and
    /// only if the byte budget has room for it; with shorter ones it shrinks.
    #[test]
    fn a_takeover_counts_the_change_in_size_against_the_budget() {
        let clock = crate::ManualClock::new();
        let digest = CanonicalArguments::from(Fingerprint::of(&1).unwrap());
        let long = CanonicalArguments::of(&"x".repeat(100)).unwrap();
        let grown = long.exact().expect("short enough to keep").len();
        let short = Duration::from_secs(1);
        // With room to spare, a takeover with longer arguments counts exactly the difference.
        let roomy = MemoryStore::builder().clock(clock.clone()).build();
        let key = numbered_key(0);
        assert!(matches!(
            roomy.claim_or_purge(&key, &digest, short),
            Ok(Claim::Acquired { .. })
        ));
        clock.advance(short * 2);
        assert!(matches!(
            roomy.claim_or_purge(&key, &long, HOUR),
            Ok(Claim::Acquired { .. })
        ));
        assert_eq!(roomy.bytes(), RECORD_OVERHEAD_BYTES + grown);
        // Room for one record with kept arguments, less one byte.
        let store = MemoryStore::builder()
            .max_bytes(RECORD_OVERHEAD_BYTES + grown + RECORD_OVERHEAD_BYTES + grown - 1)
            .clock(clock.clone())
            .build();
        let (a, b) = (numbered_key(1), numbered_key(2));
        for key in [&a, &b] {
            assert!(matches!(
                store.claim_or_purge(key, &digest, short),
                Ok(Claim::Acquired { .. })
            ));
        }
        assert_eq!(store.bytes(), 2 * RECORD_OVERHEAD_BYTES);
        clock.advance(short * 2);
        // `a` taken over with long arguments: it grows by `grown`, which fits.
        assert!(matches!(
            store.claim_or_purge(&a, &long, HOUR),
            Ok(Claim::Acquired { .. })
        ));
        assert_eq!(store.bytes(), 2 * RECORD_OVERHEAD_BYTES + grown);
        // `b` taken over likewise would pass the budget by a byte: refused, nothing counted.
        let refused = store.claim_or_purge(&b, &long, HOUR);
        assert!(
            matches!(refused, Err(StoreError::ByteBudgetFull { .. })),
            "{refused:?}"
        );
        assert_eq!(
            store.bytes(),
            RECORD_OVERHEAD_BYTES + grown,
            "only `a`: `b`'s dead record was removed to make room, and still there was none"
        );
        // Taken over with a digest again, `a` shrinks back.
        clock.advance(HOUR * 2);
        assert!(matches!(
            store.claim_or_purge(&a, &digest, HOUR),
            Ok(Claim::Acquired { .. })
        ));
        assert_eq!(store.bytes(), RECORD_OVERHEAD_BYTES);
    }

    /// After a large purge the tables are rebuilt to fit what is left: a table whose records
    /// were removed keeps its slots (and their deleted marks, which a lookup of an absent key
    /// probes through) until it is rebuilt.
    #[test]
    fn tables_shrink_after_a_large_purge() {
        // More than `PURGE_PART` per shard, so each shard is purged in more than one part.
        const RECORDS: u32 = 40_000;
        const _: () = assert!(RECORDS as usize / SHARDS > PURGE_PART);
        let (store, _clock) = store_of_expired(RECORDS);
        let slots = |store: &MemoryStore| -> usize {
            store
                .shards
                .iter()
                .map(|shard| shard.lock().unwrap().capacity())
                .sum()
        };
        assert!(slots(&store) >= RECORDS as usize);
        let kept = numbered_key(RECORDS);
        assert!(matches!(
            claim(&store, &kept, Duration::from_secs(3600)),
            Claim::Acquired { .. }
        ));
        // The new key's claim may have swept a few already; the purge removes every other.
        let held = store.len();
        let purged = ready(store.purge_expired()).expect("purge");
        assert_eq!(purged, held as u64 - 1, "every dead record is purged");
        assert_eq!(store.len(), 1);
        assert!(
            slots(&store) <= 32 * 16,
            "the shards keep {} slots for 1 record after the purge",
            slots(&store)
        );
        assert!(
            matches!(
                claim(&store, &kept, Duration::from_secs(3600)),
                Claim::InProgress { .. }
            ),
            "the live record survives the rebuild"
        );
    }

    #[test]
    fn each_store_has_its_own_seed() {
        let key = StorageKey::from_bytes([7; 32]);
        assert_ne!(
            SeededKeys::new().hash_one(key),
            SeededKeys::new().hash_one(key)
        );
    }
}
