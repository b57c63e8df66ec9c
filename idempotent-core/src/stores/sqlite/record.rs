//! One row of `idempotent_records`, read defensively: a row that does not fit is
//! [`StoreError::Corrupt`], never a panic and never taken for an absent record.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::ValueRef;

use crate::error::StoreError;
use crate::key::StorageKey;
use crate::stores::millis;

/// The record format this release writes and reads (the `format` column).
pub(super) const FORMAT: i64 = 1;
/// The `state` of a record whose holder is running.
pub(super) const IN_PROGRESS: &str = "in_progress";
/// The `state` of a record holding an output.
pub(super) const COMPLETED: &str = "completed";

/// The read of one record, with the columns [`Record::from_row`] expects, in order.
pub(super) const SELECT_RECORD: &str = "SELECT format, state, fingerprint, fence, until, output
     FROM idempotent_records WHERE key = ?1";

/// A well-formed record.
pub(super) struct Record {
    pub(super) fingerprint: [u8; 32],
    pub(super) fence: i64,
    /// Lease end (in progress) or expiry (completed), in ms since the Unix epoch.
    pub(super) until: i64,
    pub(super) state: State,
}

pub(super) enum State {
    InProgress,
    /// The output, if the caller asked for it.
    Completed(Option<Vec<u8>>),
}

impl Record {
    /// Parses a row selected with [`SELECT_RECORD`]; copies the output only if `want_output`.
    pub(super) fn from_row(
        row: &rusqlite::Row<'_>,
        key: &StorageKey,
        want_output: bool,
    ) -> Result<Result<Self, StoreError>, rusqlite::Error> {
        let corrupt = |message: String| {
            Err(StoreError::Corrupt {
                key: key.to_hex(),
                message,
            })
        };
        // The format first: the other columns of an unknown format may mean something else.
        match row.get_ref(0)? {
            ValueRef::Integer(FORMAT) => {}
            ValueRef::Integer(other) => {
                return Ok(corrupt(format!(
                    "record format version {other} is not supported by this release (it reads version {FORMAT})"
                )));
            }
            other => {
                return Ok(corrupt(format!(
                    "the format version is {}",
                    describe(other)
                )));
            }
        }
        let completed = match row.get_ref(1)? {
            ValueRef::Text(b"in_progress") => false,
            ValueRef::Text(b"completed") => true,
            ValueRef::Text(other) => {
                return Ok(corrupt(format!(
                    "unknown state {:?} (expected {IN_PROGRESS:?} or {COMPLETED:?})",
                    String::from_utf8_lossy(other)
                )));
            }
            other => return Ok(corrupt(format!("the state is {}", describe(other)))),
        };
        let fingerprint = match row.get_ref(2)? {
            ValueRef::Blob(bytes) => match <[u8; 32]>::try_from(bytes) {
                Ok(fingerprint) => fingerprint,
                Err(_) => {
                    return Ok(corrupt(format!(
                        "the fingerprint is {} bytes long, not 32",
                        bytes.len()
                    )));
                }
            },
            other => return Ok(corrupt(format!("the fingerprint is {}", describe(other)))),
        };
        let fence = match row.get_ref(3)? {
            ValueRef::Integer(fence) if fence >= 0 => fence,
            other => return Ok(corrupt(format!("the fence is {}", describe(other)))),
        };
        let until = match row.get_ref(4)? {
            ValueRef::Integer(until) => until,
            other => {
                return Ok(corrupt(format!(
                    "the lease end or expiry (until) is {}",
                    describe(other)
                )));
            }
        };
        let state = if completed {
            match row.get_ref(5)? {
                ValueRef::Blob(output) => State::Completed(want_output.then(|| output.to_vec())),
                other => {
                    return Ok(corrupt(format!(
                        "the output of a completed record is {}",
                        describe(other)
                    )));
                }
            }
        } else {
            State::InProgress
        };
        Ok(Ok(Record {
            fingerprint,
            fence,
            until,
            state,
        }))
    }

    /// Not yet past its lease end or expiry.
    pub(super) fn is_live(&self, now: i64) -> bool {
        now < self.until
    }

    /// `fence` holds the record: in progress under it, with a live lease. The one rule for
    /// every fenced write.
    pub(super) fn held_by(&self, fence: u64, now: i64) -> bool {
        matches!(self.state, State::InProgress)
            && u64::try_from(self.fence) == Ok(fence)
            && self.is_live(now)
    }
}

/// A column value that is not what the format requires, for a message.
fn describe(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "NULL".to_string(),
        ValueRef::Integer(n) => format!("the integer {n}"),
        ValueRef::Real(x) => format!("the real {x}"),
        ValueRef::Text(text) => format!("the text {:?}", String::from_utf8_lossy(text)),
        ValueRef::Blob(bytes) => format!("a {}-byte blob", bytes.len()),
    }
}

/// The system wall clock in ms since the Unix epoch: the store's time.
pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// When a lease or ttl of `duration` taken at `now` ends: `duration` in whole ms, rounded up
/// (1 ms to [`MAX_DURATION`](crate::MAX_DURATION)), plus one. The clock reads whole ms,
/// rounded down, so a lease taken late in a millisecond would otherwise end up to a
/// millisecond early; with the extra one it lasts at least `duration` and at most 1 ms more.
pub(super) fn until(now: i64, duration: Duration) -> i64 {
    now.saturating_add(millis::held_i64(duration))
        .saturating_add(1)
}

/// What is left of a live lease ending at `until` (see [`until`]) at `now`, for a
/// `retry_after`: at most the lease, at least 1 ms.
pub(super) fn until_from(now: i64, until: i64) -> Duration {
    millis::left(until.saturating_sub(now).saturating_sub(1))
}
