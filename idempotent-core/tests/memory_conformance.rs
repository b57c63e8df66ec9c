//! The memory store against the protocol's conformance suite, plus what only the memory store
//! promises: a capacity in records and a budget in bytes that never evict a live record, and
//! waiters woken by notification.

mod support;

use std::sync::Arc;
use std::time::Duration;

use idempotent_core::conformance::Harness;
use idempotent_core::stores::memory::RECORD_OVERHEAD_BYTES;
use idempotent_core::{
    Bytes, CanonicalArguments, Claim, FencedWrite, ManualClock, MemoryStore, StorageKey, Store,
    StoreError,
};
use tokio::task::JoinHandle;

use support::{acquire, args, key};

/// A fresh memory store on a fresh manual clock.
fn manual_harness() -> Harness {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build();
    Harness::with_manual_clock(Arc::new(store), clock)
}

idempotent_core::conformance_suite!(manual_harness());

/// The same suite on the system clock, which also exercises the suite's real-time mode.
mod real_time {
    idempotent_core::conformance_suite!(idempotent_core::conformance::Harness::with_real_time(
        std::sync::Arc::new(idempotent_core::MemoryStore::new()),
        std::time::Duration::from_millis(300),
    ));
}

const HOUR: Duration = Duration::from_secs(3600);
/// How long a wait that must end may take before the test fails instead of hanging.
const BOUND: Duration = Duration::from_secs(5);

/// A memory store on a manual clock, as `Arc<dyn Store>` (object safety) and as itself.
fn manual_store(capacity: usize) -> (Arc<MemoryStore>, Arc<dyn Store>, ManualClock) {
    let clock = ManualClock::new();
    let store = Arc::new(
        MemoryStore::builder()
            .capacity(capacity)
            .clock(clock.clone())
            .build(),
    );
    let dyn_store: Arc<dyn Store> = store.clone();
    (store, dyn_store, clock)
}

