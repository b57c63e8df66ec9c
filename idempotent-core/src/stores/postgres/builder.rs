//! Configuring and opening a [`PostgresStore`].

use std::fmt;
#[cfg(feature = "postgres-tls")]
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::listener::Listener;
use super::pool::Pool;
use super::sql::{self, Statements};
use super::tls::{ConnectionString, Connector, Mode};
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
    /// The CA file set on the builder, over the URL's `sslrootcert`.
    pub(super) root_certificate_file: Option<PathBuf>,
    /// The service's pool ([`PostgresStore::from_pool`]): `url` is then unused.
    pub(super) pool: Option<deadpool_postgres::Pool>,
    /// On the service's pool, where the listening connection goes.
    pub(super) listen_url: Option<String>,
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
            .field("root_certificate_file", &self.root_certificate_file)
            .field("pool", &self.pool.as_ref().map(|pool| pool.status()))
            .field("listen_url", &self.listen_url.as_deref().map(RedactedUrl))
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

    /// The most pooled connections (default 16); waiting uses one more. On the service's pool
    /// ([`PostgresStore::from_pool`]) that pool's own limit applies instead.
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

    /// The CA certificates (a PEM file) the server's certificate is verified against, for
    /// `sslmode=verify-ca` and `verify-full`, in place of the webpki roots and of the URL's
    /// `sslrootcert=`. As libpq does, `sslmode=require` with a CA file verifies the chain as
    /// `verify-ca` does.
    ///
    /// ```
    /// use idempotent_core::stores::postgres::PostgresStore;
    ///
    /// let builder = PostgresStore::builder("postgres://app@db.internal/shop?sslmode=verify-full")
    ///     .root_certificate_file("/etc/ssl/shop-db-ca.pem");
    /// ```
    #[cfg(feature = "postgres-tls")]
    pub fn root_certificate_file(mut self, path: impl AsRef<Path>) -> Self {
        self.root_certificate_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// On the service's pool ([`PostgresStore::from_pool`]): the connection string of the one
    /// connection the store opens besides that pool, to `LISTEN` for completions (a pooled
    /// connection cannot receive notifications: deadpool-postgres drops them). Give the string
    /// the pool connects with; its `sslmode`, `sslrootcert` and
    /// [`root_certificate_file`](Self::root_certificate_file) apply, and its TLS is also the
    /// TLS of the store's cancel requests. Without it, waiters look at the record again every
    /// [`poll_interval`](Self::poll_interval). Not used by a store built from a URL, which
    /// listens on its own URL.
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self
    }

    /// `url` split and parsed: the driver's configuration (with the store's connection
    /// settings), the connector of its TLS, and its `sslmode`.
    fn connection(
        &self,
        url: &str,
    ) -> Result<(tokio_postgres::Config, Connector, Mode), StoreError> {
        let invalid = |problem: String| StoreError::Backend {
            // Not the driver's error, which may quote part of the string.
            message: format!(
                "invalid PostgreSQL connection string {:?}: {problem}",
                RedactedUrl(url)
            ),
            source: None,
        };
        let parts = ConnectionString::parse(url).map_err(invalid)?;
        let mut config = parts.config().ok_or_else(|| {
            invalid(
                "write postgres://user:password@host:port/database (URL-special characters percent-encoded) or libpq's key=value form".to_owned(),
            )
        })?;
        let root_certificate_file = self
            .root_certificate_file
            .as_deref()
            .or(parts.root_certificate_file.as_deref());
        let connector = Connector::new(parts.mode, root_certificate_file)?;
        pool::configure(&mut config, self.timeout);
        Ok((config, connector, parts.mode))
    }

    /// Connects, creates the tables if missing (or checks their schema version), and returns
    /// the store.
    pub async fn build(self) -> Result<PostgresStore, StoreError> {
        sql::check_table_name(&self.table).map_err(|message| StoreError::Backend {
            message,
            source: None,
        })?;
        let statements = Statements::new(&self.table);
        let (pool, connector, tls_mode, listening) = match &self.pool {
            None => {
                let (config, connector, mode) = self.connection(&self.url)?;
                let pool = pool::new_pool(
                    config.clone(),
                    &connector,
                    self.max_connections,
                    self.timeout,
                )?;
                (
                    pool,
                    connector.clone(),
                    Some(mode),
                    Some((config, connector)),
                )
            }
            Some(foreign) => {
                let listening = match &self.listen_url {
                    Some(url) => {
                        let (config, connector, _) = self.connection(url)?;
                        Some((config, connector))
                    }
                    None => None,
                };
                // Cancel requests go with the listening connection's TLS; without one, with
                // TLS when the connection being cancelled used it (not verified, as libpq's
                // `require`: the request only carries that connection's cancel key).
                let connector = match &listening {
                    Some((_, connector)) => connector.clone(),
                    None => Connector::new(Mode::Prefer, None)?,
                };
                (Pool::Foreign(foreign.clone()), connector, None, listening)
            }
        };
        let listener = Listener::new(listening, statements.listen.clone(), self.timeout);
        let store = PostgresStore {
            pool,
            connector,
            tls_mode,
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
