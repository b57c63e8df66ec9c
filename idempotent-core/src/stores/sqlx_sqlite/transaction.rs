//! The transactional mode on sqlx SQLite: the claim and the recorded result are statements in
//! the caller's `sqlx::Transaction<'_, Sqlite>`, so the body's writes and the record commit
//! together or not at all.
//!
//! SQLite has one writer at a time. A transaction's claim takes the database's write lock and
//! holds it until the transaction ends, so a second transaction's claim of any key waits for
//! the first to commit or roll back (the connection's busy timeout bounds that wait; it is not
//! the call's `on_conflict`), then replays the committed record or, after a rollback, runs.
//! Begin such transactions with `BEGIN IMMEDIATE` (`pool.begin_with("BEGIN IMMEDIATE")`): the
//! wait then happens at `BEGIN`, under the busy timeout. A deferred transaction that read
//! before its claim cannot wait for the lock once another connection committed after its read
//! (SQLite answers `SQLITE_BUSY` at once): its claim is then [`Error::Conflict`], and the
//! transaction should be rolled back and retried.
//!
//! A claim in progress that was committed outside this transaction (by the store under a
//! lease) is answered [`Error::Conflict`] at once instead of being waited for: the wait would
//! hold the write lock that the holder needs to record its result.
//!
//! A claim this transaction itself wrote (an earlier call in it that was cancelled, or is still
//! running) is [`Error::HeldByThisTransaction`]: each claim also writes its key and fence into
//! a temporary table of the connection (`temp.idempotent_claimed_here`), which a rollback
//! empties with the rest of the transaction. If a transaction is committed with such a claim
//! still in progress (against the advice to roll back), later transactions on the same pooled
//! connection see that claim as their own until its lease ends, and answer
//! `HeldByThisTransaction` instead of `Conflict`. The table keeps one row of a key and a fence
//! per key claimed on the connection, for the connection's life.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{Sqlite, SqliteConnection, Transaction};

use super::SqlxSqliteStore;
use super::ops::{self, Seen};
use crate::engine::{Call, Outcome, execute};
use crate::error::{Error, StoreError};
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::ledger::{Claimed, Keeping, Ledger, WaitBudget, Writes};
use crate::options::Options;
use crate::recorded::OkOnly;
use crate::store::{Bytes, Claim, Fence, FencedWrite, Store};
use crate::stores::sqlite_format::{
    self as format, CREATE_CLAIMED_HERE, SELECT_CLAIMED_HERE, State,
};
use crate::stores::sqlx_tx::LockConnection;

/// The caller's transaction as a [`Ledger`]: the claim, the record and the release are
/// statements in it. The engine and the body take turns on the one `&mut` transaction through
/// the mutex: the ledger locks it for each of its statements, the body holds it while it runs.
pub struct InSqlxSqliteTransaction<'a> {
    store: &'a SqlxSqliteStore,
    tx: &'a (dyn LockConnection<SqliteConnection> + 'a),
}

impl<'a> InSqlxSqliteTransaction<'a> {
    pub(crate) fn new(
        store: &'a SqlxSqliteStore,
        tx: &'a (dyn LockConnection<SqliteConnection> + 'a),
    ) -> Self {
        Self { store, tx }
    }
}

/// A conflict whose holder's lease is unknown: at most this call's kind of lease.
fn busy_conflict(lease: Duration) -> Claimed {
    Claimed::Refused(Error::Conflict { retry_after: lease })
}

async fn claimed_here(
    connection: &mut SqliteConnection,
    key: &StorageKey,
    fence: i64,
) -> Result<bool, StoreError> {
    let failed = |error| ops::from_sqlx("could not look up the transaction's own claims", error);
    sqlx::query(CREATE_CLAIMED_HERE)
        .execute(&mut *connection)
        .await
        .map_err(failed)?;
    let found = sqlx::query(SELECT_CLAIMED_HERE)
        .bind(key.as_bytes().as_slice())
        .bind(fence)
        .fetch_optional(&mut *connection)
        .await
        .map_err(failed)?;
    Ok(found.is_some())
}

async fn mark_claimed_here(
    connection: &mut SqliteConnection,
    key: &StorageKey,
    fence: Fence,
) -> Result<(), StoreError> {
    // Both statements in one round trip; the key is written as hex and the fence as a number,
    // so nothing but those two values is spliced into the text.
    let statements = format!(
        "{CREATE_CLAIMED_HERE}; INSERT OR REPLACE INTO temp.idempotent_claimed_here (key, fence) VALUES (X'{}', {});",
        key.to_hex(),
        fence.get()
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(statements))
        .execute(&mut *connection)
        .await
        .map_err(|error| ops::from_sqlx("could not note the transaction's claim", error))?;
    Ok(())
}

