//! The rows the store's statements return, decoded by column name (the names and aliases of
//! `postgres_sql.rs`), defensively: a record that does not fit is [`StoreError::Corrupt`],
//! never a panic and never taken for an absent record.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::{Claim, Fence};
use crate::stores::millis;
use crate::stores::postgres_sql::FORMAT;

/// What a claim statement returned (`claim` or `claim_in_transaction`: the columns
/// `acquired`, `fence`, `fingerprint`, `state`, `output`, `left_ms` and `format`), judged;
/// `None` when it returned no row (another transaction inserted the record after the
/// statement's snapshot: the caller runs it again).
pub(super) fn judge_claim(
    rows: &[PgRow],
    key: &StorageKey,
    fingerprint: &Fingerprint,
) -> Result<Option<Claim>, StoreError> {
    let corrupt = |message: &str| StoreError::Corrupt {
        key: key.to_hex(),
        message: message.to_string(),
    };
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let acquired: bool = row
        .try_get("acquired")
        .map_err(|_| corrupt("unexpected claim row"))?;
    let fence: Option<i64> = row
        .try_get("fence")
        .map_err(|_| corrupt("the fence has an unexpected type"))?;
    let fence = fence.ok_or_else(|| corrupt("no fence"))?;
    if acquired {
        let fence = u64::try_from(fence).map_err(|_| corrupt("negative fence"))?;
        return Ok(Some(Claim::Acquired {
            fence: Fence::new(fence),
        }));
    }
    let format: Option<i16> = row
        .try_get("format")
        .map_err(|_| corrupt("unexpected format column"))?;
    if format != Some(FORMAT) {
        return Err(corrupt(&format!(
            "record format {format:?} is not supported by this release (it reads {FORMAT})"
        )));
    }
    // Borrowed from the row: the comparison needs no copy.
    let stored: Option<&[u8]> = row
        .try_get("fingerprint")
        .map_err(|_| corrupt("unexpected fingerprint column"))?;
    if stored.map(<[u8]>::len) != Some(32) {
        return Err(corrupt("the fingerprint is not 32 bytes"));
    }
    if stored != Some(fingerprint.as_bytes().as_slice()) {
        return Ok(Some(Claim::Mismatch));
    }
    let state: Option<i16> = row
        .try_get("state")
        .map_err(|_| corrupt("unexpected state column"))?;
    match state {
        Some(0) => {
            let left: Option<i64> = row
                .try_get("left_ms")
                .map_err(|_| corrupt("the lease left has an unexpected type"))?;
            Ok(Some(Claim::InProgress {
                // Whole ms, rounded up by the statement.
                retry_after: millis::left(left.unwrap_or(0)),
            }))
        }
        Some(1) => {
            let output: Option<Vec<u8>> = row
                .try_get("output")
                .map_err(|_| corrupt("unexpected output column"))?;
            output
                .map(|output| {
                    Some(Claim::Completed {
                        output: output.into(),
                    })
                })
                .ok_or_else(|| corrupt("a completed record without output"))
        }
        other => Err(corrupt(&format!("unknown state {other:?}"))),
    }
}

/// Whether the `claim_in_transaction` row says the caller's own transaction holds the claim
/// (the column `own`).
pub(super) fn own_claim(rows: &[PgRow]) -> bool {
    rows.first()
        .and_then(|row| row.try_get::<Option<bool>, _>("own").ok().flatten())
        == Some(true)
}

/// What the `lease_left` statement returned (the column `left_ms`, whole ms rounded up): the
/// lease left if the key is in progress.
pub(super) fn lease_left(rows: &[PgRow]) -> Result<Option<Duration>, StoreError> {
    rows.first()
        .map(|row| {
            let left: Option<i64> = row
                .try_get("left_ms")
                .map_err(|error| unexpected("the lease look-up", error))?;
            Ok(millis::left(left.unwrap_or(0)))
        })
        .transpose()
}

/// What the `purge` statement returned (the column `purged`): how many records it deleted.
pub(super) fn purged(rows: &[PgRow]) -> Result<u64, StoreError> {
    let purged: i64 = match rows.first() {
        Some(row) => row
            .try_get("purged")
            .map_err(|error| unexpected("the purge", error))?,
        None => 0,
    };
    Ok(u64::try_from(purged).unwrap_or(0))
}

fn unexpected(statement: &str, error: sqlx::Error) -> StoreError {
    StoreError::Backend {
        message: format!(
            "the store's statement for {statement} answered with a column other than it \
             writes ({error}): a bug in this release, to report with this message"
        ),
        source: Some(Box::new(error)),
    }
}
