//! The protocol's operations, each one `BEGIN IMMEDIATE` transaction on a blocking thread.
//!
//! `BEGIN IMMEDIATE` takes the database's write lock before the record is read, so the read,
//! the decision and the write are one atomic step against every other connection and process.
//! The time is read once the lock is held.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::record::{self, COMPLETED, FORMAT, IN_PROGRESS, Record, SELECT_RECORD, State};
use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::{Claim, Fence, FencedWrite};

/// Why an operation failed: SQLite failed while doing `what` (mapped to a store error by the
/// caller, which knows the busy timeout), or the store has its answer (a corrupt record, an
/// exhausted fence counter).
pub(super) enum OpError {
    Sqlite(&'static str, rusqlite::Error),
    Store(StoreError),
}

impl From<StoreError> for OpError {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

pub(super) type OpResult<T> = Result<T, OpError>;

pub(super) fn fail(what: &'static str) -> impl Fn(rusqlite::Error) -> OpError {
    move |error| OpError::Sqlite(what, error)
}

pub(super) fn begin(connection: &mut Connection) -> OpResult<Transaction<'_>> {
    connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail("could not begin a write transaction"))
}

pub(super) fn commit(transaction: Transaction<'_>) -> OpResult<()> {
    transaction
        .commit()
        .map_err(fail("could not commit a write transaction"))
}

/// The record under `key`, if any; a row that does not fit is `Corrupt`.
pub(super) fn read(
    connection: &Connection,
    key: &StorageKey,
    want_output: bool,
) -> OpResult<Option<Record>> {
    let mut statement = connection
        .prepare_cached(SELECT_RECORD)
        .map_err(fail("could not prepare a read"))?;
    let record = statement
        .query_row([key.as_bytes().as_slice()], |row| {
            record::from_row(row, key, want_output)
        })
        .optional()
        .map_err(fail("could not read a record"))?;
    Ok(record.transpose()?)
}

/// A fence larger than every fence handed out from this database, and than `old`.
fn next_fence(transaction: &Transaction<'_>, old: Option<i64>) -> OpResult<i64> {
    let last: Option<i64> = transaction
        .prepare_cached("SELECT last FROM idempotent_fence WHERE id = 1")
        .and_then(|mut statement| statement.query_row([], |row| row.get(0)).optional())
        .map_err(fail("could not read the fence counter"))?;
    let Some(fence) = last.unwrap_or(0).max(old.unwrap_or(0)).checked_add(1) else {
        return Err(OpError::Store(StoreError::Backend {
            message: "the SQLite store's fence counter is exhausted".to_string(),
            source: None,
        }));
    };
    transaction
        .prepare_cached(
            "INSERT INTO idempotent_fence (id, last) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET last = excluded.last",
        )
        .and_then(|mut statement| statement.execute([fence]))
        .map_err(fail("could not advance the fence counter"))?;
    Ok(fence)
}

pub(super) fn claim(
    connection: &mut Connection,
    key: &StorageKey,
    fingerprint: &Fingerprint,
    lease: Duration,
) -> OpResult<Claim> {
    let transaction = begin(connection)?;
    let now = record::now_ms();
    let existing = read(&transaction, key, true)?;
    let old_fence = existing.as_ref().map(|record| record.fence);
    if let Some(record) = existing
        && record.is_live(now)
    {
        // Nothing to write: dropping the transaction ends it.
        if record.fingerprint != *fingerprint.as_bytes() {
            return Ok(Claim::Mismatch);
        }
        return Ok(match record.state {
            State::InProgress => Claim::InProgress {
                retry_after: record::until_from(now, record.until),
            },
            // The read's copy of the output, handed over without another.
            State::Completed(output) => Claim::Completed {
                output: output.unwrap_or_default().into(),
            },
        });
    }
    let fence = next_fence(&transaction, old_fence)?;
    transaction
        .prepare_cached(
            "INSERT OR REPLACE INTO idempotent_records
                 (key, fingerprint, fence, state, until, output, format)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6)",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                key.as_bytes().as_slice(),
                fingerprint.as_bytes().as_slice(),
                fence,
                IN_PROGRESS,
                record::until(now, lease),
                FORMAT,
            ])
        })
        .map_err(fail("could not write a claim"))?;
    commit(transaction)?;
    Ok(Claim::Acquired {
        // At least 1: one more than a non-negative number.
        fence: Fence::new(fence.unsigned_abs()),
    })
}

