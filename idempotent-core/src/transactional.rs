//! The transactional mode's entry point: a call run with the PostgreSQL store writing its
//! claim and record in the caller's transaction (`stores/postgres/transaction.rs` supplies the
//! statements, as a [`Ledger`](crate::ledger::Ledger); the engine drives them). The other
//! stores' entry points are next to their ledgers: `stores/sqlx_postgres/transaction.rs`,
//! `stores/sqlx_sqlite/transaction.rs` and `stores/sqlite/transaction.rs`.

use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::{Call, Outcome, execute};
use crate::error::Error;
use crate::options::Options;
use crate::recorded::OkOnly;
use crate::stores::postgres::{InTransaction, PostgresStore, PostgresTransaction};

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
        let tx = tokio::sync::Mutex::new(tx);
        let ledger = InTransaction::new(self, &tx);
        execute::<OkOnly, T, E, F>(&ledger, options, call.prepare(), body).await
    }
}
