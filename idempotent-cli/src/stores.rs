//! The store a URL names, opened for an operator.

use std::path::Path;

use idempotent_core::admin::Admin;
use idempotent_core::stores::postgres::PostgresStore;
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::stores::sqlite::SqliteStore;

use crate::Failure;

/// One of the stores the CLI reads.
pub(crate) enum Opened {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
    Redis(RedisStore),
}

impl Opened {
    pub(crate) fn admin(&self) -> &dyn Admin {
        match self {
            Opened::Sqlite(store) => store,
            Opened::Postgres(store) => store,
            Opened::Redis(store) => store,
        }
    }

    /// Whether the store deletes ended records by itself (Redis).
    pub(crate) fn expires_by_itself(&self) -> bool {
        matches!(self, Opened::Redis(_))
    }
}

/// Opens the store at `url`. A SQLite database must exist already: the CLI never creates one.
pub(crate) async fn open(url: &str, table: &str, key_prefix: &str) -> Result<Opened, Failure> {
    let store_failed = |error: idempotent_core::StoreError| {
        Failure::Store(format!(
            "could not open the store at {}: {error}",
            redacted(url)
        ))
    };
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if path.is_empty() {
            return Err(Failure::Usage(
                "a SQLite URL needs a path: sqlite:///var/lib/app/idempotency.sqlite3".to_string(),
            ));
        }
        if !Path::new(path).is_file() {
            return Err(Failure::Usage(format!(
                "no SQLite database at {path}: give the path the store was opened with"
            )));
        }
        return SqliteStore::open(path)
            .map(Opened::Sqlite)
            .map_err(store_failed);
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return PostgresStore::builder(url)
            .table(table)
            .build()
            .await
            .map(Opened::Postgres)
            .map_err(store_failed);
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return RedisStore::builder(url)
            .key_prefix(key_prefix)
            .build()
            .map(Opened::Redis)
            .map_err(store_failed);
    }
    Err(Failure::Usage(format!(
        "unknown store URL {}: give sqlite://<path>, postgres://…, redis://… or rediss://…",
        redacted(url)
    )))
}

/// `url` without the password between `:` and `@`, for messages.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((credentials, host)) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("postgres://shop:s3cret@db:5432/shop"),
            "postgres://shop:***@db:5432/shop"
        );
        assert_eq!(
            redacted("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(redacted("sqlite:///tmp/x"), "sqlite:///tmp/x");
    }
}
