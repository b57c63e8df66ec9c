//! Configuring a [`SqliteStore`]: the builder, `synchronous`, and the defaults.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::SqliteStore;
use super::pool::Pool;
use super::schema::{self, ConnectionSettings};
use crate::error::StoreError;

/// How long an operation waits for the database's write lock by default.
///
/// ```
/// # use std::time::Duration;
/// assert_eq!(idempotent_core::stores::sqlite::DEFAULT_BUSY_TIMEOUT, Duration::from_secs(5));
/// ```
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a waiter looks at the record again by default.
///
/// ```
/// # use std::time::Duration;
/// assert_eq!(idempotent_core::stores::sqlite::DEFAULT_POLL_INTERVAL, Duration::from_millis(25));
/// ```
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(25);

/// How many connections a store object uses at most by default.
///
/// ```
/// assert_eq!(idempotent_core::stores::sqlite::DEFAULT_MAX_CONNECTIONS, 4);
/// ```
pub const DEFAULT_MAX_CONNECTIONS: usize = 4;

/// How hard SQLite makes sure a commit is on disk (`PRAGMA synchronous`).
///
/// ```
/// use idempotent_core::stores::sqlite::Synchronous;
///
/// assert_eq!(Synchronous::default(), Synchronous::Full);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Every commit is synced to disk before it returns: a completed record survives a power
    /// loss. The default.
    #[default]
    Full,
    /// Commits are synced at checkpoints only: faster, and safe against a crash of the
    /// process, but a power loss or OS crash may lose the last transactions (and so let
    /// their keys run again).
    Normal,
}

impl Synchronous {
    pub(super) fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Configures a [`SqliteStore`].
///
/// ```
/// use std::time::Duration;
/// use idempotent_core::stores::sqlite::{SqliteStore, Synchronous};
///
/// let path = std::env::temp_dir().join(format!("idempotent-builder-{}.sqlite3", std::process::id()));
/// let store = SqliteStore::builder(&path)
///     .busy_timeout(Duration::from_secs(2))
///     .synchronous(Synchronous::Normal)
///     .poll_interval(Duration::from_millis(50))
///     .max_connections(2)
///     .build()?;
/// # drop(store);
/// # let _ = std::fs::remove_file(&path);
/// # Ok::<(), idempotent_core::StoreError>(())
/// ```
#[derive(Debug, Clone)]
pub struct SqliteStoreBuilder {
    pub(super) path: PathBuf,
    pub(super) busy_timeout: Duration,
    pub(super) synchronous: Synchronous,
    pub(super) poll_interval: Duration,
    pub(super) max_connections: usize,
}

impl SqliteStoreBuilder {
    /// How long an operation waits for the database's write lock, held by another connection
    /// or process, before it fails with [`StoreError::Unavailable`] (default 5 s). Time spent
    /// queued behind this store object's own operations counts too.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::stores::sqlite::SqliteStore;
    /// let builder = SqliteStore::builder("app.sqlite3").busy_timeout(Duration::from_millis(500));
    /// ```
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How hard commits are synced to disk (default [`Synchronous::Full`]).
    ///
    /// ```
    /// # use idempotent_core::stores::sqlite::{SqliteStore, Synchronous};
    /// // Faster; the last transactions may be lost on a power loss.
    /// let builder = SqliteStore::builder("app.sqlite3").synchronous(Synchronous::Normal);
    /// ```
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// How often a waiter looks at the record again, to see completions by other store objects
    /// and processes (default 25 ms; at least 1 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::stores::sqlite::SqliteStore;
    /// let builder = SqliteStore::builder("app.sqlite3").poll_interval(Duration::from_millis(100));
    /// ```
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many connections this store object uses at most (default 4; at least 1). Writes
    /// use one at a time, since SQLite admits one writer; the others serve waiters' reads.
    ///
    /// ```
    /// # use idempotent_core::stores::sqlite::SqliteStore;
    /// let builder = SqliteStore::builder("app.sqlite3").max_connections(2);
    /// ```
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Opens the database (creating the file and its tables if missing) and checks its schema
    /// version. Blocks on the file system: call it at startup, or in `spawn_blocking`.
    ///
    /// Fails if the file cannot be opened or switched to WAL, if its schema is newer than this
    /// release knows, or for `":memory:"` (each connection would see its own database: use
    /// [`MemoryStore`](crate::MemoryStore)).
    ///
    /// ```
    /// use idempotent_core::stores::sqlite::SqliteStore;
    ///
    /// let path = std::env::temp_dir().join(format!("idempotent-build-{}.sqlite3", std::process::id()));
    /// let store = SqliteStore::builder(&path).build()?;
    /// # drop(store);
    /// # let _ = std::fs::remove_file(&path);
    /// assert!(SqliteStore::builder(":memory:").build().is_err());
    /// # Ok::<(), idempotent_core::StoreError>(())
    /// ```
    pub fn build(self) -> Result<SqliteStore, StoreError> {
        let path_text = self.path.to_string_lossy();
        if path_text.is_empty() || path_text == ":memory:" || path_text.starts_with("file::memory:")
        {
            return Err(StoreError::Backend {
                message: format!(
                    "the SQLite store needs a database file, not {path_text:?}: each connection to an in-memory or temporary database sees its own (use MemoryStore for one process)"
                ),
                source: None,
            });
        }
        let settings = ConnectionSettings {
            busy_timeout: self.busy_timeout,
            synchronous: self.synchronous,
        };
        let mut first = schema::open(&self.path, settings)?;
        schema::prepare(&mut first, &self.path, self.busy_timeout)?;
        Ok(SqliteStore {
            pool: Arc::new(Pool::new(self.path, settings, first, self.max_connections)),
            wakes: Arc::default(),
            poll_interval: self.poll_interval,
        })
    }
}
