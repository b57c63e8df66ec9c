//! The SQLite store: one machine, several processes, records that survive restarts.
//!
//! Records live in one database file that any number of processes on the machine may open at
//! once. Each operation is one `BEGIN IMMEDIATE` transaction (read the record, decide exactly
//! as the protocol says, write, commit), run on Tokio's blocking threads over a small pool of
//! connections, so the async threads never wait on the disk. The database is in WAL journal
//! mode, so reads never wait for writers.
//!
//! # Durability
//!
//! By default the store runs with `PRAGMA synchronous = FULL`: when `complete` returns, the
//! completed record is on disk and survives a crash of the process, the OS or the machine.
//! [`Synchronous::Normal`] is faster (no sync on each commit) and still survives a crash of
//! the process, but a power loss or OS crash may lose the last transactions; a lost
//! completion is a key that can run again.
//!
//! # Time
//!
//! SQLite has no server clock: leases and expiry are measured on the system's wall clock, in
//! ms since the Unix epoch, which every process on the machine shares. Moving the clock
//! forward ends leases early (a key may then run twice); moving it back lengthens them. Keep
//! the clock disciplined (NTP slews rather than steps) and do not share the file between
//! machines (network file systems also break SQLite's locking).
//!
//! # Waiting
//!
//! SQLite cannot notify other connections. A waiter is woken at once when the store object it
//! waits on (or a clone of it) completes or releases the key; completions by other store
//! objects and other processes are seen by polling the record every
//! [`poll_interval`](SqliteStoreBuilder::poll_interval) (25 ms by default), and the wait
//! also ends when the holder's lease does.
//!
//! # The transactional mode
//!
//! [`SqliteStore::run_in_transaction`] (and `#[idempotent(tx = tx, store = ...)]` with a `&` or
//! `&mut rusqlite::Transaction`) writes the claim and the record in the caller's transaction on
//! this file, so they commit with the body's writes or not at all. A call in that mode is a
//! future that is not `Send` (`rusqlite::Transaction` is neither `Send` nor `Sync`), and its
//! statements run on the thread that polls it, like the caller's own rusqlite statements.
//!
//! # Schema
//!
//! Three tables, created when missing: `idempotent_schema(version)` (this release writes and
//! reads version 1 and refuses a database with a newer one), `idempotent_fence` (one counter:
//! fences grow across every process sharing the file, even after records are deleted), and
//! `idempotent_records` (`key` BLOB primary key of 32 bytes, `fingerprint` BLOB of 32 bytes,
//! `fence` INTEGER, `state` TEXT `'in_progress'` or `'completed'`, `until` INTEGER in ms since
//! the Unix epoch (lease end or expiry), `output` BLOB, `format` INTEGER, the record format
//! version, 1). A row that does not fit is reported as [`StoreError::Corrupt`] for its key,
//! never taken for an absent record; an operator can delete it
//! (`DELETE FROM idempotent_records WHERE key = X'…'`) to make the key usable again.

mod admin;
mod builder;
mod ops;
mod pool;
mod record;
mod schema;
mod transaction;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use crate::error::StoreError;
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};
use crate::stores::wake_table::WakeTable;
use ops::{OpError, OpResult};
use pool::{Access, Pool, from_sqlite};

// The ledger the `#[idempotent(tx = ..)]` attribute builds for a rusqlite transaction.
pub(crate) use transaction::InSqliteTransaction;

pub use builder::{
    DEFAULT_BUSY_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_POLL_INTERVAL, SqliteStoreBuilder,
    Synchronous,
};

