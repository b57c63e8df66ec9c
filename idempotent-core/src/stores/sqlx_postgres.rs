//! The PostgreSQL store on a `sqlx::PgPool` the service already has: the protocol of
//! [`PostgresStore`](crate::stores::postgres) (its tables, statements, fences and
//! notifications), through sqlx, and its transactional mode in a
//! `sqlx::Transaction<'_, Postgres>`.
//!
//! A table written by one of the two PostgreSQL stores is read by the other: they create and
//! read the same tables (`<table>`, `<table>_schema` with the same schema version, the sequence
//! `<table>_fences`), run the same statements, and notify on the same channel `<table>_done`.
//! Each operation is one statement: the claim inserts or takes over a dead record with
//! `INSERT .. ON CONFLICT .. DO UPDATE .. WHERE <dead> RETURNING`, and the same statement reads
//! the live record when it cannot claim, so a replay is one round trip. The statements run
//! through `sqlx::query` as persistent statements: sqlx prepares each once per connection and
//! keeps it in the connection's statement cache (`statement_cache_capacity`, 100 by default;
//! the store uses 7).
//!
//! sqlx pings a pooled connection before handing it out (`test_before_acquire`, on by
//! default): a round trip before each of the store's statements, so a replay costs two. Turn
//! it off on the pool the store uses (`PgPoolOptions::test_before_acquire(false)`); a broken
//! connection then fails one statement, and its call, with a store error.
//!
//! Durability, time, the schema and what a row that does not fit means are as for
//! `PostgresStore`: see its module documentation.
//!
//! # Waiting
//!
//! One connection of the pool is taken by a `sqlx::postgres::PgListener` that LISTENs on
//! `<table>_done`, from the first wait on (size the pool for it). A waiter registers its
//! interest in the key, then looks at the record with a statement that marks it (`waiting`);
//! `complete` and `release` NOTIFY the channel with the key, at commit, only when a waiter
//! marked the record. When the listening connection is lost, every waiter looks again at once,
//! and until a new one listens, waiters look again every
//! [`poll_interval`](SqlxPgStoreBuilder::poll_interval) (50 ms by default).
//!
//! # Timeouts
//!
//! Getting a connection and running a statement take at most
//! [`timeout`](SqlxPgStoreBuilder::timeout) together; then the call fails with
//! [`StoreError::Unavailable`]. sqlx 0.9 sends no cancel request when a statement's future is
//! dropped: a connection given back to the pool is pinged first, which waits for the statement
//! in flight to end. So a statement that ran out of time goes on on the server until it ends,
//! and may still apply; the store closes its connection rather than give it back. What can keep
//! one of the store's statements running is a row lock: a transactional-mode claim of the same
//! key, uncommitted. A claim that applies after its caller gave up holds its key, with nobody
//! running it, until its lease runs out, and is then taken over; a completion or a release that
//! applies late is guarded by its fence. Unlike `PostgresStore`, this store does not own the
//! connections and leaves their settings alone: give the pool's connections `lock_timeout` and
//! `statement_timeout` (for example `PgConnectOptions::options([("lock_timeout", "2s"),
//! ("statement_timeout", "30s")])`) to bound such statements on the server. (Bounding each
//! statement itself would need a transaction around it, `SET LOCAL` in it: three round trips
//! instead of one.)

mod builder;
pub(crate) mod error;
mod listener;
mod record;
mod schema;
mod transaction;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{AssertSqlSafe, PgPool, Postgres, SqlSafeStr, SqlStr};

use crate::error::StoreError;
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};
use crate::stores::millis::held_i64 as millis;
use crate::stores::postgres_sql::{self, CLAIM_ATTEMPTS, fence_param};
use crate::stores::wait::wait_turn;
use error::{from_sqlx, is_rolled_back, timed_out};
use listener::Listener;

pub use builder::SqlxPgStoreBuilder;
// The ledger the `#[idempotent(tx = ..)]` attribute builds for a sqlx transaction.
pub(crate) use transaction::InSqlxPgTransaction;

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// The statements of `postgres_sql.rs` as sqlx takes them: shared, so a query clones a pointer.
struct Statements {
    schema: SqlStr,
    claim: SqlStr,
    claim_in_transaction: SqlStr,
    complete: SqlStr,
    release: SqlStr,
    complete_in_transaction: SqlStr,
    release_in_transaction: SqlStr,
    extend: SqlStr,
    lease_left: SqlStr,
    purge: SqlStr,
    remove: SqlStr,
}

impl Statements {
    fn new(texts: &postgres_sql::Statements) -> Self {
        let sql = |text: &String| AssertSqlSafe(Arc::<str>::from(text.as_str())).into_sql_str();
        Self {
            schema: sql(&texts.schema),
            claim: sql(&texts.claim),
            claim_in_transaction: sql(&texts.claim_in_transaction),
            complete: sql(&texts.complete),
            release: sql(&texts.release),
            complete_in_transaction: sql(&texts.complete_in_transaction),
            release_in_transaction: sql(&texts.release_in_transaction),
            extend: sql(&texts.extend),
            lease_left: sql(&texts.lease_left),
            purge: sql(&texts.purge),
            remove: sql(&texts.remove),
        }
    }
}

