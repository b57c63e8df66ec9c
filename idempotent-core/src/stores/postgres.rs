//! The PostgreSQL store: a fleet of application servers sharing one database, and the one way
//! to make database side effects exactly-once (the transactional mode).
//!
//! A record is one row of the store's table. Each operation is one statement (prepared once per
//! connection): the claim inserts or takes over a dead record with `INSERT .. ON CONFLICT ..
//! DO UPDATE .. WHERE <dead> RETURNING`, and the same statement reads the live record when it
//! cannot claim, so a replay is one round trip. `complete`, `release` and `extend` are guarded
//! by the fence and a live lease (in the transactional mode, by the fence alone). Times are the
//! server's `statement_timestamp()` (not `now()`, which in the caller's transaction is when
//! that began). Fences come from a sequence, so they only grow. Waiters LISTEN on the store's
//! channel; `complete` and `release` NOTIFY it.

mod listener;
mod sql;
mod transaction;

use std::fmt;

use crate::redact::RedactedUrl;
use std::sync::Arc;
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, RecycleResult};
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Statement};

use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};
// A lease or ttl as the statements take it, which a `bigint` and an `interval` hold.
use crate::stores::millis::held_i64 as millis;
use crate::stores::wait::wait_turn;
use listener::Listener;
use sql::Statements;

pub use transaction::PostgresTransaction;

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
    url: String,
    table: String,
    max_connections: usize,
    timeout: Duration,
    poll_interval: Duration,
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
        config.connect_timeout(self.timeout);
        let settings = server_settings(config.get_options(), self.timeout);
        config.options(settings);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(ConnectionManager(manager))
            .max_size(self.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.timeout))
            .create_timeout(Some(self.timeout))
            // No recycle timeout: fast recycling only checks that the connection is open, with
            // no round trip, so a timeout could never fire; it cost a clock read and a timer
            // set up on every checkout. (Verified recycling would need one again.)
            .build()
            .map_err(|error| StoreError::Backend {
                message: format!("could not build the connection pool: {error}"),
                source: None,
            })?;
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

