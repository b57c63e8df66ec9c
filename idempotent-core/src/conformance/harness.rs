//! [`Harness`]: the store under test, how time moves for it, and what it keeps alive.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::show;
use crate::fingerprint::CanonicalArguments;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::{Bytes, Claim, Fence, FencedWrite, Store};
use crate::stores::memory::ManualClock;

/// The lease the suite uses when time is manual.
const MANUAL_LEASE: Duration = Duration::from_secs(1);

/// Makes every key unique within the process, whatever the harness.
static KEY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A store under test plus how time moves for it.
///
/// Build one with [`Harness::with_manual_clock`] for a store that reads a
/// [`ManualClock`] (the suite then never sleeps to make a lease run out), or with
/// [`Harness::with_real_time`] for a store that reads a real clock, such as its server's.
///
/// A manual-clock harness should not be shared by properties that run at the same time: one
/// property's [`advance`](Harness::advance) would expire the other's leases.
///
/// A harness can also keep alive whatever the store needs beside it (a temporary folder, a
/// server's handle): see [`Harness::keep`].
#[derive(Debug, Clone)]
pub struct Harness {
    store: Arc<dyn Store>,
    pub(super) time: Time,
    fences_grow: bool,
    pub(super) native_expiry: bool,
    /// What the harness keeps alive for the store (see [`Harness::keep`]). Declared after
    /// `store`, so a harness lets go of its store before its guards.
    guards: Vec<Arc<dyn Any + Send + Sync>>,
}

#[derive(Debug, Clone)]
pub(super) enum Time {
    Manual(ManualClock),
    Real { short: Duration },
}

impl Harness {
    /// Time moves only when the test says: [`advance`](Harness::advance) moves this
    /// [`ManualClock`], which the store must read.
    ///
    /// The suite's short lease is then 1 s of manual time.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use idempotent_core::conformance::Harness;
    /// use idempotent_core::{ManualClock, MemoryStore};
    ///
    /// let clock = ManualClock::new();
    /// let store = MemoryStore::builder().clock(clock.clone()).build();
    /// let harness = Harness::with_manual_clock(Arc::new(store), clock);
    /// assert_eq!(harness.lease(), std::time::Duration::from_secs(1));
    /// ```
    pub fn with_manual_clock(store: Arc<dyn Store>, clock: ManualClock) -> Self {
        Self {
            store,
            time: Time::Manual(clock),
            fences_grow: true,
            native_expiry: false,
            guards: Vec::new(),
        }
    }

    /// The store reads a real clock (e.g. a server's): [`advance`](Harness::advance) sleeps,
    /// so the leases and ttls the suite lets run out are `short` (e.g. 300 ms).
    ///
    /// `short` must be long enough for a few round trips to the store: the suite expects a
    /// lease of `short` to still be live two thirds of `short` after it was taken.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use idempotent_core::conformance::Harness;
    /// use idempotent_core::MemoryStore;
    ///
    /// let harness = Harness::with_real_time(Arc::new(MemoryStore::new()), Duration::from_millis(300));
    /// assert_eq!(harness.lease(), Duration::from_millis(300));
    /// ```
    pub fn with_real_time(store: Arc<dyn Store>, short: Duration) -> Self {
        Self {
            store,
            time: Time::Real { short },
            fences_grow: true,
            native_expiry: false,
            guards: Vec::new(),
        }
    }

    /// Whether the store promises that a key's fences only grow (the default, `true`). With
    /// `false` the suite only checks that fences never repeat.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idempotent_core::{conformance::Harness, ManualClock, MemoryStore};
    /// # let clock = ManualClock::new();
    /// # let store = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    /// let harness = Harness::with_manual_clock(store, clock).fences_grow(false);
    /// ```
    pub fn fences_grow(mut self, grow: bool) -> Self {
        self.fences_grow = grow;
        self
    }

    /// Whether the store deletes expired records by itself (e.g. Redis key expiry), so that
    /// [`Store::purge_expired`] may find nothing left to count. Default `false`: the suite
    /// then requires `purge_expired` to count at least the records it let expire. With `true`
    /// it still requires expired records to be gone and live ones to be kept.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use idempotent_core::{conformance::Harness, MemoryStore};
    /// let harness = Harness::with_real_time(Arc::new(MemoryStore::new()), Duration::from_millis(300))
    ///     .expiry_is_native(true);
    /// ```
    pub fn expiry_is_native(mut self, native: bool) -> Self {
        self.native_expiry = native;
        self
    }

