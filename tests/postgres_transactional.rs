//! The transactional mode (`tx = tx`): the claim and the recorded result are written in the
//! caller's transaction, so business writes and the record commit together or not at all.
#![cfg(feature = "postgres")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotent_core::stores::postgres::PostgresStore;
use idempotent_core::{
    Bytes, CanonicalArguments, Claim, Error, FencedWrite, Fingerprinter, OnConflict, Options,
    StorageKey, Store, idempotent,
};
use idempotent_test_support::shared_postgres;
use support::postgres_client;
use tokio_postgres::{Client, Transaction};

#[derive(Debug)]
enum ShopError {
    Declined,
    Database(#[allow(dead_code)] tokio_postgres::Error),
    Idempotency(Error),
}

impl From<Error> for ShopError {
    fn from(error: Error) -> Self {
        ShopError::Idempotency(error)
    }
}

impl From<tokio_postgres::Error> for ShopError {
    fn from(error: tokio_postgres::Error) -> Self {
        ShopError::Database(error)
    }
}

struct Shop {
    store: Arc<PostgresStore>,
    executions: AtomicU32,
}

impl Shop {
    /// Inserts the order in the caller's transaction; `decline` makes it fail after the insert.
    #[idempotent(key = order_id, store = self.store, tx = tx, skip(decline))]
    async fn create_order(
        &self,
        tx: &mut Transaction<'_>,
        order_id: String,
        amount: i64,
        decline: bool,
    ) -> Result<String, ShopError> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        insert_order(tx, &order_id, amount).await?;
        if decline {
            return Err(ShopError::Declined);
        }
        Ok(format!("order {order_id} for {amount}"))
    }

    /// Like `create_order`, but a non-positive amount is declined before anything is written.
    #[idempotent(key = order_id, store = self.store, tx = tx)]
    async fn create_checked_order(
        &self,
        tx: &mut Transaction<'_>,
        order_id: String,
        amount: i64,
    ) -> Result<String, ShopError> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        if amount <= 0 {
            return Err(ShopError::Declined);
        }
        insert_order(tx, &order_id, amount).await?;
        Ok(format!("order {order_id} for {amount}"))
    }

    /// Like `create_order`, with a short lease and a body that outlasts it.
    #[idempotent(key = order_id, store = self.store, tx = tx, lease = "200ms")]
    async fn create_slow_order(
        &self,
        tx: &mut Transaction<'_>,
        order_id: String,
        amount: i64,
    ) -> Result<String, ShopError> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        insert_order(tx, &order_id, amount).await?;
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok(format!("order {order_id} for {amount}"))
    }

    /// Writes the order in a savepoint of the caller's transaction: the body sees `tx` as the
    /// function declares it, `&mut`, which `savepoint` needs.
    #[idempotent(key = order_id, store = self.store, tx = tx)]
    async fn create_order_in_a_savepoint(
        &self,
        tx: &mut Transaction<'_>,
        order_id: String,
        amount: i64,
    ) -> Result<String, ShopError> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        let savepoint = tx.savepoint("order_write").await?;
        insert_order(&savepoint, &order_id, amount).await?;
        savepoint.commit().await?;
        Ok(format!("order {order_id} for {amount}"))
    }

    fn executions(&self) -> u32 {
        self.executions.load(Ordering::SeqCst)
    }
}

/// The body's own write, in the caller's transaction.
async fn insert_order(
    tx: &Transaction<'_>,
    order_id: &str,
    amount: i64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO orders (id, amount) VALUES ($1, $2)",
        &[&order_id, &amount],
    )
    .await
    .map(drop)
}

