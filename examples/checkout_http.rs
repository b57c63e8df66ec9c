//! Checkout over HTTP, made safe to retry with an `Idempotency-Key`.
//!
//! The server is an axum `Router` with `POST /checkout` behind
//! `idempotent_core::http::IdempotencyLayer`: a checkout reserves stock, charges a card and
//! creates an order, and answers `201 Created` with a `Location` and the receipt. Every request
//! carries `Idempotency-Key: "<uuid>"`; a retry with the key gets the first response back (with
//! `Idempotent-Replayed: true`) instead of a second charge, a retry that arrives while the first
//! request still runs gets `409 Conflict` with `Retry-After`, and the key sent with another cart
//! gets `422`.
//!
//! The client, in the same process, is many concurrent customers with one checkout each, each
//! with a fresh UUID v4 as its key, kept across its retries. Faults are injected on the way,
//! chosen from a seed (`--seed`) per customer and attempt, so a seed meets the same faults
//! whatever order the tasks run in:
//!
//! - the handler is slower than the client's timeout: the client hangs up, the handler still
//!   charges the card, and the retry must replay;
//! - the response is lost after the handler ran (a middleware outside the layer answers `502`
//!   or drops the connection mid-response): the retry must replay;
//! - the payment gateway answers `503` before charging: the layer releases the key, and the
//!   retry runs the checkout;
//! - some customers double-click: two concurrent sends with one key, one of which gets `409`
//!   and retries later (or both get the one receipt);
//! - one customer sends its key again with another cart, and gets `422`.
//!
//! The inventory, payment gateway and order book count everything they do, outside the
//! idempotency store. The ledger at the end is computed from them, and the example exits with
//! status 1 if a customer was charged twice, or has no order or no receipt.
//!
//! Run it with `cargo run --example checkout_http`; with a durable store, e.g.
//! `cargo run --example checkout_http --features sqlite -- --store sqlite`; only the server,
//! for curl, with `cargo run --example checkout_http -- --listen 127.0.0.1:3000 --serve
//! --slow-ms 3000` (see `--help`).

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{Full, Limited};
use idempotent_core::http::{IDEMPOTENT_REPLAYED, IdempotencyLayer};
use idempotent_core::{MemoryStore, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::sleep;

// ---- What a customer sends, and gets back -----------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cart {
    customer: String,
    items: Vec<Item>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    sku: String,
    quantity: u32,
}

/// The body of a `201 Created`, recorded by the layer and replayed to every retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order_id: String,
    customer: String,
    amount_cents: u64,
    charge_id: String,
}

/// What the shop sells, at what price; the server prices a cart, never the client.
const CATALOG: [(&str, u64); 5] = [
    ("mug", 1_200),
    ("tea", 630),
    ("lamp", 8_900),
    ("kettle", 3_450),
    ("socks", 900),
];

const MAX_QUANTITY: u32 = 99;

/// The cart's price in cents, or what is wrong with it.
fn price(cart: &Cart) -> Result<u64, String> {
    if cart.customer.trim().is_empty() || cart.customer.len() > 64 {
        return Err("\"customer\" must be a name of 1 to 64 bytes".to_owned());
    }
    if cart.items.is_empty() {
        return Err("\"items\" is empty: a checkout needs at least one item".to_owned());
    }
    let mut cents = 0;
    for item in &cart.items {
        let Some((_, unit)) = CATALOG.iter().find(|(sku, _)| *sku == item.sku) else {
            let skus: Vec<&str> = CATALOG.iter().map(|(sku, _)| *sku).collect();
            return Err(format!(
                "unknown sku {:?}: the shop sells {}",
                item.sku,
                skus.join(", ")
            ));
        };
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(format!(
                "quantity {} of {:?}: a quantity is 1 to {MAX_QUANTITY}",
                item.quantity, item.sku
            ));
        }
        cents += unit * u64::from(item.quantity);
    }
    Ok(cents)
}

// ---- The systems with side effects: each keeps a journal of what it did -----------------------

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("a task panicked while holding a lock")
}

struct Charge {
    id: String,
    customer: String,
    amount_cents: u64,
}

struct Order {
    id: String,
    customer: String,
    charge_id: String,
}

