//! The stores. The in-memory store is always there; the others are behind cargo features.

pub mod memory;
#[cfg(any(
    feature = "sqlite",
    feature = "sqlx-sqlite",
    feature = "postgres",
    feature = "redis"
))]
mod millis;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "sqlite", feature = "sqlx-sqlite"))]
mod sqlite_format;
#[cfg(feature = "sqlx-sqlite")]
pub mod sqlx_sqlite;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod wait;
#[cfg(any(feature = "sqlite", feature = "sqlx-sqlite", feature = "postgres"))]
mod wake_table;
