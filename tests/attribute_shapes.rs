//! `#[idempotent]` on every shape of function: each replays (the body runs once across retries)
//! and refuses a key reused with other arguments.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_core::{Error, MemoryStore, Store, idempotent};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

#[derive(Debug)]
pub enum AppError {
    Idempotency(Error),
}

impl From<Error> for AppError {
    fn from(error: Error) -> Self {
        AppError::Idempotency(error)
    }
}

fn assert_key_reused<T: std::fmt::Debug>(result: Result<T, AppError>) {
    match result {
        Err(AppError::Idempotency(Error::KeyReused)) => {}
        other => panic!("expected KeyReused, got {other:?}"),
    }
}

static FREE_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = order_id)]
async fn free_function(order_id: &str, amount: u64) -> Result<String, AppError> {
    FREE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("{order_id}:{amount}"))
}

#[tokio::test]
async fn free_async_function() {
    for _ in 0..3 {
        assert_eq!(free_function("free-1", 10).await.unwrap(), "free-1:10");
    }
    assert_eq!(FREE_RUNS.load(Ordering::SeqCst), 1);
    assert_key_reused(free_function("free-1", 11).await);
    assert_eq!(FREE_RUNS.load(Ordering::SeqCst), 1);
}

#[derive(Debug, Default)]
struct Service {
    runs: AtomicU32,
    store: Option<Arc<MemoryStore>>,
}

impl Service {
    #[idempotent(key = key)]
    async fn by_ref(&self, key: u64, amount: u32) -> Result<u32, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(amount * 2)
    }

    #[idempotent(key = key, name = "tests.by_mut")]
    async fn by_mut(&mut self, key: u64, amount: u32) -> Result<u32, AppError> {
        *self.runs.get_mut() += 1;
        Ok(amount + 1)
    }

    #[idempotent(key = key, name = "tests.by_arc")]
    async fn by_arc(self: Arc<Self>, key: u64, amount: u32) -> Result<u32, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(amount + 2)
    }

    #[idempotent(key = key, store = self.store.as_ref().expect("a store"))]
    async fn with_own_store(&self, key: &str) -> Result<u32, AppError> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst))
    }

    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn method_taking_ref_self() {
    let service = Service::default();
    for _ in 0..3 {
        assert_eq!(service.by_ref(1, 21).await.unwrap(), 42);
    }
    assert_eq!(service.runs(), 1);
    assert_key_reused(service.by_ref(1, 22).await);
}

#[tokio::test]
async fn method_taking_mut_self() {
    let mut service = Service::default();
    for _ in 0..3 {
        assert_eq!(service.by_mut(1, 1).await.unwrap(), 2);
    }
    assert_eq!(service.runs(), 1);
    assert_key_reused(service.by_mut(1, 5).await);
}

#[tokio::test]
async fn method_taking_arc_self() {
    let service = Arc::new(Service::default());
    for _ in 0..3 {
        assert_eq!(Arc::clone(&service).by_arc(1, 1).await.unwrap(), 3);
    }
    assert_eq!(service.runs(), 1);
    assert_key_reused(Arc::clone(&service).by_arc(1, 2).await);
}

#[tokio::test]
async fn store_given_by_an_expression_over_self() {
    let store = Arc::new(MemoryStore::new());
    let service = Service {
        store: Some(Arc::clone(&store)),
        ..Service::default()
    };
    assert_eq!(service.with_own_store("k").await.unwrap(), 0);
    assert_eq!(service.with_own_store("k").await.unwrap(), 0);
    assert_eq!(service.runs(), 1);
    assert_eq!(store.len(), 1, "the record is in the service's store");
}

static GENERIC_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = key)]
async fn generic<T, K>(key: K, value: T) -> Result<Vec<T>, AppError>
where
    T: Serialize + DeserializeOwned + Clone + Send,
    K: AsRef<str> + Serialize + idempotent_core::IdempotencyKey,
{
    GENERIC_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(vec![value.clone(), value])
}

#[tokio::test]
async fn generic_function_with_bounds_and_where_clause() {
    for _ in 0..3 {
        assert_eq!(generic("g-1", 7u8).await.unwrap(), vec![7, 7]);
    }
    assert_eq!(GENERIC_RUNS.load(Ordering::SeqCst), 1);
    assert_key_reused(generic("g-1", 8u8).await);
}

