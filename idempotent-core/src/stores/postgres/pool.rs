//! The store's connections: setting them up, the pool, the statements prepared on each, and
//! ending a statement nobody waits for any more (cancelling it on the server).

use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, PoolError, RecycleResult};
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, RecyclingMethod};
use tokio::time::error::Elapsed;
use tokio_postgres::Statement;

use super::error::{describe, from_pg, timed_out};
use super::sql::Statements;
use super::tls::Connector;
use crate::error::StoreError;

/// Sets up `config` for the store's connections, pooled or listening: the connect timeout,
/// and the server settings the store relies on (see [`server_settings`]).
pub(super) fn configure(config: &mut tokio_postgres::Config, timeout: Duration) {
    config.connect_timeout(timeout);
    let settings = server_settings(config.get_options(), timeout);
    config.options(settings);
}

/// The pool of the store's connections to `config` (made by `connector`): at most
/// `max_connections`, and waiting for one or connecting a new one takes at most `timeout`.
pub(super) fn new_pool(
    config: tokio_postgres::Config,
    connector: &Connector,
    max_connections: usize,
    timeout: Duration,
) -> Result<Pool, StoreError> {
    let manager = connector.manager(
        config,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    managed::Pool::builder(ConnectionManager(manager))
        .max_size(max_connections)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        // No recycle timeout: fast recycling only checks that the connection is open, with
        // no round trip, so a timeout could never fire; it cost a clock read and a timer
        // set up on every checkout. (Verified recycling would need one again.)
        .build()
        .map(Pool::Own)
        .map_err(|error| StoreError::Backend {
            message: format!("could not build the connection pool: {error}"),
            source: None,
        })
}

/// The statements run on pooled connections, each prepared once per connection, on first use.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Claim,
    Complete,
    Release,
    Extend,
    LeaseLeft,
    Remove,
    Purge,
}

impl Kind {
    const COUNT: usize = 7;

    fn text(self, statements: &Statements) -> &str {
        match self {
            Kind::Claim => &statements.claim,
            Kind::Complete => &statements.complete,
            Kind::Release => &statements.release,
            Kind::Extend => &statements.extend,
            Kind::LeaseLeft => &statements.lease_left,
            Kind::Remove => &statements.remove,
            Kind::Purge => &statements.purge,
        }
    }
}

/// A pooled connection and its prepared statements, found by [`Kind`]: a lookup by the SQL
/// text (deadpool's statement cache) hashes the whole text on every statement.
pub(super) struct Connection {
    pub(super) client: ClientWrapper,
    prepared: [Option<Statement>; Kind::COUNT],
}

impl Connection {
    /// The client and its prepared `kind`, prepared on this connection the first time.
    pub(super) async fn prepared(
        &mut self,
        kind: Kind,
        statements: &Statements,
    ) -> Result<(&ClientWrapper, &Statement), StoreError> {
        let Connection { client, prepared } = self;
        let slot = &mut prepared[kind as usize];
        let statement = match slot {
            Some(statement) => statement,
            None => slot.insert(
                client
                    .prepare(kind.text(statements))
                    .await
                    .map_err(|error| from_pg("could not prepare a statement", error))?,
            ),
        };
        Ok((client, statement))
    }
}

/// deadpool-postgres' manager (connecting, recycling), for connections that carry their
/// prepared statements. Boxed: the pool moves its objects on every checkout and return, and a
/// connection is a few hundred bytes.
pub(super) struct ConnectionManager(Manager);

impl managed::Manager for ConnectionManager {
    type Type = Box<Connection>;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<Box<Connection>, tokio_postgres::Error> {
        Ok(Box::new(Connection {
            client: self.0.create().await?,
            prepared: Default::default(),
        }))
    }

    async fn recycle(
        &self,
        connection: &mut Box<Connection>,
        metrics: &Metrics,
    ) -> RecycleResult<tokio_postgres::Error> {
        self.0.recycle(&mut connection.client, metrics).await
    }

    fn detach(&self, connection: &mut Box<Connection>) {
        self.0.detach(&mut connection.client);
    }
}

/// Where the store's statements run: its own pool, whose connections keep the statements
/// prepared by kind and carry the store's server settings, or the service's deadpool-postgres
/// pool, where statements are prepared through its statement cache.
#[derive(Clone)]
pub(super) enum Pool {
    Own(managed::Pool<ConnectionManager>),
    Foreign(deadpool_postgres::Pool),
}

impl Pool {
    /// A connection, waiting as the pool is configured to.
    pub(super) async fn get(&self) -> Result<Pooled, PoolError<tokio_postgres::Error>> {
        Ok(match self {
            Pool::Own(pool) => Pooled::Own(pool.get().await?),
            Pool::Foreign(pool) => Pooled::Foreign(pool.get().await?),
        })
    }
}

/// A connection taken from the store's [`Pool`].
pub(super) enum Pooled {
    Own(managed::Object<ConnectionManager>),
    Foreign(deadpool_postgres::Object),
}

impl Pooled {
    pub(super) fn client(&mut self) -> &mut ClientWrapper {
        match self {
            Pooled::Own(connection) => &mut connection.client,
            Pooled::Foreign(object) => object,
        }
    }

