//! The transactional mode: the claim and the recorded result are written in the caller's own
//! transaction, so the body's database writes and the record commit together or not at all.
//!
//! Concurrent callers of one key block on the first one's uncommitted row (its unique key)
//! instead of seeing it in progress; once it commits they replay its result, and if it rolls
//! back one of them runs. No lease is needed while the row is uncommitted, so there is no
//! heartbeat, and the result is recorded (or the claim deleted) however long the body ran; a
//! panic, a cancelled call or a lost connection roll the transaction back, which takes the
//! claim with it. Use READ COMMITTED (PostgreSQL's default): each claim statement then sees
//! what committed before it. Under REPEATABLE READ or SERIALIZABLE a claim racing another
//! transaction's claim of the same key can fail with a serialization error (SQLSTATE 40001,
//! named in the `Error::Store` message): retry the whole transaction, as for any
//! serialization failure.
//!
//! Statements run with `query_typed`, their parameter types given: `query` with SQL text would
//! prepare the statement first, a round trip of its own on every call, as the caller's
//! connection keeps no prepared statements of ours.

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::types::Type;

use super::{PostgresStore, claim_with, from_pg, millis};
use crate::engine::{Call, Encoded, Outcome, Prepared, acquire, encode_result, start_call};
use crate::error::{Error, StoreError};
use crate::key::StorageKey;
use crate::options::Options;
use crate::recorded::OkOnly;
use crate::store::{Claim, Fence};
use crate::telemetry::CallOutcome;

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
        // In progress means held by a call outside any transaction of ours (the
        // non-transactional mode); a transaction's own claims block instead.
        let claim = || self.claim_in(tx, &key, &fingerprint, options);
        let fence = match acquire::<OkOnly, T, E, _>(claim, self, &key, options, &mut trace).await {
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
                    (&millis(options.get_ttl()), Type::INT8),
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

    async fn claim_in(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        key: &StorageKey,
        fingerprint: &crate::fingerprint::Fingerprint,
        options: &Options,
    ) -> Result<Claim, StoreError> {
        let key_param = key.as_bytes().as_slice();
        let fingerprint_param = fingerprint.as_bytes().as_slice();
        let lease = millis(options.get_lease());
        claim_with(key, fingerprint, || async move {
            tx.query_typed(
                &self.statements.claim,
                &[
                    (&key_param, Type::BYTEA),
                    (&fingerprint_param, Type::BYTEA),
                    (&lease, Type::INT8),
                ],
            )
            .await
            .map_err(|error| from_pg("the claim failed in the transaction", error))
        })
        .await
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
