//! What the two SQLite stores share: the schema, the record format, the SQL that does not
//! depend on the driver, and the clock. The rusqlite store (`stores/sqlite/`) and the sqlx
//! store (`stores/sqlx_sqlite/`) read and write the same file through it, so a database
//! written by one is read by the other.
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
//!
//! Two triggers keep `idempotent_fence.last` at least the largest fence written into
//! `idempotent_records`, so that a claim can take its fence from the counter in the same
//! statement that writes the record (the sqlx store's one-statement claim). They are an
//! addition within schema version 1: a release that does not know them advances the counter
//! itself before it writes a fence, which leaves the triggers nothing to do, and every store of
//! this release creates them when missing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::Claim;
use crate::stores::millis;

/// The schema version this release creates and understands.
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// The tables, the index and the fence triggers, each created when missing.
pub(crate) const CREATE: &str = "
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
CREATE TRIGGER IF NOT EXISTS idempotent_fence_on_insert
AFTER INSERT ON idempotent_records
WHEN typeof(NEW.fence) = 'integer'
BEGIN
    UPDATE idempotent_fence SET last = NEW.fence WHERE id = 1 AND last < NEW.fence;
END;
CREATE TRIGGER IF NOT EXISTS idempotent_fence_on_update
AFTER UPDATE OF fence ON idempotent_records
WHEN typeof(NEW.fence) = 'integer'
BEGIN
    UPDATE idempotent_fence SET last = NEW.fence WHERE id = 1 AND last < NEW.fence;
END;
";

/// The schema version in the file: one row, NULL on a new file (an aggregate answers one row).
pub(crate) const SELECT_VERSION: &str = "SELECT max(version) FROM idempotent_schema";
/// Records this release's version in a new file.
pub(crate) const INSERT_VERSION: &str = "INSERT INTO idempotent_schema (version) VALUES (?1)";
/// Creates the fence counter when missing.
pub(crate) const INSERT_FENCE: &str =
    "INSERT INTO idempotent_fence (id, last) VALUES (1, 0) ON CONFLICT (id) DO NOTHING";

/// Whether a file's schema version (`None`: a new file) can be used by this release: `Ok(true)`
/// when the version must be written, `Ok(false)` when it is this release's.
pub(crate) fn check_version(version: Option<i64>, file: &str) -> Result<bool, StoreError> {
    match version {
        None => Ok(true),
        Some(SCHEMA_VERSION) => Ok(false),
        Some(version) if version > SCHEMA_VERSION => Err(StoreError::Backend {
            message: format!(
                "the SQLite database {file} has schema version {version}, newer than this release of idempotent-core knows (version {SCHEMA_VERSION}); upgrade idempotent-core, or use another database file"
            ),
            source: None,
        }),
        Some(version) => Err(StoreError::Backend {
            message: format!(
                "the SQLite database {file} has schema version {version}, which no release of idempotent-core wrote (this one uses version {SCHEMA_VERSION})"
            ),
            source: None,
        }),
    }
}

/// The record format this release writes and reads (the `format` column).
pub(crate) const FORMAT: i64 = 1;
/// The `state` of a record whose holder is running.
pub(crate) const IN_PROGRESS: &str = "in_progress";
/// The `state` of a record holding an output.
pub(crate) const COMPLETED: &str = "completed";

/// The read of one record, with the columns [`Record::parse`] expects, in order.
pub(crate) const SELECT_RECORD: &str = "SELECT format, state, fingerprint, fence, until, output
     FROM idempotent_records WHERE key = ?1";

/// One claim in one statement, for a key seen free: inserts the record, or replaces the dead
/// record seen (`?5`: the fence it had, NULL if there was none), with a fence one above both
/// the fence counter and the old record's fence, and answers the fence. The counter follows
/// through the triggers. No row comes back if the record is no longer the one seen (another
/// claim came first): read again.
///
/// `?1` key, `?2` fingerprint, `?3` lease end, `?4` now, `?5` the fence seen.
pub(crate) const CLAIM: &str = "INSERT INTO idempotent_records
         (key, fingerprint, fence, state, until, output, format)
     VALUES (?1, ?2, coalesce((SELECT last FROM idempotent_fence WHERE id = 1), 0) + 1,
             'in_progress', ?3, NULL, 1)
     ON CONFLICT (key) DO UPDATE SET
         fingerprint = excluded.fingerprint,
         fence = max(excluded.fence, idempotent_records.fence + 1),
         state = excluded.state,
         until = excluded.until,
         output = NULL,
         format = excluded.format
     WHERE idempotent_records.fence = ?5 AND idempotent_records.until <= ?4
     RETURNING fence";

