//! Each option of `#[idempotent]`, checked by what it does on a real call rather than by the
//! code it expands to: `scope`, `ttl`, `lease`, `on_conflict`, `cache_errors`, `skip`, `name`,
//! `store` and `max_output_bytes`. Each test fails if the attribute drops its option (falls
//! back to the default); leases and expiry are measured on a [`ManualClock`], so no test
//! sleeps to see time pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idempotent_core::{Error, ManualClock, MemoryStore, StorageKey, Store, idempotent};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug)]
pub enum AppError {
    Idempotency(Error),
}

impl From<Error> for AppError {
    fn from(error: Error) -> Self {
        AppError::Idempotency(error)
    }
}

/// The `retry_after` of an `Error::Conflict`; panics on anything else.
fn conflict_retry_after<T: std::fmt::Debug>(result: Result<T, AppError>) -> Duration {
    match result {
        Err(AppError::Idempotency(Error::Conflict { retry_after })) => retry_after,
        other => panic!("expected Error::Conflict, got {other:?}"),
    }
}

fn assert_key_reused<T: std::fmt::Debug>(result: Result<T, AppError>) {
    match result {
        Err(AppError::Idempotency(Error::KeyReused)) => {}
        other => panic!("expected Error::KeyReused, got {other:?}"),
    }
}

/// Returns once the first call's body runs (it then holds the key); panics if that call ended
/// without running it, so a test fails instead of waiting for a body that never starts.
async fn holding<T: std::fmt::Debug>(
    entered: &Notify,
    first: &mut tokio::task::JoinHandle<Result<T, AppError>>,
) {
    tokio::select! {
        () = entered.notified() => {}
        ended = first => panic!("the first call ended without running its body: {ended:?}"),
    }
}

fn runs(counter: &AtomicUsize) -> usize {
    counter.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------
// scope

static SCOPED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = order, scope = tenant, name = "attribute_options.scope")]
async fn scoped(tenant: &str, order: &str) -> Result<String, AppError> {
    let run = SCOPED_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(format!("{tenant}/{order}#{run}"))
}

#[tokio::test]
async fn scope_the_same_key_in_two_scopes_is_two_operations() {
    assert_eq!(scoped("acme", "order-1").await.unwrap(), "acme/order-1#1");
    assert_eq!(
        scoped("acme", "order-1").await.unwrap(),
        "acme/order-1#1",
        "same key, same scope: replayed"
    );
    assert_eq!(runs(&SCOPED_RUNS), 1);

    let other_scope = scoped("globex", "order-1").await;
    assert!(
        matches!(&other_scope, Ok(value) if value == "globex/order-1#2"),
        "same key in another scope must run as its own operation: {other_scope:?}"
    );
    assert_eq!(runs(&SCOPED_RUNS), 2);
    assert_eq!(
        scoped("globex", "order-1").await.unwrap(),
        "globex/order-1#2",
        "and replays within its own scope"
    );
    assert_eq!(
        scoped("acme", "order-1").await.unwrap(),
        "acme/order-1#1",
        "the first scope's record is untouched"
    );
    assert_eq!(runs(&SCOPED_RUNS), 2);
}

// ---------------------------------------------------------------------------------------------
// ttl, lease (on a manual clock)

/// The ttl under test: shorter than the 24 h default, and at least the default lease (30 s) so
/// that it needs no `lease` beside it.
const TTL: Duration = Duration::from_secs(90);
/// The lease under test: other than the 30 s default, and long enough that no heartbeat
/// (every third of it, on the real clock) renews it while the test runs.
const LEASE: Duration = Duration::from_secs(45);
const TICK: Duration = Duration::from_millis(1);

/// A service on a store whose time only moves when the test says so.
struct Clocked {
    store: Arc<MemoryStore>,
    clock: ManualClock,
    runs: AtomicUsize,
    entered: Notify,
    release: Notify,
}

impl Clocked {
    fn new() -> Arc<Self> {
        let clock = ManualClock::new();
        Arc::new(Self {
            store: Arc::new(MemoryStore::builder().clock(clock.clone()).build()),
            clock,
            runs: AtomicUsize::new(0),
            entered: Notify::new(),
            release: Notify::new(),
        })
    }

    #[idempotent(key = order, ttl = "90s", store = self.store, name = "attribute_options.ttl")]
    async fn kept_90s(&self, order: &str) -> Result<usize, AppError> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// [`Clocked::kept_90s`] with the ttl given as a `Duration` expression.
    #[idempotent(key = order, ttl = TTL, store = self.store, name = "attribute_options.ttl_expr")]
    async fn kept_for_ttl(&self, order: &str) -> Result<usize, AppError> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    async fn kept(&self, ttl: TtlForm, order: &str) -> Result<usize, AppError> {
        match ttl {
            TtlForm::Literal => self.kept_90s(order).await,
            TtlForm::Expression => self.kept_for_ttl(order).await,
        }
    }

