//! [`Admin`] for the PostgreSQL store: plain statements on a pooled connection, within the
//! store's timeout; the purge deletes in batches that skip rows other transactions hold.

use std::time::Duration;

use super::PostgresStore;
use super::sql::FORMAT;
use crate::admin::{Admin, OldestRecord, RecordState, RecordView, StoreStats, stored_key};
use crate::error::StoreError;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes};

/// The time left until `until`, in whole milliseconds rounded up, never below zero.
const LEFT_MS: &str =
    "greatest(ceil(extract(epoch FROM (until - statement_timestamp())) * 1000), 0)::bigint";
/// What a row takes: its key and fingerprint (32 bytes each), its fence (8) and its output.
const ROW_BYTES: &str =
    "octet_length(key) + octet_length(fingerprint) + 8 + coalesce(octet_length(output), 0)";

fn left(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn unexpected(error: tokio_postgres::Error) -> StoreError {
    StoreError::Backend {
        message: format!("a record's columns could not be read: {error}"),
        source: Some(Box::new(error)),
    }
}

impl PostgresStore {
    /// The live record with the lowest fence (the first claimed).
    async fn oldest(&self) -> Result<Option<OldestRecord>, StoreError> {
        let sql = format!(
            "SELECT key, fence, state, {LEFT_MS} FROM {}
             WHERE format = $1 AND state IN (0, 1) AND until > statement_timestamp()
             ORDER BY fence LIMIT 1",
            self.table
        );
        let rows = self.query_text(&sql, &[&FORMAT]).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let read = || -> Result<_, tokio_postgres::Error> {
            Ok((
                row.try_get::<_, Vec<u8>>(0)?,
                row.try_get::<_, i64>(1)?,
                row.try_get::<_, i16>(2)?,
                row.try_get::<_, i64>(3)?,
            ))
        };
        let (key, fence, state, left_ms) = read().map_err(unexpected)?;
        Ok(Some(OldestRecord {
            key: stored_key(&key)?,
            fence: count(fence),
            state: if state == 0 {
                RecordState::InProgress
            } else {
                RecordState::Completed
            },
            left: left(left_ms),
        }))
    }
}

impl Admin for PostgresStore {
    fn inspect<'a>(
        &'a self,
        key: &'a StorageKey,
    ) -> BoxFuture<'a, Result<Option<RecordView>, StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT state, fence, format, {LEFT_MS}, until <= statement_timestamp(), output,
                        ({ROW_BYTES})::bigint
                 FROM {} WHERE key = $1",
                self.table
            );
            let rows = self.query_text(&sql, &[&key.as_bytes().as_slice()]).await?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let read = || -> Result<_, tokio_postgres::Error> {
                Ok((
                    row.try_get::<_, i16>(0)?,
                    row.try_get::<_, i64>(1)?,
                    row.try_get::<_, i16>(2)?,
                    row.try_get::<_, i64>(3)?,
                    row.try_get::<_, bool>(4)?,
                    row.try_get::<_, Option<Vec<u8>>>(5)?,
                    row.try_get::<_, i64>(6)?,
                ))
            };
            let (state, fence, format, left_ms, ended, output, bytes) =
                read().map_err(unexpected)?;
            let corrupt = |message: String| StoreError::Corrupt {
                key: key.to_hex(),
                message,
            };
            if format != FORMAT {
                return Err(corrupt(format!(
                    "record format {format} is not supported by this release"
                )));
            }
            let state = match state {
                0 => RecordState::InProgress,
                1 => RecordState::Completed,
                other => return Err(corrupt(format!("unknown record state {other}"))),
            };
            Ok(Some(RecordView {
                state,
                fence: count(fence),
                left: left(left_ms),
                expired: ended,
                output: match state {
                    RecordState::Completed => output.map(Bytes::from),
                    _ => None,
                },
                bytes: count(bytes),
            }))
        })
    }

    fn stats(&self) -> BoxFuture<'_, Result<StoreStats, StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT state, until <= statement_timestamp() AS ended, count(*),
                        coalesce(sum({ROW_BYTES}), 0)::bigint, min({LEFT_MS})
                 FROM {} WHERE format = $1 AND state IN (0, 1)
                 GROUP BY 1, 2",
                self.table
            );
            let rows = self.query_text(&sql, &[&FORMAT]).await?;
            let mut stats = StoreStats::default();
            for row in &rows {
                let read = || -> Result<_, tokio_postgres::Error> {
                    Ok((
                        row.try_get::<_, i16>(0)?,
                        row.try_get::<_, bool>(1)?,
                        row.try_get::<_, i64>(2)?,
                        row.try_get::<_, i64>(3)?,
                        row.try_get::<_, Option<i64>>(4)?,
                    ))
                };
                let (state, ended, records, bytes, nearest) = read().map_err(unexpected)?;
                stats.bytes += count(bytes);
                if ended {
                    stats.expired += count(records);
                    continue;
                }
                if state == 0 {
                    stats.in_progress += count(records);
                } else {
                    stats.completed += count(records);
                }
                if let Some(nearest) = nearest.map(left) {
                    stats.nearest_end = Some(stats.nearest_end.map_or(nearest, |n| n.min(nearest)));
                }
            }
            stats.oldest = self.oldest().await?;
            Ok(stats)
        })
    }

    fn purge_expired_batch(&self, limit: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
            // The rows are locked as they are chosen, and rows another transaction holds (a
            // claim taking a dead record over) are skipped, so a batch never waits and never
            // holds more than `limit` rows.
            let sql = format!(
                "WITH doomed AS (
                     SELECT key FROM {table} WHERE until <= statement_timestamp()
                     LIMIT $1 FOR UPDATE SKIP LOCKED
                 ), gone AS (
                     DELETE FROM {table} t USING doomed d
                     WHERE t.key = d.key AND t.until <= statement_timestamp()
                     RETURNING 1
                 )
                 SELECT count(*) FROM gone",
                table = self.table
            );
            let rows = self.query_text(&sql, &[&limit]).await?;
            let purged = rows
                .first()
                .map(|row| row.try_get::<_, i64>(0))
                .transpose()
                .map_err(unexpected)?
                .unwrap_or(0);
            Ok(count(purged))
        })
    }
}