/// The statements run on pooled connections, each prepared once per connection, on first use.
#[derive(Debug, Clone, Copy)]
enum Kind {
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
struct Connection {
    client: ClientWrapper,
    prepared: [Option<Statement>; Kind::COUNT],
}

impl Connection {
    /// The client and its prepared `kind`, prepared on this connection the first time.
    async fn prepared(
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
struct ConnectionManager(Manager);

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

type Pool = managed::Pool<ConnectionManager>;

/// A pooled connection while the store's statements run on it. Dropped, or
/// [abandoned](Running::abandon), before [`Running::done`], it is taken out of the pool and
/// closed, and the server is asked to cancel what it runs: a statement the caller stopped
/// waiting for (a timeout, a cancelled call) must not go on and apply unseen, nor keep the
/// connection busy for the next caller.
struct Running {
    pooled: Option<managed::Object<ConnectionManager>>,
    timeout: Duration,
}

impl Running {
    fn new(pooled: managed::Object<ConnectionManager>, timeout: Duration) -> Self {
        Self {
            pooled: Some(pooled),
            timeout,
        }
    }

    fn connection(&mut self) -> &mut Connection {
        self.pooled
            .as_mut()
            .expect("a running connection is present until done or abandoned")
    }

    /// The statements ended: the connection goes back to the pool.
    fn done(mut self) {
        self.pooled.take();
    }

    /// Closes the connection and cancels its statement, waiting (up to the timeout) until the
    /// server has the cancel request.
    async fn abandon(mut self) {
        if let Some(pooled) = self.pooled.take() {
            cancel(pooled, self.timeout).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(cancel(pooled, self.timeout))),
                // No runtime to send the cancel request from: the connection is closed at
                // least, never handed to another call.
                Err(_) => drop(managed::Object::take(pooled)),
            }
        }
    }
}

/// Takes `pooled` out of the pool, closes it, and asks the server to cancel its statement.
async fn cancel(pooled: managed::Object<ConnectionManager>, timeout: Duration) {
    let token = pooled.client.cancel_token();
    drop(managed::Object::take(pooled));
    if let Ok(Err(error)) = tokio::time::timeout(timeout, token.cancel_query(NoTls)).await {
        tracing::debug!(target: "idempotent", error = %describe(&error), "could not cancel an abandoned statement");
    }
}

/// A timeout as the server's `statement_timeout` and `lock_timeout` take it: `int`
/// milliseconds, where 0 would mean no limit. Whole ms rounded up, at least 1, as
/// [`held_millis`](crate::held_millis) rounds, and at most `i32::MAX` (about 24 days).
fn timeout_ms(timeout: Duration) -> i32 {
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

/// A [`Store`] in PostgreSQL.
///
/// Besides the [`Store`] protocol (one statement per operation, its own connections), it has a
/// transactional mode: [`PostgresStore::run_in_transaction`] runs a call inside the caller's own
/// transaction, so the business writes and the record commit together or not at all.
///
/// TLS: this release connects without TLS; keep the database on a private network.
///
/// ```no_run
/// use std::sync::Arc;
/// use idempotent_core::{set_default_store, stores::postgres::PostgresStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::builder("postgres://app@127.0.0.1/shop").build().await?;
/// set_default_store(Arc::new(store))?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    statements: Arc<Statements>,
    listener: Arc<Listener>,
    table: String,
    timeout: Duration,
    poll_interval: Duration,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn fence_param(fence: Fence) -> i64 {
    // Sequence values are positive `bigint`s, so every fence this store hands out fits.
    i64::try_from(fence.get()).unwrap_or(-1)
}

pub(super) fn from_pg(message: &str, error: tokio_postgres::Error) -> StoreError {
    // An error the server did not send (a closed connection, I/O, a timeout) passes, as do
    // connection exceptions (08), operator intervention such as a terminated backend, a
    // cancelled statement or a shutdown (57), exhausted resources (53), a lock not had in time
    // (55P03), and a serialization failure or deadlock (40001, 40P01: the statement was rolled
    // back); any other server error is a real failure.
    let passing = error.as_db_error().is_none_or(|db| {
        let code = db.code().code();
        matches!(&code[..2], "08" | "53" | "57") || matches!(code, "55P03" | "40001" | "40P01")
    });
    let message = format!("{message}: {}", describe(&error));
    if passing {
        StoreError::Unavailable {
            message,
            source: Some(Box::new(error)),
        }
    } else {
        StoreError::Backend {
            message,
            source: Some(Box::new(error)),
        }
    }
}

/// What the server said (its message and SQLSTATE, with detail and hint), or the driver's
/// error: tokio-postgres displays every server error as just "db error".
pub(super) fn describe(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        return error.to_string();
    };
    let mut text = format!(
        "{}: {} (SQLSTATE {})",
        db.severity(),
        db.message(),
        db.code().code()
    );
    if let Some(detail) = db.detail() {
        text.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = db.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text
}

/// Whether `error` is a serialization failure or a deadlock (SQLSTATE 40001, 40P01): the
/// server rolled the statement's transaction back.
fn is_rolled_back(error: &StoreError) -> bool {
    let StoreError::Unavailable {
        source: Some(source),
        ..
    } = error
    else {
        return false;
    };
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::as_db_error)
        .is_some_and(|db| matches!(db.code().code(), "40001" | "40P01"))
}

fn timed_out(what: &str, timeout: Duration) -> StoreError {
    StoreError::Unavailable {
        message: format!("{what} took longer than {timeout:?}"),
        source: None,
    }
}

/// How many times a claim statement is run again when a concurrent insert hid the record.
const CLAIM_ATTEMPTS: usize = 5;

/// Runs a claim statement with `run` until its answer can be judged: a record a concurrent
/// transaction inserted after the statement's snapshot hides from it, and the statement runs
/// again with a new snapshot, at most [`CLAIM_ATTEMPTS`] times.
pub(super) async fn claim_with<F>(
    key: &StorageKey,
    fingerprint: &Fingerprint,
    mut run: impl FnMut() -> F,
) -> Result<Claim, StoreError>
where
    F: Future<Output = Result<Vec<tokio_postgres::Row>, StoreError>>,
{
    for _ in 0..CLAIM_ATTEMPTS {
        if let Some(claim) = judge_claim(&run().await?, key, fingerprint)? {
            return Ok(claim);
        }
    }
    Err(StoreError::Backend {
        message: format!("the record under key {key} kept changing during the claim"),
        source: None,
    })
}

/// What a claim statement returned, before it is judged.
fn judge_claim(
    rows: &[tokio_postgres::Row],
    key: &StorageKey,
    fingerprint: &Fingerprint,
) -> Result<Option<Claim>, StoreError> {
    let corrupt = |message: &str| StoreError::Corrupt {
        key: key.to_hex(),
        message: message.to_string(),
    };
    let Some(row) = rows.first() else {
        // Another transaction inserted the record after this statement's snapshot was taken:
        // the caller runs the statement again, with a new snapshot.
        return Ok(None);
    };
    let read = |index: usize| -> Result<_, StoreError> {
        row.try_get::<_, Option<i64>>(index)
            .map_err(|_| corrupt("a column has an unexpected type"))
    };
    let acquired: bool = row
        .try_get(0)
        .map_err(|_| corrupt("unexpected claim row"))?;
    let fence = read(1)?.ok_or_else(|| corrupt("no fence"))?;
    if acquired {
        let fence = u64::try_from(fence).map_err(|_| corrupt("negative fence"))?;
        return Ok(Some(Claim::Acquired {
            fence: Fence::new(fence),
        }));
    }
    let format: Option<i16> = row
        .try_get(6)
        .map_err(|_| corrupt("unexpected format column"))?;
    if format != Some(sql::FORMAT) {
        return Err(corrupt(&format!(
            "record format {format:?} is not supported by this release (it reads {})",
            sql::FORMAT
        )));
    }
    // Borrowed from the row: the comparison needs no copy.
    let stored: Option<&[u8]> = row
        .try_get(2)
        .map_err(|_| corrupt("unexpected fingerprint column"))?;
    if stored.map(<[u8]>::len) != Some(32) {
        return Err(corrupt("the fingerprint is not 32 bytes"));
    }
    if stored != Some(fingerprint.as_bytes().as_slice()) {
        return Ok(Some(Claim::Mismatch));
    }
    let state: Option<i16> = row
        .try_get(3)
        .map_err(|_| corrupt("unexpected state column"))?;
    let left = read(5)?.unwrap_or(0);
    match state {
        Some(0) => Ok(Some(Claim::InProgress {
            // Whole ms, rounded down: a lease with less than a millisecond left is still live.
            retry_after: crate::stores::millis::left(left),
        })),
        Some(1) => {
            let output: Option<Vec<u8>> = row
                .try_get(4)
                .map_err(|_| corrupt("unexpected output column"))?;
            output
                .map(|output| {
                    Some(Claim::Completed {
                        output: output.into(),
                    })
                })
                .ok_or_else(|| corrupt("a completed record without output"))
        }
        other => Err(corrupt(&format!("unknown state {other:?}"))),
    }
}

/// The schema, claim and complete statement texts the store uses for `table`, for the
/// benches' raw-driver baseline (through `__private`).
pub(crate) fn statement_texts(
    table: &str,
) -> Result<crate::private::PostgresStatementTexts, String> {
    sql::check_table_name(table)?;
    let Statements {
        schema,
        claim,
        complete,
        ..
    } = Statements::new(table);
    Ok(crate::private::PostgresStatementTexts {
        schema,
        claim,
        complete,
    })
}

impl PostgresStore {
    /// A builder for the database at `url` (`postgres://user:password@host:port/database`).
    ///
    /// ```
    /// let builder = idempotent_core::stores::postgres::PostgresStore::builder("postgres://app@127.0.0.1/shop");
    /// ```
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            url: url.into(),
            table: "idempotent_records".to_string(),
            max_connections: 16,
            timeout: Duration::from_secs(2),
            poll_interval: Duration::from_millis(50),
        }
    }

    /// The table records are kept in.
    ///
    /// ```no_run
    /// # use idempotent_core::stores::postgres::PostgresStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = PostgresStore::builder("postgres://app@127.0.0.1/shop").build().await.unwrap();
    /// assert_eq!(store.table(), "idempotent_records");
    /// # }
    /// ```
    pub fn table(&self) -> &str {
        &self.table
    }

    async fn client(&self) -> Result<managed::Object<ConnectionManager>, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|error| StoreError::Unavailable {
                message: format!("no database connection: {error}"),
                source: Some(Box::new(error)),
            })
    }

    /// Runs one prepared statement on a pooled connection, within the timeout (getting the
    /// connection included). On a timeout the statement is cancelled and its connection closed.
    async fn query(
        &self,
        kind: Kind,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let pooled = tokio::time::timeout_at(deadline, self.client())
            .await
            .map_err(|_| timed_out("getting a connection", self.timeout))??;
        let mut running = Running::new(pooled, self.timeout);
        let work = async {
            let (client, prepared) = running
                .connection()
                .prepared(kind, &self.statements)
                .await?;
            client
                .query(prepared, params)
                .await
                .map_err(|error| from_pg("a statement failed", error))
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(result) => {
                running.done();
                result
            }
            Err(_) => {
                running.abandon().await;
                Err(timed_out("a statement", self.timeout))
            }
        }
    }

    /// The schema version recorded in `<table>_schema`, or `None` when the tables are missing
    /// or hold no version. Takes no lock on the records' table.
    async fn schema_version(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<Option<i32>, StoreError> {
        let schema_table = format!("{}_schema", self.table);
        // The catalog itself, read with the statement's snapshot: `to_regclass` would answer
        // from this connection's catalog cache, which does not hear of a table another
        // starter created while this one waited for its turn.
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables
                                WHERE tablename = $1 AND schemaname = ANY (current_schemas(false)))",
                &[&schema_table],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|error| from_pg("could not look for the schema table", error))?;
        if !exists {
            return Ok(None);
        }
        client
            .query_one(&format!("SELECT max(version) FROM {schema_table}"), &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|error| from_pg("could not read the schema version", error))
    }

    fn newer_schema(&self, version: i32) -> StoreError {
        StoreError::Backend {
            message: format!(
                "table {} has schema version {version}, newer than this release knows ({}): upgrade the library",
                self.table,
                sql::SCHEMA_VERSION
            ),
            source: None,
        }
    }

    /// Brings the tables to [`sql::SCHEMA_VERSION`] if they are not there yet.
    ///
    /// The version is read first, with no lock on the records' table: on tables that are up to
    /// date (every start but the first of a release) nothing else runs. `ALTER TABLE` waits for
    /// an exclusive lock on the table, behind any open transaction that touched it, and every
    /// statement on the table then queues behind that wait: run on every start, it let one
    /// server starting stall the calls of the whole fleet. When a migration is due, starters
    /// take turns on an advisory lock, and the migration waits for table locks no longer than
    /// the store's timeout (`lock_timeout`), then fails the start rather than stall the table.
    async fn migrate(&self) -> Result<(), StoreError> {
        let budget = self.timeout * 5;
        let pooled = tokio::time::timeout(budget, self.client())
            .await
            .map_err(|_| timed_out("getting a connection", budget))??;
        let mut running = Running::new(pooled, self.timeout);
        let work = async {
            let pooled = running.connection();
            match self.schema_version(&*pooled.client).await? {
                Some(version) if version == sql::SCHEMA_VERSION => return Ok(()),
                Some(version) if version > sql::SCHEMA_VERSION => {
                    return Err(self.newer_schema(version));
                }
                _ => {}
            }
            let transaction = pooled
                .client
                .transaction()
                .await
                .map_err(|error| from_pg("could not begin the schema transaction", error))?;
            // Processes starting together take turns; the lock ends with the transaction.
            transaction
                .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&self.table])
                .await
                .map_err(|error| from_pg("could not lock the schema", error))?;
            transaction
                .batch_execute(&format!(
                    "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
                    timeout_ms(self.timeout),
                    timeout_ms(budget)
                ))
                .await
                .map_err(|error| from_pg("could not set the schema's timeouts", error))?;
            // Another starter may have migrated while this one waited for its turn.
            let version = self.schema_version(&*transaction).await?;
            match version {
                Some(version) if version > sql::SCHEMA_VERSION => {
                    return Err(self.newer_schema(version));
                }
                Some(version) if version == sql::SCHEMA_VERSION => {}
                // New tables, or older ones the schema statements bring up to date.
                _ => {
                    transaction
                        .batch_execute(&self.statements.schema)
                        .await
                        .map_err(|error| {
                            from_pg(
                                "could not create or upgrade the tables (a transaction holding \
                                 them longer than the store's timeout makes the upgrade give up: \
                                 start again when it has ended)",
                                error,
                            )
                        })?;
                    let insert = format!("INSERT INTO {}_schema (version) VALUES ($1)", self.table);
                    transaction
                        .execute(&insert, &[&sql::SCHEMA_VERSION])
                        .await
                        .map_err(|error| from_pg("could not record the schema version", error))?;
                }
            }
            transaction
                .commit()
                .await
                .map_err(|error| from_pg("could not commit the schema", error))
        };
        match tokio::time::timeout(budget, work).await {
            Ok(result) => {
                running.done();
                result
            }
            Err(_) => {
                running.abandon().await;
                Err(timed_out("creating the tables", budget))
            }
        }
    }

    async fn fenced_write(
        &self,
        kind: Kind,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<FencedWrite, StoreError> {
        let rows = self.query(kind, params).await?;
        Ok(if rows.is_empty() {
            FencedWrite::Fenced
        } else {
            FencedWrite::Applied
        })
    }

    async fn lease_left(&self, key: &StorageKey) -> Result<Option<Duration>, StoreError> {
        let key = key.as_bytes().as_slice();
        let rows = self.query(Kind::LeaseLeft, &[&key]).await?;
        Ok(rows.first().map(|row| {
            let left: Option<i64> = row.try_get(0).unwrap_or(None);
            crate::stores::millis::left(left.unwrap_or(0))
        }))
    }
}

