//! Checkout, made safe to retry.
//!
//! A checkout reserves stock, charges a card and creates an order. Clients repeat it whenever
//! they cannot tell whether it happened: a request that timed out, a response lost on its way
//! back, a customer who clicks "Pay" five times. Each repeat could charge the customer again,
//! so the service's checkout is `#[idempotent]`, keyed by the order id: the first call does the
//! work, every repeat gets the first call's receipt back.
//!
//! The inventory, payment gateway and order book count everything they do, outside the
//! idempotency store. The ledger at the end is computed from them, and the example exits with
//! status 1 if an order was charged twice or is missing.
//!
//! The records live in the in-memory default store, or with `--store sqlite|postgres|redis` in
//! a durable one. The inventory, payments and orders are in memory and start empty on every
//! run, so a second run on a durable store charges nothing: every order replays the receipt
//! the first run recorded (the ledger counts those as replayed from an earlier run).
//!
//! Run it with `cargo run --example checkout`, or e.g.
//! `cargo run --example checkout --features sqlite -- --store sqlite` (see `--help`).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use idempotent_core::{MemoryStore, Store, idempotent, set_default_store};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

// ---- What the client sends, what it gets back, what can go wrong ------------------------------

#[derive(Debug, Clone, Serialize)]
struct CheckoutRequest {
    order_id: String,
    customer: String,
    /// (sku, quantity)
    items: Vec<(String, u32)>,
    amount_cents: u64,
}

/// Recorded in the idempotency store and replayed to retries, so it round-trips through serde.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order_id: String,
    charge_id: String,
    amount_cents: u64,
    /// The run and the number of the request that ran the checkout: a client whose own request
    /// has another number, or whose run is another, was given a replay.
    run: String,
    executed_by_request: u64,
}

impl Receipt {
    /// How the request numbered `request_number` in run `run` came by this receipt.
    fn how(&self, run: &str, request_number: u64) -> &'static str {
        if self.run != run {
            "replayed from an earlier run"
        } else if self.executed_by_request == request_number {
            "executed"
        } else {
            "replayed"
        }
    }
}

#[derive(Debug)]
enum CheckoutError {
    OutOfStock {
        sku: String,
    },
    /// The idempotency layer refused the call or could not run it.
    Idempotency(idempotent_core::Error),
}

impl CheckoutError {
    /// A busy key or a failing store may clear up; an empty shelf or a reused key gives the same
    /// answer however often it is asked.
    fn is_retryable(&self) -> bool {
        use idempotent_core::Error::{Conflict, Store};
        matches!(self, Self::Idempotency(Conflict { .. } | Store(_)))
    }
}

impl From<idempotent_core::Error> for CheckoutError {
    fn from(error: idempotent_core::Error) -> Self {
        Self::Idempotency(error)
    }
}

impl fmt::Display for CheckoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfStock { sku } => write!(f, "out of stock: {sku}"),
            Self::Idempotency(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for CheckoutError {}

// ---- The systems with side effects: each keeps a journal of what it did -----------------------

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("a task panicked while holding a lock")
}

#[derive(Default)]
struct Inventory {
    stock: Mutex<HashMap<String, u32>>,
    /// One order id per reservation made.
    reservations: Mutex<Vec<String>>,
}

impl Inventory {
    async fn reserve(&self, order_id: &str, items: &[(String, u32)]) -> Result<(), CheckoutError> {
        sleep(Duration::from_millis(20)).await;
        let mut stock = lock(&self.stock);
        if let Some((sku, _)) = items
            .iter()
            .find(|(sku, n)| stock.get(sku).is_none_or(|s| s < n))
        {
            return Err(CheckoutError::OutOfStock { sku: sku.clone() });
        }
        for (sku, n) in items {
            if let Some(left) = stock.get_mut(sku) {
                *left -= n;
            }
        }
        lock(&self.reservations).push(order_id.to_owned());
        Ok(())
    }
}

struct Charge {
    id: String,
    order_id: String,
    amount_cents: u64,
}

struct PaymentGateway {
    /// Charge ids carry the run's id, so no two runs hand out the same one.
    run: String,
    charges: Mutex<Vec<Charge>>,
}

impl PaymentGateway {
    /// The slow step: this is where an impatient client hangs up.
    async fn charge(&self, order_id: &str, amount_cents: u64) -> String {
        sleep(Duration::from_millis(50)).await;
        let mut charges = lock(&self.charges);
        let id = format!("ch_{}_{:04}", self.run, charges.len() + 1);
        charges.push(Charge {
            id: id.clone(),
            order_id: order_id.to_owned(),
            amount_cents,
        });
        id
    }
}

