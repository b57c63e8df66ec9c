//! Configuring and opening a [`PostgresStore`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::listener::Listener;
use super::sql::{self, Statements};
use super::{PostgresStore, pool};
use crate::error::StoreError;
use crate::redact::RedactedUrl;

/// Configures a [`PostgresStore`].
///
/// ```no_run
/// use std::time::Duration;
/// use idempotent_core::stores::postgres::PostgresStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::StoreError> {
/// let store = PostgresStore::builder("postgres://app@127.0.0.1:5432/shop")
///     .table("checkout_idempotency")
///     .max_connections(16)
///     .timeout(Duration::from_secs(1))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStoreBuilder {
    pub(super) url: String,
    pub(super) table: String,
    pub(super) max_connections: usize,
    pub(super) timeout: Duration,
    pub(super) poll_interval: Duration,
}

/// The URL's password is masked: `postgres://user:***@host/db`, `password=***`.
impl fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStoreBuilder")
            .field("url", &RedactedUrl(&self.url))
            .field("table", &self.table)
            .field("max_connections", &self.max_connections)
            .field("timeout", &self.timeout)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

impl PostgresStoreBuilder {
    /// The table records are kept in (default `idempotent_records`); the store also makes
    /// `<table>_schema` and the sequence `<table>_fences`, and notifies on `<table>_done`.
    /// Lowercase letters, digits and underscores.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The most pooled connections (default 16); waiting uses one more.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long connecting, getting a pooled connection, or one statement may take before a
    /// call fails with a store error (default 2 s each).
    ///
    /// A statement that runs out of time is ended on the server too, not only abandoned: the
    /// store asks the server to cancel it and closes its connection, and the store's
    /// connections run with `statement_timeout` and `lock_timeout` set to this timeout. (A claim
    /// that went on waiting on the server for a row lock could otherwise apply later, as a
    /// claim nobody holds, and keep its key in progress for a whole lease.) The call fails once
    /// the cancel request is sent, which itself may take up to this timeout again.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often a waiter looks again when it cannot listen (default 50 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Connects, creates the tables if missing (or checks their schema version), and returns
    /// the store.
    pub async fn build(self) -> Result<PostgresStore, StoreError> {
        sql::check_table_name(&self.table).map_err(|message| StoreError::Backend {
            message,
            source: None,
        })?;
        let mut config: tokio_postgres::Config =
            self.url.parse().map_err(|_| StoreError::Backend {
                // Not the driver's error, which may quote part of the string.
                message: format!(
                    "invalid PostgreSQL connection string {:?}: write postgres://user:password@host:port/database (URL-special characters percent-encoded) or libpq's key=value form",
                    RedactedUrl(&self.url)
                ),
                source: None,
            })?;
        pool::configure(&mut config, self.timeout);
        let pool = pool::new_pool(config.clone(), self.max_connections, self.timeout)?;
        let statements = Statements::new(&self.table);
        let listener = Listener::new(config, statements.listen.clone(), self.timeout);
        let store = PostgresStore {
            pool,
            statements: Arc::new(statements),
            listener: Arc::new(listener),
            table: self.table,
            timeout: self.timeout,
            poll_interval: self.poll_interval,
        };
        store.migrate().await?;
        Ok(store)
    }
}
