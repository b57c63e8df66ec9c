//! The protocol's statements on a sqlx SQLite executor (the pool, or the caller's transaction),
//! and what their answers mean.
//!
//! Each statement is one round trip to the connection's worker thread, so each operation is as
//! few statements as the protocol allows: a replay is one read; a fresh claim is that read and
//! one upsert that takes its fence from the counter in the same statement; a fenced write is
//! one conditional statement. A single statement commits on its own (autocommit), so no
//! `BEGIN`/`COMMIT` round trips are spent.

use std::time::Duration;

use sqlx::sqlite::SqliteRow;
use sqlx::{Decode, Row, SqliteExecutor, TypeInfo, ValueRef};

use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::{Fence, FencedWrite};
use crate::stores::sqlite_format::{
    self as format, CLAIM, COMPLETE, EXTEND, PURGE, RELEASE, REMOVE, Record, SELECT_RECORD, State,
    Value,
};
pub(super) use crate::stores::sqlite_format::{Seen, judge};

/// Reads column `index` of `row` as SQLite holds it.
fn value(row: &SqliteRow, index: usize) -> Result<Value<'_>, sqlx::Error> {
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let decoded = match raw.type_info().name() {
        "INTEGER" => <i64 as Decode<sqlx::Sqlite>>::decode(raw).map(Value::Integer),
        "REAL" => <f64 as Decode<sqlx::Sqlite>>::decode(raw).map(Value::Real),
        "TEXT" => {
            <&str as Decode<sqlx::Sqlite>>::decode(raw).map(|text| Value::Text(text.as_bytes()))
        }
        _ => <&[u8] as Decode<sqlx::Sqlite>>::decode(raw).map(Value::Blob),
    };
    decoded.map_err(|source| sqlx::Error::ColumnDecode {
        index: index.to_string(),
        source,
    })
}

/// The record under `key`, if any; a row that does not fit is `Corrupt`.
pub(super) async fn read<'e>(
    executor: impl SqliteExecutor<'e>,
    key: &StorageKey,
    want_output: bool,
) -> Result<Option<Record>, StoreError> {
    let row = sqlx::query(SELECT_RECORD)
        .bind(key.as_bytes().as_slice())
        .fetch_optional(executor)
        .await
        .map_err(|error| from_sqlx("could not read a record", error))?;
    let Some(row) = row else {
        return Ok(None);
    };
    Record::parse(|index| value(&row, index), key, want_output)
        .map_err(|error| from_sqlx("could not read a record", error))?
        .map(Some)
}

/// The one-statement claim of a key seen free (`seen`: the dead record's fence, if there was
/// one): the fence taken, or `None` if the record changed since it was read.
pub(super) async fn take<'e>(
    executor: impl SqliteExecutor<'e>,
    key: &StorageKey,
    fingerprint: &Fingerprint,
    lease: Duration,
    seen: Option<i64>,
) -> Result<Option<Fence>, StoreError> {
    let now = format::now_ms();
    let row = sqlx::query(CLAIM)
        .bind(key.as_bytes().as_slice())
        .bind(fingerprint.as_bytes().as_slice())
        .bind(format::until(now, lease))
        .bind(now)
        .bind(seen)
        .fetch_optional(executor)
        .await
        .map_err(|error| from_sqlx("could not write a claim", error))?;
    let Some(row) = row else {
        return Ok(None);
    };
    match value(&row, 0).map_err(|error| from_sqlx("could not write a claim", error))? {
        Value::Integer(fence) if fence > 0 => Ok(Some(Fence::new(fence.unsigned_abs()))),
        // One more than i64::MAX is a real in SQLite.
        _ => Err(format::fences_exhausted()),
    }
}

fn fence_param(fence: Fence) -> i64 {
    // A fence this store handed out fits; a larger one is held by nothing here.
    i64::try_from(fence.get()).unwrap_or(-1)
}

fn applied(rows: u64) -> FencedWrite {
    if rows == 0 {
        FencedWrite::Fenced
    } else {
        FencedWrite::Applied
    }
}