#[derive(Default)]
struct Orders {
    /// One order id per order created.
    created: Mutex<Vec<String>>,
}

impl Orders {
    async fn create(&self, order_id: &str) {
        sleep(Duration::from_millis(20)).await;
        lock(&self.created).push(order_id.to_owned());
    }
}

// ---- The service ------------------------------------------------------------------------------

struct CheckoutService {
    /// Tells this run's receipts from those an earlier run recorded in a durable store.
    run: String,
    inventory: Inventory,
    payments: PaymentGateway,
    orders: Orders,
    /// Calls that reached the server, and how many ran the body: what idempotency saved is the
    /// difference (less the refusals).
    requests: AtomicU64,
    executions: AtomicU64,
    keys_reused: AtomicU64,
}

impl CheckoutService {
    /// What the server does with each request that reaches it: number it, check out.
    async fn handle(&self, req: &CheckoutRequest) -> (u64, Result<Receipt, CheckoutError>) {
        let request_number = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let result = self.checkout(req, request_number).await;
        if let Err(CheckoutError::Idempotency(idempotent_core::Error::KeyReused)) = &result {
            self.keys_reused.fetch_add(1, Ordering::SeqCst);
        }
        (request_number, result)
    }

    /// Runs once per order id, however often it is called. The order id names the operation;
    /// the fingerprint of the request (the request number is skipped: it differs on every
    /// attempt) tells a retry from another request that reuses the id, which is refused. The
    /// name carries a version, so a checkout with other semantics will not replay these records.
    #[idempotent(key = req.order_id, name = "checkout.v1", skip(request_number))]
    async fn checkout(
        &self,
        req: &CheckoutRequest,
        request_number: u64,
    ) -> Result<Receipt, CheckoutError> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        self.inventory.reserve(&req.order_id, &req.items).await?;
        let charge_id = self.payments.charge(&req.order_id, req.amount_cents).await;
        self.orders.create(&req.order_id).await;
        Ok(Receipt {
            order_id: req.order_id.clone(),
            charge_id,
            amount_cents: req.amount_cents,
            run: self.run.clone(),
            executed_by_request: request_number,
        })
    }
}

// ---- A client behind a flaky network ----------------------------------------------------------

const MAX_ATTEMPTS: u64 = 6;
/// Longer than a whole checkout (about 90 ms).
const PATIENT: Duration = Duration::from_millis(500);
/// Shorter than a checkout: the client hangs up while the server still works.
const IMPATIENT: Duration = Duration::from_millis(40);

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// The request times out before it reaches the server: nothing happens there.
    RequestTimeout,
    /// The server does the work, but its response never arrives.
    ResponseLost,
    /// The client stops waiting while the server is still working.
    ClientTimeout,
}

/// xorshift64 from a fixed seed, so every run meets the same faults. The seed was picked so that
/// each kind of fault shows up.
struct Network(u64);

impl Network {
    fn next_fault(&mut self) -> Fault {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        match self.0 % 10 {
            0 | 1 => Fault::RequestTimeout,
            2 | 3 => Fault::ResponseLost,
            4 | 5 => Fault::ClientTimeout,
            _ => Fault::None,
        }
    }
}

/// A request on its way through the server, and the number the server gave it.
type ServerCall = JoinHandle<(u64, Result<Receipt, CheckoutError>)>;

/// The server handles each request on its own task, as a real server does: it keeps working
/// after the client hangs up. (Dropping the call's future instead would cancel the call, and the
/// library would release the key.)
fn serve(service: &Arc<CheckoutService>, req: &CheckoutRequest) -> ServerCall {
    let (service, req) = (Arc::clone(service), req.clone());
    tokio::spawn(async move { service.handle(&req).await })
}

struct Client {
    service: Arc<CheckoutService>,
    network: Network,
    /// Server calls this client stopped waiting for; the ledger waits for them.
    abandoned: Vec<ServerCall>,
}