/// What the store reports of itself: the capacity it was built with, and whether it is empty
/// before and after its first record, and once that record is removed.
#[tokio::test]
async fn the_store_reports_its_capacity_and_whether_it_is_empty() {
    let (memory, store, _clock) = manual_store(7);
    assert_eq!(memory.capacity(), 7);
    assert!(memory.is_empty());
    let key = key("reports", 0);
    acquire(&*store, &key, &args(1), HOUR).await;
    assert!(!memory.is_empty(), "it holds a record in progress");
    assert_eq!(memory.len(), 1);
    assert!(store.remove(&key).await.unwrap());
    assert!(memory.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_store_refuses_new_keys_and_never_evicts_live_records() {
    const CAPACITY: usize = 8;
    let (memory, store, clock) = manual_store(CAPACITY);
    let ttl = Duration::from_secs(10);

    // Six completed records that expire after `ttl`, two in progress for an hour.
    let mut completed = Vec::new();
    for i in 0..6 {
        let key = key("capacity-completed", i);
        let fence = acquire(&*store, &key, &args(1), HOUR).await;
        let output = format!("output {i}").into_bytes();
        let write = store
            .complete(&key, fence, output.clone().into(), ttl)
            .await
            .unwrap();
        assert_eq!(write, FencedWrite::Applied);
        completed.push((key, output));
    }
    let held: Vec<StorageKey> = (0..2).map(|i| key("capacity-held", i)).collect();
    for key in &held {
        acquire(&*store, key, &args(1), HOUR).await;
    }
    assert_eq!(memory.len(), CAPACITY);

    // Full: a new key is refused, with the capacity in the message.
    for attempt in 0..2 {
        match store.claim(&key("capacity-new", 0), &args(1), HOUR).await {
            Err(err @ StoreError::Full { capacity }) => {
                assert_eq!(capacity, CAPACITY);
                let message = err.to_string();
                assert!(
                    message.contains(&CAPACITY.to_string()),
                    "the Full error should name the capacity: {message}"
                );
            }
            other => panic!(
                "attempt {attempt}: a new key in a store full of live records must be refused with StoreError::Full, got {other:?}"
            ),
        }
    }

    // Nothing was evicted: every live record still answers.
    for (key, output) in &completed {
        assert_eq!(
            store.claim(key, &args(1), HOUR).await.unwrap(),
            Claim::Completed {
                output: output.clone().into()
            },
            "a live completed record must survive a refused claim"
        );
    }
    for key in &held {
        assert!(
            matches!(
                store.claim(key, &args(1), HOUR).await.unwrap(),
                Claim::InProgress { .. }
            ),
            "a live in-progress record must survive a refused claim"
        );
    }
    assert_eq!(memory.len(), CAPACITY);

    // The completed records expire; the in-progress ones (an hour) do not.
    clock.advance(ttl + Duration::from_millis(1));
    // An expired record's own key is taken over in place, even while the store is full.
    acquire(&*store, &completed[0].0, &args(1), HOUR).await;
    assert_eq!(memory.len(), CAPACITY);
    // New keys take the room of the 5 expired records, one each, and of nothing live.
    for i in 0..5 {
        acquire(&*store, &key("capacity-new", i), &args(1), HOUR).await;
        assert!(memory.len() <= CAPACITY);
    }
    assert_eq!(memory.len(), CAPACITY);
    for key in held.iter().chain([&completed[0].0]) {
        assert!(
            matches!(
                store.claim(key, &args(1), HOUR).await.unwrap(),
                Claim::InProgress { .. }
            ),
            "a live in-progress record must never be evicted to make room"
        );
    }
    assert!(matches!(
        store.claim(&key("capacity-new", 5), &args(1), HOUR).await,
        Err(StoreError::Full { capacity: CAPACITY })
    ));
}

/// A memory store on a manual clock with a byte budget (and room for any number of records).
fn budget_store(max_bytes: usize) -> (Arc<MemoryStore>, Arc<dyn Store>, ManualClock) {
    let clock = ManualClock::new();
    let store = Arc::new(
        MemoryStore::builder()
            .max_bytes(max_bytes)
            .clock(clock.clone())
            .build(),
    );
    let dyn_store: Arc<dyn Store> = store.clone();
    (store, dyn_store, clock)
}

/// A million records of 1 MiB outputs must not fit: the store is bounded in bytes as well as
/// in records. Records of 4 KiB under a budget of 40 KiB: claims are refused once the next
/// record would not fit, live records are never evicted, expired ones make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_budget_refuses_new_keys_and_never_evicts_live_records() {
    const OUTPUT: usize = 4096;
    const BUDGET: usize = 10 * (OUTPUT + RECORD_OVERHEAD_BYTES);
    let (memory, store, clock) = budget_store(BUDGET);
    let ttl = Duration::from_secs(10);

    let mut recorded = Vec::new();
    let refused = loop {
        let key = key("budget", recorded.len());
        let fence = match store.claim(&key, &args(1), HOUR).await {
            Ok(Claim::Acquired { fence }) => fence,
            Ok(other) => panic!("a new key must be acquired or refused, got {other:?}"),
            Err(error) => break error,
        };
        assert!(
            recorded.len() < 100,
            "100 records of {OUTPUT} bytes were admitted under a {BUDGET}-byte budget"
        );
        let output = vec![recorded.len() as u8; OUTPUT];
        let write = store
            .complete(&key, fence, output.clone().into(), ttl)
            .await;
        assert_eq!(write.unwrap(), FencedWrite::Applied);
        recorded.push((key, output));
    };
    assert_eq!(
        recorded.len(),
        10,
        "exactly the records that fit the budget are admitted (then {refused})"
    );
    assert!(
        matches!(refused, StoreError::ByteBudgetFull { max_bytes: BUDGET }),
        "a claim past the byte budget is refused with ByteBudgetFull, got {refused:?}"
    );
    let message = refused.to_string();
    assert!(
        message.contains(&BUDGET.to_string()) && message.contains("max_bytes"),
        "the error names the budget and how to raise it: {message}"
    );
    assert_eq!(memory.bytes(), BUDGET);

    // Nothing was evicted: every live record still replays.
    for (key, output) in &recorded {
        assert_eq!(
            store.claim(key, &args(1), HOUR).await.unwrap(),
            Claim::Completed {
                output: output.clone().into()
            },
            "a live record must survive a refused claim"
        );
    }

    // Once they expire, new keys are admitted in their room, and purged records give their
    // bytes back.
    clock.advance(ttl);
    for i in 0..10 {
        acquire(&*store, &key("budget-new", i), &args(1), HOUR).await;
        assert!(memory.bytes() <= BUDGET);
    }
    store.purge_expired().await.unwrap();
    assert_eq!(memory.len(), 10, "the expired records are all gone");
    assert_eq!(memory.bytes(), 10 * RECORD_OVERHEAD_BYTES);
}

/// The body has run by the time its output is known, so `complete` records it even past the
/// budget (a refusal would let a retry run the body again); new keys are then refused until
/// the store is back under its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_output_is_recorded_even_past_the_budget() {
    const BUDGET: usize = 4 * RECORD_OVERHEAD_BYTES;
    let (memory, store, _clock) = budget_store(BUDGET);
    let running: Vec<StorageKey> = (0..3).map(|i| key("over-budget", i)).collect();
    let mut fences = Vec::new();
    for key in &running {
        fences.push(acquire(&*store, key, &args(1), HOUR).await);
    }
    // Each output alone is larger than the whole budget.
    for (i, (key, fence)) in running.iter().zip(fences).enumerate() {
        let output = vec![i as u8; BUDGET];
        let write = store
            .complete(key, fence, output.clone().into(), HOUR)
            .await
            .unwrap();
        assert_eq!(
            write,
            FencedWrite::Applied,
            "complete {i} must record the output of a body that ran, budget or not"
        );
        assert_eq!(
            store.claim(key, &args(1), HOUR).await.unwrap(),
            Claim::Completed {
                output: output.into()
            }
        );
    }
    assert_eq!(memory.bytes(), 3 * (RECORD_OVERHEAD_BYTES + BUDGET));
    assert!(
        matches!(
            store.claim(&key("over-budget", 9), &args(1), HOUR).await,
            Err(StoreError::ByteBudgetFull { max_bytes: BUDGET })
        ),
        "over its budget, the store refuses new keys"
    );
    // Forgetting the records gives their bytes back.
    for key in &running {
        assert!(store.remove(key).await.unwrap());
    }
    assert_eq!(memory.bytes(), 0);
    acquire(&*store, &key("over-budget", 9), &args(1), HOUR).await;
}

