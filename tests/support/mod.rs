//! Pieces the root package's tests share.
#![allow(dead_code)]

/// A plain PostgreSQL client beside the store, as the application (or an operator) has one:
/// for its own transactions, or to read records straight from the table. Must run inside a
/// Tokio runtime, which drives the connection.
#[cfg(feature = "postgres")]
pub async fn postgres_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A Redis store at `url` with the default settings, as the fault and fleet tests use it.
#[cfg(feature = "redis")]
pub fn redis_store(url: &str) -> std::sync::Arc<dyn idempotent_core::Store> {
    std::sync::Arc::new(
        idempotent_core::stores::redis::RedisStore::builder(url)
            .build()
            .expect("a valid Redis URL"),
    )
}