impl Client {
    /// Retries with the same order id until a receipt arrives: safe because the service is
    /// idempotent.
    async fn submit(&mut self, req: &CheckoutRequest) -> Option<Receipt> {
        for attempt in 1..=MAX_ATTEMPTS {
            sleep(Duration::from_millis(10 * (attempt - 1))).await; // back off
            let line = format!("order {} attempt {attempt}:", req.order_id);
            let fault = self.network.next_fault();
            if fault == Fault::RequestTimeout {
                sleep(IMPATIENT).await;
                println!("{line} request timed out before reaching the server, retrying");
                continue;
            }
            let mut server = serve(&self.service, req);
            let patience = if fault == Fault::ClientTimeout {
                IMPATIENT
            } else {
                PATIENT
            };
            let Ok(joined) = timeout(patience, &mut server).await else {
                println!("{line} no answer in {patience:?}, server still working, retrying");
                self.abandoned.push(server);
                continue;
            };
            let (request_number, response) = joined.expect("a checkout task panicked");
            match response {
                _ if fault == Fault::ResponseLost => println!("{line} response lost, retrying"),
                Ok(receipt) => {
                    let how = receipt.how(&self.service.run, request_number);
                    println!("{line} receipt {} ({how})", receipt.charge_id);
                    return Some(receipt);
                }
                Err(error) if error.is_retryable() => println!("{line} {error}, retrying"),
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
}

fn request(order_id: &str, customer: &str, items: &[(&str, u32)], cents: u64) -> CheckoutRequest {
    CheckoutRequest {
        order_id: order_id.to_owned(),
        customer: customer.to_owned(),
        items: items.iter().map(|&(sku, n)| (sku.to_owned(), n)).collect(),
        amount_cents: cents,
    }
}

// ---- Where the records live: --store and --url ------------------------------------------------

const USAGE: &str = "\
usage: checkout [--store memory|sqlite|postgres|redis] [--url URL]

  --store NAME  where the idempotency records live (default: memory)
  --url URL     where that store is, also read from IDEMPOTENT_STORE_URL:
                  sqlite    a file path (default: target/checkout.sqlite3)
                  postgres  e.g. postgres://postgres@127.0.0.1:5432/postgres
                  redis     e.g. redis://127.0.0.1:6379/

The sqlite, postgres and redis stores need the cargo feature of the same name:
  cargo run --example checkout --features sqlite -- --store sqlite";

const DEFAULT_SQLITE_PATH: &str = "target/checkout.sqlite3";

/// The store named on the command line, and its URL (none for memory).
struct StoreChoice {
    name: String,
    url: Option<String>,
}

/// Reads `--store NAME` and `--url URL` (also as `--store=NAME`, `--url=URL`). The error is the
/// text to print before exiting with status 2.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<StoreChoice, String> {
    let usage = |message: String| format!("checkout: {message}\n\n{USAGE}");
    let (mut name, mut url) = (None, None);
    while let Some(arg) = args.next() {
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let slot = match flag.as_str() {
            "--store" => &mut name,
            "--url" => &mut url,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(usage(format!("unknown argument {arg:?}"))),
        };
        let value = value.or_else(|| args.next());
        *slot = Some(value.ok_or_else(|| usage(format!("{flag} needs a value")))?);
    }
    let name = name.unwrap_or_else(|| "memory".to_owned());
    let built = match name.as_str() {
        "memory" => true,
        "sqlite" => cfg!(feature = "sqlite"),
        "postgres" => cfg!(feature = "postgres"),
        "redis" => cfg!(feature = "redis"),
        _ => return Err(usage(format!("unknown store {name:?}"))),
    };
    if !built {
        return Err(format!(
            "checkout: this build has no {name} store: run with --features {name}"
        ));
    }
    if name == "memory" {
        return match url {
            Some(_) => Err(usage("the memory store takes no --url".to_owned())),
            None => Ok(StoreChoice { name, url }),
        };
    }
    let url = url.or_else(|| std::env::var("IDEMPOTENT_STORE_URL").ok());
    let url = match (name.as_str(), url) {
        (_, Some(url)) => url,
        ("sqlite", None) => DEFAULT_SQLITE_PATH.to_owned(),
        (_, None) => {
            let message = format!("--store {name} needs --url URL or IDEMPOTENT_STORE_URL");
            return Err(usage(message));
        }
    };
    Ok(StoreChoice {
        name,
        url: Some(url),
    })
}

/// Opens the chosen store. `parse_args` only lets through the stores this build has.
async fn open_store(choice: &StoreChoice) -> Result<Arc<dyn Store>, idempotent_core::StoreError> {
    Ok(match (choice.name.as_str(), choice.url.as_deref()) {
        ("memory", _) => Arc::new(MemoryStore::new()),
        #[cfg(feature = "sqlite")]
        ("sqlite", Some(path)) => {
            if let Some(dir) = std::path::Path::new(path).parent() {
                // A missing directory is reported by the store, with the path.
                let _ = std::fs::create_dir_all(dir);
            }
            Arc::new(idempotent_core::stores::sqlite::SqliteStore::open(path)?)
        }
        #[cfg(feature = "postgres")]
        ("postgres", Some(url)) => {
            let builder = idempotent_core::stores::postgres::PostgresStore::builder(url);
            Arc::new(builder.build().await?) // creates its tables if missing
        }
        #[cfg(feature = "redis")]
        ("redis", Some(url)) => {
            Arc::new(idempotent_core::stores::redis::RedisStore::builder(url).build()?)
        }
        (other, _) => unreachable!("parse_args let through the {other} store"),
    })
}

impl fmt::Display for StoreChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(url) = &self.url else {
            return write!(f, "{} (records die with this process)", self.name);
        };
        // Leave a password in the URL out of the output.
        let shown = if let Some((scheme, rest)) = url.split_once("://")
            && let Some((user_info, host)) = rest.split_once('@')
            && let Some((user, _password)) = user_info.split_once(':')
        {
            format!("{scheme}://{user}:***@{host}")
        } else {
            url.clone()
        };
        write!(f, "{} at {shown} (records outlive this run)", self.name)
    }
}

