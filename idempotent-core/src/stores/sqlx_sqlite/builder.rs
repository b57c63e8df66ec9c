//! Configuring a [`SqlxSqliteStore`] and preparing its schema in the service's database.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Acquire, Connection, SqlitePool};

use super::SqlxSqliteStore;
use super::ops::from_sqlx;
use crate::error::StoreError;
use crate::stores::sqlite_format::{
    CREATE, INSERT_FENCE, INSERT_VERSION, SCHEMA_VERSION, SELECT_VERSION, check_version,
};

/// How often a waiter looks at the record again by default.
///
/// ```
/// # use std::time::Duration;
/// assert_eq!(idempotent_core::stores::sqlx_sqlite::DEFAULT_POLL_INTERVAL, Duration::from_millis(25));
/// ```
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Configures a [`SqlxSqliteStore`] on a pool the service already has.
///
/// ```
/// use std::time::Duration;
/// use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
/// use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let path = std::env::temp_dir().join(format!("idempotent-sqlx-builder-{}.sqlite3", std::process::id()));
/// let options = SqliteConnectOptions::new()
///     .filename(&path)
///     .create_if_missing(true)
///     .journal_mode(SqliteJournalMode::Wal);
/// let pool = SqlitePool::connect_with(options).await?;
/// let store = SqlxSqliteStore::builder(pool)
///     .poll_interval(Duration::from_millis(50))
///     .build()
///     .await?;
/// # drop(store);
/// # let _ = std::fs::remove_file(&path);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqlxSqliteStoreBuilder {
    pub(super) pool: SqlitePool,
    pub(super) poll_interval: Duration,
}

impl SqlxSqliteStoreBuilder {
    /// How often a waiter looks at the record again, to see completions by other store objects
    /// and processes (default 25 ms; at least 1 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), sqlx::Error> {
    /// let pool = sqlx::SqlitePool::connect_lazy("sqlite://app.sqlite3")?;
    /// let builder = SqlxSqliteStore::builder(pool).poll_interval(Duration::from_millis(100));
    /// # Ok(()) }
    /// ```
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Creates the tables (and the fence triggers) when missing, and checks the schema
    /// version, in one `BEGIN IMMEDIATE` transaction on one of the pool's connections.
    ///
    /// Fails if the database is not in WAL journal mode (open the pool with
    /// `SqliteConnectOptions::journal_mode(SqliteJournalMode::Wal)`; the store does not change
    /// a setting of the service's database), if it is an in-memory database (each pooled
    /// connection would see its own: use [`MemoryStore`](crate::MemoryStore)), or if its
    /// schema is newer than this release knows.
    ///
    /// ```
    /// use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
    /// let refused = SqlxSqliteStore::builder(pool).build().await.unwrap_err();
    /// assert!(refused.to_string().contains("in-memory"), "{refused}");
    /// # Ok(()) }
    /// ```
    pub async fn build(self) -> Result<SqlxSqliteStore, StoreError> {
        let failed = |error| from_sqlx("could not prepare the SQLite schema", error);
        let mut connection = self.pool.acquire().await.map_err(failed)?;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *connection)
            .await
            .map_err(failed)?;
        if mode.eq_ignore_ascii_case("memory") {
            return Err(StoreError::Backend {
                message: "the SQLite store needs a database file, not an in-memory database: each pooled connection to it sees its own (use MemoryStore for one process)".to_string(),
                source: None,
            });
        }
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend {
                message: format!(
                    "the SQLite database is in {mode:?} journal mode; the store needs WAL (readers that never wait for the writer): open the pool with SqliteConnectOptions::journal_mode(SqliteJournalMode::Wal)"
                ),
                source: None,
            });
        }
        let file: String =
            sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_one(&mut *connection)
                .await
                .map_err(failed)?;
        let connection = connection.acquire().await.map_err(failed)?;
        let mut transaction = connection
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(failed)?;
        sqlx::raw_sql(CREATE)
            .execute(&mut *transaction)
            .await
            .map_err(failed)?;
        let version: Option<i64> = sqlx::query_scalar(SELECT_VERSION)
            .fetch_one(&mut *transaction)
            .await
            .map_err(failed)?;
        if check_version(version, &file)? {
            sqlx::query(INSERT_VERSION)
                .bind(SCHEMA_VERSION)
                .execute(&mut *transaction)
                .await
                .map_err(failed)?;
        }
        sqlx::query(INSERT_FENCE)
            .execute(&mut *transaction)
            .await
            .map_err(failed)?;
        transaction.commit().await.map_err(failed)?;
        Ok(SqlxSqliteStore {
            pool: self.pool,
            wakes: Arc::default(),
            poll_interval: self.poll_interval,
        })
    }
}