    /// Keeps `guard` alive as long as the harness (and its clones): the temporary folder the
    /// store's database file is in, a server's handle, anything the store must not outlive.
    /// The guards are dropped with the harness's last clone, after the properties ran.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use idempotent_core::conformance::Harness;
    /// use idempotent_core::MemoryStore;
    ///
    /// // A store whose data lives in a temporary folder (here the folder only stands beside a
    /// // memory store; a SQLite store would keep its database file in it).
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().to_owned();
    /// let harness = Harness::with_real_time(Arc::new(MemoryStore::new()), Duration::from_millis(300))
    ///     .keep(dir);
    /// assert!(path.exists(), "the harness keeps the folder");
    /// drop(harness);
    /// assert!(!path.exists(), "the folder goes with the harness");
    /// ```
    pub fn keep(mut self, guard: impl Send + Sync + 'static) -> Self {
        self.guards.push(Arc::new(guard));
        self
    }

    /// The store under test.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Lets `by` pass for the store: moves the manual clock, or sleeps in real time.
    pub async fn advance(&self, by: Duration) {
        match &self.time {
            Time::Manual(clock) => {
                clock.advance(by);
                tokio::task::yield_now().await;
            }
            Time::Real { .. } => tokio::time::sleep(by).await,
        }
    }

    /// The short lease (and unit of short ttls) the suite uses where it lets time run out.
    pub fn lease(&self) -> Duration {
        match &self.time {
            Time::Manual(_) => MANUAL_LEASE,
            Time::Real { short } => *short,
        }
    }

    /// A fresh key, unique across calls, processes and runs (it mixes `label`, the process id,
    /// a counter and the system time), so that several tests can share one store or server.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # use idempotent_core::{conformance::Harness, MemoryStore};
    /// let harness = Harness::with_real_time(Arc::new(MemoryStore::new()), Duration::from_millis(300));
    /// assert_ne!(harness.key("order"), harness.key("order"));
    /// ```
    pub fn key(&self, label: &str) -> StorageKey {
        let count = KEY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let unique = format!("{}:{count}:{nanos}", std::process::id());
        StorageKey::derive(
            &format!("idempotent_core::conformance::{label}"),
            None,
            unique.as_bytes(),
        )
        .expect("a short, non-empty key is always valid")
    }

    /// `by` plus a margin: how far to advance so that something lasting `by` has surely ended.
    pub(super) fn beyond(&self, by: Duration) -> Duration {
        match &self.time {
            Time::Manual(_) => by + Duration::from_millis(1),
            Time::Real { short } => by + (*short / 3).max(Duration::from_millis(20)),
        }
    }

    pub(super) async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Claim {
        self.store
            .claim(key, &CanonicalArguments::from(*fingerprint), lease)
            .await
            .unwrap_or_else(|err| panic!("claim({key}) failed with a store error: {err}"))
    }

    /// Claims `key`, which must be free, and returns the fence.
    pub(super) async fn acquire(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        why: &str,
    ) -> Fence {
        match self.claim(key, fingerprint, lease).await {
            Claim::Acquired { fence } => fence,
            other => panic!(
                "{why}: the protocol requires Claim::Acquired, the store returned {}",
                show(&other)
            ),
        }
    }

    pub(super) async fn complete(
        &self,
        key: &StorageKey,
        fence: Fence,
        output: &[u8],
        ttl: Duration,
    ) -> FencedWrite {
        self.store
            .complete(key, fence, Bytes::copy_from_slice(output), ttl)
            .await
            .unwrap_or_else(|err| {
                panic!("complete({key}, {fence}) failed with a store error: {err}")
            })
    }

    pub(super) async fn release(&self, key: &StorageKey, fence: Fence) -> FencedWrite {
        self.store.release(key, fence).await.unwrap_or_else(|err| {
            panic!("release({key}, {fence}) failed with a store error: {err}")
        })
    }

    pub(super) async fn extend(
        &self,
        key: &StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> FencedWrite {
        self.store
            .extend(key, fence, lease)
            .await
            .unwrap_or_else(|err| panic!("extend({key}, {fence}) failed with a store error: {err}"))
    }

    /// A fence that now holds `key`'s record must be newer than `old`.
    pub(super) fn check_newer(&self, old: Fence, new: Fence, why: &str) {
        if self.fences_grow {
            assert!(
                new > old,
                "{why}: the protocol requires a new fence greater than the earlier {old}, the store handed out {new}"
            );
        } else {
            assert_ne!(
                new, old,
                "{why}: the protocol requires a new fence, never one handed out before; the store handed out {old} again"
            );
        }
    }
}
