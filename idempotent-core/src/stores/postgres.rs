//! The PostgreSQL store: a fleet of application servers sharing one database, and the one way
//! to make database side effects exactly-once (the transactional mode).
//!
//! A record is one row of the store's table. Each operation is one statement (prepared once per
//! connection): the claim inserts or takes over a dead record with `INSERT .. ON CONFLICT ..
//! DO UPDATE .. WHERE <dead> RETURNING`, and the same statement reads the live record when it
//! cannot claim, so a replay is one round trip. `complete`, `release` and `extend` are guarded
//! by the fence and a live lease (in the transactional mode, by the fence alone). Fences come
//! from a sequence, so they only grow.
//!
//! # Durability
//!
//! Each operation's statement commits on its own before the call returns (in the
//! transactional mode, the claim and the record commit with the caller's transaction). What
//! survives a crash is what the server keeps of its commits: with the defaults (`fsync = on`,
//! `synchronous_commit = on`) a completed record survives a crash of the server or the
//! machine; with `synchronous_commit = off` a crash may lose the last transactions, and a lost
//! completion is a key that can run again. With replication, a failover to a standby that had
//! not received a claim or a completion can let a key run twice, unless the standby is
//! synchronous (`synchronous_standby_names`).
//!
//! # Time
//!
//! Leases and expiry are measured on the database server's clock, never the application's, so
//! clock skew between application servers cannot break a lease. Every statement reads
//! `statement_timestamp()`, the start of the statement: not `now()`, the start of the
//! transaction, which in the transactional mode is the caller's transaction and can be long
//! past. Leases and ttls are sent in whole milliseconds, rounded up
//! ([`held_millis`](crate::held_millis)); the lease left is answered in whole milliseconds,
//! rounded up. A record past its `until` is dead: a claim takes it over, and
//! [`purge_expired`](Store::purge_expired) deletes it.
//!
//! # Waiting
//!
//! One connection besides the pool LISTENs on the channel `<table>_done`. A waiter registers
//! its interest in the key, then looks at the record with a statement that marks it
//! (`waiting`); `complete` and `release` NOTIFY the channel with the key, at commit, only when
//! a waiter marked the record, so no completion can slip between the look and the wait, and a
//! call nobody waits for notifies nothing (a notifying transaction takes a database-wide lock
//! at commit). The wait also ends when the holder's lease does. If the listening connection
//! cannot be had, a waiter looks again every
//! [`poll_interval`](PostgresStoreBuilder::poll_interval) (50 ms by default); when it is lost,
//! every waiter looks again at once. A store on the service's pool
//! ([`PostgresStore::from_pool`]) listens only when given
//! [`listen_url`](PostgresStoreBuilder::listen_url); without it, a waiter looks at the record
//! every `poll_interval` until the key leaves progress.
//!
//! # TLS
//!
//! With the feature `postgres-tls`, `sslmode` (`disable`, `prefer`, `require`, `verify-ca`,
//! `verify-full`) and `sslrootcert` in the connection string, read as libpq reads them; see
//! [`PostgresStore`].
//!
//! # Schema
//!
//! Created when missing, in the connection's schema search path, for the table `<table>`
//! ([`table`](PostgresStoreBuilder::table), default `idempotent_records`):
//! `<table>_schema(version)` (this release writes and reads version 2, brings a version 1 table
//! up to it by adding `waiting`, and refuses a newer one), the sequence `<table>_fences`, and
//! `<table>` (`key` bytea primary key of 32 bytes, `fingerprint` bytea of 32 bytes, `fence`
//! bigint, `state` smallint 0 in progress or 1 completed, `until` timestamptz, the lease end or
//! expiry, `output` bytea, `format` smallint, the record format version, 1, `waiting` boolean)
//! with an index on `until`. A new schema version is applied by one starting store at a time
//! (an advisory lock), waiting for the table no longer than the store's timeout. A row that
//! does not fit is reported as [`StoreError::Corrupt`] for its key, never taken for an absent
//! record; an operator can delete it (`DELETE FROM <table> WHERE key = '\x…'`) to make the
//! key usable again.