struct Shop {
    /// Charge and order ids carry the run's id, so no two runs hand out the same one.
    run: String,
    /// `--slow-ms`: how long every checkout waits after charging (for a 409 with curl).
    slow: Duration,
    /// One entry per reservation (+1) and per reservation put back (-1), by customer.
    reservations: Mutex<Vec<(String, i32)>>,
    charges: Mutex<Vec<Charge>>,
    orders: Mutex<Vec<Order>>,
    /// Requests that reached the server (the outermost middleware), and how many of them ran
    /// the checkout handler: the layer answered the others itself.
    requests: AtomicU64,
    executions: AtomicU64,
    gateway_refusals: AtomicU64,
    lost_responses: AtomicU64,
    /// Checkouts running now: the ledger waits until none is.
    running: watch::Sender<usize>,
}

/// Counts a running checkout until dropped.
struct Running<'a>(&'a watch::Sender<usize>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Shop {
    fn new(run: String, slow: Duration) -> Self {
        Self {
            run,
            slow,
            reservations: Mutex::default(),
            charges: Mutex::default(),
            orders: Mutex::default(),
            requests: AtomicU64::default(),
            executions: AtomicU64::default(),
            gateway_refusals: AtomicU64::default(),
            lost_responses: AtomicU64::default(),
            running: watch::Sender::new(0),
        }
    }

    fn running(&self) -> Running<'_> {
        self.running.send_modify(|n| *n += 1);
        Running(&self.running)
    }

    async fn reserve(&self, customer: &str) {
        sleep(Duration::from_millis(10)).await;
        lock(&self.reservations).push((customer.to_owned(), 1));
    }

    fn put_back(&self, customer: &str) {
        lock(&self.reservations).push((customer.to_owned(), -1));
    }

    /// The slow step, where an impatient client hangs up.
    async fn charge(&self, customer: &str, amount_cents: u64) -> String {
        sleep(Duration::from_millis(30)).await;
        let mut charges = lock(&self.charges);
        let id = format!("ch_{}_{:04}", self.run, charges.len() + 1);
        charges.push(Charge {
            id: id.clone(),
            customer: customer.to_owned(),
            amount_cents,
        });
        id
    }

    async fn create_order(&self, customer: &str, charge_id: &str) -> String {
        sleep(Duration::from_millis(10)).await;
        let mut orders = lock(&self.orders);
        let id = format!("ord_{}_{:04}", self.run, orders.len() + 1);
        orders.push(Order {
            id: id.clone(),
            customer: customer.to_owned(),
            charge_id: charge_id.to_owned(),
        });
        id
    }
}

// ---- Injected faults --------------------------------------------------------------------------

/// A fault the client asks the server to stage, in the `X-Fault` request field (read by this
/// example only). The layer does not fingerprint it, so every attempt of a request is the same
/// request to the layer, whatever its fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The handler waits after charging, longer than the client's timeout.
    Slow,
    /// The payment gateway answers 503 before charging.
    GatewayDown,
    /// The response is replaced by a 502 after the handler ran.
    BadGateway,
    /// The connection drops in the middle of the response, after the handler ran.
    Dropped,
}

impl Fault {
    const FIELD: &str = "x-fault";
    const ALL: [Fault; 5] = [
        Self::None,
        Self::Slow,
        Self::GatewayDown,
        Self::BadGateway,
        Self::Dropped,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Slow => "slow",
            Self::GatewayDown => "gateway-down",
            Self::BadGateway => "bad-gateway",
            Self::Dropped => "drop-connection",
        }
    }

    fn of(headers: &HeaderMap) -> Self {
        let name = headers.get(Self::FIELD).and_then(|v| v.to_str().ok());
        Self::ALL
            .into_iter()
            .find(|fault| Some(fault.name()) == name)
            .unwrap_or(Self::None)
    }

    /// The fault for one attempt: the first attempt meets one half the time, later ones a
    /// quarter of the time, so every request gets through in the end.
    fn pick(seed: u64, customer: usize, click: usize, attempt: u32) -> Self {
        let roll = Rng::new(seed, &[customer as u64, click as u64, attempt.into()]).below(100);
        let roll = if attempt == 1 { roll } else { roll * 2 };
        match roll {
            0..14 => Self::Slow,
            14..26 => Self::GatewayDown,
            26..38 => Self::BadGateway,
            38..50 => Self::Dropped,
            _ => Self::None,
        }
    }
}

/// splitmix64 from a seed and a path: the same stream on every platform and in every order.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, path: &[u64]) -> Self {
        let mut rng = Self(seed);
        for &step in path {
            rng.0 = rng.next() ^ step;
        }
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---- The server -------------------------------------------------------------------------------