    /// The client and `kind` prepared on it: by kind on the store's own connections, through
    /// deadpool-postgres' statement cache (by the text) on the service's.
    pub(super) async fn prepared(
        &mut self,
        kind: Kind,
        statements: &Statements,
    ) -> Result<(&ClientWrapper, Statement), StoreError> {
        match self {
            Pooled::Own(connection) => {
                let (client, statement) = connection.prepared(kind, statements).await?;
                Ok((client, statement.clone()))
            }
            Pooled::Foreign(object) => {
                let statement = object
                    .prepare_cached(kind.text(statements))
                    .await
                    .map_err(|error| from_pg("could not prepare a statement", error))?;
                Ok((&**object, statement))
            }
        }
    }

    /// Takes the connection out of its pool (it closes once dropped); the token to cancel
    /// what it runs.
    fn take(self) -> tokio_postgres::CancelToken {
        match self {
            Pooled::Own(connection) => managed::Object::take(connection).client.cancel_token(),
            Pooled::Foreign(object) => managed::Object::take(object).cancel_token(),
        }
    }
}

/// A pooled connection while the store's statements run on it. Dropped, or
/// [abandoned](Running::abandon), before [`Running::done`], it is taken out of the pool and
/// closed, and the server is asked to cancel what it runs: a statement the caller stopped
/// waiting for (a timeout, a cancelled call) must not go on and apply unseen, nor keep the
/// connection busy for the next caller.
pub(super) struct Running {
    pooled: Option<Pooled>,
    timeout: Duration,
    /// How the cancel request is sent: with the TLS of the store's connections.
    connector: Connector,
}

impl Running {
    pub(super) fn new(pooled: Pooled, timeout: Duration, connector: Connector) -> Self {
        Self {
            pooled: Some(pooled),
            timeout,
            connector,
        }
    }

    pub(super) fn connection(&mut self) -> &mut Pooled {
        self.pooled
            .as_mut()
            .expect("a running connection is present until done or abandoned")
    }

    /// Ends the run with what its statements gave (`outcome`), the connection going back to
    /// the pool; or, when they ran out of time, abandons it and fails as `what` taking longer
    /// than `limit`.
    pub(super) async fn end<T>(
        self,
        outcome: Result<Result<T, StoreError>, Elapsed>,
        what: &str,
        limit: Duration,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(result) => {
                self.done();
                result
            }
            Err(_) => {
                self.abandon().await;
                Err(timed_out(what, limit))
            }
        }
    }

    /// The statements ended: the connection goes back to the pool.
    fn done(mut self) {
        self.pooled.take();
    }

    /// Closes the connection and cancels its statement, waiting (up to the timeout) until the
    /// server has the cancel request.
    async fn abandon(mut self) {
        if let Some(pooled) = self.pooled.take() {
            cancel(pooled, self.timeout, self.connector.clone()).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    drop(runtime.spawn(cancel(pooled, self.timeout, self.connector.clone())))
                }
                // No runtime to send the cancel request from: the connection is closed at
                // least, never handed to another call.
                Err(_) => drop(pooled.take()),
            }
        }
    }
}

/// Takes `pooled` out of the pool, closes it, and asks the server to cancel its statement.
async fn cancel(pooled: Pooled, timeout: Duration, connector: Connector) {
    let token = pooled.take();
    if let Ok(Err(error)) = tokio::time::timeout(timeout, connector.cancel(&token)).await {
        tracing::debug!(target: "idempotent", error = %describe(&error), "could not cancel an abandoned statement");
    }
}

/// A timeout as the server's `statement_timeout` and `lock_timeout` take it: `int`
/// milliseconds, where 0 would mean no limit. Whole ms rounded up, at least 1, as
/// [`held_millis`](crate::held_millis) rounds, and at most `i32::MAX` (about 24 days).
pub(super) fn timeout_ms(timeout: Duration) -> i32 {
    i32::try_from(crate::store::held_millis(timeout)).unwrap_or(i32::MAX)
}

/// The startup options of the store's connections: `existing` (from the URL) and the server
/// settings the store relies on.
fn server_settings(existing: Option<&str>, timeout: Duration) -> String {
    // READ COMMITTED whatever the database's default: the statements are written for it (each
    // sees what committed before it), and under REPEATABLE READ or SERIALIZABLE concurrent
    // claims of a key fail with serialization errors instead of waiting for each other.
    let limit = timeout_ms(timeout);
    let ours = format!(
        "-c statement_timeout={limit} -c lock_timeout={limit} \
         -c default_transaction_isolation=read\\ committed"
    );
    match existing {
        Some(existing) if !existing.trim().is_empty() => format!("{existing} {ours}"),
        _ => ours,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_whole_ms_rounded_up_within_an_int() {
        assert_eq!(timeout_ms(Duration::ZERO), 1);
        assert_eq!(timeout_ms(Duration::from_micros(1500)), 2);
        assert_eq!(timeout_ms(Duration::from_secs(2)), 2000);
        assert_eq!(timeout_ms(Duration::from_secs(30 * 86_400)), i32::MAX);
        assert_eq!(timeout_ms(Duration::MAX), i32::MAX);
    }

    #[test]
    fn server_settings_keep_the_urls_options() {
        let ours = "-c statement_timeout=2000 -c lock_timeout=2000 \
                    -c default_transaction_isolation=read\\ committed";
        assert_eq!(server_settings(None, Duration::from_secs(2)), ours);
        assert_eq!(server_settings(Some("  "), Duration::from_secs(2)), ours);
        assert_eq!(
            server_settings(Some("-c search_path=shop"), Duration::from_secs(2)),
            format!("-c search_path=shop {ours}")
        );
    }
}