mod admin;
mod builder;
mod error;
mod listener;
mod pool;
mod record;
mod schema;
mod sql;
mod tls;
mod transaction;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::ToSql;

use crate::error::StoreError;
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};
// A lease or ttl as the statements take it, which a `bigint` and an `interval` hold.
use crate::stores::millis::held_i64 as millis;
use crate::stores::wait::wait_turn;
use error::{from_pg, is_rolled_back, timed_out};
use listener::Listener;
use pool::{Kind, Pool, Pooled, Running};
use record::{CLAIM_ATTEMPTS, claim_with, fence_param, judge_claim};
use sql::Statements;
use tls::{Connector, Mode};

pub use builder::PostgresStoreBuilder;
pub(crate) use transaction::InTransaction;
pub use transaction::PostgresTransaction;

/// A [`Store`] in PostgreSQL.
///
/// Besides the [`Store`] protocol (one statement per operation, its own connections), it has a
/// transactional mode: [`PostgresStore::run_in_transaction`] runs a call inside the caller's own
/// transaction, so the business writes and the record commit together or not at all.
///
/// TLS (feature `postgres-tls`, rustls): `sslmode` in the connection string, with libpq's
/// meanings. `disable`: plain text. `prefer` (the default): TLS if the server offers it,
/// plain text otherwise, the certificate not verified. `require`: TLS or no connection, but
/// the certificate is not verified, so it keeps out eavesdroppers, not an attacker on the
/// network who can answer in the server's place. `verify-ca`: the server's certificate must
/// be signed by one of the roots (the host name is not checked). `verify-full`: signed by one
/// of the roots and naming the host connected to: the mode to use wherever the network is not
/// trusted. The roots are the webpki roots (Mozilla's), or the CA certificates of a PEM file
/// named by `sslrootcert=` in the connection string or by
/// [`PostgresStoreBuilder::root_certificate_file`]. The pooled connections, the listening one
/// and the cancel requests all use it. Without the feature, a connection string asking for
/// `require`, `verify-ca` or `verify-full` is refused by `build` (never connected in plain
/// text), and `prefer` connects in plain text.
///
/// ```no_run
/// use idempotent_core::stores::postgres::PostgresStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::builder(
///     "postgres://app@db.internal/shop?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem",
/// )
/// .build()
/// .await?;
/// # Ok(()) }
/// ```
///
/// The service's own deadpool-postgres pool can carry the store's statements too:
/// [`PostgresStore::from_pool`].
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
    /// How connections are made, for the cancel requests.
    connector: Connector,
    /// The `sslmode` of the store's own connections, for the errors of their handshakes;
    /// `None` on the service's pool.
    tls_mode: Option<Mode>,
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
            root_certificate_file: None,
            pool: None,
            listen_url: None,
        }
    }

    /// A builder for a store whose statements run on `pool`, the service's own
    /// deadpool-postgres pool, within its limits: the store opens no pool of its own.
    ///
    /// The store's statements are prepared through the pool's statement cache
    /// (`prepare_cached`), and a statement that runs out of the store's
    /// [`timeout`](PostgresStoreBuilder::timeout) is cancelled on the server and its
    /// connection taken out of the pool and closed, as on the store's own connections.
    ///
    /// The service's connections do not carry the settings the store gives its own
    /// (`statement_timeout` and `lock_timeout` at the store's timeout, `READ COMMITTED`), and
    /// the store sets nothing on them: a statement is bounded by the store's timeout on the
    /// client side and then cancelled (the server stops it once the cancel request arrives; if
    /// that request is lost, a claim waiting for a row lock may still apply later, and its key
    /// stays in progress until its lease runs out); under a stricter default isolation, a claim
    /// that meets a serialization failure is run again, a few times, as on the store's own
    /// connections. `max_connections` does not apply: the pool's own limit does.
    ///
    /// Waiting: a pooled connection cannot receive notifications, so the store listens on a
    /// connection of its own only when given [`listen_url`](PostgresStoreBuilder::listen_url)
    /// (one connection besides the pool); without it, waiters look at the record again every
    /// [`poll_interval`](PostgresStoreBuilder::poll_interval).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
    /// use idempotent_core::stores::postgres::PostgresStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let url = "postgres://app@127.0.0.1/shop";
    /// // The service's pool, with its own limit.
    /// let manager = Manager::from_config(
    ///     url.parse()?,
    ///     tokio_postgres::NoTls,
    ///     ManagerConfig { recycling_method: RecyclingMethod::Fast },
    /// );
    /// let pool = Pool::builder(manager).max_size(8).build()?;
    ///
    /// let store = PostgresStore::from_pool(pool.clone())
    ///     .listen_url(url) // one more connection, for waiters to be woken
    ///     .build()
    ///     .await?;
    /// idempotent_core::set_default_store(Arc::new(store))?;
    ///
    /// // The service's own queries share the pool with the store.
    /// let orders: i64 = pool.get().await?.query_one("SELECT count(*) FROM orders", &[]).await?.get(0);
    /// # let _ = orders;
    /// # Ok(()) }
    /// ```
    pub fn from_pool(pool: deadpool_postgres::Pool) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            pool: Some(pool),
            ..PostgresStore::builder(String::new())
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

    async fn client(&self) -> Result<Pooled, StoreError> {
        self.pool.get().await.map_err(|error| {
            if let (Some(mode), deadpool::managed::PoolError::Backend(failure)) =
                (self.tls_mode, &error)
                && let Some(tls) = tls::tls_failure(mode, failure)
            {
                return tls;
            }
            StoreError::Unavailable {
                message: format!("no database connection: {error}"),
                source: Some(Box::new(error)),
            }
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
        let mut running = Running::new(pooled, self.timeout, self.connector.clone());
        let work = async {
            let (client, prepared) = running
                .connection()
                .prepared(kind, &self.statements)
                .await?;
            client
                .query(&prepared, params)
                .await
                .map_err(|error| from_pg("a statement failed", error))
        };
        let outcome = tokio::time::timeout_at(deadline, work).await;
        running.end(outcome, "a statement", self.timeout).await
    }

    /// Runs `sql` (not prepared ahead: the operator's statements, `admin.rs`) within the
    /// store's timeout, as [`query`](Self::query) runs the protocol's.
    async fn query_text(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let pooled = tokio::time::timeout_at(deadline, self.client())
            .await
            .map_err(|_| timed_out("getting a connection", self.timeout))??;
        let mut running = Running::new(pooled, self.timeout, self.connector.clone());
        let work = async {
            running
                .connection()
                .client()
                .query(sql, params)
                .await
                .map_err(|error| from_pg("a statement failed", error))
        };
        let outcome = tokio::time::timeout_at(deadline, work).await;
        running.end(outcome, "a statement", self.timeout).await
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

    /// A waiter's look: the lease left while `key` is in progress, its row marked `waiting`.
    ///
    /// Two waiters whose looks both find the row unmarked race for the mark; the second finds
    /// the row changed since its snapshot (marked by the first) and returns nothing, as if the
    /// key had left progress. A second look, with a snapshot of its own, sees the mark and the
    /// lease. A key that did leave progress is found by neither, so only a waiter that will
    /// return at once pays the second statement.
    async fn lease_left(&self, key: &StorageKey) -> Result<Option<Duration>, StoreError> {
        let key = key.as_bytes().as_slice();
        for _ in 0..2 {
            if let Some(left) = record::lease_left(&self.query(Kind::LeaseLeft, &[&key]).await?)? {
                return Ok(Some(left));
            }
        }
        Ok(None)
    }
}

impl PostgresStore {
    /// `wait` with nowhere to listen (the service's pool without `listen_url`): looks at the
    /// record every `poll_interval` until the key leaves progress, its lease ends, or `max`.
    async fn poll_until_done(&self, key: &StorageKey, max: Duration) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + max;
        while let Some(left) = self.lease_left(key).await? {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let pause = left.min(deadline - now).min(self.poll_interval);
            tokio::time::sleep(pause).await;
        }
        Ok(())
    }
}

impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
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
        if !self.listener.configured() {
            return Box::pin(self.poll_until_done(key, max));
        }
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
        Box::pin(async move { record::purged(&self.query(Kind::Purge, &[]).await?) })
    }
}