/// The claims of a connection's transactions (the transactional modes'
/// `HeldByThisTransaction`): a temporary table, so it is the connection's own and a rollback
/// empties it with the rest of the transaction.
pub(crate) const CREATE_CLAIMED_HERE: &str =
    "CREATE TEMP TABLE IF NOT EXISTS idempotent_claimed_here
     (key BLOB NOT NULL PRIMARY KEY, fence INTEGER NOT NULL)";
/// Whether this connection claimed `?1` under fence `?2` (a row comes back if so).
pub(crate) const SELECT_CLAIMED_HERE: &str =
    "SELECT 1 FROM temp.idempotent_claimed_here WHERE key = ?1 AND fence = ?2";
/// Notes that this connection claimed `?1` under fence `?2`.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) const INSERT_CLAIMED_HERE: &str =
    "INSERT OR REPLACE INTO temp.idempotent_claimed_here (key, fence) VALUES (?1, ?2)";

/// The condition of every fenced write, on `?1` key, `?2` fence, `?3` now: the record is a
/// well-formed claim in progress under the fence with a live lease.
macro_rules! held {
    () => {
        "key = ?1 AND format = 1 AND state = 'in_progress' AND fence = ?2
         AND typeof(until) = 'integer' AND ?3 < until
         AND typeof(fingerprint) = 'blob' AND length(fingerprint) = 32"
    };
}

/// Records the output `?4` with expiry `?5`, if `?2` holds `?1` at `?3`.
pub(crate) const COMPLETE: &str = concat!(
    "UPDATE idempotent_records SET state = 'completed', until = ?5, output = ?4 WHERE ",
    held!()
);
/// Deletes the claim, if `?2` holds `?1` at `?3`.
pub(crate) const RELEASE: &str = concat!("DELETE FROM idempotent_records WHERE ", held!());
/// Moves the lease end to `?4`, if `?2` holds `?1` at `?3`.
#[cfg_attr(not(feature = "sqlx-sqlite"), allow(dead_code))]
pub(crate) const EXTEND: &str = concat!("UPDATE idempotent_records SET until = ?4 WHERE ", held!());
/// Deletes `?1`'s record whatever it holds.
#[cfg_attr(not(feature = "sqlx-sqlite"), allow(dead_code))]
pub(crate) const REMOVE: &str = "DELETE FROM idempotent_records WHERE key = ?1";
/// Deletes the records past their lease or expiry at `?1`. Rows of a format or state this
/// release does not know are left for an operator to look at.
#[cfg_attr(not(feature = "sqlx-sqlite"), allow(dead_code))]
pub(crate) const PURGE: &str = "DELETE FROM idempotent_records
     WHERE until <= ?1 AND format = 1 AND state IN ('in_progress', 'completed')";

/// One column value as SQLite holds it, whichever driver read it.
#[derive(Clone, Copy)]
pub(crate) enum Value<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a [u8]),
    Blob(&'a [u8]),
}

/// A well-formed record.
pub(crate) struct Record {
    pub(crate) fingerprint: [u8; 32],
    pub(crate) fence: i64,
    /// Lease end (in progress) or expiry (completed), in ms since the Unix epoch.
    pub(crate) until: i64,
    pub(crate) state: State,
}

pub(crate) enum State {
    InProgress,
    /// The output, if the caller asked for it.
    Completed(Option<Vec<u8>>),
}

