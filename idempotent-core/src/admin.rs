//! What an operator needs from a store that the engine does not: one record as it stands,
//! counts over all of them, and purging in batches. The operator CLI (`idempotent-cli`, the
//! command `idempotent`) is built on it; a service can use it for its own admin pages.
//!
//! [`Admin`] is implemented by the stores that outlive a process: [`SqliteStore`], the
//! [`PostgresStore`] and the [`RedisStore`] (one server; not a Redis Cluster). Forgetting one
//! record is [`Store::remove`].
//!
//! No store keeps when a record was written, only when it ends (its lease, or its expiry), and
//! the fence of the claim that wrote it. Fences only grow (a sequence on PostgreSQL, a counter
//! on SQLite, the claiming process's clock in microseconds on Redis), so the statistics give
//! the oldest live record as the one with the lowest fence, the first claimed, and the time
//! until the record nearest its end ends.
//!
//! [`SqliteStore`]: crate::stores::sqlite::SqliteStore
//! [`PostgresStore`]: crate::stores::postgres::PostgresStore
//! [`RedisStore`]: crate::stores::redis::RedisStore
//!
//! ```no_run
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use idempotent_core::StorageKey;
//! use idempotent_core::admin::Admin;
//! use idempotent_core::stores::sqlite::SqliteStore;
//!
//! let store = SqliteStore::open("/var/lib/shop/idempotency.sqlite3")?;
//! let key = StorageKey::derive("shop::checkout", None, b"order-1")?;
//! if let Some(record) = store.inspect(&key).await? {
//!     println!("{:?}, fence {}, ends in {:?}", record.state, record.fence, record.left);
//! }
//! let stats = store.stats().await?;
//! println!("{} completed, {} bytes", stats.completed, stats.bytes);
//! # Ok(()) }
//! # #[cfg(not(feature = "sqlite"))] fn main() {}
//! ```

use std::time::Duration;

use crate::error::StoreError;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Store};
use crate::telemetry::{Change, audit};

/// The audit trail's `forgotten` event (target `idempotent::audit`, level `DEBUG`) for the
/// record of `key` under `function`, removed through [`Store::remove`] by an operator's tool:
/// [`Idempotency::forget`](crate::Idempotency::forget) emits it itself. Call it once the
/// removal answered `true`.
pub fn audit_forgotten(function: &str, key: &StorageKey) {
    audit(function, key, None, Change::Forgotten);
}

/// The audit trail's `purged` event for `count` records removed through
/// [`Admin::purge_expired_batch`]: [`Idempotency::purge_expired`](crate::Idempotency::purge_expired)
/// emits it itself.
pub fn audit_purged(count: u64) {
    crate::telemetry::audit_purged(count);
}

/// Where a record is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordState {
    /// Claimed: its body is running, or its holder died and the lease has not ended yet.
    InProgress,
    /// Its output is recorded; calls with its key replay it until it expires.
    Completed,
    /// Released (the body failed, panicked or was cancelled): a short-lived tombstone that
    /// keeps the last fence (Redis only; the SQL stores delete a released record).
    Released,
}

impl RecordState {
    /// `in_progress`, `completed` or `released`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Released => "released",
        }
    }
}

/// One record as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordView {
    /// Where it is in its life.
    pub state: RecordState,
    /// The fence of the claim that wrote it.
    pub fence: u64,
    /// How long until it ends: the lease left while in progress, the time to its expiry once
    /// completed. Zero once it has ended (a record the store has not purged yet).
    pub left: Duration,
    /// Whether it has ended (its lease or its ttl ran out) and waits to be purged: the key is
    /// free, and the record is never replayed.
    pub expired: bool,
    /// The recorded output (the serialized `Ok` value), for a completed record.
    pub output: Option<Bytes>,
    /// What the record takes in the store, in bytes: its key, fingerprint, fence and output
    /// as stored (not the store's own overhead per row or key).
    pub bytes: u64,
}

/// Counts over every record of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Live records in progress.
    pub in_progress: u64,
    /// Live completed records.
    pub completed: u64,
    /// Live tombstones of released records (Redis).
    pub released: u64,
    /// Records that have ended but are not purged yet (the SQL stores; Redis deletes them by
    /// itself).
    pub expired: u64,
    /// The bytes of every record, as [`RecordView::bytes`] counts them.
    pub bytes: u64,
    /// How long until the live record nearest its end ends (its lease or its expiry); `None`
    /// without live records.
    pub nearest_end: Option<Duration>,
    /// The live record (in progress or completed) claimed first: the lowest fence. `None`
    /// without live records. On Redis, fences from several processes are ordered by their
    /// clocks, so "first" holds to within the clocks' skew.
    pub oldest: Option<OldestRecord>,
}

/// The storage key a SQL store's row holds in its key column; a value of another length is
/// a corrupt row.
pub(crate) fn stored_key(bytes: &[u8]) -> Result<StorageKey, StoreError> {
    match <[u8; 32]>::try_from(bytes) {
        Ok(key) => Ok(StorageKey::from_bytes(key)),
        Err(_) => Err(StoreError::Corrupt {
            key: bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
            message: format!("a record's key is {} bytes, not 32", bytes.len()),
        }),
    }
}

/// The live record claimed first, as [`StoreStats::oldest`] gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OldestRecord {
    /// Its storage key (logs show its first 16 hex digits).
    pub key: StorageKey,
    /// The fence of its claim, the lowest of the live records.
    pub fence: u64,
    /// Where it is in its life.
    pub state: RecordState,
    /// How long until it ends: its lease, or its expiry once completed.
    pub left: Duration,
}

impl StoreStats {
    /// Every record counted: live and expired.
    pub fn records(&self) -> u64 {
        self.in_progress + self.completed + self.released + self.expired
    }
}

/// An operator's access to a store: see the [module docs](self).
pub trait Admin: Store {
    /// The record of `key` as it stands, expired or not; `None` if the store holds none.
    fn inspect<'a>(
        &'a self,
        key: &'a StorageKey,
    ) -> BoxFuture<'a, Result<Option<RecordView>, StoreError>>;

    /// Counts over every record. On Redis this walks the keys with `SCAN` (never `KEYS`), so
    /// it takes time on a large keyspace but does not block the server.
    fn stats(&self) -> BoxFuture<'_, Result<StoreStats, StoreError>>;

    /// Deletes at most `limit` (at least 1) of the ended records [`Store::purge_expired`]
    /// would delete, in one short transaction, and answers how many it deleted: 0 once none is
    /// left. Call it until it answers 0 to purge everything without one long transaction
    /// (PostgreSQL skips rows another transaction holds locked). Redis deletes ended records
    /// by itself: there it always answers 0.
    fn purge_expired_batch(&self, limit: u64) -> BoxFuture<'_, Result<u64, StoreError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_key_of_32_bytes_is_the_storage_key_and_any_other_is_corrupt() {
        let bytes: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(stored_key(&bytes).unwrap(), StorageKey::from_bytes(bytes));
        let error = stored_key(&bytes[..31]).unwrap_err();
        assert!(
            matches!(&error, StoreError::Corrupt { key, message }
                if key.len() == 62 && message.contains("31 bytes")),
            "{error:?}"
        );
    }
}