const DOCS_URL: &str = "https://shop.example/docs/idempotency";

/// `POST /checkout` behind the idempotency layer, behind a network that loses responses.
fn app(shop: Arc<Shop>, store: Arc<dyn Store>) -> Router {
    // A real service also scopes keys by the authenticated principal (`with_scope`); this
    // example has no authentication, so all customers share one key space.
    let idempotency = IdempotencyLayer::new("shop.checkout.v1")
        .with_store(store)
        // The lease is what a 409's Retry-After says to wait; renewed while a checkout runs.
        .with_lease(Duration::from_secs(2))
        .with_docs_url(DOCS_URL)
        .expect("the documentation URL is a valid header value");
    Router::new()
        .route("/checkout", post(checkout))
        .layer(idempotency)
        // Outside the layer: what it does to a response happens after the layer recorded it.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shop),
            lossy_network,
        ))
        .with_state(shop)
}

async fn checkout(
    State(shop): State<Arc<Shop>>,
    headers: HeaderMap,
    cart: Result<Json<Cart>, JsonRejection>,
) -> Response {
    let _running = shop.running();
    shop.executions.fetch_add(1, Ordering::SeqCst);
    let cart = match cart {
        Ok(Json(cart)) => cart,
        Err(rejection) => {
            let detail = format!(
                "{}; send e.g. {{\"customer\":\"ada\",\"items\":[{{\"sku\":\"mug\",\"quantity\":2}}]}} \
                 with Content-Type: application/json",
                rejection.body_text()
            );
            return problem(
                StatusCode::BAD_REQUEST,
                "The cart could not be read",
                &detail,
            );
        }
    };
    let amount_cents = match price(&cart) {
        Ok(cents) => cents,
        Err(why) => return problem(StatusCode::BAD_REQUEST, "The cart is not valid", &why),
    };
    let fault = Fault::of(&headers);
    shop.reserve(&cart.customer).await;
    if fault == Fault::GatewayDown {
        shop.put_back(&cart.customer);
        shop.gateway_refusals.fetch_add(1, Ordering::SeqCst);
        let detail = "the card was not charged and the stock was put back: retry with the same \
                      Idempotency-Key";
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Payment gateway unavailable",
            detail,
        );
    }
    let charge_id = shop.charge(&cart.customer, amount_cents).await;
    let slow = match fault {
        Fault::Slow => SLOW_CHECKOUT.max(shop.slow),
        _ => shop.slow,
    };
    sleep(slow).await;
    let order_id = shop.create_order(&cart.customer, &charge_id).await;
    let location = format!("/orders/{order_id}");
    let receipt = Receipt {
        order_id,
        customer: cart.customer,
        amount_cents,
        charge_id,
    };
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(receipt),
    )
        .into_response()
}

/// An `application/problem+json` answer (RFC 9457), like the layer's own.
fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let content_type = [(header::CONTENT_TYPE, "application/problem+json")];
    (status, content_type, body.to_string()).into_response()
}

/// The network between the server and its clients: for a request whose `X-Fault` asks for it,
/// the response is lost after the handler (and the layer) ran.
async fn lossy_network(State(shop): State<Arc<Shop>>, request: Request, next: Next) -> Response {
    shop.requests.fetch_add(1, Ordering::SeqCst);
    let fault = Fault::of(request.headers());
    let response = next.run(request).await;
    match fault {
        Fault::BadGateway => {
            shop.lost_responses.fetch_add(1, Ordering::SeqCst);
            (StatusCode::BAD_GATEWAY, "upstream connection reset\n").into_response()
        }
        Fault::Dropped => {
            shop.lost_responses.fetch_add(1, Ordering::SeqCst);
            // The head goes out saying one byte follows; the body then fails, and the server
            // closes the connection before the client has the receipt.
            let (mut parts, _receipt) = response.into_parts();
            parts.headers.remove(header::CONTENT_LENGTH);
            let cut = Limited::new(Full::new(Bytes::from_static(b"{\"order_id\"")), 1);
            Response::from_parts(parts, Body::new(cut))
        }
        Fault::None | Fault::Slow | Fault::GatewayDown => response,
    }
}

// ---- The client's retries (to be replaced by `idempotent_core::client`'s middleware) ----------