// ---- The story --------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let choice = parse_args(std::env::args().skip(1)).unwrap_or_else(|message| {
        eprintln!("{message}");
        std::process::exit(2);
    });
    let store = open_store(&choice).await.unwrap_or_else(|error| {
        eprintln!("checkout: cannot open the {} store: {error}", choice.name);
        std::process::exit(1);
    });
    // Before the first call: the service's #[idempotent] checkout uses the default store.
    set_default_store(store).expect("no idempotent call has run yet");
    // std's hash keys are random per process: an id for this run, with no extra dependency.
    let run = format!("{:06x}", RandomState::new().hash_one("run") & 0xff_ffff);
    println!("run {run}, store: {choice}");

    let stock = [("mug", 10), ("tea", 20), ("lamp", 1)].map(|(sku, n)| (sku.to_owned(), n));
    let service = Arc::new(CheckoutService {
        run: run.clone(),
        inventory: Inventory {
            stock: Mutex::new(stock.into()),
            ..Inventory::default()
        },
        payments: PaymentGateway {
            run,
            charges: Mutex::default(),
        },
        orders: Orders::default(),
        requests: AtomicU64::default(),
        executions: AtomicU64::default(),
        keys_reused: AtomicU64::default(),
    });
    // The receipt each client was given, by order id.
    let mut receipts = HashMap::new();
    let mut problems = Vec::new();

    println!("== Retries through a flaky network ==");
    let orders = [
        request("A-1001", "ada", &[("mug", 2)], 2_400),
        request("A-1002", "brian", &[("tea", 5), ("mug", 1)], 3_150),
        request("A-1003", "chen", &[("lamp", 1)], 8_900),
        request("A-1004", "dana", &[("lamp", 2)], 17_800), // the shop only ever has one lamp
    ];
    let mut client = Client {
        service: Arc::clone(&service),
        network: Network(0x7344),
        abandoned: Vec::new(),
    };
    for req in &orders {
        if let Some(receipt) = client.submit(req).await {
            receipts.insert(req.order_id.clone(), receipt);
        }
    }

    println!("\n== Double click: 5 concurrent submissions of one order ==");
    let clicked = request("A-1005", "emil", &[("tea", 3)], 1_800);
    let clicks: Vec<ServerCall> = (0..5).map(|_| serve(&service, &clicked)).collect();
    let (mut executed, mut seen) = (0, Vec::new());
    for click in clicks {
        match click.await.expect("a checkout task panicked") {
            (request_number, Ok(receipt)) => {
                executed += usize::from(receipt.how(&service.run, request_number) == "executed");
                seen.push(receipt);
            }
            (_, Err(error)) => problems.push(format!("a click on A-1005 failed: {error}")),
        }
    }
    let (answers, replayed) = (seen.len(), seen.len() - executed);
    seen.dedup();
    let ids: Vec<&str> = seen.iter().map(|r| r.charge_id.as_str()).collect();
    let ids = ids.join(", ");
    println!(
        "order A-1005: {answers} answers, {executed} executed, {replayed} replayed, receipts: {ids}"
    );
    match seen.as_slice() {
        [receipt] => {
            receipts.insert(clicked.order_id.clone(), receipt.clone());
        }
        _ => problems.push(format!("the clicks on A-1005 got receipts {ids}")),
    }

    println!("\n== The same order id with a different amount ==");
    let tampered = CheckoutRequest {
        amount_cents: 1,
        ..orders[0].clone()
    };
    match service.handle(&tampered).await.1 {
        Err(error @ CheckoutError::Idempotency(idempotent_core::Error::KeyReused)) => {
            println!("order A-1001 for 1 cent: refused: {error}");
        }
        Ok(receipt) => problems.push(format!("a reused order id was accepted: {receipt:?}")),
        Err(error) => problems.push(format!("a reused order id failed otherwise: {error}")),
    }

    // The calls the client hung up on may still be running: count once they are done.
    for server in client.abandoned.drain(..) {
        drop(server.await.expect("a checkout task panicked"));
    }
    ledger(&service, &receipts, problems);
}

