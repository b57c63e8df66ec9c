//! One row of `idempotent_records`, read defensively through the format both SQLite stores
//! share (`stores/sqlite_format.rs`): a row that does not fit is [`StoreError::Corrupt`],
//! never a panic and never taken for an absent record.

use rusqlite::types::ValueRef;

use crate::error::StoreError;
use crate::key::StorageKey;
use crate::stores::sqlite_format::Value;
pub(super) use crate::stores::sqlite_format::{
    COMPLETED, FORMAT, IN_PROGRESS, Record, SELECT_RECORD, State, now_ms, until, until_from,
};

/// Parses a row selected with [`SELECT_RECORD`]; copies the output only if `want_output`.
pub(super) fn from_row(
    row: &rusqlite::Row<'_>,
    key: &StorageKey,
    want_output: bool,
) -> Result<Result<Record, StoreError>, rusqlite::Error> {
    Record::parse(
        |index| {
            Ok(match row.get_ref(index)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(n) => Value::Integer(n),
                ValueRef::Real(x) => Value::Real(x),
                ValueRef::Text(text) => Value::Text(text),
                ValueRef::Blob(bytes) => Value::Blob(bytes),
            })
        },
        key,
        want_output,
    )
}