impl InSqlxSqliteTransaction<'_> {
    async fn claim_in(
        &self,
        key: &StorageKey,
        arguments: &CanonicalArguments,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let fingerprint = arguments.fingerprint();
        let mut tx = self.tx.lock().await;
        let connection: &mut SqliteConnection = &mut tx;
        for _ in 0..super::CLAIM_ATTEMPTS {
            let record = ops::read(&mut *connection, key, true).await?;
            let now = format::now_ms();
            let in_progress = record
                .as_ref()
                .filter(|record| matches!(record.state, State::InProgress) && record.is_live(now))
                .map(|record| record.fence);
            match ops::judge(record, &fingerprint, now) {
                Seen::Answer(Claim::InProgress { retry_after }) => {
                    let fence = in_progress.unwrap_or(-1);
                    return Ok(if claimed_here(connection, key, fence).await? {
                        Claimed::Refused(Error::HeldByThisTransaction)
                    } else {
                        Claimed::Refused(Error::Conflict { retry_after })
                    });
                }
                Seen::Answer(claim) => return Ok(Claimed::Claim(claim)),
                Seen::Free(seen) => {
                    match ops::take(&mut *connection, key, &fingerprint, lease, seen).await {
                        Ok(Some(fence)) => {
                            mark_claimed_here(connection, key, fence).await?;
                            return Ok(Claimed::Claim(Claim::Acquired { fence }));
                        }
                        Ok(None) => {}
                        Err(StoreError::Unavailable {
                            source: Some(source),
                            ..
                        }) if source
                            .downcast_ref::<sqlx::Error>()
                            .is_some_and(ops::is_busy) =>
                        {
                            return Ok(busy_conflict(lease));
                        }
                        Err(error) => return Err(error),
                    }
                }
            }
        }
        Err(StoreError::Backend {
            message: format!("the record under key {key} kept changing during the claim"),
            source: None,
        })
    }
}

impl Ledger for InSqlxSqliteTransaction<'_> {
    /// The claim never waits for another holder (see the module docs): a claim in progress is
    /// `Conflict` or `HeldByThisTransaction` at once.
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
        _: &'a mut WaitBudget,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + 'a {
        self.claim_in(key, arguments, lease)
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + 'a {
        Store::wait(self.store, key, max)
    }

    /// The transaction's end settles the claim: no lease.
    type Writes = Self;

    fn keeping(&self) -> Keeping<'_, Self> {
        Keeping::Writes(self)
    }
}

impl Writes for InSqlxSqliteTransaction<'_> {
    async fn complete(
        &self,
        key: &StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> Result<FencedWrite, StoreError> {
        let mut tx = self.tx.lock().await;
        ops::complete(&mut **tx, key, fence, &output, ttl).await
    }

    /// Deletes the claim again; should it fail, the caller's rollback removes it anyway.
    async fn release(&self, key: &StorageKey, fence: Fence) {
        let mut tx = self.tx.lock().await;
        if let Err(error) = ops::release(&mut **tx, key, fence).await {
            tracing::warn!(target: "idempotent", %error, "could not delete a claim in the transaction; rolling it back removes it");
        }
    }
}

impl SqlxSqliteStore {
    /// Runs `body` under `call` inside the caller's transaction `tx`: the claim and the
    /// recorded value are written in `tx`, so they commit (or roll back) with the body's own
    /// writes in `tx`. The body gets `tx` back to write with. The caller commits; on an `Err`
    /// the claim is deleted again, and the caller should roll back.
    ///
    /// Begin `tx` with `BEGIN IMMEDIATE` (`pool.begin_with("BEGIN IMMEDIATE")`): SQLite has one
    /// writer, so a second transaction then waits at its `BEGIN` (for the connection's busy
    /// timeout) until the first commits, and replays its record, or runs if it rolled back.
    /// A claim found in progress is answered at once, [`Error::HeldByThisTransaction`] if
    /// this transaction wrote it (an earlier call in it that was cancelled), else
    /// [`Error::Conflict`]; `options`' `on_conflict` does not make it wait, as waiting would
    /// hold the write lock the holder needs. See the [module docs](super) for the rest.
    ///
    /// ```
    /// use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
    /// use idempotent_core::{Call, Fingerprint, Options, Outcome};
    /// use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
    ///
    /// #[derive(Debug)]
    /// enum ShopError { Database(sqlx::Error), Idempotency(idempotent_core::Error) }
    /// impl From<idempotent_core::Error> for ShopError {
    ///     fn from(e: idempotent_core::Error) -> Self { ShopError::Idempotency(e) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let path = std::env::temp_dir().join(format!("idempotent-sqlx-tx-{}.sqlite3", std::process::id()));
    /// # let _ = std::fs::remove_file(&path);
    /// let pool = SqlitePool::connect_with(
    ///     SqliteConnectOptions::new().filename(&path).create_if_missing(true)
    ///         .journal_mode(SqliteJournalMode::Wal),
    /// ).await?;
    /// sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY)").execute(&pool).await?;
    /// let store = SqlxSqliteStore::builder(pool.clone()).build().await?;
    ///
    /// for _ in 0..2 {
    ///     let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    ///     let call = Call::new("orders::create", Fingerprint::of(&42)?).key("order-42");
    ///     let order = store
    ///         .run_in_transaction(&mut tx, &Options::new(), call, async |tx| {
    ///             sqlx::query("INSERT INTO orders (id) VALUES (42)")
    ///                 .execute(&mut **tx)
    ///                 .await
    ///                 .map_err(ShopError::Database)?;
    ///             Ok::<_, ShopError>(42)
    ///         })
    ///         .await;
    ///     if order.is_ok() {
    ///         tx.commit().await?;
    ///     }
    /// }
    /// // The second run replayed the first's result and wrote no row.
    /// let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&pool).await?;
    /// assert_eq!(orders, 1);
    /// # drop(pool);
    /// # let _ = std::fs::remove_file(&path);
    /// # Ok(()) }
    /// ```
    pub async fn run_in_transaction<T, E, F>(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        options: &Options,
        call: Call<'_>,
        body: F,
    ) -> Result<Outcome<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: AsyncFnOnce(&mut Transaction<'_, Sqlite>) -> Result<T, E>,
    {
        let tx = tokio::sync::Mutex::new(tx);
        let ledger = InSqlxSqliteTransaction::new(self, &tx);
        let body = async {
            let mut tx = tx.lock().await;
            body(&mut tx).await
        };
        execute::<OkOnly, T, E, _>(&ledger, options, call.prepare(), body).await
    }
}
