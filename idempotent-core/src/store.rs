//! The store protocol: claim, complete, release, extend, wait.
//!
//! Every store keeps at most one record per [`StorageKey`], in one of three states:
//!
//! | state       | fields                                        |
//! |-------------|-----------------------------------------------|
//! | absent      | —                                             |
//! | in progress | fingerprint, fence, lease end                 |
//! | completed   | fingerprint, fence, output bytes, expiry time |
//!
//! Each operation is atomic per key. A record whose lease or expiry has passed counts as absent.
//! Fences come from a store-wide source and are never handed out twice, so a holder whose lease
//! was taken over can never write again: its `complete`, `release` and `extend` get
//! [`FencedWrite::Fenced`]. Times are the store's own (its server's clock where it has a server).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use bytes::Bytes;

use crate::error::StoreError;
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;

/// A boxed `Send` future: what [`Store`] methods return, so the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The longest lease or ttl any store holds: 36,500 days (about 100 years).
///
/// [`Options`](crate::Options) refuses longer ones before anything is claimed; a store given a
/// longer one directly holds it as this. Every store can represent it: Redis `PX`, a
/// PostgreSQL `interval` added to `statement_timestamp()`, SQLite's milliseconds since 1970 and
/// the memory store's clock all hold it with room to spare.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(idempotent_core::MAX_DURATION, Duration::from_secs(36_500 * 24 * 60 * 60));
/// ```
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 24 * 60 * 60);

/// A lease or ttl as every store holds it, in whole milliseconds: rounded up (a lease is never
/// shorter than asked), at least 1 (a zero lease would protect nothing; Redis refuses a zero
/// expiry) and at most [`MAX_DURATION`]. Stores that count in milliseconds store this; the
/// memory store holds [`Duration::from_millis`] of it, so a duration means the same on all.
///
/// ```
/// use std::time::Duration;
/// use idempotent_core::{MAX_DURATION, held_millis};
///
/// assert_eq!(held_millis(Duration::from_micros(1)), 1);
/// assert_eq!(held_millis(Duration::from_micros(1500)), 2);
/// assert_eq!(held_millis(Duration::from_secs(2)), 2000);
/// assert_eq!(held_millis(Duration::ZERO), 1);
/// assert_eq!(held_millis(MAX_DURATION), 36_500 * 86_400 * 1000);
/// assert_eq!(held_millis(Duration::MAX), 36_500 * 86_400 * 1000);
/// ```
pub const fn held_millis(duration: Duration) -> u64 {
    let duration = if duration.as_secs() >= MAX_DURATION.as_secs() {
        MAX_DURATION
    } else {
        duration
    };
    let whole = duration.as_secs() * 1000 + duration.subsec_millis() as u64;
    let part = duration.subsec_nanos() % 1_000_000 != 0;
    let millis = if part { whole + 1 } else { whole };
    if millis == 0 { 1 } else { millis }
}

/// The token a store hands to the one caller that holds a key.
///
/// A store never hands the same fence out twice for a key, even after the key's record has
/// expired and vanished; where the store allows it, fences only grow, so a body can pass its
/// fence to downstream systems as a fencing token.
///
/// ```
/// use idempotent_core::Fence;
///
/// assert!(Fence::new(2) > Fence::new(1));
/// assert_eq!(Fence::new(7).get(), 7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence(u64);

impl Fence {
    /// Wraps a fence value read from a store.
    ///
    /// ```
    /// # use idempotent_core::Fence;
    /// let fence = Fence::new(42);
    /// # assert_eq!(fence.get(), 42);
    /// ```
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The fence's value.
    ///
    /// ```
    /// # use idempotent_core::Fence;
    /// assert_eq!(Fence::new(42).get(), 42);
    /// ```
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What [`Store::claim`] found.
///
/// ```
/// use idempotent_core::{Claim, Fence};
///
/// let claim = Claim::Acquired { fence: Fence::new(1) };
/// assert!(matches!(claim, Claim::Acquired { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the key, in progress until its lease ends; it must `complete` or
    /// `release` it with this fence.
    Acquired {
        /// The holder's fence.
        fence: Fence,
    },
    /// Another caller holds the key with the same fingerprint, and its lease is live.
    InProgress {
        /// How long the holder's lease still runs.
        retry_after: Duration,
    },
    /// A live completed record with the same fingerprint: the recorded output, byte for byte.
    Completed {
        /// The bytes passed to [`Store::complete`]. [`Bytes`] so that a store holding the
        /// record in memory hands out a reference-counted view instead of a copy on every
        /// replay; a store that reads the bytes off the wire converts its `Vec<u8>` with
        /// `.into()`, which does not copy.
        output: Bytes,
    },
    /// A live record (in progress or completed) with another fingerprint: the key was reused
    /// with other arguments.
    Mismatch,
}

/// Whether a fenced write ([`Store::complete`], [`Store::release`], [`Store::extend`]) was applied.
///
/// One rule for all three: the write applies only while the record is in progress under the
/// caller's fence and its lease is live.
///
/// ```
/// use idempotent_core::FencedWrite;
///
/// assert!(FencedWrite::Applied.is_applied());
/// assert!(!FencedWrite::Fenced.is_applied());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedWrite {
    /// The record was in progress under this fence with a live lease, and is now changed.
    Applied,
    /// The fence no longer holds the key (taken over, expired, released or completed):
    /// nothing was changed.
    Fenced,
}

