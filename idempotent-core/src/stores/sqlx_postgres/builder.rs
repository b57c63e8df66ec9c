//! Configuring and opening a [`SqlxPgStore`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use super::listener::Listener;
use super::{SqlxPgStore, Statements};
use crate::error::StoreError;
use crate::stores::postgres_sql::{self, check_table_name};

/// Configures a [`SqlxPgStore`] on a pool the service already has.
///
/// ```no_run
/// use std::time::Duration;
/// use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1:5432/shop").await?;
/// let store = SqlxPgStore::builder(pool)
///     .table("checkout_idempotency")
///     .timeout(Duration::from_secs(1))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlxPgStoreBuilder {
    pub(super) pool: PgPool,
    pub(super) table: String,
    pub(super) timeout: Duration,
    pub(super) poll_interval: Duration,
}

impl fmt::Debug for SqlxPgStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxPgStoreBuilder")
            .field("table", &self.table)
            .field("timeout", &self.timeout)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl SqlxPgStoreBuilder {
    /// The table records are kept in (default `idempotent_records`, as `PostgresStore`'s); the
    /// store also makes `<table>_schema` and the sequence `<table>_fences`, and notifies on
    /// `<table>_done`. Lowercase letters, digits and underscores.
    ///
    /// ```
    /// # async fn f(pool: sqlx::PgPool) {
    /// let builder = idempotent_core::stores::sqlx_postgres::SqlxPgStore::builder(pool)
    ///     .table("checkout_idempotency");
    /// # }
    /// ```
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long getting a pooled connection plus one statement may take before a call fails
    /// with a store error (default 2 s).
    ///
    /// sqlx sends no cancel request for a statement nobody waits for any more: a statement
    /// that runs out of time goes on on the server until it ends, and may still apply (its
    /// connection is closed rather than given back to the pool). What can keep a store's
    /// statement running is a row lock held by a transactional-mode claim of the same key;
    /// bound it on the server with the pool's `lock_timeout` and `statement_timeout`
    /// ([`PgConnectOptions::options`](sqlx::postgres::PgConnectOptions::options)), as
    /// `PostgresStore` does on its own connections. See [`SqlxPgStore`], "Timeouts".
    ///
    /// ```
    /// # async fn f(pool: sqlx::PgPool) {
    /// let builder = idempotent_core::stores::sqlx_postgres::SqlxPgStore::builder(pool)
    ///     .timeout(std::time::Duration::from_millis(500));
    /// # }
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often a waiter looks again when it cannot listen (default 50 ms).
    ///
    /// ```
    /// # async fn f(pool: sqlx::PgPool) {
    /// let builder = idempotent_core::stores::sqlx_postgres::SqlxPgStore::builder(pool)
    ///     .poll_interval(std::time::Duration::from_millis(20));
    /// # }
    /// ```
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Creates the tables if missing (or checks their schema version) and returns the store.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/shop").await?;
    /// let store = idempotent_core::stores::sqlx_postgres::SqlxPgStore::builder(pool).build().await?;
    /// # Ok(()) }
    /// ```
    pub async fn build(self) -> Result<SqlxPgStore, StoreError> {
        check_table_name(&self.table).map_err(|message| StoreError::Backend {
            message,
            source: None,
        })?;
        let statements = Statements::new(&postgres_sql::Statements::new(&self.table));
        let channel = format!("{}_done", self.table);
        let listener = Listener::new(self.pool.clone(), channel, self.timeout, self.poll_interval);
        let store = SqlxPgStore {
            pool: self.pool,
            statements: Arc::new(statements),
            listener: Arc::new(listener),
            table: self.table.into(),
            timeout: self.timeout,
            poll_interval: self.poll_interval,
        };
        store.migrate().await?;
        Ok(store)
    }
}