/// Runs a fenced write: `write` is applied only if `fence` holds `key` with a live lease.
fn fenced(
    connection: &mut Connection,
    key: &StorageKey,
    fence: Fence,
    write: impl FnOnce(&Transaction<'_>, i64) -> rusqlite::Result<usize>,
) -> OpResult<FencedWrite> {
    let transaction = begin(connection)?;
    let now = record::now_ms();
    match read(&transaction, key, false)? {
        Some(record) if record.held_by(fence.get(), now) => {}
        _ => return Ok(FencedWrite::Fenced),
    }
    write(&transaction, now).map_err(fail("could not write a record"))?;
    commit(transaction)?;
    Ok(FencedWrite::Applied)
}

pub(super) fn complete(
    connection: &mut Connection,
    key: &StorageKey,
    fence: Fence,
    output: &[u8],
    ttl: Duration,
) -> OpResult<FencedWrite> {
    fenced(connection, key, fence, |transaction, now| {
        transaction
            .prepare_cached(
                "UPDATE idempotent_records SET state = ?2, until = ?3, output = ?4 WHERE key = ?1",
            )?
            .execute(params![
                key.as_bytes().as_slice(),
                COMPLETED,
                record::until(now, ttl),
                output,
            ])
    })
}

pub(super) fn release(
    connection: &mut Connection,
    key: &StorageKey,
    fence: Fence,
) -> OpResult<FencedWrite> {
    fenced(connection, key, fence, |transaction, _| {
        transaction
            .prepare_cached("DELETE FROM idempotent_records WHERE key = ?1")?
            .execute([key.as_bytes().as_slice()])
    })
}

pub(super) fn extend(
    connection: &mut Connection,
    key: &StorageKey,
    fence: Fence,
    lease: Duration,
) -> OpResult<FencedWrite> {
    fenced(connection, key, fence, |transaction, now| {
        transaction
            .prepare_cached("UPDATE idempotent_records SET until = ?2 WHERE key = ?1")?
            .execute(params![
                key.as_bytes().as_slice(),
                record::until(now, lease),
            ])
    })
}

/// How long `key`'s lease still runs, if it is in progress: a plain read, which in WAL mode
/// neither waits for writers nor holds them up.
pub(super) fn lease_left(
    connection: &mut Connection,
    key: &StorageKey,
) -> OpResult<Option<Duration>> {
    let record = read(connection, key, false)?;
    let now = record::now_ms();
    Ok(record.and_then(|record| {
        (matches!(record.state, State::InProgress) && record.is_live(now))
            .then(|| record::until_from(now, record.until))
    }))
}

/// Deletes `key`'s record whatever it holds; whether there was one.
pub(super) fn remove(connection: &mut Connection, key: &[u8; 32]) -> OpResult<bool> {
    let transaction = begin(connection)?;
    let removed = transaction
        .execute(
            "DELETE FROM idempotent_records WHERE key = ?1",
            params![key.as_slice()],
        )
        .map_err(fail("could not delete a record"))?;
    commit(transaction)?;
    Ok(removed > 0)
}

/// Deletes the records whose lease or expiry has passed. Rows of a format or state this release
/// does not know are left for an operator to look at.
pub(super) fn purge(connection: &mut Connection) -> OpResult<u64> {
    let transaction = begin(connection)?;
    let purged = transaction
        .execute(
            "DELETE FROM idempotent_records
             WHERE until <= ?1 AND format = ?2 AND state IN (?3, ?4)",
            params![record::now_ms(), FORMAT, IN_PROGRESS, COMPLETED],
        )
        .map_err(fail("could not purge expired records"))?;
    commit(transaction)?;
    Ok(purged as u64)
}
