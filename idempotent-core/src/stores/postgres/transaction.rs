//! The transactional mode: the claim and the recorded result are written in the caller's own
//! transaction, so the body's database writes and the record commit together or not at all.
//!
//! Concurrent callers of one key block on the first one's uncommitted row (its unique key)
//! instead of seeing it in progress; once it commits they replay its result, and if it rolls
//! back one of them runs. That wait is bounded by the call's `on_conflict` (`lock_timeout`,
//! set around the claim and given back its value after it). A claim the caller's own
//! transaction holds is answered at once with `Error::HeldByThisTransaction`. No lease is
//! needed while the row is uncommitted, so there is no heartbeat, and the result is recorded
//! (or the claim deleted) however long the body ran; a panic, a cancelled call or a lost
//! connection roll the transaction back, which takes the claim with it. Use READ COMMITTED
//! (PostgreSQL's default): each claim statement then sees what committed before it. Under
//! REPEATABLE READ or SERIALIZABLE a claim racing another transaction's claim of the same key
//! can fail with a serialization error (SQLSTATE 40001, named in the `Error::Store` message):
//! retry the whole transaction, as for any serialization failure.
//!
//! Statements run with `query_typed`, their parameter types given: `query` with SQL text would
//! prepare the statement first, a round trip of its own on every call, as the caller's
//! connection keeps no prepared statements of ours.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::types::{ToSql, Type};

use super::{CLAIM_ATTEMPTS, PostgresStore, from_pg, judge_claim, millis, sql};
use crate::engine::{Call, Encoded, Outcome, Prepared, encode_result, start_call};
use crate::error::{Error, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::options::{OnConflict, Options};
use crate::recorded::{OkOnly, Recording};
use crate::store::{Claim, Fence, Store};
use crate::telemetry::{CallOutcome, CallTrace};

/// What a claim in the caller's transaction found.
enum Found {
    /// What the store's claim answers.
    Claim(Claim),
    /// A claim in progress that this transaction itself wrote.
    Own,
    /// Another transaction's uncommitted claim of the key, still there when the wait the call's
    /// `on_conflict` allows ran out (`lock_timeout`). The caller's transaction is aborted.
    LockTimeout,
}

/// How long a claim may wait for another transaction's uncommitted claim of its key when the
/// call rejects conflicts: the least `lock_timeout` there is (0 would mean no limit).
const REJECT_LOCK_WAIT: Duration = Duration::from_millis(1);

/// A transaction the transactional mode can write in: `tokio_postgres`'s or
/// `deadpool_postgres`'s, or a reference to one.
///
/// ```
/// fn accepts(_: &impl idempotent_core::stores::postgres::PostgresTransaction) {}
/// fn with_deadpool(tx: &deadpool_postgres::Transaction<'_>) { accepts(tx) }
/// fn with_tokio_postgres(tx: &tokio_postgres::Transaction<'_>) { accepts(tx) }
/// ```
pub trait PostgresTransaction: Sync {
    /// The underlying `tokio_postgres` transaction.
    fn transaction(&self) -> &tokio_postgres::Transaction<'_>;
}

impl PostgresTransaction for tokio_postgres::Transaction<'_> {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        self
    }
}

impl PostgresTransaction for deadpool_postgres::Transaction<'_> {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        self
    }
}

impl<T: PostgresTransaction + ?Sized> PostgresTransaction for &T {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        (**self).transaction()
    }
}

impl<T: PostgresTransaction + ?Sized + Send> PostgresTransaction for &mut T {
    fn transaction(&self) -> &tokio_postgres::Transaction<'_> {
        (**self).transaction()
    }
}