    /// The first execution holds the key until the test releases it; later ones return at once.
    #[idempotent(
        key = order,
        lease = "45s",
        on_conflict = "reject",
        store = self.store,
        name = "attribute_options.lease"
    )]
    async fn leased_45s(&self, order: &str) -> Result<usize, AppError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run == 1 {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(run)
    }

    fn runs(&self) -> usize {
        runs(&self.runs)
    }
}

/// How the ttl is written in the attribute.
#[derive(Clone, Copy)]
enum TtlForm {
    /// `ttl = "90s"`, checked at compile time.
    Literal,
    /// `ttl = TTL`, a `Duration` expression.
    Expression,
}

async fn replays_until_the_ttl_runs_out(ttl: TtlForm) {
    let service = Clocked::new();
    assert_eq!(service.kept(ttl, "order-1").await.unwrap(), 1);

    service.clock.advance(TTL - TICK);
    assert_eq!(
        service.kept(ttl, "order-1").await.unwrap(),
        1,
        "just before the ttl runs out, the record replays"
    );
    assert_eq!(service.runs(), 1);

    service.clock.advance(TICK * 2);
    assert_eq!(
        service.kept(ttl, "order-1").await.unwrap(),
        2,
        "just after the ttl ran out, the body runs again"
    );
    assert_eq!(service.runs(), 2);
}

#[tokio::test]
async fn ttl_replays_until_it_runs_out_then_runs_again() {
    replays_until_the_ttl_runs_out(TtlForm::Literal).await;
}

#[tokio::test]
async fn ttl_given_as_an_expression_is_applied_too() {
    replays_until_the_ttl_runs_out(TtlForm::Expression).await;
}

#[tokio::test]
async fn lease_is_what_a_second_caller_is_told_to_wait_and_when_it_may_take_over() {
    let service = Clocked::new();
    let mut first = {
        let service = Arc::clone(&service);
        tokio::spawn(async move { service.leased_45s("order-1").await })
    };
    holding(&service.entered, &mut first).await;

    assert_eq!(
        conflict_retry_after(service.leased_45s("order-1").await),
        LEASE,
        "the holder's whole lease is left (the clock has not moved)"
    );
    service.clock.advance(LEASE - TICK);
    assert_eq!(
        conflict_retry_after(service.leased_45s("order-1").await),
        TICK,
        "the lease still holds just before it runs out"
    );
    assert_eq!(service.runs(), 1);

    service.clock.advance(TICK * 2);
    assert_eq!(
        service.leased_45s("order-1").await.unwrap(),
        2,
        "once the lease ran out, the next caller takes the key over and runs"
    );
    assert_eq!(service.runs(), 2);

    service.release.notify_one();
    assert_eq!(
        first.await.unwrap().unwrap(),
        1,
        "the first caller still gets its own value"
    );
    assert_eq!(
        service.leased_45s("order-1").await.unwrap(),
        2,
        "the record is the one of the caller that took over"
    );
    assert_eq!(service.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// on_conflict

/// A service on the real clock whose first execution holds the key until released.
struct Blocking {
    runs: AtomicUsize,
    entered: Notify,
    release: Notify,
}

/// The lease of [`Blocking::reject`]; its first caller renews it while its body runs.
const REJECT_LEASE: Duration = Duration::from_secs(2);

impl Blocking {
    #[idempotent(
        key = order,
        lease = "2s",
        on_conflict = "reject",
        name = "attribute_options.on_conflict"
    )]
    async fn reject(&self, order: &str) -> Result<usize, AppError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run == 1 {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(run)
    }
}

#[tokio::test]
async fn on_conflict_reject_answers_a_second_caller_at_once() {
    let service = Arc::new(Blocking {
        runs: AtomicUsize::new(0),
        entered: Notify::new(),
        release: Notify::new(),
    });
    let mut first = {
        let service = Arc::clone(&service);
        tokio::spawn(async move { service.reject("order-1").await })
    };
    holding(&service.entered, &mut first).await;

    // The first body runs until it is released below, so a caller that waits for it cannot
    // return within a lease; one that is rejected returns at once.
    let second = tokio::time::timeout(REJECT_LEASE, service.reject("order-1"))
        .await
        .expect("a rejected caller must not wait for the running one");
    let retry_after = conflict_retry_after(second);
    assert!(
        !retry_after.is_zero() && retry_after <= REJECT_LEASE,
        "retry_after is what is left of the holder's lease: {retry_after:?}"
    );
    assert_eq!(runs(&service.runs), 1, "the rejected caller ran nothing");

    service.release.notify_one();
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(
        service.reject("order-1").await.unwrap(),
        1,
        "after the holder finished, its value replays"
    );
    assert_eq!(runs(&service.runs), 1);
}

