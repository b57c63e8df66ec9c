//! The transactional mode on rusqlite: the claim and the recorded result are statements in
//! the caller's `rusqlite::Transaction`, so the body's writes and the record commit together
//! or not at all. The statements are the ones the sqlx SQLite store runs in its transactional
//! mode (`stores/sqlite_format.rs`), with the same answers (`stores/sqlx_sqlite/transaction.rs`).
//!
//! `rusqlite::Transaction` is neither `Send` nor `Sync`, so a call in this mode is a future
//! that is not `Send`, and its statements run synchronously on the thread that polls it: a
//! statement that waits for SQLite's write lock (the connection's busy timeout) blocks that
//! thread, as every statement on the transaction does.
//!
//! SQLite has one writer at a time. A transaction's claim takes the database's write lock and
//! holds it until the transaction ends, so a second transaction's claim of any key waits for
//! the first to commit or roll back, then replays the committed record or, after a rollback,
//! runs. Begin such transactions with `TransactionBehavior::Immediate`: the wait then happens
//! at `BEGIN`, under the busy timeout. A deferred transaction that read before its claim cannot
//! wait for the lock once another connection committed after its read (SQLite answers
//! `SQLITE_BUSY` at once): its claim is then [`Error::Conflict`], and the transaction should be
//! rolled back and retried.
//!
//! A claim in progress that was committed outside this transaction (by the store under a
//! lease) is answered [`Error::Conflict`] at once instead of being waited for: the wait would
//! hold the write lock that the holder needs to record its result.
//!
//! A claim this transaction itself wrote (an earlier call in it that was cancelled, or is still
//! running) is [`Error::HeldByThisTransaction`]: each claim also writes its key and fence into
//! a temporary table of the connection (`temp.idempotent_claimed_here`), which a rollback
//! empties with the rest of the transaction. If a transaction is committed with such a claim
//! still in progress (against the advice to roll back), later transactions on the same
//! connection see that claim as their own until its lease ends, and answer
//! `HeldByThisTransaction` instead of `Conflict`.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Transaction, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::SqliteStore;
use super::ops::{self, OpError};
use crate::engine::{Call, Outcome, execute};
use crate::error::{Error, StoreError};
use crate::fingerprint::{CanonicalArguments, Fingerprint};
use crate::key::StorageKey;
use crate::ledger::{Claimed, Keeping, Ledger, WaitBudget, Writes};
use crate::options::Options;
use crate::recorded::OkOnly;
use crate::store::{Bytes, Claim, Fence, FencedWrite, Store};
use crate::stores::sqlite_format::{
    self as format, CLAIM, COMPLETE, CREATE_CLAIMED_HERE, INSERT_CLAIMED_HERE, RELEASE,
    SELECT_CLAIMED_HERE, Seen, State,
};

/// How many times a claim reads again after the record changed between its read and its write.
const CLAIM_ATTEMPTS: usize = 16;

/// The connection of a locked transaction.
pub(crate) type Locked<'g> = Box<dyn Deref<Target = Connection> + 'g>;

/// The caller's transaction, as the ledger reaches it: the ledger's type then names neither
/// the transaction's lifetimes nor how it is held, so the `#[idempotent(tx = tx)]` runner,
/// which is generic over the transaction, holds a ledger of one type.
pub(crate) trait LockSqliteTransaction {
    /// Waits for the transaction, and holds it until the answer is dropped.
    fn lock(&self) -> Pin<Box<dyn Future<Output = Locked<'_>> + '_>>;
}

/// A transaction the caller lends for the whole call ([`SqliteStore::run_in_transaction`]):
/// the body and the ledger share it, as its statements take `&self`.
impl LockSqliteTransaction for Transaction<'_> {
    fn lock(&self) -> Pin<Box<dyn Future<Output = Locked<'_>> + '_>> {
        let connection: &Connection = self;
        Box::pin(std::future::ready(Box::new(connection) as Locked<'_>))
    }
}

/// The attribute's cell around a `&` or `&mut` transaction, locked.
struct Guard<'g, T>(tokio::sync::MutexGuard<'g, T>);