impl FencedWrite {
    /// `true` for [`FencedWrite::Applied`].
    ///
    /// ```
    /// # use idempotent_core::FencedWrite;
    /// assert!(FencedWrite::Applied.is_applied());
    /// ```
    pub const fn is_applied(self) -> bool {
        matches!(self, FencedWrite::Applied)
    }
}

/// A place to keep idempotency records: every store implements exactly this protocol.
///
/// The trait is object safe (`Arc<dyn Store>` is how the engine holds a store): methods return
/// boxed `Send` futures. The `conformance` feature's suite checks an implementation.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idempotent_core::{Bytes, CanonicalArguments, Claim, MemoryStore, StorageKey, Store, FencedWrite};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
/// let key = StorageKey::derive("docs", None, b"order-1")?;
/// let arguments = CanonicalArguments::of(&("order-1", 4200))?;
///
/// let Claim::Acquired { fence } = store.claim(&key, &arguments, Duration::from_secs(30)).await? else {
///     unreachable!("a fresh key is free");
/// };
/// let write = store.complete(&key, fence, Bytes::from_static(b"\"receipt\""), Duration::from_secs(3600)).await?;
/// assert_eq!(write, FencedWrite::Applied);
/// assert_eq!(
///     store.claim(&key, &arguments, Duration::from_secs(30)).await?,
///     Claim::Completed { output: Bytes::from_static(b"\"receipt\"") }
/// );
/// # Ok(()) }
/// ```
pub trait Store: Send + Sync + fmt::Debug {
    /// Claims `key` for a call whose arguments are `arguments`.
    ///
    /// Absent (or expired) → in progress with a new fence and a lease of `lease`:
    /// [`Claim::Acquired`]. In progress with a live lease → [`Claim::InProgress`].
    /// Completed and live → [`Claim::Completed`]. Either, with other arguments →
    /// [`Claim::Mismatch`].
    ///
    /// A store compares arguments in the form it keeps: a networked store keeps
    /// `arguments.fingerprint()`; the in-memory store keeps short arguments as they are
    /// ([`CanonicalArguments::exact`]) and compares their bytes, which skips the hashing.
    /// Both forms of the same arguments are equal ([`CanonicalArguments`]), so the outcome
    /// does not depend on the form a caller passes.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idempotent_core::{CanonicalArguments, Claim, Fingerprint, MemoryStore, StorageKey, Store};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryStore::new();
    /// let key = StorageKey::derive("docs", None, b"order-1")?;
    /// let lease = Duration::from_secs(30);
    ///
    /// let arguments = CanonicalArguments::of(&("order-1", 4200))?;
    /// assert!(matches!(store.claim(&key, &arguments, lease).await?, Claim::Acquired { .. }));
    ///
    /// // Arguments known only by their fingerprint are the same arguments.
    /// let hashed = CanonicalArguments::from(Fingerprint::of(&("order-1", 4200))?);
    /// assert!(matches!(store.claim(&key, &hashed, lease).await?, Claim::InProgress { .. }));
    /// # Ok(()) }
    /// ```
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;

    /// Records `output` for `key`, kept for `ttl`, if `key` is in progress under `fence` with a
    /// live lease; otherwise changes nothing and returns [`FencedWrite::Fenced`].
    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>>;

    /// Deletes `key`'s record if it is in progress under `fence` with a live lease, so the key
    /// is claimable at once.
    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>>;

    /// Renews the lease of `key` to `lease` from now, if it is in progress under `fence` with a
    /// live lease: the heartbeat of a long body.
    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>>;

    /// Resolves when `key` is no longer in progress with a live lease (completed, released,
    /// or its lease ran out), or after `max`, whichever comes first. Never a busy loop.
    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes records whose lease or expiry has passed; returns how many. Housekeeping for
    /// stores without native expiry: correctness never depends on it.
    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Deletes `key`'s record whatever its state and fence; returns whether there was one.
    /// For operators: a record that cannot be read (corrupt, or of a changed type) is purged
    /// with it, and the next call runs. Deleting a live claim lets a second caller run while
    /// the first still does, so use it on records known to be dead or wrong.
    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// A short, static name of the kind of store (`"memory"`, `"redis"`, ...): the `store`
    /// label of the store metrics (feature `metrics`, see [`crate::metrics`]). A store of
    /// its own keeps the default, `"custom"`, or names itself; a wrapper names what it wraps.
    ///
    /// ```
    /// use idempotent_core::{MemoryStore, Store};
    /// assert_eq!(MemoryStore::new().kind(), "memory");
    /// ```
    fn kind(&self) -> &'static str {
        "custom"
    }
}

/// A shared store is a store: a wrapper (such as `encryption::EncryptedStore`) can take an
/// `Arc<dyn Store>` the service already holds.
///
/// ```
/// use std::sync::Arc;
/// use idempotent_core::{MemoryStore, Store};
///
/// let shared: Arc<dyn Store> = Arc::new(MemoryStore::new());
/// fn kind_of(store: &impl Store) -> &'static str { store.kind() }
/// assert_eq!(kind_of(&shared), "memory");
/// ```
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        (**self).claim(key, arguments, lease)
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        (**self).complete(key, fence, output, ttl)
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        (**self).release(key, fence)
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        (**self).extend(key, fence, lease)
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).wait(key, max)
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        (**self).purge_expired()
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).remove(key)
    }

    fn kind(&self) -> &'static str {
        (**self).kind()
    }
}