// ---------------------------------------------------------------------------------------------
// cache_errors

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum PayError {
    Declined { attempt: usize },
    Idempotency(String),
}

impl From<Error> for PayError {
    fn from(error: Error) -> Self {
        PayError::Idempotency(error.to_string())
    }
}

static RECORDED_DECLINES: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = order, cache_errors, name = "attribute_options.cache_errors")]
async fn decline_recorded(order: &str) -> Result<u32, PayError> {
    let _ = order;
    let attempt = RECORDED_DECLINES.fetch_add(1, Ordering::SeqCst) + 1;
    Err(PayError::Declined { attempt })
}

static RELEASED_DECLINES: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = order, name = "attribute_options.no_cache_errors")]
async fn decline_released(order: &str) -> Result<u32, PayError> {
    let _ = order;
    let attempt = RELEASED_DECLINES.fetch_add(1, Ordering::SeqCst) + 1;
    Err(PayError::Declined { attempt })
}

#[tokio::test]
async fn cache_errors_records_an_err_and_replays_it() {
    assert_eq!(
        decline_recorded("order-1").await,
        Err(PayError::Declined { attempt: 1 })
    );
    assert_eq!(
        decline_recorded("order-1").await,
        Err(PayError::Declined { attempt: 1 }),
        "the recorded error replays"
    );
    assert_eq!(
        runs(&RECORDED_DECLINES),
        1,
        "the body did not run for the replay"
    );
}

#[tokio::test]
async fn without_cache_errors_an_err_releases_the_key() {
    assert_eq!(
        decline_released("order-1").await,
        Err(PayError::Declined { attempt: 1 })
    );
    assert_eq!(
        decline_released("order-1").await,
        Err(PayError::Declined { attempt: 2 }),
        "nothing was recorded: the retry runs the body again"
    );
    assert_eq!(runs(&RELEASED_DECLINES), 2);
}

// ---------------------------------------------------------------------------------------------
// skip

static SKIP_RUNS: AtomicUsize = AtomicUsize::new(0);

/// `trace_id` is serializable, so only `skip` keeps it out of the fingerprint.
#[idempotent(key = order, skip(trace_id), name = "attribute_options.skip")]
async fn with_trace(order: &str, amount: u64, trace_id: String) -> Result<String, AppError> {
    let run = SKIP_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(format!("{order}:{amount}#{run} ({trace_id})"))
}

#[tokio::test]
async fn skip_leaves_an_argument_out_of_the_fingerprint() {
    assert_eq!(
        with_trace("order-1", 10, "trace-a".into()).await.unwrap(),
        "order-1:10#1 (trace-a)"
    );
    let retried = with_trace("order-1", 10, "trace-b".into()).await;
    assert!(
        matches!(&retried, Ok(value) if value == "order-1:10#1 (trace-a)"),
        "another skipped argument is the same call: replayed, not KeyReused: {retried:?}"
    );
    assert_eq!(runs(&SKIP_RUNS), 1);

    assert_key_reused(with_trace("order-1", 11, "trace-a".into()).await);
    assert_eq!(runs(&SKIP_RUNS), 1);
}

// ---------------------------------------------------------------------------------------------
// name

static SHARED_FIRST_RUNS: AtomicUsize = AtomicUsize::new(0);
static SHARED_SECOND_RUNS: AtomicUsize = AtomicUsize::new(0);
static SEPARATE_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = order, name = "attribute_options.name.shared")]
async fn shared_first(order: &str) -> Result<String, AppError> {
    SHARED_FIRST_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("first:{order}"))
}

#[idempotent(key = order, name = "attribute_options.name.shared")]
async fn shared_second(order: &str) -> Result<String, AppError> {
    SHARED_SECOND_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("second:{order}"))
}

#[idempotent(key = order, name = "attribute_options.name.separate")]
async fn separate(order: &str) -> Result<String, AppError> {
    SEPARATE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("separate:{order}"))
}

#[tokio::test]
async fn name_is_the_namespace_two_functions_share_keys_by() {
    assert_eq!(shared_first("order-1").await.unwrap(), "first:order-1");
    assert_eq!(
        shared_second("order-1").await.unwrap(),
        "first:order-1",
        "the same name: the second function replays the first one's record"
    );
    assert_eq!(runs(&SHARED_FIRST_RUNS), 1);
    assert_eq!(runs(&SHARED_SECOND_RUNS), 0);

    assert_eq!(
        separate("order-1").await.unwrap(),
        "separate:order-1",
        "another name: the same key is another operation"
    );
    assert_eq!(runs(&SEPARATE_RUNS), 1);
}