impl Record {
    /// Parses the columns of [`SELECT_RECORD`]; `column(i)` reads column `i`, and is called
    /// only for the columns needed. Copies the output only if `want_output`.
    pub(crate) fn parse<'v, E>(
        mut column: impl FnMut(usize) -> Result<Value<'v>, E>,
        key: &StorageKey,
        want_output: bool,
    ) -> Result<Result<Self, StoreError>, E> {
        let corrupt = |message: String| {
            Err(StoreError::Corrupt {
                key: key.to_hex(),
                message,
            })
        };
        // The format first: the other columns of an unknown format may mean something else.
        match column(0)? {
            Value::Integer(FORMAT) => {}
            Value::Integer(other) => {
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
        let completed = match column(1)? {
            Value::Text(b"in_progress") => false,
            Value::Text(b"completed") => true,
            Value::Text(other) => {
                return Ok(corrupt(format!(
                    "unknown state {:?} (expected {IN_PROGRESS:?} or {COMPLETED:?})",
                    String::from_utf8_lossy(other)
                )));
            }
            other => return Ok(corrupt(format!("the state is {}", describe(other)))),
        };
        let fingerprint = match column(2)? {
            Value::Blob(bytes) => match <[u8; 32]>::try_from(bytes) {
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
        let fence = match column(3)? {
            Value::Integer(fence) if fence >= 0 => fence,
            other => return Ok(corrupt(format!("the fence is {}", describe(other)))),
        };
        let until = match column(4)? {
            Value::Integer(until) => until,
            other => {
                return Ok(corrupt(format!(
                    "the lease end or expiry (until) is {}",
                    describe(other)
                )));
            }
        };
        let state = if completed {
            match column(5)? {
                Value::Blob(output) => State::Completed(want_output.then(|| output.to_vec())),
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
    pub(crate) fn is_live(&self, now: i64) -> bool {
        now < self.until
    }

    /// `fence` holds the record: in progress under it, with a live lease. The one rule for
    /// every fenced write.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn held_by(&self, fence: u64, now: i64) -> bool {
        matches!(self.state, State::InProgress)
            && u64::try_from(self.fence) == Ok(fence)
            && self.is_live(now)
    }
}

/// What one read of a record decided for a claim.
pub(crate) enum Seen {
    /// The answer: the record is live (or does not fit).
    Answer(Claim),
    /// The key is free: no record (`None`), or a dead one under this fence.
    Free(Option<i64>),
}

/// What a claim of a key for `fingerprint` makes of the record read ([`CLAIM`] takes a key
/// seen free).
pub(crate) fn judge(record: Option<Record>, fingerprint: &Fingerprint, now: i64) -> Seen {
    let Some(record) = record else {
        return Seen::Free(None);
    };
    if !record.is_live(now) {
        return Seen::Free(Some(record.fence));
    }
    if record.fingerprint != *fingerprint.as_bytes() {
        return Seen::Answer(Claim::Mismatch);
    }
    Seen::Answer(match record.state {
        State::InProgress => Claim::InProgress {
            retry_after: until_from(now, record.until),
        },
        State::Completed(output) => Claim::Completed {
            output: output.unwrap_or_default().into(),
        },
    })
}

/// A column value that is not what the format requires, for a message.
fn describe(value: Value<'_>) -> String {
    match value {
        Value::Null => "NULL".to_string(),
        Value::Integer(n) => format!("the integer {n}"),
        Value::Real(x) => format!("the real {x}"),
        Value::Text(text) => format!("the text {:?}", String::from_utf8_lossy(text)),
        Value::Blob(bytes) => format!("a {}-byte blob", bytes.len()),
    }
}

/// The system wall clock in ms since the Unix epoch: the store's time.
pub(crate) fn now_ms() -> i64 {
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
pub(crate) fn until(now: i64, duration: Duration) -> i64 {
    now.saturating_add(millis::held_i64(duration))
        .saturating_add(1)
}

/// What is left of a live lease ending at `until` (see [`until`]) at `now`, for a
/// `retry_after`: at most the lease, at least 1 ms.
pub(crate) fn until_from(now: i64, until: i64) -> Duration {
    millis::left(until.saturating_sub(now).saturating_sub(1))
}

/// The fence counter ran out (a fence above `i64::MAX` would be needed).
pub(crate) fn fences_exhausted() -> StoreError {
    StoreError::Backend {
        message: "the SQLite store's fence counter is exhausted".to_string(),
        source: None,
    }
}
