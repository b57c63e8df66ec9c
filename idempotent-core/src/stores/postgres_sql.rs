//! The SQL of the PostgreSQL stores, for one table name: `PostgresStore` (tokio-postgres) and
//! `SqlxPgStore` (sqlx) run the same statements on the same tables, so a table written by one
//! is read by the other. Nothing here depends on a driver.
//!
//! Every operation is one statement. Times come from the server's `statement_timestamp()`, the
//! start of the statement: not `now()`, the start of the transaction, which in the
//! transactional mode is the caller's transaction and can be long past (a lease that ran out
//! after it began would look alive to it for good). A record is one row: state 0 in progress,
//! 1 completed; `until` is the lease end or the expiry.

use std::time::Duration;

use crate::error::Error;
use crate::ledger::Claimed;
use crate::store::{Claim, Fence};

/// The record format this release writes and reads.
pub(crate) const FORMAT: i16 = 1;
/// The schema version this release creates and knows. Version 2 added `waiting`; a version 1
/// table gains the column when a store of this release opens it.
pub(crate) const SCHEMA_VERSION: i32 = 2;

/// Sets `lock_timeout` to `$1` (text) for the caller's transaction, keeping the value it had.
pub(crate) const SET_LOCK_TIMEOUT: &str = "SELECT set_config('lock_timeout', $1, true)
     FROM (SELECT set_config('idempotent.saved_lock_timeout', current_setting('lock_timeout'), true)
           OFFSET 0) saved";
/// Gives `lock_timeout` back the value [`SET_LOCK_TIMEOUT`] kept.
pub(crate) const RESTORE_LOCK_TIMEOUT: &str =
    "SELECT set_config('lock_timeout', current_setting('idempotent.saved_lock_timeout'), true)";

/// Whether the schema table `$1` (`<table>_schema`, text) exists in the search path: the
/// catalog itself, read with the statement's snapshot (`to_regclass` would answer from the
/// connection's catalog cache, which does not hear of a table another starter created while
/// this one waited for its turn).
pub(crate) const SCHEMA_TABLE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables
                    WHERE tablename = $1 AND schemaname = ANY (current_schemas(false)))";
/// Starters migrating the tables `$1` (text) take turns on this lock, which ends with their
/// transaction.
pub(crate) const SCHEMA_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext($1))";

/// The latest schema version recorded for `table` (an `integer`, NULL when none is).
pub(crate) fn schema_version_query(table: &str) -> String {
    format!("SELECT max(version) FROM {table}_schema")
}

/// Records schema version `$1` (`integer`) for `table`.
pub(crate) fn schema_version_insert(table: &str) -> String {
    format!("INSERT INTO {table}_schema (version) VALUES ($1)")
}

/// Whether a server error with SQLSTATE `code` passes (the call may be tried again later):
/// connection exceptions (08), operator intervention such as a terminated backend, a cancelled
/// statement or a shutdown (57), exhausted resources (53), a lock not had in time (55P03), and
/// a serialization failure or deadlock (40001, 40P01: the statement was rolled back). Any other
/// server error is a real failure.
pub(crate) fn sqlstate_passes(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "53" | "57")) || matches!(code, "55P03" | "40001" | "40P01")
}

/// Whether SQLSTATE `code` says the server rolled the statement's transaction back (a
/// serialization failure or a deadlock): a claim in a transaction of its own can run again.
pub(crate) fn sqlstate_rolled_back(code: &str) -> bool {
    matches!(code, "40001" | "40P01")
}

/// A fence as the statements take it, a `bigint`.
pub(crate) fn fence_param(fence: Fence) -> i64 {
    // Sequence values are positive `bigint`s, so every fence the stores hand out fits.
    i64::try_from(fence.get()).unwrap_or(-1)
}

/// How many times a claim statement is run again when a concurrent insert hid the record.
pub(crate) const CLAIM_ATTEMPTS: usize = 5;

