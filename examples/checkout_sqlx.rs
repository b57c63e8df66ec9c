//! Checkout on sqlx: each order row and its idempotency record commit in one transaction.
//!
//! The service writes orders with sqlx, as most Rust services do, and its `place_order` is
//! `#[idempotent(tx = tx, ...)]`: the claim, the order row and the recorded receipt are written
//! in the caller's transaction, so they commit together or not at all. A server that dies
//! before its commit leaves neither the order nor the record, and the client's retry runs the
//! order once more, exactly once. A retry after the commit replays the receipt and writes no
//! row.
//!
//! The ledger at the end is read from the database, the source of truth: every order must have
//! exactly one row; the example exits with status 1 otherwise. The database outlives the run,
//! so a second run replays every order from the first and writes no row at all.
//!
//! Run it with `cargo run --example checkout_sqlx` (SQLite, in `target/checkout_sqlx.sqlite3`),
//! or on PostgreSQL with
//! `cargo run --example checkout_sqlx -- --url postgres://postgres@127.0.0.1:5432/postgres`.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idempotent_core::idempotent;
use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool, Transaction};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

// ---- What the client sends and gets back ------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct OrderRequest {
    order_id: String,
    customer: String,
    amount_cents: i64,
}

/// Recorded with the order and replayed to retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order_id: String,
    /// The order row's number in the database.
    number: i64,
    amount_cents: i64,
    /// The run that wrote the order.
    run: String,
}

#[derive(Debug)]
enum ShopError {
    Database(sqlx::Error),
    /// The idempotency layer refused the call or could not run it.
    Idempotency(idempotent_core::Error),
    /// The server died before its commit (a fault of the story).
    ServerDied,
}

impl From<idempotent_core::Error> for ShopError {
    fn from(error: idempotent_core::Error) -> Self {
        Self::Idempotency(error)
    }
}

impl From<sqlx::Error> for ShopError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error)
    }
}

impl fmt::Display for ShopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Database(error) => write!(f, "database: {error}"),
            Self::Idempotency(error) => write!(f, "{error}"),
            Self::ServerDied => write!(f, "the server died before its commit"),
        }
    }
}

// ---- The service, on SQLite or PostgreSQL -----------------------------------------------------

/// The order's insert: the same SQL on both databases (sqlx's SQLite takes `$1` too).
const INSERT_ORDER: &str = "INSERT INTO shop_orders (order_id, customer, amount_cents, run) \
                            VALUES ($1, $2, $3, $4) RETURNING number";

/// One shop per database: the same `place_order`, on that database's transaction and store.
macro_rules! shop {
    ($shop:ident, $database:ty, $store:ty, $create_orders:expr) => {
        struct $shop {
            run: String,
            store: $store,
            /// How many times `place_order`'s body ran, committed or not.
            executions: AtomicU64,
        }

        impl $shop {
            const CREATE_ORDERS: &str = $create_orders;

            /// Runs once per order id, however often it is retried: the claim, the order row and
            /// the receipt commit in the caller's transaction, or none of them does. The
            /// request's fields are the fingerprint: another request with a used order id is
            /// refused.
            #[idempotent(key = req.order_id, name = "checkout_sqlx.v1", store = self.store, tx = tx)]
            async fn place_order(
                &self,
                tx: &mut Transaction<'_, $database>,
                req: &OrderRequest,
            ) -> Result<Receipt, ShopError> {
                self.executions.fetch_add(1, Ordering::SeqCst);
                let number: i64 = sqlx::query_scalar(INSERT_ORDER)
                    .bind(&req.order_id)
                    .bind(&req.customer)
                    .bind(req.amount_cents)
                    .bind(&self.run)
                    .fetch_one(&mut **tx)
                    .await?;
                Ok(Receipt {
                    order_id: req.order_id.clone(),
                    number,
                    amount_cents: req.amount_cents,
                    run: self.run.clone(),
                })
            }
        }
    };
}

shop!(
    SqliteShop,
    Sqlite,
    SqlxSqliteStore,
    "CREATE TABLE IF NOT EXISTS shop_orders (
         number INTEGER PRIMARY KEY AUTOINCREMENT,
         order_id TEXT NOT NULL, customer TEXT NOT NULL,
         amount_cents INTEGER NOT NULL, run TEXT NOT NULL)"
);