/// A [`Store`] in a SQLite database file: one machine, any number of processes, records that
/// survive restarts.
///
/// Clones share the connections and wake each other's waiters. See the
/// [module docs](self) for durability, time and the schema.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idempotent_core::stores::sqlite::SqliteStore;
/// use idempotent_core::{Bytes, CanonicalArguments, Claim, StorageKey, Store};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let path = std::env::temp_dir().join(format!("idempotent-store-{}.sqlite3", std::process::id()));
/// # let _ = std::fs::remove_file(&path);
/// let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path)?);
/// let key = StorageKey::derive("docs", None, b"order-1")?;
/// let arguments = CanonicalArguments::of(&("order-1", 4200))?;
/// let Claim::Acquired { fence } = store.claim(&key, &arguments, Duration::from_secs(30)).await? else {
///     unreachable!("a fresh key is free");
/// };
/// store.complete(&key, fence, Bytes::from_static(b"\"receipt\""), Duration::from_secs(3600)).await?;
/// drop(store);
///
/// // Another process, or this one after a restart, finds the record.
/// let store = SqliteStore::open(&path)?;
/// assert_eq!(
///     store.claim(&key, &arguments, Duration::from_secs(30)).await?,
///     Claim::Completed { output: Bytes::from_static(b"\"receipt\"") }
/// );
/// # drop(store);
/// # let _ = std::fs::remove_file(&path);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: Arc<Pool>,
    wakes: Arc<WakeTable<StorageKey>>,
    poll_interval: Duration,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.pool.path())
            .field("busy_timeout", &self.pool.busy_timeout())
            .field("synchronous", &self.pool.synchronous())
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` with the default settings: busy timeout 5 s,
    /// `synchronous = FULL`, waiters polling every 25 ms. See [`SqliteStoreBuilder::build`].
    ///
    /// ```
    /// use idempotent_core::stores::sqlite::SqliteStore;
    ///
    /// let path = std::env::temp_dir().join(format!("idempotent-open-{}.sqlite3", std::process::id()));
    /// let store = SqliteStore::open(&path)?;
    /// assert_eq!(store.path(), path);
    /// # drop(store);
    /// # let _ = std::fs::remove_file(&path);
    /// # Ok::<(), idempotent_core::StoreError>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        Self::builder(path).build()
    }

    /// A builder for the database at `path`, to change the busy timeout, `synchronous`, the
    /// poll interval or the number of connections.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idempotent_core::stores::sqlite::SqliteStore;
    ///
    /// let builder = SqliteStore::builder("/var/lib/shop/idempotency.sqlite3")
    ///     .busy_timeout(Duration::from_secs(1));
    /// ```
    pub fn builder(path: impl AsRef<Path>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: path.as_ref().to_path_buf(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            synchronous: Synchronous::default(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// The database file.
    ///
    /// ```
    /// use idempotent_core::stores::sqlite::SqliteStore;
    ///
    /// let path = std::env::temp_dir().join(format!("idempotent-path-{}.sqlite3", std::process::id()));
    /// let store = SqliteStore::open(&path)?;
    /// assert!(store.path().ends_with(path.file_name().unwrap()));
    /// # drop(store);
    /// # let _ = std::fs::remove_file(&path);
    /// # Ok::<(), idempotent_core::StoreError>(())
    /// ```
    pub fn path(&self) -> &Path {
        self.pool.path()
    }

    /// Runs a blocking operation on a pooled connection, mapping SQLite's errors.
    async fn run<T, F>(&self, access: Access, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> OpResult<T> + Send + 'static,
    {
        let busy_timeout = self.pool.busy_timeout();
        self.pool
            .run(access, move |connection| {
                op(connection).map_err(|error| match error {
                    OpError::Sqlite(what, error) => from_sqlite(what, error, busy_timeout),
                    OpError::Store(error) => error,
                })
            })
            .await
    }

    /// A fenced write that wakes this store object's waiters on `key` when it applies.
    async fn fenced_write<F>(
        &self,
        key: StorageKey,
        wake: bool,
        op: F,
    ) -> Result<FencedWrite, StoreError>
    where
        F: FnOnce(&mut Connection, &StorageKey) -> OpResult<FencedWrite> + Send + 'static,
    {
        let wakes = Arc::clone(&self.wakes);
        self.run(Access::Write, move |connection| {
            let write = op(connection, &key)?;
            // Woken here, on the blocking thread, so that waiters hear of the change even if
            // the caller stopped waiting for it.
            if wake && write == FencedWrite::Applied {
                wakes.wake(&key);
            }
            Ok(write)
        })
        .await
    }
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let (key, fingerprint) = (*key, arguments.fingerprint());
        Box::pin(self.run(Access::Write, move |connection| {
            ops::claim(connection, &key, &fingerprint, lease)
        }))
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(self.fenced_write(*key, true, move |connection, key| {
            ops::complete(connection, key, fence, &output, ttl)
        }))
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(self.fenced_write(*key, true, move |connection, key| {
            ops::release(connection, key, fence)
        }))
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(self.fenced_write(*key, false, move |connection, key| {
            ops::extend(connection, key, fence, lease)
        }))
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let key = *key;
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            let mut registration = self.wakes.register(key);
            loop {
                // Listen first, then look: a completion after the look is always heard.
                let notified = registration.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let lease_left = self
                    .run(Access::Read, move |connection| {
                        ops::lease_left(connection, &key)
                    })
                    .await?;
                let Some(lease_left) = lease_left else {
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
        Box::pin(self.run(Access::Write, ops::purge))
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        let key = *key.as_bytes();
        Box::pin(self.run(Access::Write, move |connection| {
            ops::remove(connection, &key)
        }))
    }
}
