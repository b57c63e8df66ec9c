//! The transactional mode: the claim and the recorded result are written in the caller's own
//! transaction, so the body's database writes and the record commit together or not at all.
//!
//! Concurrent callers of one key block on the first one's uncommitted row (its unique key)
//! instead of seeing it in progress; once it commits they replay its result, and if it rolls
//! back one of them runs. That wait is bounded by the call's `on_conflict` (`lock_timeout`,
//! set around the claim and given back its value after it). A claim the caller's own
//! transaction holds is answered at once with `Error::HeldByThisTransaction`. No lease is
//! needed while the row is uncommitted, so there is no heartbeat, and the result is recorded
//! (or the claim deleted) however long the body ran; a panic, a cancelled call or a lost
//! connection roll the transaction back, which takes the claim with it. Use READ COMMITTED
//! (PostgreSQL's default): each claim statement then sees what committed before it. Under
//! REPEATABLE READ or SERIALIZABLE a claim racing another transaction's claim of the same key
//! can fail with a serialization error (SQLSTATE 40001, named in the `Error::Store` message):
//! retry the whole transaction, as for any serialization failure.
//!
//! Statements run with `query_typed`, their parameter types given: `query` with SQL text would
//! prepare the statement first, a round trip of its own on every call, as the caller's
//! connection keeps no prepared statements of ours.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};

use super::sql::{Found, lock_timeout};
use super::{CLAIM_ATTEMPTS, PostgresStore, fence_param, from_pg, judge_claim, millis, sql};
use crate::error::StoreError;
use crate::fingerprint::{CanonicalArguments, Fingerprint};
use crate::key::StorageKey;
use crate::ledger::{Claimed, Keeping, Ledger, WaitBudget, Writes};
use crate::store::{Bytes, Fence, FencedWrite, Store};

/// A transaction the transactional mode can write in: `tokio_postgres`'s or
/// `deadpool_postgres`'s, or a reference to one.
///
/// ```
/// fn accepts(_: &impl idempotent_core::stores::postgres::PostgresTransaction) {}
/// fn with_deadpool(tx: &deadpool_postgres::Transaction<'_>) { accepts(tx) }
/// fn with_tokio_postgres(tx: &tokio_postgres::Transaction<'_>) { accepts(tx) }
/// ```
pub trait PostgresTransaction: Sync {
    /// The underlying `tokio_postgres` transaction.
    fn transaction(&self) -> &tokio_postgres::Transaction<'_>;
}

impl PostgresTransaction for tokio_postgres::Transaction<'_> {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        self
    }
}

impl PostgresTransaction for deadpool_postgres::Transaction<'_> {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        self
    }
}

impl<T: PostgresTransaction + ?Sized> PostgresTransaction for &T {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        (**self).transaction()
    }
}

impl<T: PostgresTransaction + ?Sized + Send> PostgresTransaction for &mut T {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        (**self).transaction()
    }
}

/// The caller's transaction as a [`Ledger`]: the claim, the record and the release are
/// statements in it. The transaction is behind a lock that the ledger takes for each of its
/// statements, so that a body given the transaction as `&mut` (by `#[idempotent(tx = tx)]`)
/// can hold it while it runs: the ledger writes nothing while the body runs. The lock's type is
/// erased, so that the ledger's type does not depend on the transaction's.
pub struct InTransaction<'a> {
    store: &'a PostgresStore,
    tx: &'a (dyn LockTransaction + 'a),
}

impl<'a> InTransaction<'a> {
    pub(crate) fn new(store: &'a PostgresStore, tx: &'a (dyn LockTransaction + 'a)) -> Self {
        Self { store, tx }
    }
}

/// A lock around a transaction the ledger writes in.
pub(crate) trait LockTransaction: Sync {
    fn lock(&self) -> Pin<Box<dyn Future<Output = Box<dyn Locked + '_>> + Send + '_>>;
}

/// A locked transaction.
pub(crate) trait Locked: Send {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_>;
}

struct Guard<'g, T>(tokio::sync::MutexGuard<'g, T>);

impl<T: PostgresTransaction + Send> Locked for Guard<'_, T> {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        self.0.transaction()
    }
}

