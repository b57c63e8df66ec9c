//! Opening connections and the database's schema, with its version.
//!
//! The schema itself, its version rules and the fence triggers are shared with the sqlx store
//! (`stores/sqlite_format.rs`).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use super::Synchronous;
use super::pool::from_sqlite;
use crate::error::StoreError;
use crate::stores::sqlite_format::{
    CREATE, INSERT_FENCE, INSERT_VERSION, SCHEMA_VERSION, SELECT_VERSION, check_version,
};

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
    let version: Option<i64> = transaction
        .query_row(SELECT_VERSION, [], |row| row.get(0))
        .map_err(failed)?;
    if check_version(version, &path.display().to_string())? {
        transaction
            .execute(INSERT_VERSION, [SCHEMA_VERSION])
            .map_err(failed)?;
    }
    transaction.execute(INSERT_FENCE, []).map_err(failed)?;
    transaction.commit().map_err(failed)
}
