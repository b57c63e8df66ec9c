//! The stores the fleet tests run against, chosen by name in child processes.

use std::sync::Arc;

use idempotent_core::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    #[cfg(feature = "postgres")]
    Postgres,
    #[cfg(feature = "redis")]
    Redis,
    /// A Redis Cluster; the "url" is its nodes' URLs, separated by commas.
    #[cfg(feature = "redis")]
    RedisCluster,
    #[cfg(feature = "sqlite")]
    Sqlite,
    #[cfg(feature = "sqlx-postgres")]
    SqlxPostgres,
    #[cfg(feature = "sqlx-sqlite")]
    SqlxSqlite,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            Kind::Postgres => "postgres",
            #[cfg(feature = "redis")]
            Kind::Redis => "redis",
            #[cfg(feature = "redis")]
            Kind::RedisCluster => "redis-cluster",
            #[cfg(feature = "sqlite")]
            Kind::Sqlite => "sqlite",
            #[cfg(feature = "sqlx-postgres")]
            Kind::SqlxPostgres => "sqlx-postgres",
            #[cfg(feature = "sqlx-sqlite")]
            Kind::SqlxSqlite => "sqlx-sqlite",
        }
    }

    pub fn from_name(name: &str) -> Kind {
        match name {
            #[cfg(feature = "postgres")]
            "postgres" => Kind::Postgres,
            #[cfg(feature = "redis")]
            "redis" => Kind::Redis,
            #[cfg(feature = "redis")]
            "redis-cluster" => Kind::RedisCluster,
            #[cfg(feature = "sqlite")]
            "sqlite" => Kind::Sqlite,
            #[cfg(feature = "sqlx-postgres")]
            "sqlx-postgres" => Kind::SqlxPostgres,
            #[cfg(feature = "sqlx-sqlite")]
            "sqlx-sqlite" => Kind::SqlxSqlite,
            other => panic!("unknown store kind {other:?}"),
        }
    }
}

/// Connects to the store; must run inside a Tokio runtime.
pub async fn connect(kind: Kind, url: &str) -> Arc<dyn Store> {
    match kind {
        #[cfg(feature = "postgres")]
        Kind::Postgres => Arc::new(
            idempotent_core::stores::postgres::PostgresStore::builder(url)
                .max_connections(8)
                .build()
                .await
                .expect("connect to PostgreSQL"),
        ),
        #[cfg(feature = "redis")]
        Kind::Redis => crate::support::redis_store(url),
        #[cfg(feature = "redis")]
        Kind::RedisCluster => Arc::new(
            idempotent_core::stores::redis::RedisStore::cluster_builder(url.split(','))
                .build()
                .expect("valid Redis Cluster URLs"),
        ),
        #[cfg(feature = "sqlite")]
        Kind::Sqlite => Arc::new(
            idempotent_core::stores::sqlite::SqliteStore::open(url)
                .expect("open the SQLite database"),
        ),
        #[cfg(feature = "sqlx-postgres")]
        Kind::SqlxPostgres => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect(url)
                .await
                .expect("connect to PostgreSQL");
            Arc::new(
                idempotent_core::stores::sqlx_postgres::SqlxPgStore::builder(pool)
                    .build()
                    .await
                    .expect("create the tables"),
            )
        }
        #[cfg(feature = "sqlx-sqlite")]
        Kind::SqlxSqlite => Arc::new(
            idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore::builder(
                sqlx_sqlite_pool(url).await,
            )
            .build()
            .await
            .expect("prepare the SQLite database"),
        ),
    }
}

/// The fence of the record under `key` (of `crate::child::NAME`), read straight from the
/// store's storage, beside the protocol.
pub async fn current_fence(kind: Kind, url: &str, key: &str) -> u64 {
    let storage_key = crate::child::storage_key(key);
    match kind {
        #[cfg(feature = "postgres")]
        Kind::Postgres => {
            let client = crate::support::postgres_client(url).await;
            let fence: i64 = client
                .query_one(
                    "SELECT fence FROM idempotent_records WHERE key = $1",
                    &[&storage_key.as_bytes().as_slice()],
                )
                .await
                .expect("the record has a fence")
                .get(0);
            fence.try_into().expect("a positive fence")
        }
        #[cfg(feature = "redis")]
        Kind::Redis => {
            let store = idempotent_core::stores::redis::RedisStore::builder(url)
                .build()
                .expect("a valid Redis URL");
            let client = redis::Client::open(url).expect("a valid Redis URL");
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            // The record is `2<state><fingerprint>|<fence>|<output>` (redis/prelude.lua).
            let record: Vec<u8> = redis::cmd("GET")
                .arg(store.record_key(&storage_key))
                .query_async(&mut connection)
                .await
                .expect("the record exists");
            fence_of(&record)
        }
        #[cfg(feature = "redis")]
        Kind::RedisCluster => {
            let store = idempotent_core::stores::redis::RedisStore::cluster_builder(url.split(','))
                .build()
                .expect("valid Redis Cluster URLs");
            let mut connection = redis::cluster::ClusterClient::new(url.split(','))
                .expect("valid Redis Cluster URLs")
                .get_async_connection()
                .await
                .expect("connect to the cluster");
            let record: Vec<u8> = redis::cmd("GET")
                .arg(store.record_key(&storage_key))
                .query_async(&mut connection)
                .await
                .expect("the record exists");
            fence_of(&record)
        }
        #[cfg(feature = "sqlite")]
        Kind::Sqlite => {
            let connection = rusqlite::Connection::open(url).expect("open the database file");
            connection
                .busy_timeout(std::time::Duration::from_secs(5))
                .expect("set a busy timeout");
            let fence: i64 = connection
                .query_row(
                    "SELECT fence FROM idempotent_records WHERE key = ?1",
                    [storage_key.as_bytes().as_slice()],
                    |row| row.get(0),
                )
                .expect("the record has a fence");
            fence.try_into().expect("a non-negative fence")
        }
        #[cfg(feature = "sqlx-postgres")]
        Kind::SqlxPostgres => {
            let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(url)
                .await
                .expect("connect to PostgreSQL");
            let fence: i64 =
                sqlx::query_scalar("SELECT fence FROM idempotent_records WHERE key = $1")
                    .bind(storage_key.as_bytes().as_slice())
                    .fetch_one(&mut connection)
                    .await
                    .expect("the record has a fence");
            fence.try_into().expect("a positive fence")
        }
        #[cfg(feature = "sqlx-sqlite")]
        Kind::SqlxSqlite => {
            let fence: i64 =
                sqlx::query_scalar("SELECT fence FROM idempotent_records WHERE key = ?1")
                    .bind(storage_key.as_bytes().as_slice())
                    .fetch_one(&sqlx_sqlite_pool(url).await)
                    .await
                    .expect("the record has a fence");
            fence.try_into().expect("a non-negative fence")
        }
    }
}

/// The fence of a Redis record, `2<state><fingerprint>|<fence>|<output>` (redis/prelude.lua).
#[cfg(feature = "redis")]
fn fence_of(record: &[u8]) -> u64 {
    let fence = record
        .split(|&byte| byte == b'|')
        .nth(1)
        .expect("a record with a fence");
    std::str::from_utf8(fence)
        .expect("an ASCII fence")
        .parse()
        .expect("a numeric fence")
}

/// A pool on the database file `path`, as a service would open it: WAL, sqlx's defaults
/// otherwise.
#[cfg(feature = "sqlx-sqlite")]
pub async fn sqlx_sqlite_pool(path: &str) -> sqlx::SqlitePool {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    sqlx::SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal),
    )
    .await
    .expect("open the SQLite database")
}