pub(super) async fn complete<'e>(
    executor: impl SqliteExecutor<'e>,
    key: &StorageKey,
    fence: Fence,
    output: &[u8],
    ttl: Duration,
) -> Result<FencedWrite, StoreError> {
    let now = format::now_ms();
    let done = sqlx::query(COMPLETE)
        .bind(key.as_bytes().as_slice())
        .bind(fence_param(fence))
        .bind(now)
        .bind(output)
        .bind(format::until(now, ttl))
        .execute(executor)
        .await
        .map_err(|error| from_sqlx("could not record a result", error))?;
    Ok(applied(done.rows_affected()))
}

pub(super) async fn release<'e>(
    executor: impl SqliteExecutor<'e>,
    key: &StorageKey,
    fence: Fence,
) -> Result<FencedWrite, StoreError> {
    let done = sqlx::query(RELEASE)
        .bind(key.as_bytes().as_slice())
        .bind(fence_param(fence))
        .bind(format::now_ms())
        .execute(executor)
        .await
        .map_err(|error| from_sqlx("could not release a claim", error))?;
    Ok(applied(done.rows_affected()))
}

pub(super) async fn extend<'e>(
    executor: impl SqliteExecutor<'e>,
    key: &StorageKey,
    fence: Fence,
    lease: Duration,
) -> Result<FencedWrite, StoreError> {
    let now = format::now_ms();
    let done = sqlx::query(EXTEND)
        .bind(key.as_bytes().as_slice())
        .bind(fence_param(fence))
        .bind(now)
        .bind(format::until(now, lease))
        .execute(executor)
        .await
        .map_err(|error| from_sqlx("could not extend a lease", error))?;
    Ok(applied(done.rows_affected()))
}

/// How long `key`'s lease still runs, if it is in progress: a plain read, which in WAL mode
/// neither waits for writers nor holds them up.
pub(super) async fn lease_left<'e>(
    executor: impl SqliteExecutor<'e>,
    key: &StorageKey,
) -> Result<Option<Duration>, StoreError> {
    let record = read(executor, key, false).await?;
    let now = format::now_ms();
    Ok(record.and_then(|record| {
        (matches!(record.state, State::InProgress) && record.is_live(now))
            .then(|| format::until_from(now, record.until))
    }))
}

pub(super) async fn remove<'e>(
    executor: impl SqliteExecutor<'e>,
    key: &StorageKey,
) -> Result<bool, StoreError> {
    let done = sqlx::query(REMOVE)
        .bind(key.as_bytes().as_slice())
        .execute(executor)
        .await
        .map_err(|error| from_sqlx("could not delete a record", error))?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn purge<'e>(executor: impl SqliteExecutor<'e>) -> Result<u64, StoreError> {
    let done = sqlx::query(PURGE)
        .bind(format::now_ms())
        .execute(executor)
        .await
        .map_err(|error| from_sqlx("could not purge expired records", error))?;
    Ok(done.rows_affected())
}

/// Whether `error` is SQLite's "busy" or "locked" (the write lock stayed taken for longer than
/// the connection's busy timeout, or could not be waited for at all).
pub(super) fn is_busy(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    db.code()
        .and_then(|code| code.parse::<i32>().ok())
        // The primary result code is the low byte of the extended one.
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// A sqlx error as a store error: a database still locked after the busy timeout, a pool with
/// no connection to give, or a connection that failed is `Unavailable`; the rest is `Backend`.
pub(super) fn from_sqlx(context: &str, error: sqlx::Error) -> StoreError {
    if is_busy(&error) {
        return StoreError::Unavailable {
            message: format!(
                "{context}: the SQLite database stayed locked by another connection for longer than the pool's busy timeout; raise busy_timeout (SqliteConnectOptions::busy_timeout) or shorten the other writers' transactions"
            ),
            source: Some(Box::new(error)),
        };
    }
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable {
                message: format!("{context}: {error}"),
                source: Some(Box::new(error)),
            }
        }
        error => StoreError::Backend {
            message: format!("{context}: {error}"),
            source: Some(Box::new(error)),
        },
    }
}