impl Store for PostgresStore {
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fingerprint: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let key_param = key.as_bytes().as_slice();
            let fingerprint_param = fingerprint.as_bytes().as_slice();
            let lease = millis(lease);
            claim_with(key, fingerprint, || async move {
                let mut attempts = 0;
                loop {
                    let result = self
                        .query(Kind::Claim, &[&key_param, &fingerprint_param, &lease])
                        .await;
                    // A serialization failure or deadlock rolled the statement back, and it
                    // runs in a transaction of its own: running it again is safe. (The store's
                    // connections are READ COMMITTED, where neither is expected.)
                    match result {
                        Err(error) if is_rolled_back(&error) && attempts < CLAIM_ATTEMPTS => {
                            attempts += 1;
                        }
                        result => return result,
                    }
                }
            })
            .await
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
            let key = key.as_bytes().as_slice();
            let (fence, output, ttl) = (fence_param(fence), &output[..], millis(ttl));
            self.fenced_write(Kind::Complete, &[&key, &fence, &output, &ttl])
                .await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let key = key.as_bytes().as_slice();
            let fence = fence_param(fence);
            self.fenced_write(Kind::Release, &[&key, &fence]).await
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let key = key.as_bytes().as_slice();
            let (fence, lease) = (fence_param(fence), millis(lease));
            self.fenced_write(Kind::Extend, &[&key, &fence, &lease])
                .await
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Listen first, then look: a notification after the look is always heard.
        let interest = async {
            let interest = self.listener.interest(key.to_hex()).await?;
            Some(async move {
                let mut interest = interest;
                interest.notified().await;
            })
        };
        Box::pin(wait_turn(
            interest,
            self.lease_left(key),
            max,
            self.poll_interval,
        ))
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let key = key.as_bytes().as_slice();
            Ok(!self.query(Kind::Remove, &[&key]).await?.is_empty())
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let rows = self.query(Kind::Purge, &[]).await?;
            let purged: i64 = rows
                .first()
                .and_then(|row| row.try_get(0).ok())
                .unwrap_or(0);
            Ok(u64::try_from(purged).unwrap_or(0))
        })
    }
}