// ---- The ledger: the truth, from the systems that did the work --------------------------------

const ORDER_IDS: [&str; 5] = ["A-1001", "A-1002", "A-1003", "A-1004", "A-1005"];
const OUT_OF_STOCK: &str = "A-1004";

fn ledger(
    service: &CheckoutService,
    receipts: &HashMap<String, Receipt>,
    mut problems: Vec<String>,
) {
    let charges = lock(&service.payments.charges);
    let created = lock(&service.orders.created);
    let reserved = lock(&service.inventory.reservations);
    let count =
        |journal: &[String], order_id: &str| journal.iter().filter(|id| *id == order_id).count();
    let (mut charged_twice, mut earlier_runs) = (0, 0);
    for order_id in ORDER_IDS {
        let charge_ids: Vec<&str> = charges
            .iter()
            .filter(|c| c.order_id == order_id)
            .map(|c| c.id.as_str())
            .collect();
        charged_twice += usize::from(charge_ids.len() > 1);
        let receipt = receipts.get(order_id);
        // A receipt for a charge this run never made, for an order it never charged, was
        // recorded by an earlier run in a durable store: that run did the work, so this one
        // must not have.
        let earlier = order_id != OUT_OF_STOCK
            && charge_ids.is_empty()
            && receipt.is_some_and(|r| charges.iter().all(|c| c.id != r.charge_id));
        earlier_runs += usize::from(earlier);
        // Every order happens exactly once, here or in an earlier run, except the one that
        // never could.
        let want = usize::from(order_id != OUT_OF_STOCK && !earlier);
        let done = [
            ("charged", charge_ids.len()),
            ("created", count(&created, order_id)),
            ("reserved", count(&reserved, order_id)),
        ];
        for (what, n) in done {
            if n != want {
                problems.push(format!("order {order_id} was {what} {n} times, not {want}"));
            }
        }
        match receipt {
            None if order_id != OUT_OF_STOCK => problems.push(format!(
                "order {order_id} is missing: its client got no receipt"
            )),
            Some(r) if !earlier && charge_ids != [r.charge_id.as_str()] => problems.push(format!(
                "order {order_id}: the client holds {} but the payments say {charge_ids:?}",
                r.charge_id
            )),
            _ => {}
        }
    }
    let requests = service.requests.load(Ordering::SeqCst);
    let executions = service.executions.load(Ordering::SeqCst);
    let keys_reused = service.keys_reused.load(Ordering::SeqCst);
    if keys_reused != 1 {
        problems.push(format!("{keys_reused} reused order ids refused, not 1"));
    }
    let prevented = requests.saturating_sub(executions + keys_reused);

    println!("\n== Ledger, from inventory, payments and orders ==");
    println!("requests that reached the server:   {requests}");
    println!("  ran the checkout:                 {executions} (the out-of-stock ones included)");
    println!("  refused, order id reused:         {keys_reused}");
    println!("  answered with a recorded receipt: {prevented}");
    println!("orders charged more than once:      {charged_twice}");
    println!("orders replayed from earlier runs:  {earlier_runs}");
    let cents: u64 = charges.iter().map(|c| c.amount_cents).sum();
    println!(
        "charged in this run:                {}.{:02}",
        cents / 100,
        cents % 100
    );
    println!(
        "orders: {}, charges: {}, replayed from an earlier run: {earlier_runs}, \
         duplicate executions prevented: {prevented}",
        created.len(),
        charges.len()
    );
    if problems.is_empty() {
        let earlier = match earlier_runs {
            0 => String::new(),
            n => format!(" ({n} of them by an earlier run)"),
        };
        println!(
            "OK: every order was charged exactly once{earlier}, and its client holds the receipt"
        );
    } else {
        for problem in &problems {
            println!("WRONG: {problem}");
        }
        std::process::exit(1);
    }
}
