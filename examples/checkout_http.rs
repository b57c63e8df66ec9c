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
//! The same server answers `GET /metrics` with the library's metrics in Prometheus' text
//! format (feature `metrics`, `metrics-exporter-prometheus`): calls of `shop.checkout.v1` by
//! outcome, their times and the store's operations' times as histograms (buckets from 50µs to
//! 10s).
//!
//! Run it with `cargo run --example checkout_http`; with a durable store, e.g.
//! `cargo run --example checkout_http --features sqlite -- --store sqlite`; only the server,
//! for curl, with `cargo run --example checkout_http -- --listen 127.0.0.1:3000 --serve
//! --slow-ms 3000` (see `--help`).

// The parts, in examples/checkout_http/ (a directory without main.rs, so not an example itself):
// the shop and its journals, the server, the client's retry loop (which the client middleware is
// to replace), the injected faults and the command line.
#[path = "checkout_http/args.rs"]
mod args;
#[path = "checkout_http/faults.rs"]
mod faults;
#[path = "checkout_http/retry.rs"]
mod retry;
#[path = "checkout_http/server.rs"]
mod server;
#[path = "checkout_http/shop.rs"]
mod shop;

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::StatusCode;

use args::{open_store, parse_args};
use faults::{Fault, Rng};
use retry::{Attempt, Delivery, send_with_retries, uuid_v4};
use server::app;
use shop::{CATALOG, Cart, Charge, Item, Order, Receipt, Shop, lock};

/// The upper bounds, in seconds, of the buckets of the `_seconds` histograms at `GET /metrics`
/// (call and wait durations, store operations): from 50µs, a store operation in memory, to 10s,
/// a slow checkout or a long wait.
const SECONDS_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

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
    // The process's metrics recorder, rendered at GET /metrics. The durations are histograms
    // (without buckets the exporter renders them as summaries, which cannot be aggregated
    // across processes).
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
            &SECONDS_BUCKETS,
        )
        .unwrap_or_else(|error| fail(format!("cannot set the histograms' buckets: {error}")))
        .install_recorder()
        .unwrap_or_else(|error| fail(format!("cannot install the metrics recorder: {error}")));
    idempotent_core::metrics::describe();
    let server = axum::serve(listener, app(Arc::clone(&shop), store, metrics));
    let url = format!("http://{address}/checkout");
    println!("run {run}, store: {}", args.store);
    println!("metrics: http://{address}/metrics");

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
        if ordered.len() > 1 {
            problems.push(format!("{name} has {} orders, not 1", ordered.len()));
        }
        // A receipt is held when the order book and the payments both have what it says.
        let holds = |receipt: &Receipt| {
            let ordered = ordered
                .iter()
                .any(|o| o.id == receipt.order_id && o.charge_id == receipt.charge_id);
            let charged = charged
                .iter()
                .any(|c| c.id == receipt.charge_id && c.amount_cents == receipt.amount_cents);
            ordered && charged
        };
        if ordered.is_empty() || !receipts.iter().all(|r| r.as_ref().is_some_and(holds)) {
            missing_orders += 1;
            let charge_ids: Vec<&str> = charged.iter().map(|c| c.id.as_str()).collect();
            let order_ids: Vec<&str> = ordered.iter().map(|o| o.id.as_str()).collect();
            let held: Vec<Option<&str>> = receipts
                .iter()
                .map(|r| r.as_ref().map(|r| r.charge_id.as_str()))
                .collect();
            problems.push(format!(
                "{name} is missing an order: orders {order_ids:?}, charges {charge_ids:?}, \
                 receipts held {held:?}"
            ));
        }
        if receipts.windows(2).any(|pair| pair[0] != pair[1]) {
            problems.push(format!("{name}'s clicks got different receipts"));
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