/// Kept arguments count: a record keeps arguments of up to 128 bytes exactly, and they take
/// their length of the budget.
#[tokio::test]
async fn kept_arguments_count_against_the_budget() {
    use idempotent_core::CanonicalArguments;
    let (memory, store, _clock) = budget_store(0);
    assert_eq!(
        memory.max_bytes(),
        RECORD_OVERHEAD_BYTES + idempotent_core::MAX_EXACT_ARGUMENTS,
        "the smallest budget holds one record with the longest kept arguments"
    );
    let arguments = CanonicalArguments::of("order-7").unwrap();
    let kept = arguments.exact().expect("short arguments are kept").len();
    let claim = store
        .claim(&key("arguments", 0), &arguments, HOUR)
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired { .. }));
    assert_eq!(memory.bytes(), RECORD_OVERHEAD_BYTES + kept);
    assert!(matches!(
        store.claim(&key("arguments", 1), &args(1), HOUR).await,
        Err(StoreError::ByteBudgetFull { .. })
    ));
}

/// Expired records are removed as new keys arrive, a few per claim, so a store whose keys
/// turn over never fills with dead records (nor stops a claim to purge them all). One new key
/// per millisecond with a 100 ms ttl: about 100 records are live at any time.
#[tokio::test]
async fn expired_records_are_removed_as_new_keys_arrive() {
    const LIVE: usize = 100;
    let (memory, store, clock) = manual_store(10 * LIVE);
    let ttl = Duration::from_millis(LIVE as u64);
    let mut most = 0;
    for i in 0..20 * LIVE {
        let key = key("turnover", i);
        let fence = acquire(&*store, &key, &args(1), ttl).await;
        let write = store
            .complete(&key, fence, Bytes::from_static(b"{}"), ttl)
            .await;
        assert_eq!(write.unwrap(), FencedWrite::Applied);
        clock.advance(Duration::from_millis(1));
        if i >= LIVE {
            most = most.max(memory.len());
        }
    }
    assert!(
        most <= 2 * LIVE,
        "the store held up to {most} records with {LIVE} live: dead records piled up"
    );
}

