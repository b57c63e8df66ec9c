//! The transactional mode on SQLite through rusqlite: the claim and the recorded result are
//! written in the caller's `rusqlite::Transaction`, on the store's own database file, so the
//! order row and the record commit together or not at all.
//!
//! `rusqlite::Transaction` is neither `Send` nor `Sync`, so these calls' futures are not
//! `Send`: the tests run on current-thread runtimes (`#[tokio::test]`), one per thread where
//! several transactions race.
#![cfg(feature = "sqlite")]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::task::Poll;
use std::time::Duration;

use idempotent_core::stores::sqlite::SqliteStore;
use idempotent_core::{
    Call, CanonicalArguments, Claim, Error, Fingerprint, Options, Outcome, Store, idempotent,
};
use rusqlite::{Connection, Transaction, TransactionBehavior};

#[derive(Debug)]
enum ShopError {
    Declined,
    Database(#[allow(dead_code)] rusqlite::Error),
    Idempotency(Error),
}

impl From<Error> for ShopError {
    fn from(error: Error) -> Self {
        ShopError::Idempotency(error)
    }
}

impl From<rusqlite::Error> for ShopError {
    fn from(error: rusqlite::Error) -> Self {
        ShopError::Database(error)
    }
}

struct Shop {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: SqliteStore,
    executions: AtomicU32,
}

fn insert_order(tx: &Transaction<'_>, order_id: &str, amount: i64) -> Result<(), ShopError> {
    tx.execute(
        "INSERT INTO orders (id, amount) VALUES (?1, ?2)",
        rusqlite::params![order_id, amount],
    )?;
    Ok(())
}

impl Shop {
    fn open() -> Shop {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.sqlite3");
        let store = SqliteStore::open(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute(
                "CREATE TABLE orders (id TEXT PRIMARY KEY, amount INTEGER NOT NULL)",
                [],
            )
            .unwrap();
        Shop {
            _dir: dir,
            path,
            store,
            executions: AtomicU32::new(0),
        }
    }

    /// A connection of the service's own to the store's file.
    fn connect(&self) -> Connection {
        connect(&self.path)
    }

    /// Inserts the order in `tx` through the non-macro API; `decline` makes it fail after the
    /// insert.
    async fn create_order(
        &self,
        tx: &Transaction<'_>,
        order_id: &str,
        amount: i64,
        decline: bool,
    ) -> Result<Outcome<String>, ShopError> {
        self.store
            .run_in_transaction(tx, &Options::new(), order_call(order_id, amount), async {
                self.executions.fetch_add(1, Ordering::SeqCst);
                insert_order(tx, order_id, amount)?;
                if decline {
                    return Err(ShopError::Declined);
                }
                Ok(format!("order {order_id} for {amount}"))
            })
            .await
    }

    /// `create_order` with the attribute, on a `&mut` transaction: the body sees `tx` as
    /// declared, and the claim and the record are written in it too.
    #[idempotent(key = order_id, store = self.store, tx = tx, skip(decline), name = "orders::create")]
    async fn create_order_with_the_attribute(
        &self,
        tx: &mut Transaction<'_>,
        order_id: String,
        amount: i64,
        decline: bool,
    ) -> Result<String, ShopError> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        insert_order(tx, &order_id, amount)?;
        if decline {
            return Err(ShopError::Declined);
        }
        Ok(format!("order {order_id} for {amount}"))
    }

    /// The same on a shared `&` transaction.
    #[idempotent(key = order_id, store = self.store, tx = tx, name = "orders::create")]
    async fn create_order_on_a_shared_transaction(
        &self,
        tx: &Transaction<'_>,
        order_id: String,
        amount: i64,
    ) -> Result<String, ShopError> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        insert_order(tx, &order_id, amount)?;
        Ok(format!("order {order_id} for {amount}"))
    }

    /// The same call, whose body never ends.
    #[idempotent(key = order_id, store = self.store, tx = tx, name = "orders::create")]
    async fn create_order_that_never_ends(
        &self,
        tx: &Transaction<'_>,
        order_id: String,
        amount: i64,
    ) -> Result<String, ShopError> {
        let _ = (tx, order_id, amount);
        std::future::pending().await
    }