/// The client hangs up after this long: longer than a checkout (about 50 ms), shorter than a
/// slow one.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(250);
const SLOW_CHECKOUT: Duration = Duration::from_millis(500);
const MAX_ATTEMPTS: u32 = 10;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What one attempt came to.
#[derive(Debug)]
enum Attempt {
    TimedOut,
    /// No complete response: the connection failed or dropped.
    Lost,
    Answered {
        status: StatusCode,
        replayed: bool,
        retry_after: Option<u64>,
    },
}

/// A complete response.
struct Answer {
    status: StatusCode,
    replayed: bool,
    content_type: Option<String>,
    body: Bytes,
}

/// A request's attempts, and the answer that ended them (none if every attempt failed).
struct Delivery {
    attempts: Vec<Attempt>,
    answer: Option<Answer>,
}

/// Sends one logical request until it has an answer worth keeping, with the same
/// `Idempotency-Key` on every attempt: safe to repeat, because the server replays the first
/// response instead of running the request again.
///
/// Retries after a timeout or a connection that failed or dropped, a 5xx, and a 409 with
/// `Retry-After` (the first request with the key still runs: wait as long as it says). The
/// other waits back off exponentially from 50 ms to 1 s, with jitter so that customers who
/// failed together do not retry together. `request(attempt)` builds each attempt.
async fn send_with_retries(
    key: &str,
    mut request: impl FnMut(u32) -> reqwest::RequestBuilder,
    jitter: &mut Rng,
) -> Delivery {
    let mut attempts = Vec::new();
    for attempt in 1..=MAX_ATTEMPTS {
        let sent = request(attempt)
            .header("idempotency-key", format!("\"{key}\""))
            .timeout(CLIENT_TIMEOUT)
            .send()
            .await;
        let backoff = {
            let ceiling = FIRST_BACKOFF.saturating_mul(1 << (attempt - 1).min(16));
            let ceiling = ceiling.min(MAX_BACKOFF);
            let half = u64::try_from(ceiling.as_millis() / 2).unwrap_or(u64::MAX);
            Duration::from_millis(half + jitter.below(half + 1))
        };
        let wait = match receive(sent).await {
            Err(error) if error.is_timeout() => {
                attempts.push(Attempt::TimedOut);
                backoff
            }
            Err(error) if error.is_connect() || error.is_request() || error.is_body() => {
                attempts.push(Attempt::Lost);
                backoff
            }
            Err(error) => {
                // Not the network's doing (a request that cannot be built): no retry helps.
                eprintln!("checkout_http: a request failed: {error}");
                attempts.push(Attempt::Lost);
                return Delivery {
                    attempts,
                    answer: None,
                };
            }
            Ok((answer, retry_after)) => {
                attempts.push(Attempt::Answered {
                    status: answer.status,
                    replayed: answer.replayed,
                    retry_after,
                });
                let seconds = retry_after.map(Duration::from_secs);
                match (answer.status, seconds) {
                    (status, Some(wait)) if status == StatusCode::CONFLICT => {
                        wait + Duration::from_millis(jitter.below(100))
                    }
                    (status, wait) if status.is_server_error() => wait.unwrap_or(backoff),
                    _ => {
                        return Delivery {
                            attempts,
                            answer: Some(answer),
                        };
                    }
                }
            }
        };
        if attempt < MAX_ATTEMPTS {
            sleep(wait).await;
        }
    }
    Delivery {
        attempts,
        answer: None,
    }
}

/// The whole response, head and body, and its `Retry-After` in seconds.
async fn receive(
    sent: reqwest::Result<reqwest::Response>,
) -> reqwest::Result<(Answer, Option<u64>)> {
    let response = sent?;
    let headers = response.headers();
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = text(header::RETRY_AFTER).and_then(|s| s.parse().ok());
    let status = response.status();
    let replayed = text(IDEMPOTENT_REPLAYED) == Some("true");
    let content_type = text(header::CONTENT_TYPE).map(str::to_owned);
    let body = response.bytes().await?;
    let answer = Answer {
        status,
        replayed,
        content_type,
        body,
    };
    Ok((answer, retry_after))
}

/// A fresh UUID v4 in its hyphenated form. The bits come from std's per-process random hash
/// keys, with no extra dependency; a real client uses a CSPRNG (`uuid::Uuid::new_v4`).
fn uuid_v4() -> String {
    let state = RandomState::new();
    let bits = u128::from(state.hash_one(1_u8)) << 64 | u128::from(state.hash_one(2_u8));
    let bits = (bits & !(0xf << 76)) | (0x4 << 76); // version 4
    let bits = (bits & !(0b11 << 62)) | (0b10 << 62); // variant RFC 9562
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        bits >> 96,
        (bits >> 80) & 0xffff,
        (bits >> 64) & 0xffff,
        (bits >> 48) & 0xffff,
        bits & 0xffff_ffff_ffff
    )
}

