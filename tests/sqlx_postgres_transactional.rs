//! The transactional mode on sqlx (`SqlxPgStore::run_in_transaction`): the claim and the
//! recorded result are written in the caller's `sqlx::Transaction<'_, Postgres>`, so business
//! writes and the record commit together or not at all. The scenarios of
//! `postgres_transactional.rs`, through the non-macro API.
#![cfg(feature = "sqlx-postgres")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
use idempotent_core::{Call, Error, Fingerprinter, OnConflict, Options, Outcome, idempotent};
use idempotent_test_support::shared_postgres;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres, Transaction};

#[derive(Debug)]
enum ShopError {
    Declined,
    Database(#[allow(dead_code)] sqlx::Error),
    Idempotency(Error),
}

impl From<Error> for ShopError {
    fn from(error: Error) -> Self {
        ShopError::Idempotency(error)
    }
}

impl From<sqlx::Error> for ShopError {
    fn from(error: sqlx::Error) -> Self {
        ShopError::Database(error)
    }
}

struct Shop {
    store: SqlxPgStore,
    pool: PgPool,
    executions: AtomicU32,
}

/// `create_order`'s call for `order_id` and `amount`.
fn order_call(order_id: &str, amount: i64) -> Call<'_> {
    let mut arguments = Fingerprinter::new();
    arguments.push(order_id).unwrap().push(&amount).unwrap();
    Call::new(
        "sqlx_postgres_transactional::create_order",
        arguments.finish(),
    )
    .key(order_id)
}

impl Shop {
    /// Inserts the order in the caller's transaction; `decline` makes it fail after the insert.
    async fn create_order(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        options: &Options,
        order_id: &str,
        amount: i64,
        decline: bool,
    ) -> Result<Outcome<String>, ShopError> {
        self.store
            .run_in_transaction(tx, options, order_call(order_id, amount), async |tx| {
                self.executions.fetch_add(1, Ordering::SeqCst);
                sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, $2)")
                    .bind(order_id)
                    .bind(amount)
                    .execute(&mut **tx)
                    .await?;
                if decline {
                    return Err(ShopError::Declined);
                }
                Ok(format!("order {order_id} for {amount}"))
            })
            .await
    }

    async fn order(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        order_id: &str,
        amount: i64,
    ) -> Result<String, ShopError> {
        self.create_order(tx, &Options::new(), order_id, amount, false)
            .await
            .map(Outcome::into_value)
    }

    /// `create_order` with the attribute: the body sees `tx` as declared, `&mut`, and the claim
    /// and the record are written in it too.
    #[idempotent(key = order_id, store = self.store, tx = tx, skip(decline))]
    async fn create_order_with_the_attribute(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        order_id: String,
        amount: i64,
        decline: bool,
    ) -> Result<String, ShopError> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, $2)")
            .bind(&order_id)
            .bind(amount)
            .execute(&mut **tx)
            .await?;
        if decline {
            return Err(ShopError::Declined);
        }
        Ok(format!("order {order_id} for {amount}"))
    }

    fn executions(&self) -> u32 {
        self.executions.load(Ordering::SeqCst)
    }

    async fn orders_and_records(&self) -> (i64, i64) {
        let count = async |sql: &'static str| -> i64 {
            sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
        };
        (
            count("SELECT count(*) FROM orders").await,
            count("SELECT count(*) FROM idempotent_records").await,
        )
    }
}

/// A shop on a database of its own, with its orders table, and the database's URL.
async fn shop() -> (Shop, String) {
    let url = shared_postgres().create_unique_database("sqlx_tx");
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .connect(&url)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY, amount bigint NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let store = SqlxPgStore::builder(pool.clone()).build().await.unwrap();
    (
        Shop {
            store,
            pool,
            executions: AtomicU32::new(0),
        },
        url,
    )
}

#[tokio::test]
async fn committed_together_and_replayed_in_a_later_transaction() {
    let (shop, _) = shop().await;
    for _ in 0..3 {
        let mut tx = shop.pool.begin().await.unwrap();
        let receipt = shop.order(&mut tx, "A-1", 100).await.unwrap();
        assert_eq!(receipt, "order A-1 for 100");
        tx.commit().await.unwrap();
    }
    assert_eq!(shop.executions(), 1);
    assert_eq!(shop.orders_and_records().await, (1, 1));

    let mut tx = shop.pool.begin().await.unwrap();
    let reused = shop.order(&mut tx, "A-1", 999).await;
    assert!(
        matches!(reused, Err(ShopError::Idempotency(Error::KeyReused))),
        "{reused:?}"
    );
}