    fn orders_and_records(&self) -> (i64, i64) {
        let connection = self.connect();
        let count = |table: &str| {
            connection
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                    row.get(0)
                })
                .unwrap()
        };
        (count("orders"), count("idempotent_records"))
    }

    fn executions(&self) -> u32 {
        self.executions.load(Ordering::SeqCst)
    }
}

fn connect(path: &Path) -> Connection {
    let connection = Connection::open(path).unwrap();
    connection.busy_timeout(Duration::from_secs(30)).unwrap();
    connection
}

fn order_call(order_id: &str, amount: i64) -> Call<'_> {
    Call::new(
        "orders::create",
        Fingerprint::of(&(order_id, amount)).unwrap(),
    )
    .key(order_id)
}

fn begin(connection: &mut Connection) -> Transaction<'_> {
    connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap()
}

/// Polls `call` once: its claim is written, and its body is left waiting.
async fn poll_once<F: Future>(call: F) {
    let mut call = pin!(call);
    let polled = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_ready())).await;
    assert!(!polled, "the body never ends");
}

#[tokio::test]
async fn committed_together_and_replayed_in_a_later_transaction() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    let tx = begin(&mut connection);
    let first = shop.create_order(&tx, "o-1", 42, false).await.unwrap();
    assert!(matches!(first, Outcome::Executed(_)), "{first:?}");
    tx.commit().unwrap();
    assert_eq!(shop.orders_and_records(), (1, 1));

    let tx = begin(&mut connection);
    let again = shop.create_order(&tx, "o-1", 42, false).await.unwrap();
    tx.commit().unwrap();
    assert_eq!(again, Outcome::Replayed("order o-1 for 42".to_string()));
    assert_eq!(shop.executions(), 1);
    assert_eq!(shop.orders_and_records(), (1, 1));

    let tx = begin(&mut connection);
    let reused = shop.create_order(&tx, "o-1", 43, false).await;
    assert!(
        matches!(reused, Err(ShopError::Idempotency(Error::KeyReused))),
        "{reused:?}"
    );
}

#[tokio::test]
async fn a_body_that_fails_after_its_insert_leaves_neither_row_nor_record() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    let tx = begin(&mut connection);
    let declined = shop.create_order(&tx, "o-2", 7, true).await;
    assert!(matches!(declined, Err(ShopError::Declined)), "{declined:?}");
    tx.rollback().unwrap();
    assert_eq!(shop.orders_and_records(), (0, 0));

    let tx = begin(&mut connection);
    let retried = shop.create_order(&tx, "o-2", 7, false).await.unwrap();
    tx.commit().unwrap();
    assert!(matches!(retried, Outcome::Executed(_)), "{retried:?}");
    assert_eq!(shop.executions(), 2, "the retry ran once");
    assert_eq!(shop.orders_and_records(), (1, 1));

    // A caller that commits a failed call anyway keeps its row, but not the claim: it was
    // deleted in the transaction.
    let tx = begin(&mut connection);
    let declined = shop.create_order(&tx, "o-2b", 7, true).await;
    assert!(matches!(declined, Err(ShopError::Declined)), "{declined:?}");
    tx.commit().unwrap();
    assert_eq!(shop.orders_and_records(), (2, 1));
}

/// A transaction that ends without a commit (dropped: rusqlite rolls it back; a process killed
/// mid-transaction leaves only uncommitted WAL frames, which SQLite ignores in the same way)
/// leaves neither the order nor the claim, and the retry runs once.
#[tokio::test]
async fn a_transaction_dropped_before_commit_leaves_nothing_and_the_retry_runs_once() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    let tx = begin(&mut connection);
    let order = shop.create_order(&tx, "o-3", 5, false).await.unwrap();
    assert!(matches!(order, Outcome::Executed(_)), "{order:?}");
    drop(tx);
    assert_eq!(shop.orders_and_records(), (0, 0));

    let tx = begin(&mut connection);
    let retried = shop.create_order(&tx, "o-3", 5, false).await.unwrap();
    tx.commit().unwrap();
    assert!(matches!(retried, Outcome::Executed(_)), "{retried:?}");
    assert_eq!(shop.executions(), 2);
    assert_eq!(shop.orders_and_records(), (1, 1));
}