// ---- The customers ----------------------------------------------------------------------------

struct Customer {
    index: usize,
    name: String,
    cart: Cart,
    key: String,
    double_clicks: bool,
    /// Sends its key again with another cart once it has its receipt.
    reuses_key: bool,
}

impl Customer {
    fn new(seed: u64, index: usize, count: usize) -> Self {
        let name = format!("customer-{:02}", index + 1);
        let mut rng = Rng::new(seed, &[index as u64, u64::MAX]);
        let lines = 1 + rng.below(3);
        let items = (0..lines)
            .map(|_| {
                let (sku, _) = CATALOG[rng.below(CATALOG.len() as u64) as usize];
                let quantity = 1 + rng.below(3) as u32;
                Item {
                    sku: sku.to_owned(),
                    quantity,
                }
            })
            .collect();
        Self {
            index,
            cart: Cart {
                customer: name.clone(),
                items,
            },
            name,
            key: uuid_v4(),
            double_clicks: index % 8 == 3,
            reuses_key: index + 1 == count,
        }
    }

    /// Another cart, for the same key.
    fn other_cart(&self) -> Cart {
        let mut cart = self.cart.clone();
        cart.items.push(Item {
            sku: "lamp".to_owned(),
            quantity: 1,
        });
        cart
    }
}

/// What happened to one customer: a delivery per click, and the reused key's.
struct Story {
    clicks: Vec<Delivery>,
    reuse: Option<Delivery>,
}

async fn shop_as(http: &reqwest::Client, url: &str, seed: u64, customer: &Customer) -> Story {
    let click = |click: usize, cart: Cart| {
        let mut jitter = Rng::new(seed, &[customer.index as u64, click as u64, u64::MAX]);
        async move {
            let request = |attempt| {
                let fault = Fault::pick(seed, customer.index, click, attempt);
                let request = http.post(url).json(&cart);
                match fault {
                    Fault::None => request,
                    _ => request.header(Fault::FIELD, fault.name()),
                }
            };
            send_with_retries(&customer.key, request, &mut jitter).await
        }
    };
    let clicks = if customer.double_clicks {
        let (first, second) = tokio::join!(
            click(0, customer.cart.clone()),
            click(1, customer.cart.clone())
        );
        vec![first, second]
    } else {
        vec![click(0, customer.cart.clone()).await]
    };
    let reuse = if customer.reuses_key {
        Some(click(2, customer.other_cart()).await)
    } else {
        None
    };
    Story { clicks, reuse }
}

/// One line per attempt, for the story of a customer.
fn describe(attempts: &[Attempt]) -> String {
    let steps: Vec<String> = attempts
        .iter()
        .map(|attempt| match attempt {
            Attempt::TimedOut => "timed out".to_owned(),
            Attempt::Lost => "connection dropped".to_owned(),
            Attempt::Answered {
                status,
                replayed,
                retry_after,
            } => {
                let mut step = status.as_u16().to_string();
                if *replayed {
                    step.push_str(" replayed");
                }
                if let Some(seconds) = retry_after {
                    step.push_str(&format!(" (Retry-After: {seconds})"));
                }
                step
            }
        })
        .collect();
    steps.join(" -> ")
}

// ---- The command line: --store, --url, --seed, --listen, --serve, --slow-ms -------------------

const USAGE: &str = "\
usage: checkout_http [--store memory|sqlite|postgres|redis] [--url URL] [--seed N]
                     [--customers N] [--listen ADDR] [--serve] [--slow-ms MS]

  --store NAME     where the idempotency records live (default: memory)
  --url URL        where that store is, also read from IDEMPOTENT_STORE_URL:
                     sqlite    a file path (default: target/checkout_http.sqlite3)
                     postgres  e.g. postgres://postgres@127.0.0.1:5432/postgres
                     redis     e.g. redis://127.0.0.1:6379/
  --seed N         picks the carts and the faults (default: 1): a seed meets the same faults
                   on every run
  --customers N    how many customers check out at once (default: 32, at most 1000)
  --listen ADDR    the server's address (default: 127.0.0.1 on a free port)
  --serve          only serve, until interrupted (e.g. for curl)
  --slow-ms MS     every checkout waits MS milliseconds after charging (default: 0), so that
                   a second request with its key meets it running (409)

