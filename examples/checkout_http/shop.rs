//! The shop: what a customer sends and gets back, and the systems with side effects
//! (inventory, payment gateway, order book), each keeping a journal of what it did, outside the
//! idempotency store.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::sleep;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Cart {
    pub(crate) customer: String,
    pub(crate) items: Vec<Item>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Item {
    pub(crate) sku: String,
    pub(crate) quantity: u32,
}

/// The body of a `201 Created`, recorded by the layer and replayed to every retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Receipt {
    pub(crate) order_id: String,
    pub(crate) customer: String,
    pub(crate) amount_cents: u64,
    pub(crate) charge_id: String,
}

/// What the shop sells, at what price; the server prices a cart, never the client.
pub(crate) const CATALOG: [(&str, u64); 5] = [
    ("mug", 1_200),
    ("tea", 630),
    ("lamp", 8_900),
    ("kettle", 3_450),
    ("socks", 900),
];

const MAX_QUANTITY: u32 = 99;

/// The cart's price in cents, or what is wrong with it.
pub(crate) fn price(cart: &Cart) -> Result<u64, String> {
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

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("a task panicked while holding a lock")
}

pub(crate) struct Charge {
    pub(crate) id: String,
    pub(crate) customer: String,
    pub(crate) amount_cents: u64,
}

pub(crate) struct Order {
    pub(crate) id: String,
    pub(crate) customer: String,
    pub(crate) charge_id: String,
}

pub(crate) struct Shop {
    /// Charge and order ids carry the run's id, so no two runs hand out the same one.
    pub(crate) run: String,
    /// `--slow-ms`: how long every checkout waits after charging (for a 409 with curl).
    pub(crate) slow: Duration,
    /// One entry per reservation (+1) and per reservation put back (-1), by customer.
    pub(crate) reservations: Mutex<Vec<(String, i32)>>,
    pub(crate) charges: Mutex<Vec<Charge>>,
    pub(crate) orders: Mutex<Vec<Order>>,
    /// Requests that reached the server (the outermost middleware), and how many of them ran
    /// the checkout handler: the layer answered the others itself.
    pub(crate) requests: AtomicU64,
    pub(crate) executions: AtomicU64,
    pub(crate) gateway_refusals: AtomicU64,
    pub(crate) lost_responses: AtomicU64,
    /// Checkouts running now: the ledger waits until none is.
    pub(crate) running: watch::Sender<usize>,
}

/// Counts a running checkout until dropped.
pub(crate) struct Running<'a>(&'a watch::Sender<usize>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Shop {
    pub(crate) fn new(run: String, slow: Duration) -> Self {
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

    pub(crate) fn running(&self) -> Running<'_> {
        self.running.send_modify(|n| *n += 1);
        Running(&self.running)
    }

    pub(crate) async fn reserve(&self, customer: &str) {
        sleep(Duration::from_millis(10)).await;
        lock(&self.reservations).push((customer.to_owned(), 1));
    }

    pub(crate) fn put_back(&self, customer: &str) {
        lock(&self.reservations).push((customer.to_owned(), -1));
    }

    /// The slow step, where an impatient client hangs up.
    pub(crate) async fn charge(&self, customer: &str, amount_cents: u64) -> String {
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

    pub(crate) async fn create_order(&self, customer: &str, charge_id: &str) -> String {
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