#[tokio::test]
async fn a_call_retried_in_its_transaction_after_it_was_cancelled_is_refused_at_once() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    let tx = begin(&mut connection);
    let options = Options::new();
    // The claim is written, then the body never ends: the call is dropped.
    poll_once(
        shop.store
            .run_in_transaction(&tx, &options, order_call("o-4", 1), async {
                std::future::pending::<Result<String, ShopError>>().await
            }),
    )
    .await;
    let again = shop.create_order(&tx, "o-4", 1, false).await;
    assert!(
        matches!(
            again,
            Err(ShopError::Idempotency(Error::HeldByThisTransaction))
        ),
        "{again:?}"
    );
    tx.rollback().unwrap();
    assert_eq!(
        shop.executions(),
        0,
        "the refused call did not run its body"
    );

    // After the rollback the key is free again, and the transaction's own claims forgotten.
    let tx = begin(&mut connection);
    let order = shop.create_order(&tx, "o-4", 1, false).await.unwrap();
    tx.commit().unwrap();
    assert!(matches!(order, Outcome::Executed(_)), "{order:?}");
}

/// A claim in progress that the store holds under a lease, outside any transaction, is a
/// conflict at once: waiting would hold the write lock its holder needs.
#[tokio::test]
async fn a_claim_held_under_a_lease_is_a_conflict_at_once() {
    let shop = Shop::open();
    let fingerprint = Fingerprint::of(&("o-5", 1)).unwrap();
    let key = order_call("o-5", 1).storage_key().unwrap();
    let claim = shop
        .store
        .claim(
            &key,
            &CanonicalArguments::from(fingerprint),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired { .. }), "{claim:?}");

    let mut connection = shop.connect();
    let tx = begin(&mut connection);
    let held = shop.create_order(&tx, "o-5", 1, false).await;
    assert!(
        matches!(held, Err(ShopError::Idempotency(Error::Conflict { .. }))),
        "{held:?}"
    );
    tx.rollback().unwrap();
    assert_eq!(shop.executions(), 0);
}

/// The record a transaction wrote is the one the ordinary store reads: the same file, the same
/// layout, and the same key for the same call.
#[tokio::test]
async fn the_ordinary_stores_replay_what_a_transaction_recorded() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    let tx = begin(&mut connection);
    shop.create_order(&tx, "o-6", 3, false).await.unwrap();
    tx.commit().unwrap();

    let idempotency =
        idempotent_core::Idempotency::new(Arc::new(SqliteStore::open(&shop.path).unwrap()));
    let replayed = idempotency
        .run(order_call("o-6", 3), async {
            Ok::<_, Error>("ran again".to_string())
        })
        .await
        .unwrap();
    assert_eq!(replayed, Outcome::Replayed("order o-6 for 3".to_string()));

    #[cfg(feature = "sqlx-sqlite")]
    {
        use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
        let pool = sqlx::sqlite::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(&shop.path),
        )
        .await
        .unwrap();
        let store = SqlxSqliteStore::builder(pool).build().await.unwrap();
        let replayed = idempotent_core::Idempotency::new(Arc::new(store))
            .run(order_call("o-6", 3), async {
                Ok::<_, Error>("ran again".to_string())
            })
            .await
            .unwrap();
        assert_eq!(replayed, Outcome::Replayed("order o-6 for 3".to_string()));
    }
    assert_eq!(shop.executions(), 1);
}

/// Transactions on their own connections, each on its own thread: SQLite lets one write at a
/// time, the others wait at `BEGIN IMMEDIATE` and then replay the first one's record.
#[test]
fn eight_transactions_on_their_own_threads_make_one_order() {
    let shop = Arc::new(Shop::open());
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (shop, start) = (Arc::clone(&shop), Arc::clone(&start));
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mut connection = shop.connect();
                start.wait();
                runtime.block_on(async {
                    let tx = begin(&mut connection);
                    let order = shop.create_order(&tx, "o-7", 9, false).await.unwrap();
                    tx.commit().unwrap();
                    order
                })
            })
        })
        .collect();
    let mut executed = 0;
    for thread in threads {
        let order = thread.join().unwrap();
        assert_eq!(order.value(), "order o-7 for 9");
        if !order.is_replayed() {
            executed += 1;
        }
    }
    assert_eq!(executed, 1);
    assert_eq!(shop.executions(), 1);
    assert_eq!(shop.orders_and_records(), (1, 1));
}