static PATTERN_RUNS: AtomicU32 = AtomicU32::new(0);

#[derive(Serialize)]
struct Point {
    x: i32,
    y: i32,
}

#[idempotent(key = id)]
async fn patterns(id: u32, (a, b): (u32, u32), Point { x, y }: Point) -> Result<i64, AppError> {
    PATTERN_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(i64::from(a + b) + i64::from(x * y))
}

#[tokio::test]
async fn pattern_arguments() {
    for _ in 0..3 {
        assert_eq!(patterns(1, (1, 2), Point { x: 3, y: 4 }).await.unwrap(), 15);
    }
    assert_eq!(PATTERN_RUNS.load(Ordering::SeqCst), 1);
    assert_key_reused(patterns(1, (1, 2), Point { x: 3, y: 5 }).await);
}

static BORROW_RUNS: AtomicU32 = AtomicU32::new(0);

#[derive(Serialize)]
struct Request<'a> {
    customer: &'a str,
    items: &'a [&'a str],
}

/// Not serializable: must be skipped.
struct Connection;

#[idempotent(key = request.customer, skip(connection))]
async fn borrowed<'a>(
    request: &Request<'a>,
    note: &'a str,
    connection: &Connection,
) -> Result<usize, AppError> {
    let _ = connection;
    BORROW_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(request.items.len() + note.len())
}

#[tokio::test]
async fn arguments_with_references_and_lifetimes() {
    let items = ["a", "b"];
    let request = Request {
        customer: "borrow-1",
        items: &items,
    };
    for _ in 0..3 {
        assert_eq!(borrowed(&request, "xyz", &Connection).await.unwrap(), 5);
    }
    assert_eq!(BORROW_RUNS.load(Ordering::SeqCst), 1);
    assert_key_reused(borrowed(&request, "other", &Connection).await);
}

trait Mailer {
    async fn send(&self, to: String, body: String) -> Result<u32, AppError>;
}

struct SmtpMailer {
    sent: AtomicU32,
    store: Arc<dyn Store>,
}

impl Mailer for SmtpMailer {
    #[idempotent(key = to, store = self.store)]
    async fn send(&self, to: String, body: String) -> Result<u32, AppError> {
        Ok(self.sent.fetch_add(1, Ordering::SeqCst) + body.len() as u32)
    }
}

#[tokio::test]
async fn method_in_a_trait_impl() {
    let mailer = SmtpMailer {
        sent: AtomicU32::new(0),
        store: Arc::new(MemoryStore::new()),
    };
    for _ in 0..3 {
        assert_eq!(
            mailer
                .send("ada@example.com".into(), "hi".into())
                .await
                .unwrap(),
            2
        );
    }
    assert_eq!(mailer.sent.load(Ordering::SeqCst), 1);
    assert_key_reused(mailer.send("ada@example.com".into(), "bye".into()).await);
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Receipt {
    id: u32,
}

#[tokio::test]
async fn futures_are_send_so_they_can_be_spawned() {
    #[idempotent(key = id)]
    async fn spawned(id: u32) -> Result<Receipt, AppError> {
        tokio::task::yield_now().await;
        Ok(Receipt { id })
    }
    let handle = tokio::spawn(spawned(99));
    assert_eq!(handle.await.unwrap().unwrap(), Receipt { id: 99 });
}

static COMPUTED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = format!("{tenant}/{order}"), scope = tenant.to_uppercase())]
async fn computed_key_and_scope(tenant: &str, order: u32) -> Result<u32, AppError> {
    COMPUTED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(order)
}

#[tokio::test]
async fn key_and_scope_computed_into_temporaries() {
    for _ in 0..3 {
        assert_eq!(computed_key_and_scope("acme", 7).await.unwrap(), 7);
    }
    assert_eq!(COMPUTED_RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(
        computed_key_and_scope("acme", 8).await.unwrap(),
        8,
        "another key"
    );
    assert_eq!(COMPUTED_RUNS.load(Ordering::SeqCst), 2);
}