shop!(
    PostgresShop,
    Postgres,
    SqlxPgStore,
    "CREATE TABLE IF NOT EXISTS shop_orders (
         number BIGSERIAL PRIMARY KEY,
         order_id TEXT NOT NULL, customer TEXT NOT NULL,
         amount_cents BIGINT NOT NULL, run TEXT NOT NULL)"
);

/// What happens to a request on the server's side, after `place_order`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// The server commits, but the response never reaches the client.
    ResponseLost,
    /// The server dies after the body, before its commit: the transaction rolls back.
    CrashBeforeCommit,
    /// The server is slow to commit; the client stops waiting and retries meanwhile.
    SlowCommit,
}

enum Shop {
    Sqlite { pool: SqlitePool, shop: SqliteShop },
    Postgres { pool: PgPool, shop: PostgresShop },
}

impl Shop {
    /// One request as the server handles it: a transaction, the order, the commit (or not).
    async fn handle(&self, req: &OrderRequest, fault: Fault) -> Result<Receipt, ShopError> {
        match self {
            Shop::Sqlite { pool, shop } => {
                // IMMEDIATE: the transaction takes SQLite's write lock at once, so a concurrent
                // one waits for it (busy_timeout) rather than failing on its first write.
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let receipt = shop.place_order(&mut tx, req).await?;
                finish(tx, fault).await?;
                Ok(receipt)
            }
            Shop::Postgres { pool, shop } => {
                let mut tx = pool.begin().await?;
                let receipt = shop.place_order(&mut tx, req).await?;
                finish(tx, fault).await?;
                Ok(receipt)
            }
        }
    }

    fn executions(&self) -> u64 {
        match self {
            Shop::Sqlite { shop, .. } => shop.executions.load(Ordering::SeqCst),
            Shop::Postgres { shop, .. } => shop.executions.load(Ordering::SeqCst),
        }
    }

    /// Every order row: (order id, number, run).
    async fn rows(&self) -> Result<Vec<(String, i64, String)>, sqlx::Error> {
        const ROWS: &str = "SELECT order_id, number, run FROM shop_orders ORDER BY number";
        match self {
            Shop::Sqlite { pool, .. } => sqlx::query_as(ROWS).fetch_all(pool).await,
            Shop::Postgres { pool, .. } => sqlx::query_as(ROWS).fetch_all(pool).await,
        }
    }
}

/// Ends a request's transaction as `fault` says.
async fn finish<DB: sqlx::Database>(
    tx: Transaction<'_, DB>,
    fault: Fault,
) -> Result<(), ShopError> {
    match fault {
        Fault::CrashBeforeCommit => {
            drop(tx); // rolled back: neither the order nor its record is left
            return Err(ShopError::ServerDied);
        }
        Fault::SlowCommit => sleep(SLOW_COMMIT).await,
        Fault::None | Fault::ResponseLost => {}
    }
    tx.commit().await?;
    Ok(())
}

// ---- A client that retries --------------------------------------------------------------------

const MAX_ATTEMPTS: u32 = 6;
/// How long the client waits for an answer.
const PATIENCE: Duration = Duration::from_millis(150);
/// Longer than the client's patience.
const SLOW_COMMIT: Duration = Duration::from_millis(400);

/// A request on its way through the server. The server keeps working after the client hangs up.
type ServerCall = JoinHandle<Result<Receipt, ShopError>>;

fn serve(shop: &Arc<Shop>, req: &OrderRequest, fault: Fault) -> ServerCall {
    let (shop, req) = (Arc::clone(shop), req.clone());
    tokio::spawn(async move { shop.handle(&req, fault).await })
}

/// Submits `req` until a receipt arrives, the server meeting `faults` on the first attempts.
async fn submit(
    shop: &Arc<Shop>,
    req: &OrderRequest,
    faults: &[Fault],
    abandoned: &mut Vec<ServerCall>,
) -> Option<Receipt> {
    for attempt in 1..=MAX_ATTEMPTS {
        let fault = faults
            .get(attempt as usize - 1)
            .copied()
            .unwrap_or(Fault::None);
        let line = format!("order {} attempt {attempt}:", req.order_id);
        let mut server = serve(shop, req, fault);
        let Ok(joined) = timeout(PATIENCE, &mut server).await else {
            println!("{line} no answer in {PATIENCE:?}, the server still works, retrying");
            abandoned.push(server);
            continue;
        };
        match joined.expect("a request task panicked") {
            Err(ShopError::ServerDied) => {
                println!("{line} the server died before its commit, retrying")
            }
            Ok(_) if fault == Fault::ResponseLost => println!("{line} response lost, retrying"),
            Ok(receipt) => {
                println!("{line} order #{} ({})", receipt.number, how(&receipt, shop));
                return Some(receipt);
            }
            Err(error) => {
                println!("{line} {error}, not retrying");
                return None;
            }
        }
    }
    println!(
        "order {}: no receipt after {MAX_ATTEMPTS} attempts",
        req.order_id
    );
    None
}