// ---------------------------------------------------------------------------------------------
// store

const LEDGER_NAME: &str = "attribute_options.store";

struct Ledger {
    store: Arc<MemoryStore>,
    runs: AtomicUsize,
}

impl Ledger {
    fn on(store: &Arc<MemoryStore>) -> Self {
        Self {
            store: Arc::clone(store),
            runs: AtomicUsize::new(0),
        }
    }

    #[idempotent(key = order, store = self.store, name = "attribute_options.store")]
    async fn book(&self, order: &str) -> Result<String, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(format!("booked {order} in this ledger"))
    }
}

static DEFAULT_STORE_BOOKINGS: AtomicUsize = AtomicUsize::new(0);

/// The same name and key as [`Ledger::book`], on the default store.
#[idempotent(key = order, name = "attribute_options.store")]
async fn book_in_default_store(order: &str) -> Result<String, AppError> {
    DEFAULT_STORE_BOOKINGS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("booked {order} in the default store"))
}

#[tokio::test]
async fn store_holds_the_record_of_the_call() {
    let store = Arc::new(MemoryStore::new());
    let ledger = Ledger::on(&store);
    assert_eq!(
        ledger.book("order-1").await.unwrap(),
        "booked order-1 in this ledger"
    );
    assert_eq!(
        store.len(),
        1,
        "the record is in the store given to the call"
    );

    let same_store = Ledger::on(&store);
    assert_eq!(
        same_store.book("order-1").await.unwrap(),
        "booked order-1 in this ledger"
    );
    assert_eq!(runs(&same_store.runs), 0, "on the same store: replayed");

    let other_store = Ledger::on(&Arc::new(MemoryStore::new()));
    assert_eq!(
        other_store.book("order-1").await.unwrap(),
        "booked order-1 in this ledger"
    );
    assert_eq!(runs(&other_store.runs), 1, "on another store: run again");

    assert_eq!(
        book_in_default_store("order-1").await.unwrap(),
        "booked order-1 in the default store",
        "the default store holds no record of the key"
    );
    assert_eq!(runs(&DEFAULT_STORE_BOOKINGS), 1);

    let key = StorageKey::derive(LEDGER_NAME, None, b"order-1").unwrap();
    assert!(
        store.remove(&key).await.unwrap(),
        "the record is under the call's own storage key"
    );
    ledger.book("order-1").await.unwrap();
    assert_eq!(
        runs(&ledger.runs),
        2,
        "once removed from the store, the call runs again"
    );
}

// ---------------------------------------------------------------------------------------------
// max_output_bytes

static SMALL_LIMIT_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Far under the default limit (`Options::DEFAULT_MAX_OUTPUT_BYTES`, 1 MiB).
#[idempotent(key = order, max_output_bytes = 64)]
async fn limited_to_64_bytes(order: &str, size: usize) -> Result<String, AppError> {
    SMALL_LIMIT_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok("x".repeat(size))
}

#[tokio::test]
async fn max_output_bytes_refuses_a_larger_output_and_releases_the_key() {
    match limited_to_64_bytes("limit-small-1", 100).await {
        Err(AppError::Idempotency(Error::OutputTooLarge { size, limit: 64 })) => {
            assert!(size > 100, "the JSON string with its quotes: {size}")
        }
        other => panic!("expected Error::OutputTooLarge with limit 64, got {other:?}"),
    }
    // The key was released: a retry runs the body again (and is refused again).
    assert!(limited_to_64_bytes("limit-small-1", 100).await.is_err());
    assert_eq!(runs(&SMALL_LIMIT_RUNS), 2);
    // An output within the limit is recorded.
    assert_eq!(
        limited_to_64_bytes("limit-small-2", 10)
            .await
            .unwrap()
            .len(),
        10
    );
}

static LARGE_LIMIT_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Over the default limit: the default would refuse an output of 1.5 MiB.
#[idempotent(key = order, max_output_bytes = 2_097_152)]
async fn limited_to_2_mib(order: &str, size: usize) -> Result<String, AppError> {
    LARGE_LIMIT_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok("x".repeat(size))
}

#[tokio::test]
async fn max_output_bytes_above_the_default_records_a_larger_output() {
    let size = 1536 * 1024;
    assert!(size > idempotent_core::Options::DEFAULT_MAX_OUTPUT_BYTES);
    assert_eq!(
        limited_to_2_mib("limit-large-1", size).await.unwrap().len(),
        size
    );
    assert_eq!(runs(&LARGE_LIMIT_RUNS), 1, "the first call runs the body");
    assert_eq!(
        limited_to_2_mib("limit-large-1", size).await.unwrap().len(),
        size
    );
    assert_eq!(runs(&LARGE_LIMIT_RUNS), 1, "the retry replays");
}