/// Starts `wait(key, 60 s)` on its own task.
fn spawn_wait(store: &Arc<dyn Store>, key: StorageKey) -> JoinHandle<()> {
    let store = Arc::clone(store);
    tokio::spawn(async move { store.wait(&key, Duration::from_secs(60)).await.unwrap() })
}

/// Fails the test if the waiter is not done within [`BOUND`] (instead of hanging).
async fn expect_woken(waiter: JoinHandle<()>, what: &str) {
    match tokio::time::timeout(BOUND, waiter).await {
        Ok(joined) => joined.expect("the waiter task"),
        Err(_) => panic!(
            "{what}: the waiter was not woken within {BOUND:?}; with a manual clock and a 1 h lease only a notification can wake it"
        ),
    }
}

/// Lets the spawned waiters register, and checks they are really waiting.
async fn expect_waiting(waiters: &[JoinHandle<()>]) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    for waiter in waiters {
        assert!(
            !waiter.is_finished(),
            "wait on a key in progress with a 1 h lease returned at once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_when_the_holder_completes() {
    let (_, store, _clock) = manual_store(100);
    let key = key("wake-complete", 0);
    let fence = acquire(&*store, &key, &args(1), HOUR).await;
    let waiters: Vec<_> = (0..10).map(|_| spawn_wait(&store, key)).collect();
    expect_waiting(&waiters).await;
    let write = store
        .complete(&key, fence, Bytes::from_static(b"done"), HOUR)
        .await
        .unwrap();
    assert_eq!(write, FencedWrite::Applied);
    for waiter in waiters {
        expect_woken(waiter, "complete").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_when_the_holder_releases() {
    let (_, store, _clock) = manual_store(100);
    let key = key("wake-release", 0);
    let fence = acquire(&*store, &key, &args(1), HOUR).await;
    let waiters: Vec<_> = (0..10).map(|_| spawn_wait(&store, key)).collect();
    expect_waiting(&waiters).await;
    assert_eq!(
        store.release(&key, fence).await.unwrap(),
        FencedWrite::Applied
    );
    for waiter in waiters {
        expect_woken(waiter, "release").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_when_an_expired_lease_is_taken_over() {
    let (_, store, clock) = manual_store(100);
    let key = key("wake-takeover", 0);
    acquire(&*store, &key, &args(1), HOUR).await;
    let waiters: Vec<_> = (0..3).map(|_| spawn_wait(&store, key)).collect();
    expect_waiting(&waiters).await;
    clock.advance(HOUR + Duration::from_millis(1));
    acquire(&*store, &key, &args(1), HOUR).await;
    for waiter in waiters {
        expect_woken(waiter, "a claim taking over the expired lease").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_when_an_expired_lease_is_purged() {
    let (_, store, clock) = manual_store(100);
    let key = key("wake-purge", 0);
    acquire(&*store, &key, &args(1), HOUR).await;
    let waiters: Vec<_> = (0..3).map(|_| spawn_wait(&store, key)).collect();
    expect_waiting(&waiters).await;
    clock.advance(HOUR + Duration::from_millis(1));
    assert_eq!(store.purge_expired().await.unwrap(), 1);
    for waiter in waiters {
        expect_woken(waiter, "purge_expired removing the expired lease").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_at_once_when_the_key_is_not_in_progress() {
    let (_, store, clock) = manual_store(100);
    let at_once = async |key: &StorageKey, what: &str| {
        let waited = tokio::time::timeout(BOUND, store.wait(key, Duration::from_secs(60))).await;
        assert!(
            matches!(waited, Ok(Ok(()))),
            "wait on {what} must return at once, got {waited:?}"
        );
    };

    at_once(&key("at-once", 0), "an absent key").await;

    let completed = key("at-once", 1);
    let fence = acquire(&*store, &completed, &args(1), HOUR).await;
    store
        .complete(&completed, fence, Bytes::new(), HOUR)
        .await
        .unwrap();
    at_once(&completed, "a completed key").await;

    let expired = key("at-once", 2);
    acquire(&*store, &expired, &args(1), Duration::from_secs(1)).await;
    clock.advance(Duration::from_secs(1));
    at_once(&expired, "a key whose lease ended (not yet purged)").await;
}

#[test]
fn the_store_works_as_a_shared_trait_object() {
    fn shareable<T: Send + Sync + 'static>(_: &T) {}
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    shareable(&store);
    assert!(format!("{store:?}").contains("MemoryStore"));
}

/// The memory store keeps short arguments as they are and compares bytes, and keeps long ones
/// (or ones given only by their fingerprint) as a fingerprint. A record claimed with arguments
/// in one form is found with them in the other, in progress and completed, and other arguments
/// are a mismatch in either form: for short arguments and for long ones.
#[tokio::test]
async fn arguments_match_in_either_form() {
    let (_, store, _) = manual_store(64);
    let either = |arguments: &CanonicalArguments| {
        [
            ("as they are", arguments.clone()),
            (
                "by fingerprint",
                CanonicalArguments::from(arguments.fingerprint()),
            ),
        ]
    };
    let of = |value: &str| CanonicalArguments::of(value).expect("a string serializes");
    let cases = [
        ("short", of("order-7"), of("order-8")),
        ("long", of(&"x".repeat(300)), of(&"y".repeat(300))),
    ];
    assert!(cases[0].1.exact().is_some() && cases[1].1.exact().is_none());
    for (i, (size, arguments, other)) in cases.iter().enumerate() {
        for (j, (first, claimed)) in either(arguments).into_iter().enumerate() {
            let key = key("either-form", i * 2 + j);
            let Claim::Acquired { fence } = store.claim(&key, &claimed, HOUR).await.unwrap() else {
                panic!("the first claim of {size} arguments {first} must acquire");
            };
            for (then, again) in either(arguments) {
                let why = format!("{size} arguments claimed {first}, claimed again {then}");
                let claim = store.claim(&key, &again, HOUR).await.unwrap();
                assert!(
                    matches!(claim, Claim::InProgress { .. }),
                    "{why}: {claim:?}"
                );
            }
            for (then, different) in either(other) {
                let claim = store.claim(&key, &different, HOUR).await.unwrap();
                assert_eq!(
                    claim,
                    Claim::Mismatch,
                    "{size} {first}, other arguments {then}"
                );
            }
            let write = store.complete(&key, fence, b"done".to_vec().into(), HOUR);
            assert_eq!(write.await.unwrap(), FencedWrite::Applied);
            for (then, again) in either(arguments) {
                let claim = store.claim(&key, &again, HOUR).await.unwrap();
                let why =
                    format!("{size} arguments completed after a claim {first}, claimed {then}");
                assert_eq!(
                    claim,
                    Claim::Completed {
                        output: b"done".to_vec().into()
                    },
                    "{why}"
                );
            }
            for (then, different) in either(other) {
                let claim = store.claim(&key, &different, HOUR).await.unwrap();
                assert_eq!(
                    claim,
                    Claim::Mismatch,
                    "{size} completed {first}, other arguments {then}"
                );
            }
        }
    }
}
