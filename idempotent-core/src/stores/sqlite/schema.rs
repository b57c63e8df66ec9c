//! Opening connections and the database's schema, with its version.
//!
//! ```sql
//! idempotent_schema(version INTEGER NOT NULL)            -- one row: the schema version
//! idempotent_fence(id INTEGER PRIMARY KEY CHECK (id = 1),
//!                  last INTEGER NOT NULL)                -- the last fence handed out
//! idempotent_records(key BLOB NOT NULL PRIMARY KEY,      -- the 32-byte storage key
//!                    fingerprint BLOB, fence INTEGER,
//!                    state TEXT,                         -- 'in_progress' | 'completed'
//!                    until INTEGER,                      -- ms since the Unix epoch
//!                    output BLOB, format INTEGER)        -- record format version
//! ```
//!
//! The record columns are deliberately free of `NOT NULL` and type constraints: a row that
//! does not fit is reported as corrupt by the reader, with what is wrong, rather than being
//! refused in ways that would hide it.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use super::Synchronous;
use super::pool::from_sqlite;
use crate::error::StoreError;

/// The schema version this release creates and understands.
pub(super) const SCHEMA_VERSION: i64 = 1;

const CREATE: &str = "
CREATE TABLE IF NOT EXISTS idempotent_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idempotent_fence (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotent_records (
    key BLOB NOT NULL PRIMARY KEY,
    fingerprint BLOB,
    fence INTEGER,
    state TEXT,
    until INTEGER,
    output BLOB,
    format INTEGER
);
CREATE INDEX IF NOT EXISTS idempotent_records_until ON idempotent_records (until);
";

/// How each connection is set up.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectionSettings {
    pub(super) busy_timeout: Duration,
    pub(super) synchronous: Synchronous,
}

/// Opens one connection to `path` with the store's pragmas.
pub(super) fn open(path: &Path, settings: ConnectionSettings) -> Result<Connection, StoreError> {
    let connection = Connection::open(path).map_err(|error| {
        from_sqlite(
            &format!("could not open the SQLite database {}", path.display()),
            error,
            settings.busy_timeout,
        )
    })?;
    let setup = |connection: &Connection| -> rusqlite::Result<()> {
        connection.busy_timeout(settings.busy_timeout)?;
        connection.pragma_update(None, "synchronous", settings.synchronous.pragma())?;
        Ok(())
    };
    setup(&connection).map_err(|error| {
        from_sqlite(
            "could not set up a SQLite connection",
            error,
            settings.busy_timeout,
        )
    })?;
    Ok(connection)
}

/// Switches the database to WAL, creates what is missing, and refuses a schema this release
/// does not know.
pub(super) fn prepare(
    connection: &mut Connection,
    path: &Path,
    busy_timeout: Duration,
) -> Result<(), StoreError> {
    let failed = |error| from_sqlite("could not prepare the SQLite schema", error, busy_timeout);
    // WAL is a property of the file: once set, every connection (and process) uses it.
    let mode: String = connection
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .map_err(failed)?;
    if !mode.eq_ignore_ascii_case("wal") {
        let mode: String = connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(failed)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend {
                message: format!(
                    "the SQLite database {} could not be switched to WAL journal mode (it is in {mode:?} mode)",
                    path.display()
                ),
                source: None,
            });
        }
    }
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    transaction.execute_batch(CREATE).map_err(failed)?;
    // An aggregate answers one row, NULL on an empty table.
    let version: Option<i64> = transaction
        .query_row("SELECT max(version) FROM idempotent_schema", [], |row| {
            row.get(0)
        })
        .map_err(failed)?;
    match version {
        None => {
            transaction
                .execute(
                    "INSERT INTO idempotent_schema (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(failed)?;
        }
        Some(SCHEMA_VERSION) => {}
        Some(version) if version > SCHEMA_VERSION => {
            return Err(StoreError::Backend {
                message: format!(
                    "the SQLite database {} has schema version {version}, newer than this release of idempotent-core knows (version {SCHEMA_VERSION}); upgrade idempotent-core, or use another database file",
                    path.display()
                ),
                source: None,
            });
        }
        Some(version) => {
            return Err(StoreError::Backend {
                message: format!(
                    "the SQLite database {} has schema version {version}, which no release of idempotent-core wrote (this one uses version {SCHEMA_VERSION})",
                    path.display()
                ),
                source: None,
            });
        }
    }
    transaction
        .execute(
            "INSERT INTO idempotent_fence (id, last) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
            [],
        )
        .map_err(failed)?;
    transaction.commit().map_err(failed)
}