The sqlite, postgres and redis stores need the cargo feature of the same name:
  cargo run --example checkout_http --features sqlite -- --store sqlite";

const DEFAULT_SQLITE_PATH: &str = "target/checkout_http.sqlite3";
const DEFAULT_SEED: u64 = 1;
const DEFAULT_CUSTOMERS: usize = 32;
const MAX_CUSTOMERS: usize = 1000;

/// The store named on the command line, and its URL (none for memory).
struct StoreChoice {
    name: String,
    url: Option<String>,
}

struct Args {
    store: StoreChoice,
    seed: u64,
    customers: usize,
    listen: SocketAddr,
    serve: bool,
    slow: Duration,
}

/// Reads the command line (also as `--flag=VALUE`). The error is the text to print before
/// exiting with status 2.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let usage = |message: String| format!("checkout_http: {message}\n\n{USAGE}");
    let (mut name, mut url, mut seed, mut customers, mut listen, mut slow) =
        (None, None, None, None, None, None);
    let mut serve = false;
    while let Some(arg) = args.next() {
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let slot = match flag.as_str() {
            "--store" => &mut name,
            "--url" => &mut url,
            "--seed" => &mut seed,
            "--customers" => &mut customers,
            "--listen" => &mut listen,
            "--slow-ms" => &mut slow,
            "--serve" if value.is_none() => {
                serve = true;
                continue;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(usage(format!("unknown argument {arg:?}"))),
        };
        let value = value.or_else(|| args.next());
        *slot = Some(value.ok_or_else(|| usage(format!("{flag} needs a value")))?);
    }
    let number = |flag: &str, value: Option<String>, default: u64| match value {
        None => Ok(default),
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| usage(format!("{flag} takes a whole number, not {text:?}"))),
    };
    let seed = number("--seed", seed, DEFAULT_SEED)?;
    let slow = Duration::from_millis(number("--slow-ms", slow, 0)?);
    let customers = number("--customers", customers, DEFAULT_CUSTOMERS as u64)?;
    let customers = match usize::try_from(customers) {
        Ok(n @ 1..=MAX_CUSTOMERS) => n,
        _ => return Err(usage(format!("--customers is 1 to {MAX_CUSTOMERS}"))),
    };
    let listen = match listen {
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
        Some(text) => text.parse().map_err(|_| {
            usage(format!(
                "--listen takes an address like 127.0.0.1:3000, not {text:?}"
            ))
        })?,
    };
    Ok(Args {
        store: store_choice(name, url).map_err(usage)?,
        seed,
        customers,
        listen,
        serve,
        slow,
    })
}

fn store_choice(name: Option<String>, url: Option<String>) -> Result<StoreChoice, String> {
    let name = name.unwrap_or_else(|| "memory".to_owned());
    let built = match name.as_str() {
        "memory" => true,
        "sqlite" => cfg!(feature = "sqlite"),
        "postgres" => cfg!(feature = "postgres"),
        "redis" => cfg!(feature = "redis"),
        _ => return Err(format!("unknown store {name:?}")),
    };
    if !built {
        return Err(format!(
            "this build has no {name} store: run with --features {name}"
        ));
    }
    if name == "memory" {
        return match url {
            Some(_) => Err("the memory store takes no --url".to_owned()),
            None => Ok(StoreChoice { name, url }),
        };
    }
    let url = url.or_else(|| std::env::var("IDEMPOTENT_STORE_URL").ok());
    let url = match (name.as_str(), url) {
        (_, Some(url)) => url,
        ("sqlite", None) => DEFAULT_SQLITE_PATH.to_owned(),
        (_, None) => {
            return Err(format!(
                "--store {name} needs --url URL or IDEMPOTENT_STORE_URL"
            ));
        }
    };
    Ok(StoreChoice {
        name,
        url: Some(url),
    })
}

