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
