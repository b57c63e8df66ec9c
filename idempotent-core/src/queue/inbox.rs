//! The transactional inbox on PostgreSQL (sqlx): [`Consumer::run_in_transactions`].

use std::fmt;
use std::future::Future;

use sqlx::{PgPool, Postgres, Transaction};

use super::{Consumer, Failure, Message, Report, Source, SourceError, Verdict};
use crate::engine::Outcome;
use crate::error::Error;
use crate::stores::sqlx_postgres::SqlxPgStore;
use crate::stores::sqlx_postgres::error::from_sqlx;

impl<S: Source> Consumer<S> {
    /// The transactional inbox: consumes until `shutdown` completes, running `handler` for
    /// each message id in a transaction of `store`'s pool that also holds the id's record
    /// (the transactional mode, [`SqlxPgStore::run_in_transaction`]); the delivery is
    /// acknowledged only after that transaction commits.
    ///
    /// So the handler's writes to the database and the record commit together or not at
    /// all: a consumer that dies at any point before the commit leaves neither (the message
    /// is redelivered and runs again, on a database that never saw the first run), and one
    /// that dies after it leaves both (the redelivery finds the record and is acknowledged
    /// without running the handler). Two copies of one message in two consumers' transactions
    /// at once: the second waits on the first's row lock, then replays. Database effects
    /// happen exactly once; effects outside the database (an email, a call to another
    /// service) are not in the transaction and keep the guarantees of [`Consumer::run`].
    ///
    /// A handler's `Err`, or any failure before the commit, rolls the transaction back and
    /// gives the message back to the broker. The engine's options apply as in the
    /// transactional mode: its lease bounds nothing here (the transaction holds the claim),
    /// its ttl is the record's.
    ///
    /// The handler is an async closure, as in [`SqlxPgStore::run_in_transaction`]; the
    /// future this returns is therefore not `Send` (the compiler cannot see that an async
    /// closure's future is), so await it on a task that does not move between threads: in
    /// `main`, in `tokio::task::LocalSet`, or on a runtime of its own.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use idempotent_core::queue::{self, Consumer, Message};
    /// use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
    ///
    /// # async fn doc(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// let store = SqlxPgStore::builder(pool).build().await?;
    /// let (publisher, source) = queue::channel(Duration::from_secs(30));
    /// publisher.publish("order-7", r#"{"total":4200}"#);
    ///
    /// let consumer = Consumer::new("orders::place", source.clone());
    /// let report = consumer
    ///     .run_in_transactions(&store, async |tx, message: &Message| {
    ///         sqlx::query("INSERT INTO orders (id, body) VALUES ($1, $2)")
    ///             .bind(message.id())
    ///             .bind(message.payload())
    ///             .execute(&mut **tx)
    ///             .await
    ///             .map(|_| ())
    ///     }, source.settled())
    ///     .await?;
    /// assert_eq!(report.processed, 1);
    /// # Ok(()) }
    /// ```
    pub async fn run_in_transactions<H, E>(
        &self,
        store: &SqlxPgStore,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Report, SourceError>
    where
        H: AsyncFn(&mut Transaction<'_, Postgres>, &Message) -> Result<(), E>,
        E: fmt::Display,
    {
        let pool: &PgPool = store.pool();
        let handler = &handler;
        let process = |message: Message, exceeded: bool| async move {
            let mut tx = match pool.begin().await {
                Ok(tx) => tx,
                Err(error) => {
                    return Verdict::Engine(Error::Store(from_sqlx(
                        "could not begin the inbox transaction",
                        error,
                    )));
                }
            };
            let call = message.call(self.name);
            let result = store
                .run_in_transaction(
                    &mut tx,
                    self.engine.options(),
                    call,
                    async |tx: &mut Transaction<'_, Postgres>| {
                        if exceeded {
                            return Err(Failure::Exceeded);
                        }
                        handler(tx, &message)
                            .await
                            .map_err(|error| Failure::Handler(error.to_string()))
                    },
                )
                .await;
            match result {
                // The record's statement failed inside the transaction: it is aborted, and
                // the handler's writes go with it. Nothing is done; roll back and try again.
                Ok(Outcome::Unrecorded(())) => {
                    let _ = tx.rollback().await;
                    Verdict::Engine(Error::Store(crate::error::StoreError::Backend {
                        message: "the inbox record could not be written in the transaction; it was rolled back with the handler's writes".into(),
                        source: None,
                    }))
                }
                Ok(outcome) => match tx.commit().await {
                    Ok(()) => Verdict::Done(outcome),
                    // Whether a failed commit was applied cannot be known here: the delivery is
                    // given back, and its redelivery finds the record if it was.
                    Err(error) => Verdict::Engine(Error::Store(from_sqlx(
                        "the inbox transaction did not commit",
                        error,
                    ))),
                },
                Err(failure) => {
                    let _ = tx.rollback().await;
                    Verdict::from(Err(failure))
                }
            }
        };
        self.consume(process, shutdown).await
    }
}