/// Opens the chosen store. `store_choice` only lets through the stores this build has.
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
        (other, _) => unreachable!("store_choice let through the {other} store"),
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
    let args = parse_args(std::env::args().skip(1)).unwrap_or_else(|message| {
        eprintln!("{message}");
        std::process::exit(2);
    });
    let fail = |message: String| -> ! {
        eprintln!("checkout_http: {message}");
        std::process::exit(1);
    };
    let store = open_store(&args.store).await.unwrap_or_else(|error| {
        fail(format!(
            "cannot open the {} store: {error}",
            args.store.name
        ))
    });
    // std's hash keys are random per process: an id for this run, with no extra dependency.
    let run = format!("{:06x}", RandomState::new().hash_one("run") & 0xff_ffff);
    let shop = Arc::new(Shop::new(run.clone(), args.slow));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .unwrap_or_else(|error| fail(format!("cannot listen on {}: {error}", args.listen)));
    let address = listener
        .local_addr()
        .unwrap_or_else(|error| fail(format!("the listener has no address: {error}")));
    let server = axum::serve(listener, app(Arc::clone(&shop), store));
    let url = format!("http://{address}/checkout");
    println!("run {run}, store: {}", args.store);

    if args.serve {
        println!("serving POST {url} until interrupted; try:");
        println!(
            "  curl -i {url} -H 'Content-Type: application/json' \\\n    \
             -H 'Idempotency-Key: \"{}\"' \\\n    \
             -d '{{\"customer\":\"ada\",\"items\":[{{\"sku\":\"mug\",\"quantity\":2}}]}}'",
            uuid_v4()
        );
        if let Err(error) = server.await {
            fail(format!("the server stopped: {error}"));
        }
        return;
    }
    tokio::spawn(async move {
        if let Err(error) = server.await {
            eprintln!("checkout_http: the server stopped: {error}");
        }
    });

    println!(
        "seed {} (rerun with --seed {}), {} customers on {url}",
        args.seed, args.seed, args.customers
    );
    let http = reqwest::Client::new();
    let customers: Vec<Arc<Customer>> = (0..args.customers)
        .map(|index| Arc::new(Customer::new(args.seed, index, args.customers)))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for customer in &customers {
        let (http, url, customer) = (http.clone(), url.clone(), Arc::clone(customer));
        let seed = args.seed;
        tasks.spawn(async move { (customer.index, shop_as(&http, &url, seed, &customer).await) });
    }
    let mut stories: Vec<Option<Story>> = customers.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (index, story) = joined.expect("a customer's task panicked");
        stories[index] = Some(story);
    }
    let stories: Vec<Story> = stories.into_iter().flatten().collect();

    // A handler whose client gave up may still run: count once none does.
    let mut running = shop.running.subscribe();
    if tokio::time::timeout(Duration::from_secs(30), running.wait_for(|n| *n == 0))
        .await
        .is_err()
    {
        fail("checkouts still running after 30 s".to_owned());
    }
    let ok = ledger(&shop, &customers, &stories);
    if !ok {
        std::process::exit(1);
    }
}

// ---- The ledger: the truth, from the systems that did the work --------------------------------