impl Deref for Guard<'_, &Transaction<'_>> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.0
    }
}

impl Deref for Guard<'_, &mut Transaction<'_>> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.0
    }
}

/// The attribute's cell around a `&` transaction (`tx: &rusqlite::Transaction<'_>`).
impl LockSqliteTransaction for tokio::sync::Mutex<&Transaction<'_>> {
    fn lock(&self) -> Pin<Box<dyn Future<Output = Locked<'_>> + '_>> {
        Box::pin(async move { Box::new(Guard(self.lock().await)) as Locked<'_> })
    }
}

/// The attribute's cell around a `&mut` transaction, which the body holds while it runs.
impl LockSqliteTransaction for tokio::sync::Mutex<&mut Transaction<'_>> {
    fn lock(&self) -> Pin<Box<dyn Future<Output = Locked<'_>> + '_>> {
        Box::pin(async move { Box::new(Guard(self.lock().await)) as Locked<'_> })
    }
}

/// The caller's transaction as a [`Ledger`]: the claim, the record and the release are
/// statements in it, run on the thread that polls the call.
pub struct InSqliteTransaction<'a> {
    store: &'a SqliteStore,
    tx: &'a (dyn LockSqliteTransaction + 'a),
}

impl<'a> InSqliteTransaction<'a> {
    pub(crate) fn new(store: &'a SqliteStore, tx: &'a (dyn LockSqliteTransaction + 'a)) -> Self {
        Self { store, tx }
    }
}

/// A rusqlite error on the caller's connection as a store error: a database still locked
/// after the connection's busy timeout is `Unavailable`; a database without the store's
/// tables is a transaction on the wrong file; the rest is `Backend`.
fn from_caller(context: &str, error: rusqlite::Error) -> StoreError {
    if is_busy(&error) {
        return StoreError::Unavailable {
            message: format!(
                "{context}: the SQLite database stayed locked by another connection for longer than the transaction's connection's busy timeout; raise it (Connection::busy_timeout) or shorten the other writers' transactions"
            ),
            source: Some(Box::new(error)),
        };
    }
    let message = if error.to_string().contains("no such table: idempotent_") {
        format!(
            "{context}: {error}; the transaction's database has none of the store's tables: begin the transaction on a connection to the SqliteStore's own database file (SqliteStore::path)"
        )
    } else {
        format!("{context}: {error}")
    };
    StoreError::Backend {
        message,
        source: Some(Box::new(error)),
    }
}

fn from_op(error: OpError) -> StoreError {
    match error {
        OpError::Sqlite(context, error) => from_caller(context, error),
        OpError::Store(error) => error,
    }
}

/// SQLite's "busy" or "locked": the write lock stayed taken for longer than the busy timeout,
/// or could not be waited for at all.
fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn fence_param(fence: Fence) -> i64 {
    // A fence this store handed out fits; a larger one is held by nothing here.
    i64::try_from(fence.get()).unwrap_or(-1)
}

/// Whether this connection's transactions claimed `key` under `fence`.
fn claimed_here(connection: &Connection, key: &StorageKey, fence: i64) -> Result<bool, StoreError> {
    let failed = |error| from_caller("could not look up the transaction's own claims", error);
    connection
        .execute(CREATE_CLAIMED_HERE, [])
        .map_err(failed)?;
    let found = connection
        .prepare_cached(SELECT_CLAIMED_HERE)
        .and_then(|mut statement| {
            statement
                .query_row(params![key.as_bytes().as_slice(), fence], |_| Ok(()))
                .optional()
        })
        .map_err(failed)?;
    Ok(found.is_some())
}

fn mark_claimed_here(
    connection: &Connection,
    key: &StorageKey,
    fence: Fence,
) -> Result<(), StoreError> {
    let failed = |error| from_caller("could not note the transaction's claim", error);
    connection
        .execute(CREATE_CLAIMED_HERE, [])
        .map_err(failed)?;
    connection
        .prepare_cached(INSERT_CLAIMED_HERE)
        .and_then(|mut statement| {
            statement.execute(params![key.as_bytes().as_slice(), fence_param(fence)])
        })
        .map_err(failed)?;
    Ok(())
}

/// The one-statement claim of a key seen free ([`CLAIM`]): the fence taken, as SQLite holds
/// it, or `None` if the record changed since it was read.
fn take(
    connection: &Connection,
    key: &StorageKey,
    fingerprint: &Fingerprint,
    lease: Duration,
    seen: Option<i64>,
) -> Result<Option<Value>, rusqlite::Error> {
    let now = format::now_ms();
    connection
        .prepare_cached(CLAIM)?
        .query_row(
            params![
                key.as_bytes().as_slice(),
                fingerprint.as_bytes().as_slice(),
                format::until(now, lease),
                now,
                seen,
            ],
            |row| row.get(0),
        )
        .optional()
}

/// One claim in the caller's transaction. It never waits for another holder: see the module
/// docs.
fn claim_in(
    connection: &Connection,
    key: &StorageKey,
    fingerprint: &Fingerprint,
    lease: Duration,
) -> Result<Claimed, StoreError> {
    for _ in 0..CLAIM_ATTEMPTS {
        let record = ops::read(connection, key, true).map_err(from_op)?;
        let now = format::now_ms();
        let in_progress = record
            .as_ref()
            .filter(|record| matches!(record.state, State::InProgress) && record.is_live(now))
            .map(|record| record.fence);
        match format::judge(record, fingerprint, now) {
            Seen::Answer(Claim::InProgress { retry_after }) => {
                let fence = in_progress.unwrap_or(-1);
                return Ok(if claimed_here(connection, key, fence)? {
                    Claimed::Refused(Error::HeldByThisTransaction)
                } else {
                    Claimed::Refused(Error::Conflict { retry_after })
                });
            }
            Seen::Answer(claim) => return Ok(Claimed::Claim(claim)),
            Seen::Free(seen) => match take(connection, key, fingerprint, lease, seen) {
                Ok(Some(Value::Integer(fence))) if fence > 0 => {
                    let fence = Fence::new(fence.unsigned_abs());
                    mark_claimed_here(connection, key, fence)?;
                    return Ok(Claimed::Claim(Claim::Acquired { fence }));
                }
                // One more than i64::MAX is a real in SQLite.
                Ok(Some(_)) => return Err(format::fences_exhausted()),
                Ok(None) => {}
                // Another connection committed after this transaction's read: a conflict
                // whose holder's lease is unknown, at most this call's kind of lease.
                Err(error) if is_busy(&error) => {
                    return Ok(Claimed::Refused(Error::Conflict { retry_after: lease }));
                }
                Err(error) => return Err(from_caller("could not write a claim", error)),
            },
        }
    }
    Err(StoreError::Backend {
        message: format!("the record under key {key} kept changing during the claim"),
        source: None,
    })
}

impl Ledger for InSqliteTransaction<'_> {
    async fn claim(
        &self,
        key: &StorageKey,
        arguments: &CanonicalArguments,
        lease: Duration,
        _: &mut WaitBudget,
    ) -> Result<Claimed, StoreError> {
        let connection = self.tx.lock().await;
        claim_in(&connection, key, &arguments.fingerprint(), lease)
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

impl Writes for InSqliteTransaction<'_> {
    async fn complete(
        &self,
        key: &StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> Result<FencedWrite, StoreError> {
        let connection = self.tx.lock().await;
        let now = format::now_ms();
        let rows = connection
            .prepare_cached(COMPLETE)
            .and_then(|mut statement| {
                statement.execute(params![
                    key.as_bytes().as_slice(),
                    fence_param(fence),
                    now,
                    &output[..],
                    format::until(now, ttl),
                ])
            })
            .map_err(|error| from_caller("could not record a result", error))?;
        Ok(if rows == 0 {
            FencedWrite::Fenced
        } else {
            FencedWrite::Applied
        })
    }

    /// Deletes the claim again; should it fail, the caller's rollback removes it anyway.
    async fn release(&self, key: &StorageKey, fence: Fence) {
        let connection = self.tx.lock().await;
        let released = connection
            .prepare_cached(RELEASE)
            .and_then(|mut statement| {
                statement.execute(params![
                    key.as_bytes().as_slice(),
                    fence_param(fence),
                    format::now_ms(),
                ])
            });
        if let Err(error) = released {
            let error = from_caller("could not delete a claim", error);
            tracing::warn!(target: "idempotent", %error, "could not delete a claim in the transaction; rolling it back removes it");
        }
    }
}

impl SqliteStore {
    /// Runs `body` under `call` inside the caller's transaction `tx`: the claim and the
    /// recorded value are written in `tx`, so they commit (or roll back) with the body's own
    /// writes in `tx`. `tx` must be a transaction on this store's database file. The caller
    /// commits; on an `Err` the claim is deleted again, and the caller should roll back.
    ///
    /// Begin `tx` with `TransactionBehavior::Immediate`: SQLite has one writer, so a second
    /// transaction then waits at its `BEGIN` (for the connection's busy timeout) until the
    /// first commits, and replays its record, or runs if it rolled back. A claim found in
    /// progress is answered at once, [`Error::HeldByThisTransaction`] if this transaction
    /// wrote it (an earlier call in it that was cancelled), else [`Error::Conflict`];
    /// `options`' `on_conflict` does not make it wait, as waiting would hold the write lock the
    /// holder needs. See the [module docs](super) for the rest.
    ///
    /// The future is not `Send`, as `rusqlite::Transaction` is neither `Send` nor `Sync`: run
    /// it where it need not move between threads, on a current-thread runtime (as below), in a
    /// [`tokio::task::LocalSet`], or with `Handle::block_on` inside `spawn_blocking`. The
    /// statements run synchronously on the thread that polls the call, like the body's own
    /// rusqlite statements: one that waits for SQLite's write lock (the connection's busy
    /// timeout) blocks that thread meanwhile.
    ///
    /// ```
    /// use idempotent_core::stores::sqlite::SqliteStore;
    /// use idempotent_core::{Call, Fingerprint, Options, Outcome};
    /// use rusqlite::{Connection, TransactionBehavior};
    ///
    /// #[derive(Debug)]
    /// enum ShopError { Database(rusqlite::Error), Idempotency(idempotent_core::Error) }
    /// impl From<idempotent_core::Error> for ShopError {
    ///     fn from(e: idempotent_core::Error) -> Self { ShopError::Idempotency(e) }
    /// }
    ///
    /// // A current-thread runtime: the call's future is not `Send`.
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let path = std::env::temp_dir().join(format!("idempotent-rusqlite-tx-{}.sqlite3", std::process::id()));
    /// # let _ = std::fs::remove_file(&path);
    /// let store = SqliteStore::open(&path)?;
    /// let mut connection = Connection::open(&path)?;
    /// connection.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)", [])?;
    ///
    /// for _ in 0..2 {
    ///     let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    ///     let call = Call::new("orders::create", Fingerprint::of(&42)?).key("order-42");
    ///     let order = store
    ///         .run_in_transaction(&tx, &Options::new(), call, async {
    ///             tx.execute("INSERT INTO orders (id) VALUES (42)", [])
    ///                 .map_err(ShopError::Database)?;
    ///             Ok::<_, ShopError>(42)
    ///         })
    ///         .await;
    ///     if order.is_ok() {
    ///         tx.commit()?;
    ///     }
    /// }
    /// // The second run replayed the first's result and wrote no row.
    /// let orders: i64 = connection.query_row("SELECT count(*) FROM orders", [], |row| row.get(0))?;
    /// assert_eq!(orders, 1);
    /// # drop((store, connection));
    /// # let _ = std::fs::remove_file(&path);
    /// # Ok(()) }
    /// ```
    pub async fn run_in_transaction<T, E, F>(
        &self,
        tx: &Transaction<'_>,
        options: &Options,
        call: Call<'_>,
        body: F,
    ) -> Result<Outcome<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: Future<Output = Result<T, E>>,
    {
        let ledger = InSqliteTransaction::new(self, tx);
        execute::<OkOnly, T, E, F>(&ledger, options, call.prepare(), body).await
    }
}