/// The guard of a fenced write outside the transactional mode: the holder's lease is alive.
const LIVE_LEASE: &str = " AND until > statement_timestamp()";

pub(crate) struct Statements {
    pub(crate) schema: String,
    pub(crate) claim: String,
    pub(crate) claim_in_transaction: String,
    pub(crate) complete: String,
    pub(crate) release: String,
    pub(crate) complete_in_transaction: String,
    pub(crate) release_in_transaction: String,
    pub(crate) extend: String,
    pub(crate) lease_left: String,
    pub(crate) purge: String,
    pub(crate) remove: String,
    // `PgListener` writes its own LISTEN statement for the sqlx store.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) listen: String,
}

impl Statements {
    /// `table` must already be a checked identifier.
    pub(crate) fn new(table: &str) -> Self {
        let channel = format!("{table}_done");
        // `complete` and `release`, with `guard` added to their fenced `WHERE`.
        let complete = |guard: &str| {
            format!(
                "WITH done AS (
                     UPDATE {table} SET state = 1, output = $3,
                                        until = statement_timestamp() + $4::bigint * interval '1 millisecond'
                     WHERE key = $1 AND fence = $2 AND state = 0{guard}
                     RETURNING key, waiting
                 )
                 SELECT CASE WHEN waiting THEN pg_notify('{channel}', encode(key, 'hex')) END
                 FROM done"
            )
        };
        let release = |guard: &str| {
            format!(
                "WITH gone AS (
                     DELETE FROM {table}
                     WHERE key = $1 AND fence = $2 AND state = 0{guard}
                     RETURNING key, waiting
                 )
                 SELECT CASE WHEN waiting THEN pg_notify('{channel}', encode(key, 'hex')) END
                 FROM gone"
            )
        };
        // The parts both claims share, each with `also` added: the live record, if any
        // (`live`); the insert, or the takeover of a dead record, when there is none
        // (`claimed`); and the answer's row for each, with the columns `record.rs` reads.
        let live = |also: &str| {
            format!(
                "live AS (
                     SELECT r.fence, r.fingerprint, r.state, r.output, r.until, r.format
                     FROM {table} r
                     WHERE r.key = $1 AND r.until > statement_timestamp(){also}
                 )"
            )
        };
        let claimed = |also: &str| {
            format!(
                "claimed AS (
                     INSERT INTO {table} AS r (key, fingerprint, fence, state, until, output, format)
                     SELECT $1, $2, nextval('{table}_fences'), 0,
                            statement_timestamp() + $3::bigint * interval '1 millisecond', NULL, {FORMAT}
                     WHERE NOT EXISTS (SELECT 1 FROM live){also}
                     ON CONFLICT (key) DO UPDATE
                         SET fingerprint = EXCLUDED.fingerprint, fence = EXCLUDED.fence, state = 0,
                             until = EXCLUDED.until, output = NULL, format = {FORMAT},
                             waiting = false
                         WHERE r.until <= statement_timestamp()
                     RETURNING r.fence
                 )"
            )
        };
        let acquired = |also: &str| {
            format!(
                "SELECT true AS acquired, fence, NULL::bytea AS fingerprint, NULL::smallint AS state,
                        NULL::bytea AS output, NULL::bigint AS left_ms, NULL::smallint AS format{also}"
            )
        };
        let replay = |also: &str| {
            format!(
                "SELECT false, l.fence, l.fingerprint, l.state,
                        CASE WHEN l.fingerprint = $2 AND l.state = 1 THEN l.output END,
                        ceil(extract(epoch FROM (l.until - statement_timestamp())) * 1000)::bigint, l.format{also}"
            )
        };
        Self {
            schema: format!(
                "CREATE TABLE IF NOT EXISTS {table}_schema (version integer NOT NULL);
                 CREATE SEQUENCE IF NOT EXISTS {table}_fences;
                 CREATE TABLE IF NOT EXISTS {table} (
                     key bytea PRIMARY KEY,
                     fingerprint bytea NOT NULL,
                     fence bigint NOT NULL,
                     state smallint NOT NULL,
                     until timestamptz NOT NULL,
                     output bytea,
                     format smallint NOT NULL,
                     waiting boolean NOT NULL DEFAULT false
                 );
                 ALTER TABLE {table} ADD COLUMN IF NOT EXISTS waiting boolean NOT NULL DEFAULT false;
                 CREATE INDEX IF NOT EXISTS {table}_until ON {table} (until);"
            ),
            // The claim inserts, or takes over a dead record, in one statement; when neither
            // happens, the same statement reads the live record (the replay). The live record
            // is read first and the insert runs only without one, so a replay is a plain read:
            // no row lock, no transaction id, no WAL, no fence taken from the sequence.
            // `extract` turns the lease left into whole milliseconds.
            claim: format!(
                "WITH {live},
                 {claimed}
                 {acquired}
                 FROM claimed
                 UNION ALL
                 {replay}
                 FROM live l",
                live = live(""),
                claimed = claimed(""),
                acquired = acquired(""),
                replay = replay(""),
            ),
            // The claim of the transactional mode: the same, but a record in progress that the
            // caller's own transaction wrote (an earlier call in it was cancelled, or is still
            // running) is answered as such (`own`), live or not, and never taken over: the
            // transaction may hold that call's writes. The rows this transaction sees whose
            // writer is still in progress are its own (another's are invisible to it). The
            // writer may be a subtransaction (a savepoint), whose id is larger than the
            // transaction's own: `xmin` is 32 bits, so it is put in the epoch of the
            // transaction's id, and asked about only when it is at most 2^31 above that id (an
            // unfrozen `xmin` is less than 2^31 old, so one that seems further above is from
            // the epoch before, and `pg_xact_status` would refuse it as in the future).
            claim_in_transaction: format!(
                "WITH mine AS (
                     SELECT r.fence
                     FROM {table} r,
                          LATERAL (SELECT pg_current_xact_id_if_assigned()::text::bigint AS top,
                                          r.xmin::text::bigint AS low) ids
                     WHERE r.key = $1 AND r.state = 0
                       AND CASE WHEN ids.top IS NULL
                                     OR ids.low - (ids.top & 4294967295) NOT BETWEEN 0 AND 2147483647
                                THEN false
                                ELSE pg_xact_status((((ids.top >> 32) << 32) | ids.low)::text::xid8)
                                     = 'in progress'
                           END
                 ),
                 {live},
                 {claimed}
                 {acquired}
                 FROM claimed
                 UNION ALL
                 {replay}
                 FROM live l
                 UNION ALL
                 SELECT false, m.fence, NULL, 0::smallint, NULL, NULL, {FORMAT}::smallint, true
                 FROM mine m",
                live = live(" AND NOT EXISTS (SELECT 1 FROM mine)"),
                claimed = claimed(" AND NOT EXISTS (SELECT 1 FROM mine)"),
                acquired = acquired(", false AS own"),
                replay = replay(", false"),
            ),
            // A row when the write applied; a notification only when a waiter marked the
            // record (`lease_left`). A notifying transaction takes a database-wide lock at
            // commit, so notifying on every completion serialized the commits of first calls.
            complete: complete(LIVE_LEASE),
            release: release(LIVE_LEASE),
            // In the transactional mode the claim's row stays locked by the caller's
            // transaction until it ends, so nobody else can take it over: the fence guards
            // the write, and the lease, which only matters once the claim is committed,
            // does not. A body may outlast it.
            complete_in_transaction: complete(""),
            release_in_transaction: release(""),
            // A row when the write applied, like `complete` and `release`.
            extend: format!(
                "UPDATE {table} SET until = statement_timestamp() + $3::bigint * interval '1 millisecond'
                 WHERE key = $1 AND fence = $2 AND state = 0 AND until > statement_timestamp()
                 RETURNING key"
            ),
            // A waiter's look, after it listens: the lease left, if the key is in progress,
            // and the record marked `waiting` so its completion or release notifies. A record
            // already marked (in this statement's snapshot) is not written again. When the
            // mark finds the row changed since the snapshot (completed, released, taken over,
            // or marked by another waiter's look), no row comes back; the store then looks
            // once more, with a new snapshot (`PostgresStore::lease_left`).
            lease_left: format!(
                "WITH live AS (
                     SELECT waiting, until FROM {table}
                     WHERE key = $1 AND state = 0 AND until > statement_timestamp()
                 ),
                 marked AS (
                     UPDATE {table} SET waiting = true
                     WHERE key = $1 AND state = 0 AND until > statement_timestamp() AND NOT waiting
                     RETURNING until
                 )
                 SELECT ceil(extract(epoch FROM (until - statement_timestamp())) * 1000)::bigint AS left_ms
                 FROM marked
                 UNION ALL
                 SELECT ceil(extract(epoch FROM (until - statement_timestamp())) * 1000)::bigint FROM live
                 WHERE live.waiting"
            ),
            purge: format!(
                "WITH gone AS (DELETE FROM {table} WHERE until <= statement_timestamp() RETURNING 1)
                 SELECT count(*) AS purged FROM gone"
            ),
            remove: format!("DELETE FROM {table} WHERE key = $1 RETURNING key"),
            listen: format!("LISTEN {channel}"),
        }
    }
}

