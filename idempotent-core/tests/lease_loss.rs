//! A holder cut off from the store: with `OnLeaseLoss::Cancel` its body is dropped before its
//! lease runs out, so it never runs beside the caller that takes the key over; the body can
//! read its fence and derive keys for downstream systems that deduplicate.
//!
//! Time is Tokio's paused clock, which the memory store reads too (`TokioClock`), so leases
//! run out exactly when the test lets them.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_core::conformance::{Forwarding, Hooks};
use idempotent_core::{
    Call, CallContext, CanonicalArguments, Claim, Error, Fingerprint, Idempotency, MemoryStore,
    OnConflict, OnLeaseLoss, Options, Store, StoreError,
};
use support::TokioClock;

const LEASE: Duration = Duration::from_secs(30);

/// One caller's way to a shared store, which the test can cut: every operation then fails as
/// an unreachable store's does. Other callers reach the store directly.
#[derive(Debug)]
struct Partitioned {
    cut: AtomicBool,
}

impl Hooks for Partitioned {
    fn before(&self) -> Result<(), StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable {
                message: "partitioned from the store".into(),
                source: None,
            })
        } else {
            Ok(())
        }
    }
}

fn call() -> Call<'static> {
    Call::new("tests::charge", Fingerprint::of(&4200).unwrap()).key("order-7")
}

/// What one execution of the body saw, and whether it is still running.
#[derive(Debug, Default)]
struct Execution {
    running: AtomicBool,
    context: Mutex<Option<CallContext>>,
}

/// Sets `running` while the body's future exists.
struct Running(Arc<Execution>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::SeqCst);
    }
}

/// A body that charges forever (until dropped), after noting its context.
async fn endless(execution: Arc<Execution>) -> Result<String, Error> {
    execution.running.store(true, Ordering::SeqCst);
    *execution.context.lock().unwrap() = CallContext::current();
    let _running = Running(execution);
    std::future::pending::<()>().await;
    unreachable!()
}

/// What the second execution's body saw of its context (recorded, so plain data).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Seen {
    fence: u64,
    derived_key: String,
    storage_key: String,
}

impl Seen {
    fn now() -> Self {
        let context = CallContext::current().expect("inside an idempotent body");
        Self {
            fence: context.fence().get(),
            derived_key: context.derived_key("payment-provider"),
            storage_key: context.storage_key().to_string(),
        }
    }
}

struct Setup {
    shared: Arc<dyn Store>,
    partition: Arc<Forwarding<Partitioned>>,
}

fn setup() -> Setup {
    let shared: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(TokioClock::new()).build());
    let partition = Arc::new(Forwarding::new(
        Arc::clone(&shared),
        Partitioned {
            cut: AtomicBool::new(false),
        },
    ));
    Setup { shared, partition }
}