#[tokio::test]
async fn a_body_that_fails_after_its_insert_leaves_neither_row_nor_record() {
    let (shop, _) = shop().await;
    let mut tx = shop.pool.begin().await.unwrap();
    let declined = shop
        .create_order(&mut tx, &Options::new(), "B-1", 100, true)
        .await;
    assert!(matches!(declined, Err(ShopError::Declined)), "{declined:?}");
    tx.rollback().await.unwrap();
    assert_eq!(shop.orders_and_records().await, (0, 0));

    // The key is free: a retry runs.
    let mut tx = shop.pool.begin().await.unwrap();
    shop.order(&mut tx, "B-1", 100).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(shop.orders_and_records().await, (1, 1));
    assert_eq!(shop.executions(), 2);
}

#[tokio::test]
async fn sixteen_concurrent_transactions_with_one_key_make_one_order() {
    let (shop, _) = shop().await;
    let shop = Arc::new(shop);
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let shop = Arc::clone(&shop);
            tokio::spawn(async move {
                let mut tx = shop.pool.begin().await.unwrap();
                let receipt = shop.order(&mut tx, "C-1", 250).await;
                tx.commit().await.unwrap();
                receipt
            })
        })
        .collect();
    let mut receipts = Vec::new();
    for caller in callers {
        receipts.push(caller.await.unwrap().expect("every caller gets the order"));
    }
    receipts.dedup();
    assert_eq!(receipts, ["order C-1 for 250"]);
    assert_eq!(shop.executions(), 1);
    assert_eq!(shop.orders_and_records().await, (1, 1));
}

#[tokio::test]
async fn a_connection_lost_before_commit_leaves_nothing_and_the_retry_runs_once() {
    let (shop, _) = shop().await;
    let mut tx = shop.pool.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    shop.order(&mut tx, "D-1", 100).await.unwrap();
    // The connection dies after the business insert and the record, before the commit.
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&shop.pool)
        .await
        .unwrap();
    assert!(
        tx.commit().await.is_err(),
        "the commit cannot reach the server"
    );
    assert_eq!(shop.orders_and_records().await, (0, 0));

    for _ in 0..2 {
        let mut tx = shop.pool.begin().await.unwrap();
        shop.order(&mut tx, "D-1", 100).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(
        shop.executions(),
        2,
        "the lost attempt, then exactly one more"
    );
    assert_eq!(shop.orders_and_records().await, (1, 1));
}

#[tokio::test]
async fn a_call_retried_in_its_transaction_after_it_was_cancelled_is_refused_at_once() {
    let (shop, _) = shop().await;
    let mut tx = shop.pool.begin().await.unwrap();
    // Cancelled in its body, after the claim and the order's insert.
    let (inserted, never) = (tokio::sync::Notify::new(), tokio::sync::Notify::new());
    let options = Options::new();
    let call =
        shop.store
            .run_in_transaction(&mut tx, &options, order_call("H-1", 100), async |tx| {
                shop.executions.fetch_add(1, Ordering::SeqCst);
                sqlx::query("INSERT INTO orders (id, amount) VALUES ('H-1', 100)")
                    .execute(&mut **tx)
                    .await?;
                inserted.notify_one();
                never.notified().await;
                Ok::<_, ShopError>("unreachable".to_string())
            });
    tokio::select! {
        answer = call => panic!("the body never returns: {answer:?}"),
        () = inserted.notified() => {}
    }
    assert_eq!(shop.executions(), 1);

    // Retried in the same transaction: the claim there is the transaction's own, so the call
    // answers at once and the body does not run again in it.
    let retried = shop.order(&mut tx, "H-1", 100).await;
    assert!(
        matches!(
            retried,
            Err(ShopError::Idempotency(Error::HeldByThisTransaction))
        ),
        "{retried:?}"
    );
    assert_eq!(shop.executions(), 1, "the body did not run again");
    tx.rollback().await.unwrap();

    // Rolled back, the key is free: a new transaction runs it once.
    let mut tx = shop.pool.begin().await.unwrap();
    shop.order(&mut tx, "H-1", 100).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(shop.executions(), 2);
    assert_eq!(shop.orders_and_records().await, (1, 1));
}