impl<T: PostgresTransaction + Send> LockTransaction for tokio::sync::Mutex<T> {
    fn lock(&self) -> Pin<Box<dyn Future<Output = Box<dyn Locked + '_>> + Send + '_>> {
        Box::pin(async move { Box::new(Guard(self.lock().await)) as Box<dyn Locked + '_> })
    }
}

impl Ledger for InTransaction<'_> {
    /// Another transaction's uncommitted claim blocks the claim statement; that wait is bounded
    /// by `lock_timeout` (at once when the call rejects conflicts, else what is left of its
    /// wait). A claim held outside any transaction is answered in progress, as by the store.
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
        wait: &'a mut WaitBudget,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + 'a {
        let lock_wait = wait.left();
        async move {
            let fingerprint = arguments.fingerprint();
            Ok(self
                .claim_in(key, &fingerprint, lease, lock_wait)
                .await?
                .claimed(lease))
        }
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + 'a {
        Store::wait(self.store, key, max)
    }

    /// The claim's row stays locked until the transaction ends, which settles it: no lease.
    type Writes = Self;

    fn keeping(&self) -> Keeping<'_, Self> {
        Keeping::Writes(self)
    }
}

impl Writes for InTransaction<'_> {
    async fn complete(
        &self,
        key: &StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> Result<FencedWrite, StoreError> {
        let tx = self.tx.lock().await;
        let completed = tx
            .transaction()
            .query_typed(
                &self.store.statements.complete_in_transaction,
                &[
                    (&key.as_bytes().as_slice(), Type::BYTEA),
                    (&fence_param(fence), Type::INT8),
                    (&&output[..], Type::BYTEA),
                    (&millis(ttl), Type::INT8),
                ],
            )
            .await
            .map_err(|error| from_pg("could not record the result in the transaction", error))?;
        Ok(if completed.is_empty() {
            FencedWrite::Fenced
        } else {
            FencedWrite::Applied
        })
    }

    /// Deletes the claim again; should it fail, the caller's rollback removes it anyway.
    async fn release(&self, key: &StorageKey, fence: Fence) {
        let tx = self.tx.lock().await;
        let released = tx
            .transaction()
            .query_typed(
                &self.store.statements.release_in_transaction,
                &[
                    (&key.as_bytes().as_slice(), Type::BYTEA),
                    (&fence_param(fence), Type::INT8),
                ],
            )
            .await;
        if let Err(error) = released {
            tracing::warn!(target: "idempotent", %error, "could not delete a claim in the transaction; rolling it back removes it");
        }
    }
}

impl InTransaction<'_> {
    /// One claim in `tx`, waiting at most `lock_wait` for another transaction's uncommitted
    /// claim of the key. `lock_timeout` is set for the claim and given its value back after
    /// it; the three statements are sent together, so they cost one round trip.
    async fn claim_in(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        lock_wait: Duration,
    ) -> Result<Found, StoreError> {
        let tx = self.tx.lock().await;
        let tx = tx.transaction();
        let key_param = key.as_bytes().as_slice();
        let fingerprint_param = fingerprint.as_bytes().as_slice();
        let lease = millis(lease);
        let lock_timeout = lock_timeout(lock_wait);
        for _ in 0..CLAIM_ATTEMPTS {
            let set_params: [(&(dyn ToSql + Sync), Type); 1] = [(&lock_timeout, Type::TEXT)];
            let claim_params: [(&(dyn ToSql + Sync), Type); 3] = [
                (&key_param, Type::BYTEA),
                (&fingerprint_param, Type::BYTEA),
                (&lease, Type::INT8),
            ];
            let (set, claimed, restored) = tokio::join!(
                tx.query_typed(sql::SET_LOCK_TIMEOUT, &set_params),
                tx.query_typed(&self.store.statements.claim_in_transaction, &claim_params),
                tx.query_typed(sql::RESTORE_LOCK_TIMEOUT, &[]),
            );
            set.map_err(|error| from_pg("could not bound the claim's wait", error))?;
            let rows = match claimed {
                Ok(rows) => rows,
                Err(error)
                    if error
                        .as_db_error()
                        .is_some_and(|db| db.code().code() == "55P03") =>
                {
                    return Ok(Found::LockTimeout);
                }
                Err(error) => {
                    return Err(from_pg("the claim failed in the transaction", error));
                }
            };
            restored.map_err(|error| from_pg("could not restore lock_timeout", error))?;
            let own = rows
                .first()
                .and_then(|row| row.try_get::<_, Option<bool>>("own").ok().flatten());
            if own == Some(true) {
                return Ok(Found::Own);
            }
            if let Some(claim) = judge_claim(&rows, key, fingerprint)? {
                return Ok(Found::Claim(claim));
            }
        }
        Err(StoreError::Backend {
            message: format!("the record under key {key} kept changing during the claim"),
            source: None,
        })
    }
}
