//! [`Admin`] for the SQLite store: reads on a reader connection, purges in `BEGIN IMMEDIATE`
//! batches.

use std::time::Duration;

use rusqlite::params;

use super::SqliteStore;
use super::ops::{OpResult, begin, commit, fail, read};
use super::pool::Access;
use super::record::{self, COMPLETED, FORMAT, IN_PROGRESS, State};
use crate::admin::{Admin, OldestRecord, RecordState, RecordView, StoreStats, stored_key};
use crate::error::StoreError;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes};

/// What a row takes: its key and fingerprint (32 bytes each), its fence (8) and its output.
const ROW_BYTES: &str =
    "length(key) + ifnull(length(fingerprint), 0) + 8 + ifnull(length(output), 0)";

/// The time left until `until` at `now`, as the claim reads it: zero once ended.
fn left(now: i64, until: i64) -> Duration {
    if until <= now {
        Duration::ZERO
    } else {
        record::until_from(now, until)
    }
}

/// The live record with the lowest fence (the first claimed).
fn oldest(connection: &rusqlite::Connection, now: i64) -> OpResult<Option<OldestRecord>> {
    let mut statement = connection
        .prepare(
            "SELECT key, fence, state, until FROM idempotent_records
             WHERE format = ?1 AND state IN (?2, ?3) AND until > ?4 AND typeof(fence) = 'integer'
             ORDER BY fence LIMIT 1",
        )
        .map_err(fail("could not prepare the statistics"))?;
    let mut rows = statement
        .query(params![FORMAT, IN_PROGRESS, COMPLETED, now])
        .map_err(fail("could not read the statistics"))?;
    let Some(row) = rows.next().map_err(fail("could not read the statistics"))? else {
        return Ok(None);
    };
    let read = |row: &rusqlite::Row<'_>| -> rusqlite::Result<_> {
        Ok((
            row.get::<_, Vec<u8>>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, i64>(3)?,
        ))
    };
    let (key, fence, state, until) = read(row).map_err(fail("could not read the statistics"))?;
    Ok(Some(OldestRecord {
        key: stored_key(&key)?,
        fence: u64::try_from(fence).unwrap_or(0),
        state: if state == IN_PROGRESS {
            RecordState::InProgress
        } else {
            RecordState::Completed
        },
        left: left(now, until),
    }))
}

impl Admin for SqliteStore {
    fn inspect<'a>(
        &'a self,
        key: &'a StorageKey,
    ) -> BoxFuture<'a, Result<Option<RecordView>, StoreError>> {
        let key = *key;
        Box::pin(self.run(Access::Read, move |connection| {
            let now = record::now_ms();
            let Some(found) = read(connection, &key, true)? else {
                return Ok(None);
            };
            let (state, output) = match found.state {
                State::InProgress => (RecordState::InProgress, None),
                State::Completed(output) => (RecordState::Completed, output.map(Bytes::from)),
            };
            let bytes = 32 + 32 + 8 + output.as_ref().map_or(0, |output| output.len() as u64);
            Ok(Some(RecordView {
                state,
                fence: u64::try_from(found.fence).unwrap_or(0),
                left: left(now, found.until),
                expired: found.until <= now,
                output,
                bytes,
            }))
        }))
    }

    fn stats(&self) -> BoxFuture<'_, Result<StoreStats, StoreError>> {
        Box::pin(self.run(Access::Read, |connection| {
            let now = record::now_ms();
            let mut statement = connection
                .prepare(&format!(
                    "SELECT state, until <= ?1, count(*), sum({ROW_BYTES}), min(until)
                     FROM idempotent_records
                     WHERE format = ?2 AND state IN (?3, ?4)
                     GROUP BY 1, 2"
                ))
                .map_err(fail("could not prepare the statistics"))?;
            let mut rows = statement
                .query(params![now, FORMAT, IN_PROGRESS, COMPLETED])
                .map_err(fail("could not read the statistics"))?;
            let mut stats = StoreStats::default();
            while let Some(row) = rows.next().map_err(fail("could not read the statistics"))? {
                let read = |row: &rusqlite::Row<'_>| -> rusqlite::Result<_> {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, bool>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, Option<i64>>(3)?,
                        row.get::<_, Option<i64>>(4)?,
                    ))
                };
                let (state, ended, count, bytes, nearest) =
                    read(row).map_err(fail("could not read the statistics"))?;
                let count = u64::try_from(count).unwrap_or(0);
                stats.bytes += bytes
                    .and_then(|bytes| u64::try_from(bytes).ok())
                    .unwrap_or(0);
                if ended {
                    stats.expired += count;
                    continue;
                }
                if state == IN_PROGRESS {
                    stats.in_progress += count;
                } else {
                    stats.completed += count;
                }
                if let Some(nearest) = nearest {
                    let nearest = left(now, nearest);
                    stats.nearest_end = Some(stats.nearest_end.map_or(nearest, |n| n.min(nearest)));
                }
            }
            drop(rows);
            stats.oldest = oldest(connection, now)?;
            Ok(stats)
        }))
    }

    fn purge_expired_batch(&self, limit: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        Box::pin(self.run(Access::Write, move |connection| {
            let transaction = begin(connection)?;
            let purged = transaction
                .execute(
                    "DELETE FROM idempotent_records WHERE key IN (
                         SELECT key FROM idempotent_records
                         WHERE until <= ?1 AND format = ?2 AND state IN (?3, ?4)
                         LIMIT ?5
                     )",
                    params![record::now_ms(), FORMAT, IN_PROGRESS, COMPLETED, limit],
                )
                .map_err(fail("could not purge expired records"))?;
            commit(transaction)?;
            Ok(purged as u64)
        }))
    }
}
