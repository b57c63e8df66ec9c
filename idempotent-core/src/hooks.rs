//! Hooks for the project's own fuzz targets (`fuzz/`) and benchmarks (`benches/`): they reach
//! parts of the engine and the stores that are not API. Not part of the API either: no semver
//! promise, hidden from the docs.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::recorded::{OkAndErr, OkOnly, Recording};

/// Decodes a completed record's output as a replay does: `OkAndErr` with `cache_errors`,
/// `OkOnly` without. For the fuzz targets.
pub fn decode_recorded_output<T, E>(
    bytes: &[u8],
    cache_errors: bool,
) -> serde_json::Result<Result<T, E>>
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
{
    if cache_errors {
        <OkAndErr as Recording<T, E>>::decode(bytes)
    } else {
        <OkOnly as Recording<T, E>>::decode(bytes)
    }
}

/// The SQL the PostgreSQL stores (`PostgresStore`, `SqlxPgStore`) run for a table: the schema it creates, its claim statement
/// (`$1` key, `$2` fingerprint, `$3` lease in ms) and its complete statement (`$1` key, `$2`
/// fence, `$3` output, `$4` ttl in ms).
#[cfg(any(feature = "postgres", feature = "sqlx-postgres"))]
#[derive(Debug, Clone)]
pub struct PostgresStatementTexts {
    /// The schema statements, run once at start-up.
    pub schema: String,
    /// The claim statement.
    pub claim: String,
    /// The complete statement.
    pub complete: String,
}

/// The statement texts the store uses for `table`, so the benches can run the same statements
/// on the raw driver. Fails on a table name the store would refuse.
#[cfg(any(feature = "postgres", feature = "sqlx-postgres"))]
pub fn postgres_statement_texts(table: &str) -> Result<PostgresStatementTexts, String> {
    let (schema, claim, complete) = crate::stores::postgres_sql::statement_texts(table)?;
    Ok(PostgresStatementTexts {
        schema,
        claim,
        complete,
    })
}
