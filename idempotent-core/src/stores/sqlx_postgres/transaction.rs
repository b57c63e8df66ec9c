//! The transactional mode on sqlx: the claim and the recorded result are written in the
//! caller's own `sqlx::Transaction<'_, Postgres>`, so the body's database writes and the
//! record commit together or not at all. The semantics and the statements are those of
//! `PostgresStore`'s transactional mode (`stores/postgres/transaction.rs`): concurrent callers
//! of one key block on the first one's uncommitted row, for no longer than the call's
//! `on_conflict` allows (`lock_timeout`, set around the claim and given back its value after
//! it); a claim the caller's own transaction holds is `Error::HeldByThisTransaction`; no lease,
//! no heartbeat.
//!
//! The engine and the body take turns on the one `&mut` transaction through a mutex: the
//! ledger locks it for the claim and for the record or the release, the body holds it while
//! it runs. sqlx runs one statement per round trip, so the claim costs three (setting
//! `lock_timeout`, the claim, giving `lock_timeout` its value back) where tokio-postgres
//! pipelines them into one; the statements are prepared once per connection (sqlx's statement
//! cache), the caller's connection included.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::Mutex;

use super::error::{from_sqlx, sqlstate};
use super::{SqlxPgStore, millis, record};
use crate::engine::{Call, Outcome, execute};
use crate::error::{Error, StoreError};
use crate::fingerprint::{CanonicalArguments, Fingerprint};
use crate::key::StorageKey;
use crate::ledger::{Claimed, Keeping, Ledger, WaitBudget, Writes};
use crate::options::Options;
use crate::recorded::OkOnly;
use crate::store::{Bytes, Fence, FencedWrite, Store};
use crate::stores::postgres_sql::{
    CLAIM_ATTEMPTS, Found, RESTORE_LOCK_TIMEOUT, SET_LOCK_TIMEOUT, fence_param, lock_timeout,
};
use crate::stores::sqlx_tx::LockConnection;

/// The caller's sqlx transaction as a [`Ledger`]: the claim, the record and the release are
/// statements in it, each run with the transaction locked.
pub struct InSqlxPgTransaction<'a> {
    store: &'a SqlxPgStore,
    tx: &'a (dyn LockConnection<PgConnection> + 'a),
}

impl<'a> InSqlxPgTransaction<'a> {
    pub(crate) fn new(
        store: &'a SqlxPgStore,
        tx: &'a (dyn LockConnection<PgConnection> + 'a),
    ) -> Self {
        Self { store, tx }
    }
}

impl Ledger for InSqlxPgTransaction<'_> {
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

impl Writes for InSqlxPgTransaction<'_> {
    async fn complete(
        &self,
        key: &StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> Result<FencedWrite, StoreError> {
        let mut tx = self.tx.lock().await;
        let completed = sqlx::query(self.store.statements.complete_in_transaction.clone())
            .bind(key.as_bytes().as_slice())
            .bind(fence_param(fence))
            .bind(&output[..])
            .bind(millis(ttl))
            .fetch_all(&mut **tx)
            .await
            .map_err(|error| from_sqlx("could not record the result in the transaction", error))?;
        Ok(if completed.is_empty() {
            FencedWrite::Fenced
        } else {
            FencedWrite::Applied
        })
    }

    /// Deletes the claim again; should it fail, the caller's rollback removes it anyway.
    async fn release(&self, key: &StorageKey, fence: Fence) {
        let mut tx = self.tx.lock().await;
        let released = sqlx::query(self.store.statements.release_in_transaction.clone())
            .bind(key.as_bytes().as_slice())
            .bind(fence_param(fence))
            .fetch_all(&mut **tx)
            .await;
        if let Err(error) = released {
            tracing::warn!(target: "idempotent", %error, "could not delete a claim in the transaction; rolling it back removes it");
        }
    }
}

