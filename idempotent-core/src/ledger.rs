//! Where a call's records are written: the seam between the engine, which drives the protocol
//! (claim, wait, run, encode, record), and what holds the records.
//!
//! Two kinds of ledger exist. [`StoreHandle`]'s store, through the store's own connections: the
//! claim lives under a lease that the engine renews while the body runs, gives back if the call
//! ends before the body returned, and finishes recording if the call is dropped after. And the
//! stores' transactional modes (`stores/postgres/transaction.rs`, `stores/sqlx_*/transaction.rs`,
//! `stores/sqlite/transaction.rs`), which write the claim and the record as statements in the
//! caller's transaction: the transaction's end settles the claim (a rollback removes it), so
//! there is no lease to keep. A ledger supplies the
//! statements; the engine alone decides what follows each answer.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, StoreError};
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::metrics::{StoreOperation, timed};
use crate::store::{Bytes, Claim, Fence, FencedWrite, Store};

/// What one claim through a ledger found.
#[derive(Debug)]
pub(crate) enum Claimed {
    /// The store's answer ([`Store::claim`]).
    Claim(Claim),
    /// An answer with nothing to wait for: the key is held by this very caller (a call around
    /// this one, or an earlier call in the same transaction), or a transaction's wait for
    /// another's uncommitted claim ran out.
    Refused(Error),
}

/// How long a call may still wait for another holder of its key, under its `on_conflict`.
/// The clock is read only when someone asks: a replay never does.
#[derive(Debug)]
pub(crate) struct WaitBudget {
    /// `None` when the call rejects conflicts instead of waiting.
    timeout: Option<Duration>,
    deadline: Option<tokio::time::Instant>,
}

impl WaitBudget {
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            deadline: None,
        }
    }

    /// What is left of the wait, counted from the first time anyone asked; zero when the call
    /// rejects conflicts.
    pub(crate) fn left(&mut self) -> Duration {
        let Some(timeout) = self.timeout else {
            return Duration::ZERO;
        };
        let now = tokio::time::Instant::now();
        let deadline = *self.deadline.get_or_insert(now + timeout);
        deadline.saturating_duration_since(now)
    }
}

/// Where a call's records are written. See the module docs.
///
/// Neither a ledger nor its futures need be `Send` or `Sync`: the rusqlite transactional mode
/// writes through a `rusqlite::Transaction`, which is neither, so its calls' futures are not
/// `Send`. The other ledgers' futures still are, as the compiler sees through each `impl
/// Future` to the type behind it (`tests/*_transactional.rs` spawn such calls).
pub(crate) trait Ledger {
    /// One claim of `key` for `arguments` with a lease of `lease`. A ledger whose claim can
    /// itself block (behind a transaction's uncommitted claim) bounds that by `wait.left()`.
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
        wait: &'a mut WaitBudget,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + 'a;

    /// Resolves when `key` may be claimable, or after `max` ([`Store::wait`]).
    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + 'a;

    /// Whatever holds the claim writes nothing itself ([`NoWrites`]) when it is kept under a
    /// lease; a transaction writes the record and the release as its statements.
    type Writes: Writes;

    /// How the claim is kept until it is settled.
    fn keeping(&self) -> Keeping<'_, Self::Writes>;
}

/// How a ledger keeps a claim until it is settled.
pub(crate) enum Keeping<'a, W> {
    /// Under a lease in this store: the engine keeps the lease alive and settles the claim
    /// through the store, whatever becomes of the call.
    Lease(&'a dyn StoreHandle),
    /// In something whose end settles it (a transaction, whose rollback removes the claim):
    /// the record or the release is written once, through these writes: the stores'
    /// transactional modes.
    #[cfg_attr(
        not(any(
            feature = "postgres",
            feature = "sqlx-postgres",
            feature = "sqlx-sqlite",
            feature = "sqlite"
        )),
        allow(dead_code)
    )]
    Writes(&'a W),
}

/// The writes that settle a claim kept without a lease.
pub(crate) trait Writes {
    /// Records `output` under `fence` ([`Store::complete`]); a failure is final.
    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<FencedWrite, StoreError>> + 'a;

    /// Gives the claim back ([`Store::release`]); a failure is the writer's to report, as the
    /// claim is settled anyway when what holds it ends.
    fn release<'a>(&'a self, key: &'a StorageKey, fence: Fence) -> impl Future<Output = ()> + 'a;
}

/// The writes of a ledger that keeps its claims under a lease: there are none, and no value
/// of this type can exist.
pub(crate) enum NoWrites {}

impl Writes for NoWrites {
    async fn complete(
        &self,
        _: &StorageKey,
        _: Fence,
        _: Bytes,
        _: Duration,
    ) -> Result<FencedWrite, StoreError> {
        match *self {}
    }

    async fn release(&self, _: &StorageKey, _: Fence) {
        match *self {}
    }
}

/// A store as the engine takes it: borrowed for everything a call does, and shared with the
/// task that settles a claim if the call is dropped. What `store = ...` accepts.
#[diagnostic::on_unimplemented(
    message = "`store = ...` needs an `Arc` of a store, found `{Self}`",
    label = "not an `Arc<impl Store>` or `Arc<dyn Store>`",
    note = "keep the store in an `Arc` (for example `Arc<MemoryStore>` or `Arc<dyn Store>`) and pass that"
)]
pub trait StoreHandle: Sync {
    /// The store, borrowed: all a call needs unless it runs its body.
    fn as_store(&self) -> &dyn Store;
    /// The store, shared: kept by a call that runs its body until its claim is settled.
    fn to_store(&self) -> Arc<dyn Store>;
}

impl<S: Store + 'static> StoreHandle for Arc<S> {
    fn as_store(&self) -> &dyn Store {
        &**self
    }

    fn to_store(&self) -> Arc<dyn Store> {
        Arc::clone(self) as Arc<dyn Store>
    }
}

impl StoreHandle for Arc<dyn Store> {
    fn as_store(&self) -> &dyn Store {
        &**self
    }

    fn to_store(&self) -> Arc<dyn Store> {
        Arc::clone(self)
    }
}

impl<T: StoreHandle + ?Sized> StoreHandle for &T {
    fn as_store(&self) -> &dyn Store {
        (**self).as_store()
    }

    fn to_store(&self) -> Arc<dyn Store> {
        (**self).to_store()
    }
}

/// The store's own connections: claims under a lease.
pub(crate) struct Leased<'a> {
    handle: &'a dyn StoreHandle,
    store: &'a dyn Store,
}

impl<'a> Leased<'a> {
    pub(crate) fn new(handle: &'a dyn StoreHandle) -> Self {
        Self {
            store: handle.as_store(),
            handle,
        }
    }
}

impl Ledger for Leased<'_> {
    type Writes = NoWrites;

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
        _: &'a mut WaitBudget,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + 'a {
        let claim = timed(
            self.store,
            StoreOperation::Claim,
            self.store.claim(key, arguments, lease),
        );
        async move {
            match claim.await? {
                // Waiting for a claim that a call around this one holds would wait for itself.
                Claim::InProgress { .. } if crate::context::held_by_this_task(self.store, key) => {
                    Ok(Claimed::Refused(Error::Reentered))
                }
                claim => Ok(Claimed::Claim(claim)),
            }
        }
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + 'a {
        timed(self.store, StoreOperation::Wait, self.store.wait(key, max))
    }

    fn keeping(&self) -> Keeping<'_, NoWrites> {
        Keeping::Lease(self.handle)
    }
}