#[tokio::test]
async fn a_claim_behind_another_transactions_claim_waits_no_longer_than_its_policy() {
    let (shop, _) = shop().await;
    let mut first = shop.pool.begin().await.unwrap();
    shop.order(&mut first, "I-1", 100).await.unwrap();
    // The first transaction stays open: its claim is uncommitted.

    for (name, on_conflict) in [
        ("reject", OnConflict::Reject),
        (
            "wait 300 ms",
            OnConflict::Wait {
                timeout: Duration::from_millis(300),
            },
        ),
    ] {
        let mut tx = shop.pool.begin().await.unwrap();
        let options = Options::new().with_on_conflict(on_conflict);
        // Unbounded, the claim would wait for the first transaction, which never ends here.
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            shop.create_order(&mut tx, &options, "I-1", 100, false),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: the claim is still blocked after 30 s"));
        assert!(
            matches!(answer, Err(ShopError::Idempotency(Error::Conflict { .. }))),
            "{name}: {answer:?}"
        );
        tx.rollback().await.unwrap();
    }

    first.commit().await.unwrap();
    let mut tx = shop.pool.begin().await.unwrap();
    let replayed = shop
        .create_order(&mut tx, &Options::new(), "I-1", 100, false)
        .await
        .unwrap();
    assert!(replayed.is_replayed());
    assert_eq!(replayed.into_value(), "order I-1 for 100");
    assert_eq!(shop.executions(), 1);
}

#[tokio::test]
async fn the_callers_lock_timeout_is_left_as_it_was() {
    let (shop, _) = shop().await;
    let mut tx = shop.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '7s'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let in_body = shop
        .store
        .run_in_transaction(
            &mut tx,
            &Options::new(),
            order_call("J-1", 100),
            async |tx| {
                let shown: String = sqlx::query_scalar("SHOW lock_timeout")
                    .fetch_one(&mut **tx)
                    .await?;
                Ok::<_, ShopError>(shown)
            },
        )
        .await
        .unwrap()
        .into_value();
    assert_eq!(
        in_body, "7s",
        "the body runs with the caller's lock_timeout"
    );
    let after: String = sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(after, "7s", "and the caller's transaction goes on with it");
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_call_can_be_spawned() {
    let (shop, _) = shop().await;
    let shop = Arc::new(shop);
    let spawned = tokio::spawn({
        let shop = Arc::clone(&shop);
        async move {
            let mut tx = shop.pool.begin().await.unwrap();
            let receipt = shop.order(&mut tx, "K-1", 5).await;
            tx.commit().await.unwrap();
            receipt
        }
    });
    assert_eq!(spawned.await.unwrap().unwrap(), "order K-1 for 5");
}

#[tokio::test]
async fn the_attribute_commits_the_order_and_its_record_together_and_replays_it() {
    let (shop, _) = shop().await;
    for _ in 0..3 {
        let mut tx = shop.pool.begin().await.unwrap();
        let receipt = shop
            .create_order_with_the_attribute(&mut tx, "T-1".into(), 100, false)
            .await
            .unwrap();
        assert_eq!(receipt, "order T-1 for 100");
        tx.commit().await.unwrap();
    }
    assert_eq!(shop.executions(), 1);
    assert_eq!(shop.orders_and_records().await, (1, 1));

    let mut tx = shop.pool.begin().await.unwrap();
    let reused = shop
        .create_order_with_the_attribute(&mut tx, "T-1".into(), 999, false)
        .await;
    assert!(
        matches!(reused, Err(ShopError::Idempotency(Error::KeyReused))),
        "{reused:?}"
    );
}

#[tokio::test]
async fn the_attributes_failing_body_leaves_neither_row_nor_record_and_the_retry_runs_once() {
    let (shop, _) = shop().await;
    let mut tx = shop.pool.begin().await.unwrap();
    let declined = shop
        .create_order_with_the_attribute(&mut tx, "T-2".into(), 5, true)
        .await;
    assert!(matches!(declined, Err(ShopError::Declined)), "{declined:?}");
    tx.rollback().await.unwrap();
    assert_eq!(shop.orders_and_records().await, (0, 0));

    let mut tx = shop.pool.begin().await.unwrap();
    let receipt = shop
        .create_order_with_the_attribute(&mut tx, "T-2".into(), 5, false)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(receipt, "order T-2 for 5");
    assert_eq!(shop.executions(), 2);
    assert_eq!(shop.orders_and_records().await, (1, 1));
}

#[tokio::test]
async fn sixteen_spawned_transactions_through_the_attribute_make_one_order() {
    let (shop, _) = shop().await;
    let shop = Arc::new(shop);
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let shop = Arc::clone(&shop);
            tokio::spawn(async move {
                let mut tx = shop.pool.begin().await.unwrap();
                let receipt = shop
                    .create_order_with_the_attribute(&mut tx, "T-3".into(), 250, false)
                    .await;
                tx.commit().await.unwrap();
                receipt
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "order T-3 for 250");
    }
    assert_eq!(shop.executions(), 1);
    assert_eq!(shop.orders_and_records().await, (1, 1));
}