/// The other caller: claims every 100 ms (reject mode) until it runs its body; returns whether
/// the first execution was still running when the second began, and the second's context.
async fn take_over(shared: Arc<dyn Store>, first: Arc<Execution>) -> (bool, Seen) {
    let engine = Idempotency::new(shared).with_options(
        Options::new()
            .with_lease(LEASE)
            .with_on_conflict(OnConflict::Reject),
    );
    loop {
        let first = Arc::clone(&first);
        let ran = engine
            .run(call(), async move {
                let overlapped = first.running.load(Ordering::SeqCst);
                Ok::<_, Error>((overlapped, Seen::now()))
            })
            .await;
        match ran {
            Ok(outcome) => return outcome.into_value(),
            Err(Error::Conflict { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("the second caller failed: {other}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_holder_cut_off_from_the_store_is_cancelled_before_its_lease_runs_out() {
    let Setup { shared, partition } = setup();
    let first = Arc::new(Execution::default());
    let holder = {
        let engine = Idempotency::new(partition.clone()).with_options(
            Options::new()
                .with_lease(LEASE)
                .with_on_lease_loss(OnLeaseLoss::Cancel),
        );
        let first = Arc::clone(&first);
        tokio::spawn(async move { engine.run(call(), endless(first)).await })
    };
    while !first.running.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    let cut_at = tokio::time::Instant::now();
    partition.cut.store(true, Ordering::SeqCst);
    let other = tokio::spawn(take_over(Arc::clone(&shared), Arc::clone(&first)));

    let result = tokio::time::timeout(LEASE * 2, holder)
        .await
        .expect("the cut-off holder's body was never cancelled")
        .unwrap();
    assert!(
        matches!(result, Err(Error::LeaseLost)),
        "the cut-off holder must end with LeaseLost, got {result:?}"
    );
    let cancelled_after = cut_at.elapsed();
    assert!(
        cancelled_after < LEASE,
        "cancelled {cancelled_after:?} after the cut, not before its {LEASE:?} lease ran out"
    );
    assert!(
        !first.running.load(Ordering::SeqCst),
        "the body was dropped"
    );

    let (overlapped, second) = other.await.unwrap();
    assert!(
        !overlapped,
        "the second caller ran its body while the cut-off holder's body still ran"
    );
    let first = first
        .context
        .lock()
        .unwrap()
        .expect("the body saw its context");
    assert!(
        second.fence > first.fence().get(),
        "the takeover's fence ({}) must be larger than the lost holder's ({})",
        second.fence,
        first.fence()
    );
    assert_eq!(
        second.derived_key,
        first.derived_key("payment-provider"),
        "both executions send a downstream system the same key, so it deduplicates them"
    );
    assert_ne!(second.derived_key, first.derived_key("mailer"));
    assert_eq!(
        second.storage_key,
        call().storage_key().unwrap().to_string()
    );
    assert_eq!(first.storage_key(), call().storage_key().unwrap());
}

/// Without `Cancel` (the default), the cut-off holder runs on beside the caller that took the
/// key over: what the option is for (GUARANTEES.md, "what it does not promise").
#[tokio::test(start_paused = true)]
async fn by_default_a_cut_off_holder_runs_on_beside_the_next_one() {
    let Setup { shared, partition } = setup();
    let first = Arc::new(Execution::default());
    let holder = {
        let engine =
            Idempotency::new(partition.clone()).with_options(Options::new().with_lease(LEASE));
        let first = Arc::clone(&first);
        tokio::spawn(async move { engine.run(call(), endless(first)).await })
    };
    while !first.running.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    partition.cut.store(true, Ordering::SeqCst);
    let (overlapped, _) = take_over(shared, Arc::clone(&first)).await;
    assert!(
        overlapped,
        "with OnLeaseLoss::Continue the first body still runs when the second begins"
    );
    holder.abort();
}

/// A holder whose renewal is fenced (an operator purged the record and another caller claimed
/// the key) is cancelled at once, not at the end of its lease.
#[tokio::test(start_paused = true)]
async fn a_holder_whose_renewal_is_fenced_is_cancelled_at_once() {
    let Setup { shared, .. } = setup();
    let first = Arc::new(Execution::default());
    let holder = {
        let engine = Idempotency::new(Arc::clone(&shared)).with_options(
            Options::new()
                .with_lease(LEASE)
                .with_on_lease_loss(OnLeaseLoss::Cancel),
        );
        let first = Arc::clone(&first);
        tokio::spawn(async move { engine.run(call(), endless(first)).await })
    };
    while !first.running.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    let key = call().storage_key().unwrap();
    assert!(shared.remove(&key).await.unwrap(), "the operator's purge");
    let fingerprint = Fingerprint::of(&4200).unwrap();
    let Claim::Acquired { .. } = shared
        .claim(&key, &CanonicalArguments::from(fingerprint), LEASE)
        .await
        .unwrap()
    else {
        panic!("the purged key is free");
    };
    let started = tokio::time::Instant::now();
    let result = tokio::time::timeout(LEASE * 2, holder)
        .await
        .expect("the fenced holder's body was never cancelled")
        .unwrap();
    assert!(matches!(result, Err(Error::LeaseLost)), "got {result:?}");
    assert!(
        started.elapsed() <= LEASE / 3,
        "cancelled at its first renewal (a third of the lease), not after {:?}",
        started.elapsed()
    );
}

/// A body that keeps its lease is never cancelled, however long it runs.
#[tokio::test(start_paused = true)]
async fn a_healthy_holder_is_never_cancelled() {
    let Setup { shared, .. } = setup();
    let engine = Idempotency::new(shared).with_options(
        Options::new()
            .with_lease(LEASE)
            .with_on_lease_loss(OnLeaseLoss::Cancel),
    );
    let outcome = engine
        .run(call(), async {
            tokio::time::sleep(LEASE * 10).await;
            Ok::<_, Error>("slow but alive".to_string())
        })
        .await
        .unwrap();
    assert_eq!(outcome.into_value(), "slow but alive");
}