impl InSqlxPgTransaction<'_> {
    /// One claim in the transaction, waiting at most `lock_wait` for another transaction's
    /// uncommitted claim of the key. `lock_timeout` is set for the claim and given its value
    /// back after it: three statements, one after the other.
    async fn claim_in(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        lock_wait: Duration,
    ) -> Result<Found, StoreError> {
        let mut tx = self.tx.lock().await;
        let key_param = key.as_bytes().as_slice();
        let fingerprint_param = fingerprint.as_bytes().as_slice();
        let lease = millis(lease);
        let lock_timeout = lock_timeout(lock_wait);
        for _ in 0..CLAIM_ATTEMPTS {
            sqlx::query(SET_LOCK_TIMEOUT)
                .bind(&lock_timeout)
                .execute(&mut **tx)
                .await
                .map_err(|error| from_sqlx("could not bound the claim's wait", error))?;
            let claimed: Result<Vec<PgRow>, sqlx::Error> =
                sqlx::query(self.store.statements.claim_in_transaction.clone())
                    .bind(key_param)
                    .bind(fingerprint_param)
                    .bind(lease)
                    .fetch_all(&mut **tx)
                    .await;
            let rows = match claimed {
                Ok(rows) => rows,
                Err(error) if sqlstate(&error).as_deref() == Some("55P03") => {
                    return Ok(Found::LockTimeout);
                }
                Err(error) => {
                    return Err(from_sqlx("the claim failed in the transaction", error));
                }
            };
            sqlx::query(RESTORE_LOCK_TIMEOUT)
                .execute(&mut **tx)
                .await
                .map_err(|error| from_sqlx("could not restore lock_timeout", error))?;
            if record::own_claim(&rows) {
                return Ok(Found::Own);
            }
            if let Some(claim) = record::judge_claim(&rows, key, fingerprint)? {
                return Ok(Found::Claim(claim));
            }
        }
        Err(StoreError::Backend {
            message: format!("the record under key {key} kept changing during the claim"),
            source: None,
        })
    }
}

impl SqlxPgStore {
    /// Runs `body` under `call` inside the caller's transaction `tx`: the claim and the
    /// recorded value are written in `tx`, so they commit (or roll back) with the body's own
    /// writes in `tx`, which `body` is given. The caller commits; on an `Err` the claim is
    /// deleted again, and the caller should roll back.
    ///
    /// Another transaction's uncommitted claim of the same key blocks this call's claim until
    /// that transaction ends, for no longer than `options`' `on_conflict` allows (at once when
    /// rejecting, else the rest of the wait): then [`Error::Conflict`], and `tx` is aborted
    /// (PostgreSQL aborts a transaction whose statement failed), so roll it back and retry in a
    /// new one. A key that `tx` itself holds, claimed by an earlier call in it that was
    /// cancelled, is [`Error::HeldByThisTransaction`] at once: that call's writes may be in
    /// `tx`, so the body is not run again in it. Use READ COMMITTED (PostgreSQL's default);
    /// under REPEATABLE READ or SERIALIZABLE a claim racing another transaction's claim of the
    /// same key can fail with a serialization error (SQLSTATE 40001): retry the whole
    /// transaction.
    ///
    /// ```no_run
    /// use idempotent_core::{Call, Fingerprint, Options, stores::sqlx_postgres::SqlxPgStore};
    ///
    /// #[derive(Debug)]
    /// enum ShopError { Database(sqlx::Error), Idempotency(idempotent_core::Error) }
    /// impl From<idempotent_core::Error> for ShopError {
    ///     fn from(e: idempotent_core::Error) -> Self { ShopError::Idempotency(e) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/shop").await?;
    /// let store = SqlxPgStore::builder(pool.clone()).build().await?;
    /// let mut tx = pool.begin().await?;
    /// let call = Call::new("orders::create", Fingerprint::of(&42)?).key("order-42");
    /// let order = store
    ///     .run_in_transaction(&mut tx, &Options::new(), call, async |tx| {
    ///         sqlx::query("INSERT INTO orders (id) VALUES (42)")
    ///             .execute(&mut **tx)
    ///             .await
    ///             .map_err(ShopError::Database)?;
    ///         Ok::<_, ShopError>(42)
    ///     })
    ///     .await;
    /// if order.is_ok() {
    ///     tx.commit().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn run_in_transaction<T, E, F>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        options: &Options,
        call: Call<'_>,
        body: F,
    ) -> Result<Outcome<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: AsyncFnOnce(&mut Transaction<'_, Postgres>) -> Result<T, E>,
    {
        let tx = Mutex::new(tx);
        let ledger = InSqlxPgTransaction::new(self, &tx);
        let body = async {
            let mut guard = tx.lock().await;
            body(&mut **guard).await
        };
        execute::<OkOnly, T, E, _>(&ledger, options, call.prepare(), body).await
    }
}