impl PostgresStore {
    /// Runs `body` under `call` inside the caller's transaction `tx`: the claim and the
    /// recorded value are written in `tx`, so they commit (or roll back) with the body's own
    /// writes in `tx`. The caller commits; on an `Err` the claim is deleted again, and the
    /// caller should roll back.
    ///
    /// Another transaction's uncommitted claim of the same key blocks this call's claim until
    /// that transaction ends, for no longer than `options`' `on_conflict` allows (at once when
    /// rejecting, else the rest of the wait): then [`Error::Conflict`], and `tx` is aborted
    /// (PostgreSQL aborts a transaction whose statement failed), so roll it back and retry in a
    /// new one. A key that `tx` itself holds, claimed by an earlier call in it that was
    /// cancelled (or is still running), is [`Error::HeldByThisTransaction`] at once: that call's
    /// writes may be in `tx`, so the body is not run again in it.
    ///
    /// ```no_run
    /// use idempotent_core::{Call, Fingerprint, Options, stores::postgres::PostgresStore};
    ///
    /// #[derive(Debug)]
    /// enum ShopError { Database(tokio_postgres::Error), Idempotency(idempotent_core::Error) }
    /// impl From<idempotent_core::Error> for ShopError {
    ///     fn from(e: idempotent_core::Error) -> Self { ShopError::Idempotency(e) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = PostgresStore::builder("postgres://app@127.0.0.1/shop").build().await?;
    /// let (mut client, connection) =
    ///     tokio_postgres::connect("postgres://app@127.0.0.1/shop", tokio_postgres::NoTls).await?;
    /// tokio::spawn(connection);
    /// let tx = client.transaction().await?;
    /// let call = Call::new("orders::create", Fingerprint::of(&42)?).key("order-42");
    /// let order = store
    ///     .run_in_transaction(&tx, &Options::new(), call, async {
    ///         tx.execute("INSERT INTO orders (id) VALUES (42)", &[])
    ///             .await
    ///             .map_err(ShopError::Database)?;
    ///         Ok::<_, ShopError>(42)
    ///     })
    ///     .await;
    /// if order.is_ok() {
    ///     tx.commit().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn run_in_transaction<T, E, F>(
        &self,
        tx: &(impl PostgresTransaction + ?Sized),
        options: &Options,
        call: Call<'_>,
        body: F,
    ) -> Result<Outcome<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: Future<Output = Result<T, E>>,
    {
        self.execute_in(tx.transaction(), options, call.prepare(), body)
            .await
    }

    /// Records `Ok` values only: an `Err` releases the claim (the attribute refuses
    /// `cache_errors` with `tx`).
    pub(crate) async fn execute_in<T, E, F>(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        options: &Options,
        call: Prepared,
        body: F,
    ) -> Result<Outcome<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: Future<Output = Result<T, E>>,
    {
        let (mut trace, key, arguments) = start_call(call, options)?;
        let fingerprint = arguments.fingerprint();
        let fence = match self
            .acquire_in::<T, E>(tx, &key, &fingerprint, options, &mut trace)
            .await
        {
            Ok(fence) => fence,
            Err(done) => return done,
        };

        let result = body.await;
        let bytes = match encode_result::<OkOnly, T, E>(&result, options) {
            Encoded::Record(bytes) => bytes,
            Encoded::NotRecorded => {
                self.release_in(tx, &key, fence).await;
                trace.emit(CallOutcome::Failed);
                return result.map(Outcome::Executed);
            }
            Encoded::Refused(error) => {
                self.release_in(tx, &key, fence).await;
                trace.emit(CallOutcome::EncodeError);
                return Err(error.into());
            }
        };
        let completed = tx
            .query_typed(
                &self.statements.complete_in_transaction,
                &[
                    (&key.as_bytes().as_slice(), Type::BYTEA),
                    (&super::fence_param(fence), Type::INT8),
                    (&bytes, Type::BYTEA),
                    (&millis(options.ttl()), Type::INT8),
                ],
            )
            .await;
        match completed {
            Ok(rows) if !rows.is_empty() => {
                trace.emit(CallOutcome::Executed);
                result.map(Outcome::Executed)
            }
            Ok(_) => {
                trace.emit(CallOutcome::Fenced);
                result.map(Outcome::Unrecorded)
            }
            // The transaction is unusable now: it will not commit, so neither will the body's
            // writes. Say so rather than hand back a value whose effects will be rolled back.
            Err(error) => {
                trace.emit(CallOutcome::StoreError);
                Err(Error::Store(from_pg(
                    "could not record the result in the transaction",
                    error,
                ))
                .into())
            }
        }
    }

    /// Claims `key` in `tx` until the claim is acquired or the call has its answer, under the
    /// call's `on_conflict`: a claim held outside any transaction is waited for as by the
    /// engine; another transaction's uncommitted claim blocks the claim statement, and that
    /// wait is bounded by `lock_timeout` (a conflict at once when rejecting, else what is left
    /// of the wait); this transaction's own claim is answered at once.
    async fn acquire_in<T, E>(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        options: &Options,
        trace: &mut CallTrace,
    ) -> Result<Fence, Result<Outcome<T>, E>>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
    {
        let deadline = match options.on_conflict() {
            OnConflict::Wait { timeout } => Some(tokio::time::Instant::now() + timeout),
            OnConflict::Reject => None,
        };
        let left = || {
            deadline.map_or(Duration::ZERO, |deadline| {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            })
        };
        let conflict = |trace: &CallTrace, retry_after: Duration| {
            trace.emit(CallOutcome::Conflict);
            Err(Err(Error::Conflict { retry_after }.into()))
        };
        loop {
            let lock_wait = left().max(REJECT_LOCK_WAIT);
            let retry_after = match self
                .claim_in(tx, key, fingerprint, options, lock_wait)
                .await
            {
                Ok(Found::Claim(Claim::Acquired { fence })) => return Ok(fence),
                Ok(Found::Claim(Claim::Completed { output })) => {
                    return Err(match <OkOnly as Recording<T, E>>::decode(&output) {
                        Ok(result) => {
                            trace.emit(if trace.waited {
                                CallOutcome::Waited
                            } else {
                                CallOutcome::Replayed
                            });
                            result.map(Outcome::Replayed)
                        }
                        Err(error) => {
                            trace.emit(CallOutcome::DecodeError);
                            Err(Error::Decode(crate::error::JsonError::new(error)).into())
                        }
                    });
                }
                Ok(Found::Claim(Claim::Mismatch)) => {
                    trace.emit(CallOutcome::Mismatch);
                    return Err(Err(Error::KeyReused.into()));
                }
                Ok(Found::Own) => {
                    trace.emit(CallOutcome::Conflict);
                    return Err(Err(Error::HeldByThisTransaction.into()));
                }
                // The other transaction's claim has no lease yet that could be told; its
                // lease will be at most this call's kind of lease once it commits.
                Ok(Found::LockTimeout) => return conflict(trace, options.lease()),
                Ok(Found::Claim(Claim::InProgress { retry_after })) => retry_after,
                Err(error) => {
                    trace.emit(CallOutcome::StoreError);
                    return Err(Err(Error::Store(error).into()));
                }
            };
            // Held outside any transaction (a call not in the transactional mode).
            let left = left();
            if left.is_zero() {
                return conflict(trace, retry_after);
            }
            trace.waited = true;
            if let Err(error) = Store::wait(self, key, left).await {
                trace.emit(CallOutcome::StoreError);
                return Err(Err(Error::Store(error).into()));
            }
        }
    }

    /// One claim in `tx`, waiting at most `lock_wait` for another transaction's uncommitted
    /// claim of the key. `lock_timeout` is set for the claim and given its value back after
    /// it; the three statements are sent together, so they cost one round trip.
    async fn claim_in(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        options: &Options,
        lock_wait: Duration,
    ) -> Result<Found, StoreError> {
        let key_param = key.as_bytes().as_slice();
        let fingerprint_param = fingerprint.as_bytes().as_slice();
        let lease = millis(options.lease());
        let lock_timeout = format!("{}ms", millis(lock_wait).min(i64::from(i32::MAX)));
        for _ in 0..CLAIM_ATTEMPTS {
            let set_params: [(&(dyn ToSql + Sync), Type); 1] = [(&lock_timeout, Type::TEXT)];
            let claim_params: [(&(dyn ToSql + Sync), Type); 3] = [
                (&key_param, Type::BYTEA),
                (&fingerprint_param, Type::BYTEA),
                (&lease, Type::INT8),
            ];
            let (set, claimed, restored) = tokio::join!(
                tx.query_typed(sql::SET_LOCK_TIMEOUT, &set_params),
                tx.query_typed(&self.statements.claim_in_transaction, &claim_params),
                tx.query_typed(sql::RESTORE_LOCK_TIMEOUT, &[]),
            );
            set.map_err(|error| from_pg("could not bound the claim's wait", error))?;
            let rows = match claimed {
                Ok(rows) => rows,
                Err(error)
                    if error
                        .as_db_error()
                        .is_some_and(|db| db.code().code() == "55P03") =>
                {
                    return Ok(Found::LockTimeout);
                }
                Err(error) => {
                    return Err(from_pg("the claim failed in the transaction", error));
                }
            };
            restored.map_err(|error| from_pg("could not restore lock_timeout", error))?;
            let own = rows
                .first()
                .and_then(|row| row.try_get::<_, Option<bool>>(7).ok().flatten());
            if own == Some(true) {
                return Ok(Found::Own);
            }
            if let Some(claim) = judge_claim(&rows, key, fingerprint)? {
                return Ok(Found::Claim(claim));
            }
        }
        Err(StoreError::Backend {
            message: format!("the record under key {key} kept changing during the claim"),
            source: None,
        })
    }

    /// Deletes the claim again; should it fail, the caller's rollback removes it anyway.
    async fn release_in(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        key: &StorageKey,
        fence: Fence,
    ) {
        let released = tx
            .query_typed(
                &self.statements.release_in_transaction,
                &[
                    (&key.as_bytes().as_slice(), Type::BYTEA),
                    (&super::fence_param(fence), Type::INT8),
                ],
            )
            .await;
        if let Err(error) = released {
            tracing::warn!(target: "idempotent", %error, "could not delete a claim in the transaction; rolling it back removes it");
        }
    }
}