/// A shop on a database of its own, with its orders table.
async fn shop() -> (Shop, String) {
    let url = shared_postgres().create_unique_database("tx");
    postgres_client(&url)
        .await
        .batch_execute("CREATE TABLE orders (id text PRIMARY KEY, amount bigint NOT NULL)")
        .await
        .unwrap();
    let store = PostgresStore::builder(&url)
        .max_connections(4)
        .build()
        .await
        .unwrap();
    (
        Shop {
            store: Arc::new(store),
            executions: AtomicU32::new(0),
        },
        url,
    )
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn orders_and_records(url: &str) -> (i64, i64) {
    let client = postgres_client(url).await;
    (
        count(&client, "SELECT count(*) FROM orders").await,
        count(&client, "SELECT count(*) FROM idempotent_records").await,
    )
}

#[tokio::test]
async fn committed_together_and_replayed_in_a_later_transaction() {
    let (shop, url) = shop().await;
    let mut client = postgres_client(&url).await;
    for _ in 0..3 {
        let mut tx = client.transaction().await.unwrap();
        let receipt = shop
            .create_order(&mut tx, "A-1".into(), 100, false)
            .await
            .unwrap();
        assert_eq!(receipt, "order A-1 for 100");
        tx.commit().await.unwrap();
    }
    assert_eq!(shop.executions(), 1);
    assert_eq!(orders_and_records(&url).await, (1, 1));

    let mut tx = client.transaction().await.unwrap();
    let reused = shop.create_order(&mut tx, "A-1".into(), 999, false).await;
    assert!(
        matches!(reused, Err(ShopError::Idempotency(Error::KeyReused))),
        "{reused:?}"
    );
}

#[tokio::test]
async fn a_body_given_the_transaction_as_mut_writes_in_a_savepoint_of_it() {
    let (shop, url) = shop().await;
    let mut client = postgres_client(&url).await;
    for _ in 0..2 {
        let mut tx = client.transaction().await.unwrap();
        let receipt = shop
            .create_order_in_a_savepoint(&mut tx, "S-1".into(), 70)
            .await
            .unwrap();
        assert_eq!(receipt, "order S-1 for 70");
        tx.commit().await.unwrap();
    }
    assert_eq!(shop.executions(), 1);
    assert_eq!(orders_and_records(&url).await, (1, 1));
}

#[tokio::test]
async fn a_body_that_fails_after_its_insert_leaves_neither_row_nor_record() {
    let (shop, url) = shop().await;
    let mut client = postgres_client(&url).await;
    let mut tx = client.transaction().await.unwrap();
    let declined = shop.create_order(&mut tx, "B-1".into(), 100, true).await;
    assert!(matches!(declined, Err(ShopError::Declined)), "{declined:?}");
    tx.rollback().await.unwrap();
    assert_eq!(orders_and_records(&url).await, (0, 0));

    // The key is free: a retry runs.
    let mut tx = client.transaction().await.unwrap();
    shop.create_order(&mut tx, "B-1".into(), 100, false)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(orders_and_records(&url).await, (1, 1));
    assert_eq!(shop.executions(), 2);
}

#[tokio::test]
async fn a_failed_call_in_a_transaction_the_caller_commits_leaves_no_record() {
    let (shop, url) = shop().await;
    let mut client = postgres_client(&url).await;
    let mut tx = client.transaction().await.unwrap();
    let declined = shop.create_checked_order(&mut tx, "G-1".into(), 0).await;
    assert!(matches!(declined, Err(ShopError::Declined)), "{declined:?}");
    // The caller commits anyway: the claim was deleted in the transaction, not rolled back.
    tx.commit().await.unwrap();
    assert_eq!(orders_and_records(&url).await, (0, 0));

    // The key is free: the next call runs at once.
    let mut tx = client.transaction().await.unwrap();
    let receipt = tokio::time::timeout(
        Duration::from_secs(10),
        shop.create_checked_order(&mut tx, "G-1".into(), 100),
    )
    .await
    .expect("the key is free")
    .unwrap();
    assert_eq!(receipt, "order G-1 for 100");
    tx.commit().await.unwrap();
    assert_eq!(shop.executions(), 2);
    assert_eq!(orders_and_records(&url).await, (1, 1));
}

#[tokio::test]
async fn sixteen_concurrent_transactions_with_one_key_make_one_order() {
    let (shop, url) = shop().await;
    let shop = Arc::new(shop);
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (shop, url) = (Arc::clone(&shop), url.clone());
            tokio::spawn(async move {
                let mut client = postgres_client(&url).await;
                let mut tx = client.transaction().await.unwrap();
                let receipt = shop.create_order(&mut tx, "C-1".into(), 250, false).await;
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
    assert_eq!(orders_and_records(&url).await, (1, 1));
}

#[tokio::test]
async fn a_connection_lost_before_commit_leaves_nothing_and_the_retry_runs_once() {
    let (shop, url) = shop().await;
    let mut doomed = postgres_client(&url).await;
    let pid: i32 = doomed
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let mut tx = doomed.transaction().await.unwrap();
    shop.create_order(&mut tx, "D-1".into(), 100, false)
        .await
        .unwrap();
    // The connection dies after the business insert and the record, before the commit.
    postgres_client(&url)
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert!(
        tx.commit().await.is_err(),
        "the commit cannot reach the server"
    );
    assert_eq!(orders_and_records(&url).await, (0, 0));

    let mut client = postgres_client(&url).await;
    for _ in 0..2 {
        let mut tx = client.transaction().await.unwrap();
        shop.create_order(&mut tx, "D-1".into(), 100, false)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(
        shop.executions(),
        2,
        "the lost attempt, then exactly one more"
    );
    assert_eq!(orders_and_records(&url).await, (1, 1));
}

#[tokio::test]
async fn a_lease_that_ran_out_after_the_transaction_began_is_taken_over() {
    let (shop, url) = shop().await;
    // A holder outside any transaction claims `create_order`'s key for "E-1" and dies.
    let key = StorageKey::derive("postgres_transactional::create_order", None, b"E-1").unwrap();
    let mut arguments = Fingerprinter::new();
    arguments.push("E-1").unwrap().push(&100i64).unwrap();
    let fingerprint = arguments.finish();
    let lease = Duration::from_millis(300);
    let Claim::Acquired { fence } = shop
        .store
        .claim(&key, &CanonicalArguments::from(fingerprint), lease)
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };

    // A transaction that began, and ran a statement, while the holder's lease was alive.
    let mut client = postgres_client(&url).await;
    let mut tx = client.transaction().await.unwrap();
    tx.execute("SELECT 1", &[]).await.unwrap();
    tokio::time::sleep(lease * 2).await;

    // The lease has run out: the call takes the key over and runs, rather than waiting for
    // a holder that is gone.
    let receipt = tokio::time::timeout(
        Duration::from_secs(10),
        shop.create_order(&mut tx, "E-1".into(), 100, false),
    )
    .await
    .expect("the dead holder's key is taken over without waiting")
    .unwrap();
    assert_eq!(receipt, "order E-1 for 100");
    tx.commit().await.unwrap();
    assert_eq!(shop.executions(), 1);
    assert_eq!(orders_and_records(&url).await, (1, 1));
    assert_eq!(
        shop.store
            .complete(
                &key,
                fence,
                Bytes::from_static(b"late"),
                Duration::from_secs(60)
            )
            .await
            .unwrap(),
        FencedWrite::Fenced,
        "the dead holder's late completion is refused"
    );
}

#[tokio::test]
async fn a_body_that_outlasts_its_lease_is_still_recorded_with_its_writes() {
    let (shop, url) = shop().await;
    let mut client = postgres_client(&url).await;
    for _ in 0..2 {
        let mut tx = client.transaction().await.unwrap();
        let receipt = shop
            .create_slow_order(&mut tx, "F-1".into(), 100)
            .await
            .unwrap();
        assert_eq!(receipt, "order F-1 for 100");
        tx.commit().await.unwrap();
    }
    // The uncommitted claim needs no lease: the record commits with the order, and the
    // second call replays it.
    assert_eq!(shop.executions(), 1);
    assert_eq!(orders_and_records(&url).await, (1, 1));
}

#[tokio::test]
async fn a_call_retried_in_its_transaction_after_it_was_cancelled_is_refused_at_once() {
    let (shop, url) = shop().await;
    let mut client = postgres_client(&url).await;
    let mut tx = client.transaction().await.unwrap();
    // Cancelled in its body, after the claim and the order's insert (the body sleeps 600 ms,
    // past its 200 ms lease).
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        shop.create_slow_order(&mut tx, "H-1".into(), 100),
    )
    .await;
    assert!(cancelled.is_err(), "cancelled in the body: {cancelled:?}");
    assert_eq!(shop.executions(), 1);

    // Retried in the same transaction: the claim there is the transaction's own, so the call
    // answers at once, rather than spin until the lease ends and run the body a second time.
    let retried = shop.create_slow_order(&mut tx, "H-1".into(), 100).await;
    assert!(
        matches!(
            retried,
            Err(ShopError::Idempotency(Error::HeldByThisTransaction))
        ),
        "{retried:?}"
    );
    // Also once the lease has run out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = shop.create_slow_order(&mut tx, "H-1".into(), 100).await;
    assert!(
        matches!(
            later,
            Err(ShopError::Idempotency(Error::HeldByThisTransaction))
        ),
        "{later:?}"
    );
    assert_eq!(shop.executions(), 1, "the body did not run again");
    tx.rollback().await.unwrap();

    // In a savepoint (a nested transaction) the same.
    let mut tx = client.transaction().await.unwrap();
    let mut savepoint = tx.transaction().await.unwrap();
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        shop.create_slow_order(&mut savepoint, "H-2".into(), 100),
    )
    .await;
    assert!(cancelled.is_err());
    let retried = shop
        .create_slow_order(&mut savepoint, "H-2".into(), 100)
        .await;
    assert!(
        matches!(
            retried,
            Err(ShopError::Idempotency(Error::HeldByThisTransaction))
        ),
        "in a savepoint: {retried:?}"
    );
    savepoint.commit().await.unwrap();
    let retried = shop.create_slow_order(&mut tx, "H-2".into(), 100).await;
    assert!(
        matches!(
            retried,
            Err(ShopError::Idempotency(Error::HeldByThisTransaction))
        ),
        "after the savepoint was released: {retried:?}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(shop.executions(), 2);

    // Rolled back, the keys are free: a new transaction runs each once.
    for order in ["H-1", "H-2"] {
        let mut tx = client.transaction().await.unwrap();
        shop.create_slow_order(&mut tx, order.into(), 100)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(shop.executions(), 4);
    assert_eq!(orders_and_records(&url).await, (2, 2));
}

/// `create_order`'s call for `order_id` (amount 100), through the API with `options`.
fn create_order_call(order_id: &str) -> idempotent_core::Call<'_> {
    let mut arguments = Fingerprinter::new();
    arguments.push(order_id).unwrap().push(&100i64).unwrap();
    idempotent_core::Call::new("postgres_transactional::create_order", arguments.finish())
        .key(order_id)
}

#[tokio::test]
async fn a_claim_behind_another_transactions_claim_waits_no_longer_than_its_policy() {
    let (shop, url) = shop().await;
    let mut first = postgres_client(&url).await;
    let first_tx = first.transaction().await.unwrap();
    let mut first_tx = first_tx;
    shop.create_order(&mut first_tx, "I-1".into(), 100, false)
        .await
        .unwrap();
    // The first transaction stays open: its claim is uncommitted.

    let mut second = postgres_client(&url).await;
    for (name, on_conflict, allowed) in [
        ("reject", OnConflict::Reject, Duration::ZERO),
        (
            "wait 300 ms",
            OnConflict::Wait {
                timeout: Duration::from_millis(300),
            },
            Duration::from_millis(300),
        ),
    ] {
        let tx = second.transaction().await.unwrap();
        let options = Options::new().with_on_conflict(on_conflict);
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            shop.store
                .run_in_transaction(&tx, &options, create_order_call("I-1"), async {
                    Ok::<_, ShopError>("ran".to_string())
                }),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: the claim is still blocked after 10 s"));
        let waited = started.elapsed();
        assert!(
            matches!(answer, Err(ShopError::Idempotency(Error::Conflict { .. }))),
            "{name}: {answer:?}"
        );
        // What the policy allows, twice over, and a few round trips: not a multiple of it.
        let bound = allowed * 2 + Duration::from_millis(500);
        assert!(
            waited <= bound,
            "{name}: answered after {waited:?}, over {bound:?}"
        );
        tx.rollback().await.unwrap();
    }

    first_tx.commit().await.unwrap();
    let tx = second.transaction().await.unwrap();
    let replayed = shop
        .store
        .run_in_transaction(&tx, &Options::new(), create_order_call("I-1"), async {
            Ok::<_, ShopError>("ran".to_string())
        })
        .await
        .unwrap();
    assert!(replayed.is_replayed());
    assert_eq!(replayed.into_value(), "order I-1 for 100");
    assert_eq!(shop.executions(), 1);
}

#[tokio::test]
async fn the_callers_lock_timeout_is_left_as_it_was() {
    let (shop, url) = shop().await;
    let mut client = postgres_client(&url).await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL lock_timeout = '7s'")
        .await
        .unwrap();
    let show = async || -> String { tx.query_one("SHOW lock_timeout", &[]).await.unwrap().get(0) };
    let in_body = shop
        .store
        .run_in_transaction(&tx, &Options::new(), create_order_call("J-1"), async {
            Ok::<_, ShopError>(show().await)
        })
        .await
        .unwrap()
        .into_value();
    assert_eq!(
        in_body, "7s",
        "the body runs with the caller's lock_timeout"
    );
    assert_eq!(
        show().await,
        "7s",
        "and the caller's transaction goes on with it"
    );
    tx.commit().await.unwrap();
}