/// A table name is put into SQL text, so it must be a plain lowercase identifier.
pub(crate) fn check_table_name(table: &str) -> Result<(), String> {
    let valid = !table.is_empty()
        && table.len() <= 40
        && table.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && table
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid table name {table:?}: use 1 to 40 lowercase letters, digits and underscores, not starting with a digit"
        ))
    }
}

/// The schema, claim and complete statement texts the stores use for `table`, for the
/// benches' raw-driver baselines (through `__hooks`).
pub(crate) fn statement_texts(table: &str) -> Result<(String, String, String), String> {
    check_table_name(table)?;
    let Statements {
        schema,
        claim,
        complete,
        ..
    } = Statements::new(table);
    Ok((schema, claim, complete))
}

/// What a claim in the caller's transaction found, with either driver.
pub(crate) enum Found {
    /// What the store's claim answers.
    Claim(Claim),
    /// A claim in progress that this transaction itself wrote.
    Own,
    /// Another transaction's uncommitted claim of the key, still there when the wait the call's
    /// `on_conflict` allows ran out (`lock_timeout`). The caller's transaction is aborted.
    LockTimeout,
}

impl Found {
    /// The ledger's answer for a claim with a lease of `lease`.
    pub(crate) fn claimed(self, lease: Duration) -> Claimed {
        match self {
            Found::Claim(claim) => Claimed::Claim(claim),
            Found::Own => Claimed::Refused(Error::HeldByThisTransaction),
            // The other transaction's claim has no lease yet that could be told; its lease
            // will be at most this call's kind of lease once it commits.
            Found::LockTimeout => Claimed::Refused(Error::Conflict { retry_after: lease }),
        }
    }
}

/// How long a claim may wait for another transaction's uncommitted claim of its key when the
/// call rejects conflicts: the least `lock_timeout` there is (0 would mean no limit).
pub(crate) const REJECT_LOCK_WAIT: Duration = Duration::from_millis(1);

/// The `lock_timeout` (as [`SET_LOCK_TIMEOUT`] takes it) of a claim that may wait `lock_wait`
/// for another transaction's claim: at least [`REJECT_LOCK_WAIT`], at most what an `int` of
/// milliseconds holds.
pub(crate) fn lock_timeout(lock_wait: Duration) -> String {
    let ms = crate::stores::millis::held_i64(lock_wait.max(REJECT_LOCK_WAIT));
    format!("{}ms", ms.min(i64::from(i32::MAX)))
}
