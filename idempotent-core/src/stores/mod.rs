//! The stores. The in-memory store is always there; the others are behind cargo features.

pub mod memory;
#[cfg(any(
    feature = "sqlite",
    feature = "sqlx-sqlite",
    feature = "postgres",
    feature = "redis",
    feature = "sqlx-postgres"
))]
mod millis;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "postgres", feature = "sqlx-postgres"))]
pub(crate) mod postgres_sql;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "sqlite", feature = "sqlx-sqlite"))]
mod sqlite_format;
#[cfg(feature = "sqlx-postgres")]
pub mod sqlx_postgres;
#[cfg(feature = "sqlx-sqlite")]
pub mod sqlx_sqlite;
#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-sqlite"))]
mod sqlx_tx;
#[cfg(any(feature = "postgres", feature = "redis", feature = "sqlx-postgres"))]
mod wait;
#[cfg(any(
    feature = "sqlite",
    feature = "sqlx-sqlite",
    feature = "postgres",
    feature = "sqlx-postgres"
))]
mod wake_table;