/// Whether this run wrote the receipt's order.
fn how(receipt: &Receipt, shop: &Shop) -> &'static str {
    let run = match shop {
        Shop::Sqlite { shop, .. } => &shop.run,
        Shop::Postgres { shop, .. } => &shop.run,
    };
    if &receipt.run == run {
        "written in this run"
    } else {
        "replayed from an earlier run"
    }
}

// ---- Where the database is: --url -------------------------------------------------------------

const USAGE: &str = "\
usage: checkout_sqlx [--url URL]

  --url URL  the database, also read from DATABASE_URL:
               sqlite://PATH  (default: sqlite://target/checkout_sqlx.sqlite3)
               postgres://user:password@host:port/database";

const DEFAULT_URL: &str = "sqlite://target/checkout_sqlx.sqlite3";

/// Reads `--url URL` (or `--url=URL`); the error is the text to print before exiting with 2.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<String, String> {
    let usage = |message: String| format!("checkout_sqlx: {message}\n\n{USAGE}");
    let mut url = None;
    while let Some(arg) = args.next() {
        match arg.split_once('=') {
            Some(("--url", value)) => url = Some(value.to_owned()),
            _ if arg == "--url" => {
                url = Some(
                    args.next()
                        .ok_or_else(|| usage("--url needs a value".into()))?,
                );
            }
            _ if arg == "-h" || arg == "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(usage(format!("unknown argument {arg:?}"))),
        }
    }
    let url = url
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    if url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://")
    {
        Ok(url)
    } else {
        Err(usage(format!(
            "--url must start with sqlite: or postgres://, not {:?}",
            shown(&url)
        )))
    }
}

/// `url` without its password.
fn shown(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((user_info, host)) = rest.split_once('@')
        && let Some((user, _password)) = user_info.split_once(':')
    {
        format!("{scheme}://{user}:***@{host}")
    } else {
        url.to_owned()
    }
}

/// Connects to the database, creates the orders table if missing, and opens the store on the
/// same pool (which creates the idempotency tables if missing).
async fn open_shop(url: &str, run: String) -> Result<Shop, Box<dyn std::error::Error>> {
    let executions = AtomicU64::new(0);
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        if let Some(dir) = options.get_filename().parent() {
            // A missing directory is reported by SQLite, with the path.
            let _ = std::fs::create_dir_all(dir);
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::query(SqliteShop::CREATE_ORDERS)
            .execute(&pool)
            .await?;
        let store = SqlxSqliteStore::builder(pool.clone()).build().await?;
        let shop = SqliteShop {
            run,
            store,
            executions,
        };
        Ok(Shop::Sqlite { pool, shop })
    } else {
        let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
        sqlx::query(PostgresShop::CREATE_ORDERS)
            .execute(&pool)
            .await?;
        let store = SqlxPgStore::builder(pool.clone()).build().await?;
        let shop = PostgresShop {
            run,
            store,
            executions,
        };
        Ok(Shop::Postgres { pool, shop })
    }
}