#[tokio::test]
async fn the_attribute_commits_the_order_and_its_record_together_and_replays_it() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    for _ in 0..3 {
        let mut tx = begin(&mut connection);
        let receipt = shop
            .create_order_with_the_attribute(&mut tx, "t-1".into(), 100, false)
            .await
            .unwrap();
        assert_eq!(receipt, "order t-1 for 100");
        tx.commit().unwrap();
    }
    assert_eq!(shop.executions(), 1);
    assert_eq!(shop.orders_and_records(), (1, 1));

    // The same call on a shared transaction replays it.
    let tx = begin(&mut connection);
    let receipt = shop
        .create_order_on_a_shared_transaction(&tx, "t-1".into(), 100)
        .await
        .unwrap();
    assert_eq!(receipt, "order t-1 for 100");
    tx.commit().unwrap();
    assert_eq!(shop.executions(), 1);

    let mut tx = begin(&mut connection);
    let reused = shop
        .create_order_with_the_attribute(&mut tx, "t-1".into(), 999, false)
        .await;
    assert!(
        matches!(reused, Err(ShopError::Idempotency(Error::KeyReused))),
        "{reused:?}"
    );
}

#[tokio::test]
async fn the_attributes_failing_body_leaves_neither_row_nor_record_and_the_retry_runs_once() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    let mut tx = begin(&mut connection);
    let declined = shop
        .create_order_with_the_attribute(&mut tx, "t-2".into(), 5, true)
        .await;
    assert!(matches!(declined, Err(ShopError::Declined)), "{declined:?}");
    tx.rollback().unwrap();
    assert_eq!(shop.orders_and_records(), (0, 0));

    let mut tx = begin(&mut connection);
    let receipt = shop
        .create_order_with_the_attribute(&mut tx, "t-2".into(), 5, false)
        .await
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(receipt, "order t-2 for 5");
    assert_eq!(shop.executions(), 2);
    assert_eq!(shop.orders_and_records(), (1, 1));
}

#[tokio::test]
async fn the_attributes_transaction_dropped_before_commit_leaves_nothing() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    let tx = begin(&mut connection);
    let receipt = shop
        .create_order_on_a_shared_transaction(&tx, "t-3".into(), 8)
        .await
        .unwrap();
    assert_eq!(receipt, "order t-3 for 8");
    drop(tx);
    assert_eq!(shop.orders_and_records(), (0, 0));

    let tx = begin(&mut connection);
    shop.create_order_on_a_shared_transaction(&tx, "t-3".into(), 8)
        .await
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(shop.executions(), 2, "the retry ran once");
    assert_eq!(shop.orders_and_records(), (1, 1));
}

#[tokio::test]
async fn the_attributes_call_cancelled_in_its_transaction_is_refused_when_retried_in_it() {
    let shop = Shop::open();
    let mut connection = shop.connect();
    let tx = begin(&mut connection);
    poll_once(shop.create_order_that_never_ends(&tx, "t-4".into(), 2)).await;
    let again = shop
        .create_order_on_a_shared_transaction(&tx, "t-4".into(), 2)
        .await;
    assert!(
        matches!(
            again,
            Err(ShopError::Idempotency(Error::HeldByThisTransaction))
        ),
        "{again:?}"
    );
    tx.rollback().unwrap();
    assert_eq!(shop.executions(), 0);
}

/// A transaction on another database file has none of the store's tables: the call says so
/// rather than running its body.
#[tokio::test]
async fn a_transaction_on_another_file_is_refused_with_what_to_do() {
    let shop = Shop::open();
    let dir = tempfile::tempdir().unwrap();
    let mut connection = connect(&dir.path().join("other.sqlite3"));
    let tx = begin(&mut connection);
    let refused = shop.create_order(&tx, "o-8", 1, false).await;
    let Err(ShopError::Idempotency(Error::Store(error))) = refused else {
        panic!("expected a store error, got {refused:?}");
    };
    assert!(error.to_string().contains("SqliteStore::path"), "{error}");
    assert_eq!(shop.executions(), 0);
}