/// A [`Store`] in PostgreSQL on a [`sqlx::PgPool`] the service already has: one pool, one set
/// of limits.
///
/// The same tables and statements as
/// [`PostgresStore`](crate::stores::postgres::PostgresStore), so either can read what the
/// other wrote; a transactional mode, [`SqlxPgStore::run_in_transaction`], runs a call inside
/// the caller's `sqlx::Transaction`, so the business writes and the record commit together or
/// not at all. TLS is the pool's (sqlx's own `sslmode`).
///
/// ```no_run
/// use std::sync::Arc;
/// use idempotent_core::{set_default_store, stores::sqlx_postgres::SqlxPgStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/shop").await?;
/// let store = SqlxPgStore::builder(pool.clone()).build().await?;
/// set_default_store(Arc::new(store))?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlxPgStore {
    pool: PgPool,
    statements: Arc<Statements>,
    listener: Arc<Listener>,
    table: Arc<str>,
    timeout: Duration,
    poll_interval: Duration,
}

impl fmt::Debug for SqlxPgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxPgStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl SqlxPgStore {
    /// A builder for a store on `pool` (the table `idempotent_records`, a 2 s timeout).
    ///
    /// ```
    /// # async fn f(pool: sqlx::PgPool) {
    /// let builder = idempotent_core::stores::sqlx_postgres::SqlxPgStore::builder(pool);
    /// # }
    /// ```
    pub fn builder(pool: PgPool) -> SqlxPgStoreBuilder {
        SqlxPgStoreBuilder {
            pool,
            table: "idempotent_records".to_string(),
            timeout: Duration::from_secs(2),
            poll_interval: Duration::from_millis(50),
        }
    }

    /// The table records are kept in.
    ///
    /// ```no_run
    /// # use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/shop").await.unwrap();
    /// let store = SqlxPgStore::builder(pool).build().await.unwrap();
    /// assert_eq!(store.table(), "idempotent_records");
    /// # }
    /// ```
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The pool the store runs on.
    ///
    /// ```no_run
    /// # use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/shop").await.unwrap();
    /// let store = SqlxPgStore::builder(pool).build().await.unwrap();
    /// let mut tx = store.pool().begin().await.unwrap();
    /// # }
    /// ```
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `statement` with what `bind` binds on a pooled connection, within the timeout
    /// (getting the connection included). Out of time, the connection is closed, not given
    /// back to the pool (see "Timeouts" in the module docs).
    async fn query(
        &self,
        statement: &SqlStr,
        bind: impl FnOnce(Query<'_>) -> Query<'_>,
    ) -> Result<Vec<PgRow>, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pooled = tokio::time::timeout_at(deadline, self.pool.acquire())
            .await
            .map_err(|_| timed_out("getting a connection", self.timeout))?
            .map_err(|error| from_sqlx("no database connection", error))?;
        let query = bind(sqlx::query(statement.clone()));
        match tokio::time::timeout_at(deadline, query.fetch_all(&mut *pooled)).await {
            Ok(rows) => rows.map_err(|error| from_sqlx("a statement failed", error)),
            Err(_) => {
                pooled.close_on_drop();
                Err(timed_out("a statement", self.timeout))
            }
        }
    }

    async fn fenced_write(
        &self,
        statement: &SqlStr,
        bind: impl FnOnce(Query<'_>) -> Query<'_>,
    ) -> Result<FencedWrite, StoreError> {
        let rows = self.query(statement, bind).await?;
        Ok(if rows.is_empty() {
            FencedWrite::Fenced
        } else {
            FencedWrite::Applied
        })
    }

    /// A waiter's look: the lease left while `key` is in progress, its row marked `waiting`.
    /// Two looks at most, as `PostgresStore` does: a look that lost the race for the mark to
    /// another waiter's returns nothing, and the second, with a snapshot of its own, sees it.
    async fn lease_left(&self, key: &StorageKey) -> Result<Option<Duration>, StoreError> {
        let key = key.as_bytes().as_slice();
        for _ in 0..2 {
            let rows = self
                .query(&self.statements.lease_left, |q| q.bind(key))
                .await?;
            if let Some(left) = record::lease_left(&rows)? {
                return Ok(Some(left));
            }
        }
        Ok(None)
    }
}

impl Store for SqlxPgStore {
    fn kind(&self) -> &'static str {
        "sqlx_postgres"
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let fingerprint = &arguments.fingerprint();
            let key_param = key.as_bytes().as_slice();
            let fingerprint_param = fingerprint.as_bytes().as_slice();
            let lease = millis(lease);
            for _ in 0..CLAIM_ATTEMPTS {
                let mut attempts = 0;
                let rows = loop {
                    let result = self
                        .query(&self.statements.claim, |q| {
                            q.bind(key_param).bind(fingerprint_param).bind(lease)
                        })
                        .await;
                    // A serialization failure or deadlock rolled the statement back, and it
                    // runs in a transaction of its own: running it again is safe.
                    match result {
                        Err(error) if is_rolled_back(&error) && attempts < CLAIM_ATTEMPTS => {
                            attempts += 1;
                        }
                        result => break result?,
                    }
                };
                if let Some(claim) = record::judge_claim(&rows, key, fingerprint)? {
                    return Ok(claim);
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
            let key = key.as_bytes().as_slice();
            let (fence, ttl) = (fence_param(fence), millis(ttl));
            self.fenced_write(&self.statements.complete, |q| {
                q.bind(key).bind(fence).bind(&output[..]).bind(ttl)
            })
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
            self.fenced_write(&self.statements.release, |q| q.bind(key).bind(fence))
                .await
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
            self.fenced_write(&self.statements.extend, |q| {
                q.bind(key).bind(fence).bind(lease)
            })
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
            let rows = self.query(&self.statements.remove, |q| q.bind(key)).await?;
            Ok(!rows.is_empty())
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move { record::purged(&self.query(&self.statements.purge, |q| q).await?) })
    }
}