// ---- The story --------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let url = parse_args(std::env::args().skip(1)).unwrap_or_else(|message| {
        eprintln!("{message}");
        std::process::exit(2);
    });
    // std's hash keys are random per process: an id for this run, with no extra dependency.
    let run = format!("{:06x}", RandomState::new().hash_one("run") & 0xff_ffff);
    let shop = Arc::new(open_shop(&url, run.clone()).await.unwrap_or_else(|error| {
        eprintln!("checkout_sqlx: cannot open {}: {error}", shown(&url));
        std::process::exit(1);
    }));
    println!(
        "run {run}, database: {} (orders and records outlive this run)",
        shown(&url)
    );

    let mut receipts = HashMap::new();
    let mut abandoned = Vec::new();
    let mut problems = Vec::new();

    println!("== Retries, with the server failing in each way it can ==");
    use Fault::{CrashBeforeCommit, ResponseLost, SlowCommit};
    let orders = [
        ("B-2001", "ada", 2_400, vec![]),
        ("B-2002", "brian", 3_150, vec![ResponseLost]),
        ("B-2003", "chen", 8_900, vec![CrashBeforeCommit]),
        ("B-2004", "dana", 1_250, vec![SlowCommit]),
        (
            "B-2005",
            "emil",
            640,
            vec![CrashBeforeCommit, ResponseLost, CrashBeforeCommit],
        ),
    ];
    for (order_id, customer, amount_cents, faults) in &orders {
        let req = OrderRequest {
            order_id: (*order_id).to_owned(),
            customer: (*customer).to_owned(),
            amount_cents: *amount_cents,
        };
        if let Some(receipt) = submit(&shop, &req, faults, &mut abandoned).await {
            receipts.insert(req.order_id.clone(), receipt);
        }
    }

    println!("\n== Double click: 5 concurrent transactions for one order ==");
    let clicked = OrderRequest {
        order_id: "B-2006".into(),
        customer: "fay".into(),
        amount_cents: 1_800,
    };
    let clicks: Vec<ServerCall> = (0..5)
        .map(|_| serve(&shop, &clicked, Fault::None))
        .collect();
    let mut seen = Vec::new();
    for click in clicks {
        match click.await.expect("a request task panicked") {
            Ok(receipt) => seen.push(receipt),
            Err(error) => problems.push(format!("a click on B-2006 failed: {error}")),
        }
    }
    seen.dedup();
    match seen.as_slice() {
        [receipt] => {
            println!(
                "order B-2006: 5 answers, all order #{} ({})",
                receipt.number,
                how(receipt, &shop)
            );
            receipts.insert(clicked.order_id.clone(), receipt.clone());
        }
        _ => problems.push(format!(
            "the clicks on B-2006 got different receipts: {seen:?}"
        )),
    }

    println!("\n== The same order id with a different amount ==");
    let tampered = OrderRequest {
        amount_cents: 1,
        ..clicked.clone()
    };
    match shop.handle(&tampered, Fault::None).await {
        Err(error @ ShopError::Idempotency(idempotent_core::Error::KeyReused)) => {
            println!("order B-2006 for 1 cent: refused: {error}");
        }
        Ok(receipt) => problems.push(format!("a reused order id was accepted: {receipt:?}")),
        Err(error) => problems.push(format!("a reused order id failed otherwise: {error}")),
    }

    // The requests the client hung up on may still be committing: count once they are done.
    for server in abandoned {
        drop(server.await.expect("a request task panicked"));
    }
    let order_ids: Vec<&str> = orders
        .iter()
        .map(|(order_id, ..)| *order_id)
        .chain([clicked.order_id.as_str()])
        .collect();
    ledger(&shop, &run, &order_ids, &receipts, problems).await;
}

// ---- The ledger: the truth, from the database -------------------------------------------------

async fn ledger(
    shop: &Shop,
    run: &str,
    order_ids: &[&str],
    receipts: &HashMap<String, Receipt>,
    mut problems: Vec<String>,
) {
    let rows = shop.rows().await.unwrap_or_else(|error| {
        eprintln!("checkout_sqlx: cannot read the orders: {error}");
        std::process::exit(1);
    });
    let mut written_twice = 0;
    for order_id in order_ids {
        let numbers: Vec<i64> = rows
            .iter()
            .filter(|(id, ..)| id == order_id)
            .map(|&(_, number, _)| number)
            .collect();
        written_twice += usize::from(numbers.len() > 1);
        if numbers.len() != 1 {
            problems.push(format!(
                "order {order_id} has {} rows, not 1",
                numbers.len()
            ));
        }
        match receipts.get(*order_id) {
            None => problems.push(format!("order {order_id}: its client got no receipt")),
            Some(receipt) if numbers != [receipt.number] => problems.push(format!(
                "order {order_id}: the client holds order #{} but the rows are {numbers:?}",
                receipt.number
            )),
            Some(_) => {}
        }
    }
    let written_now = rows.iter().filter(|(.., row_run)| row_run == run).count();
    let replayed_earlier = receipts.values().filter(|r| r.run != run).count();

    println!("\n== Ledger, from the database ==");
    println!(
        "times place_order's body ran:        {} (rolled back ones included)",
        shop.executions()
    );
    println!("order rows written by this run:      {written_now}");
    println!("orders with more than one row:       {written_twice}");
    println!("orders replayed from an earlier run: {replayed_earlier}");
    if problems.is_empty() {
        println!("OK: every order has exactly one row, and its client holds its receipt");
    } else {
        for problem in &problems {
            println!("WRONG: {problem}");
        }
        std::process::exit(1);
    }
}
