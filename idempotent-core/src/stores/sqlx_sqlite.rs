//! The SQLite store on a `sqlx::SqlitePool` the service already has: the same records, in the
//! same tables, as the rusqlite [`SqliteStore`](crate::stores::sqlite::SqliteStore), so the
//! two read and write one database file together.
//!
//! # Statements
//!
//! Each sqlx statement is a round trip to the connection's worker thread, so each operation is
//! as few of them as the protocol allows, each committing on its own:
//!
//! - a replay (the key is live) is one read;
//! - a first call's claim is that read and one `INSERT .. ON CONFLICT (key) DO UPDATE .. WHERE
//!   <the record read is dead> RETURNING fence`, which takes its fence from the fence counter
//!   in the same statement (triggers on the records table advance the counter, so fences keep
//!   growing across every process and both stores). One statement cannot do both: an upsert
//!   whose `WHERE` refuses returns no row, and it takes the write lock even then, so replays
//!   would queue behind every writer. Reading first keeps replays off the write lock;
//! - `complete`, `release` and `extend` are one conditional `UPDATE`/`DELETE` each.
//!
//! # What the store expects of the pool
//!
//! - **WAL journal mode** (`SqliteConnectOptions::journal_mode(SqliteJournalMode::Wal)`; sqlx
//!   leaves the file's mode alone by default). [`build`](SqlxSqliteStoreBuilder::build) refuses
//!   a database in another mode, and an in-memory one, rather than change the service's
//!   database. A file the rusqlite store has opened is in WAL already.
//! - **A busy timeout** (sqlx's default is 5 s): how long a write waits for the write lock
//!   that another connection or process holds. A write still locked out after it fails with
//!   [`StoreError::Unavailable`]. A zero timeout makes every concurrent write fail at once.
//! - **`synchronous`**: sqlx leaves SQLite's default, `FULL`: when `complete` returns, the
//!   record is on disk. With `NORMAL` (common with WAL) a power loss or OS crash may lose the
//!   last commits, and a lost completion is a key that can run again; a crash of the process
//!   loses nothing in either mode.
//!
//! Time, waiting and the schema are as for the rusqlite store: the system's wall clock in ms
//! since the Unix epoch; a waiter is woken at once by completions through this store object (or
//! a clone) and polls every [`poll_interval`](SqlxSqliteStoreBuilder::poll_interval) for the
//! others.

mod builder;
mod ops;
mod transaction;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;

use crate::error::StoreError;
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};
use crate::stores::sqlite_format::now_ms;
use crate::stores::wake_table::WakeTable;
use ops::Seen;

pub use builder::{DEFAULT_POLL_INTERVAL, SqlxSqliteStoreBuilder};
// The ledger the `#[idempotent(tx = ..)]` attribute builds for a sqlx transaction.
pub(crate) use transaction::InSqlxSqliteTransaction;

/// How many times a claim reads again when its write found the record changed since its read.
const CLAIM_ATTEMPTS: usize = 16;

/// A [`Store`] in a SQLite database reached through a `sqlx::SqlitePool` the service already
/// has. Clones share the pool and wake each other's waiters. See the [module docs](self) for
/// what it expects of the pool's options.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
/// use idempotent_core::{Bytes, CanonicalArguments, Claim, StorageKey, Store};
/// use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let path = std::env::temp_dir().join(format!("idempotent-sqlx-store-{}.sqlite3", std::process::id()));
/// let pool = SqlitePool::connect_with(
///     SqliteConnectOptions::new()
///         .filename(&path)
///         .create_if_missing(true)
///         .journal_mode(SqliteJournalMode::Wal),
/// )
/// .await?;
/// let store: Arc<dyn Store> = Arc::new(SqlxSqliteStore::builder(pool).build().await?);
/// let key = StorageKey::derive("docs", None, b"order-1")?;
/// let arguments = CanonicalArguments::of(&("order-1", 4200))?;
/// let Claim::Acquired { fence } = store.claim(&key, &arguments, Duration::from_secs(30)).await? else {
///     unreachable!("a fresh key is free");
/// };
/// store.complete(&key, fence, Bytes::from_static(b"\"receipt\""), Duration::from_secs(3600)).await?;
/// assert_eq!(
///     store.claim(&key, &arguments, Duration::from_secs(30)).await?,
///     Claim::Completed { output: Bytes::from_static(b"\"receipt\"") }
/// );
/// # drop(store);
/// # let _ = std::fs::remove_file(&path);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlxSqliteStore {
    pool: SqlitePool,
    wakes: Arc<WakeTable<StorageKey>>,
    poll_interval: Duration,
}

impl fmt::Debug for SqlxSqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxSqliteStore")
            .field("pool_size", &self.pool.size())
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl SqlxSqliteStore {
    /// A builder for a store on `pool`; [`build`](SqlxSqliteStoreBuilder::build) prepares the
    /// schema.
    ///
    /// ```
    /// use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// let pool = sqlx::SqlitePool::connect_lazy("sqlite://app.sqlite3?mode=rwc")?;
    /// let builder = SqlxSqliteStore::builder(pool);
    /// # Ok(()) }
    /// ```
    pub fn builder(pool: SqlitePool) -> SqlxSqliteStoreBuilder {
        SqlxSqliteStoreBuilder {
            pool,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// The pool the store runs its statements on.
    ///
    /// ```
    /// # use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let path = std::env::temp_dir().join(format!("idempotent-sqlx-pool-{}.sqlite3", std::process::id()));
    /// # let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).create_if_missing(true)
    /// #     .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    /// let store = SqlxSqliteStore::builder(sqlx::SqlitePool::connect_with(options).await?).build().await?;
    /// let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(store.pool()).await?;
    /// # let _ = std::fs::remove_file(&path);
    /// # Ok(()) }
    /// ```
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Wakes this store object's waiters on `key` when a write applied.
    fn woke(&self, key: &StorageKey, write: FencedWrite) -> FencedWrite {
        if write == FencedWrite::Applied {
            self.wakes.wake(key);
        }
        write
    }
}

impl Store for SqlxSqliteStore {
    fn kind(&self) -> &'static str {
        "sqlx_sqlite"
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let fingerprint = arguments.fingerprint();
            for _ in 0..CLAIM_ATTEMPTS {
                let record = ops::read(&self.pool, key, true).await?;
                match ops::judge(record, &fingerprint, now_ms()) {
                    Seen::Answer(claim) => return Ok(claim),
                    Seen::Free(seen) => {
                        if let Some(fence) =
                            ops::take(&self.pool, key, &fingerprint, lease, seen).await?
                        {
                            return Ok(Claim::Acquired { fence });
                        }
                    }
                }
            }
            Err(StoreError::Backend {
                message: format!("the record under key {key} kept changing during the claim"),
                source: None,
            })
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let write = ops::complete(&self.pool, key, fence, &output, ttl).await?;
            Ok(self.woke(key, write))
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let write = ops::release(&self.pool, key, fence).await?;
            Ok(self.woke(key, write))
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(ops::extend(&self.pool, key, fence, lease))
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            let mut registration = self.wakes.register(*key);
            loop {
                // Listen first, then look: a completion after the look is always heard.
                let notified = registration.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let Some(lease_left) = ops::lease_left(&self.pool, key).await? else {
                    return Ok(());
                };
                let waited = started.elapsed();
                if waited >= max {
                    return Ok(());
                }
                let nap = (max - waited).min(lease_left).min(self.poll_interval);
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep(nap) => {}
                }
            }
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(ops::purge(&self.pool))
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(ops::remove(&self.pool, key))
    }
}