/// Prints every customer's story and the ledger; false if a customer was charged twice, has no
/// order or no receipt, or the reused key was not refused.
fn ledger(shop: &Shop, customers: &[Arc<Customer>], stories: &[Story]) -> bool {
    let charges = lock(&shop.charges);
    let orders = lock(&shop.orders);
    let reservations = lock(&shop.reservations);
    let mut problems = Vec::new();
    let (mut double_charges, mut missing_orders) = (0, 0);

    println!("\n== Customers: each attempt's answer ==");
    for (customer, story) in customers.iter().zip(stories) {
        let name = customer.name.as_str();
        let charged: Vec<&Charge> = charges.iter().filter(|c| c.customer == name).collect();
        let ordered: Vec<&Order> = orders.iter().filter(|o| o.customer == name).collect();
        let reserved: i32 = reservations
            .iter()
            .filter(|(who, _)| who == name)
            .map(|(_, n)| n)
            .sum();
        if charged.len() > 1 {
            double_charges += 1;
            problems.push(format!("{name} was charged {} times", charged.len()));
        }
        if reserved != 1 {
            problems.push(format!("{name} holds {reserved} reservations, not 1"));
        }
        // The receipt each click ended with.
        let mut receipts = Vec::new();
        for (click, delivery) in story.clicks.iter().enumerate() {
            let label = if story.clicks.len() > 1 {
                format!("{name} (click {})", click + 1)
            } else {
                name.to_owned()
            };
            let receipt = delivery.answer.as_ref().and_then(|answer| {
                (answer.status == StatusCode::CREATED)
                    .then(|| serde_json::from_slice::<Receipt>(&answer.body).ok())
                    .flatten()
            });
            let shown = receipt.as_ref().map_or_else(
                || "no receipt".to_owned(),
                |r| format!("{} {}", r.order_id, r.charge_id),
            );
            println!("{label:<24} {}: {shown}", describe(&delivery.attempts));
            receipts.push(receipt);
        }
        let order = match (ordered.as_slice(), charged.as_slice()) {
            ([order], [charge]) if order.charge_id == charge.id => Some((order, charge)),
            _ => None,
        };
        let held = receipts.iter().all(|receipt| {
            receipt
                .as_ref()
                .zip(order)
                .is_some_and(|(r, (order, charge))| {
                    r.order_id == order.id
                        && r.charge_id == charge.id
                        && r.amount_cents == charge.amount_cents
                })
        });
        if !held {
            missing_orders += 1;
            let charge_ids: Vec<&str> = charged.iter().map(|c| c.id.as_str()).collect();
            let order_ids: Vec<&str> = ordered.iter().map(|o| o.id.as_str()).collect();
            problems.push(format!(
                "{name}: orders {order_ids:?}, charges {charge_ids:?}, but the client holds {:?}",
                receipts
                    .iter()
                    .map(|r| r.as_ref().map(|r| r.charge_id.as_str()))
                    .collect::<Vec<_>>()
            ));
        }
        if let Some(delivery) = &story.reuse {
            let refused = delivery.answer.as_ref().is_some_and(|answer| {
                answer.status == StatusCode::UNPROCESSABLE_ENTITY
                    && answer.content_type.as_deref() == Some("application/problem+json")
            });
            println!(
                "{:<24} {}",
                format!("{name} (other cart)"),
                describe(&delivery.attempts)
            );
            if !refused {
                problems.push(format!(
                    "{name}'s key, reused with another cart, was not refused"
                ));
            }
        }
    }

    let all_attempts = || {
        stories
            .iter()
            .flat_map(|s| s.clicks.iter().chain(&s.reuse))
            .flat_map(|d| &d.attempts)
    };
    let answered = |wanted: fn(StatusCode, bool) -> bool| {
        all_attempts()
            .filter(|a| matches!(a, Attempt::Answered { status, replayed, .. } if wanted(*status, *replayed)))
            .count()
    };
    let replays = answered(|_, replayed| replayed);
    let conflicts = answered(|status, _| status == StatusCode::CONFLICT);
    let mismatches = answered(|status, _| status == StatusCode::UNPROCESSABLE_ENTITY);
    let timeouts = all_attempts()
        .filter(|a| matches!(a, Attempt::TimedOut))
        .count();
    let reusers = customers.iter().filter(|c| c.reuses_key).count();
    if mismatches != reusers {
        problems.push(format!("{mismatches} answers were 422, not {reusers}"));
    }
    let double_clickers = customers.iter().filter(|c| c.double_clicks).count();
    let load = |n: &AtomicU64| n.load(Ordering::SeqCst);
    let cents: u64 = charges.iter().map(|c| c.amount_cents).sum();

    println!("\n== Ledger, from inventory, payments and orders ==");
    println!(
        "customers:                        {} ({double_clickers} double-clicked, {reusers} sent its key with another cart)",
        customers.len()
    );
    println!("requests that reached the server: {}", load(&shop.requests));
    println!(
        "  ran the checkout:               {}",
        load(&shop.executions)
    );
    println!(
        "  gateway 503s:                   {} (nothing charged; the retry ran the checkout)",
        load(&shop.gateway_refusals)
    );
    println!(
        "  lost responses:                 {} (a 502 or a dropped connection after the checkout ran)",
        load(&shop.lost_responses)
    );
    println!(
        "timeouts:                         {timeouts} (the client hung up; the checkout went on)"
    );
    println!("409s seen:                        {conflicts} (the key's first request still ran)");
    println!(
        "replays:                          {replays} (responses with Idempotent-Replayed: true)"
    );
    println!(
        "422s:                             {mismatches} (a key sent with another cart; not charged)"
    );
    println!(
        "orders: {}, charges: {}, charged {}.{:02}",
        orders.len(),
        charges.len(),
        cents / 100,
        cents % 100
    );
    println!("double charges:                   {double_charges}");
    println!("missing orders:                   {missing_orders}");
    if problems.is_empty() {
        println!(
            "OK: every customer was charged exactly once, and holds the receipt of that charge"
        );
        true
    } else {
        for problem in &problems {
            println!("WRONG: {problem}");
        }
        false
    }
}
