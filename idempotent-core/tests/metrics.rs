//! The metrics (feature `metrics`): every call counted by function and outcome, the calls' and
//! waits' times, the store operations' times, the claims in flight, and no key or argument in
//! any label. Each test installs a recorder of its own for its thread only.
#![cfg(feature = "metrics")]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use idempotent_core::conformance::Forwarding;
use idempotent_core::metrics::{
    CALL_DURATION_SECONDS, CALLS_TOTAL, CLAIMS_IN_FLIGHT, STORE_OPERATION_DURATION_SECONDS,
    WAIT_DURATION_SECONDS,
};
use idempotent_core::{Call, Fingerprint, Idempotency, MemoryStore, OnConflict, Options, Outcome};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{AppError, DownStore, RefusedCompletes, StalledClaims};

/// One metric as the recorder holds it: its name and labels (sorted), and its value.
type Metrics = BTreeMap<(String, Vec<(String, String)>), DebugValue>;

fn metrics(snapshotter: &Snapshotter) -> Metrics {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let mut labels: Vec<_> = key
                .key()
                .labels()
                .map(|label| (label.key().to_owned(), label.value().to_owned()))
                .collect();
            labels.sort();
            ((key.key().name().to_owned(), labels), value)
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<_> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    labels
}

fn calls(metrics: &Metrics, function: &str, outcome: &str) -> u64 {
    let key = (
        CALLS_TOTAL.to_owned(),
        labels(&[("function", function), ("outcome", outcome)]),
    );
    match metrics.get(&key) {
        Some(DebugValue::Counter(count)) => *count,
        None => 0,
        Some(other) => panic!("{CALLS_TOTAL} is a counter, found {other:?}"),
    }
}

fn histogram_len(metrics: &Metrics, name: &str, pairs: &[(&str, &str)]) -> usize {
    match metrics.get(&(name.to_owned(), labels(pairs))) {
        Some(DebugValue::Histogram(values)) => values.len(),
        None => 0,
        Some(other) => panic!("{name} is a histogram, found {other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const FUNCTION: &str = "shop::checkout";
/// The argument, and the keys: none may appear in a label.
const ARGUMENT: &str = "argument-4242";
const KEYS: [&str; 6] = [
    "key-executed",
    "key-held",
    "key-abandoned",
    "key-failed",
    "key-waited",
    "key-other",
];

/// Calls of every routine outcome through the memory store, each counted once under its
/// function and outcome, with their times, the store's, and the claims in flight back to 0.
#[test]
fn every_call_is_counted_by_function_and_outcome_with_its_times() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let replays = 3;
    metrics::with_local_recorder(&recorder, || {
        runtime().block_on(async {
            let store = Arc::new(MemoryStore::new());
            let rejecting = Idempotency::new(store.clone())
                .with_options(Options::new().with_on_conflict(OnConflict::Reject));
            let waiting = Idempotency::new(store.clone());
            let arguments = Fingerprint::of(ARGUMENT).unwrap();
            let call = |key: &'static str| Call::new(FUNCTION, arguments).key(key);
            let ok = |value: u32| async move { Ok::<_, AppError>(value) };

            // executed once, replayed `replays` times, then a mismatch.
            rejecting.run(call(KEYS[0]), ok(1)).await.unwrap();
            for _ in 0..replays {
                let replay = rejecting.run(call(KEYS[0]), ok(2)).await.unwrap();
                assert!(replay.is_replayed());
            }
            let other_arguments = Call::new(FUNCTION, Fingerprint::of(&7).unwrap()).key(KEYS[0]);
            rejecting.run(other_arguments, ok(3)).await.unwrap_err();

            // A conflict with a call that holds its key (executed in the end), and a wait for
            // one (waited).
            for (engine, key) in [(&rejecting, KEYS[1]), (&waiting, KEYS[4])] {
                let (started_tx, started_rx) = tokio::sync::oneshot::channel();
                let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
                let holder = rejecting.run(call(key), async {
                    let _ = started_tx.send(());
                    let _ = finish_rx.await;
                    Ok::<_, AppError>(4u32)
                });
                let other = async {
                    started_rx.await.unwrap();
                    let finish = async {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        finish_tx.send(()).unwrap();
                    };
                    tokio::join!(engine.run(call(key), ok(5)), finish).0
                };
                let (held, other) = tokio::join!(holder, other);
                assert!(!held.unwrap().is_replayed());
                if key == KEYS[1] {
                    other.unwrap_err();
                } else {
                    assert!(other.unwrap().is_replayed());
                }
            }

            // abandoned: dropped while its body runs; the release is spawned.
            let abandoned = rejecting.run(
                call(KEYS[2]),
                std::future::pending::<Result<u32, AppError>>(),
            );
            tokio::time::timeout(Duration::from_millis(1), abandoned)
                .await
                .unwrap_err();
            // failed: the body's `Err` is not recorded; the key is released.
            rejecting
                .run(call(KEYS[3]), async {
                    Err::<u32, _>(AppError::Declined("card".into()))
                })
                .await
                .unwrap_err();
            // The abandoned call's release runs on this runtime.
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(rejecting.forget(call(KEYS[5])).await.is_ok());
        });
    });

    let metrics = metrics(&snapshotter);
    let expected = [
        ("executed", 3),
        ("replayed", replays),
        ("waited", 1),
        ("mismatch", 1),
        ("conflict", 1),
        ("abandoned", 1),
        ("failed", 1),
    ];
    for (outcome, count) in expected {
        assert_eq!(
            calls(&metrics, FUNCTION, outcome),
            count,
            "{outcome}: {metrics:#?}"
        );
        assert_eq!(
            histogram_len(
                &metrics,
                CALL_DURATION_SECONDS,
                &[("function", FUNCTION), ("outcome", outcome)]
            ),
            usize::try_from(count).unwrap(),
            "one duration per {outcome} call"
        );
    }
    let counted: u64 = metrics
        .iter()
        .filter(|((name, _), _)| name == CALLS_TOTAL)
        .map(|(_, value)| match value {
            DebugValue::Counter(count) => *count,
            other => panic!("{other:?}"),
        })
        .sum();
    let all: u64 = expected.iter().map(|(_, count)| count).sum();
    assert_eq!(counted, all, "no other outcome was counted: {metrics:#?}");

    assert_eq!(
        histogram_len(&metrics, WAIT_DURATION_SECONDS, &[("function", FUNCTION)]),
        1,
        "the one call that waited: {metrics:#?}"
    );
    for operation in ["claim", "complete", "release", "wait", "remove"] {
        assert!(
            histogram_len(
                &metrics,
                STORE_OPERATION_DURATION_SECONDS,
                &[("store", "memory"), ("operation", operation)]
            ) > 0,
            "the memory store's {operation} is timed: {metrics:#?}"
        );
    }
    assert_eq!(
        metrics.get(&(
            CLAIMS_IN_FLIGHT.to_owned(),
            labels(&[("function", FUNCTION)])
        )),
        Some(&DebugValue::Gauge(0.0.into())),
        "every claim settled, the abandoned one's release too: {metrics:#?}"
    );

    for (name, labels) in metrics.keys() {
        for (label, value) in labels {
            assert!(
                !value.contains(ARGUMENT) && !KEYS.iter().any(|key| value.contains(key)),
                "{name}'s label {label} = {value:?} holds a key or an argument"
            );
        }
    }
}

/// The claims in flight count a body while it runs, and no longer once it is settled.
/// (`DebuggingRecorder`'s snapshots drain the values they read, so each shows the change
/// since the one before.)
#[test]
fn a_running_body_is_a_claim_in_flight() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let gauge = |snapshotter: &Snapshotter| {
        metrics(snapshotter).remove(&(
            CLAIMS_IN_FLIGHT.to_owned(),
            labels(&[("function", "jobs::run")]),
        ))
    };
    metrics::with_local_recorder(&recorder, || {
        runtime().block_on(async {
            let engine = Idempotency::new(Arc::new(MemoryStore::new()));
            let call = Call::new("jobs::run", Fingerprint::of(&1).unwrap()).key("job-1");
            engine
                .run(call, async {
                    assert_eq!(
                        gauge(&snapshotter),
                        Some(DebugValue::Gauge(1.0.into())),
                        "the body runs under a claim"
                    );
                    Ok::<_, AppError>(1u8)
                })
                .await
                .unwrap();
        });
    });
    // A snapshot drains what it reads: the body's snapshot took the +1, so what is left is the
    // settlement's -1, and the gauge is back to 0.
    assert_eq!(
        gauge(&snapshotter),
        Some(DebugValue::Gauge((-1.0).into())),
        "the settled claim is no longer in flight"
    );
}

/// A body that outlives a third of its lease has the lease renewed: each renewal is a timed
/// `extend` of the store.
#[test]
fn a_lease_renewal_is_a_timed_extend() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        runtime().block_on(async {
            let engine = Idempotency::new(Arc::new(MemoryStore::new()))
                .with_options(Options::new().with_lease(Duration::from_millis(30)));
            let call = Call::new("jobs::run", Fingerprint::of(&1).unwrap()).key("job-long");
            engine
                .run(call, async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, AppError>(1u8)
                })
                .await
                .unwrap();
        });
    });
    let renewals = histogram_len(
        &metrics(&snapshotter),
        STORE_OPERATION_DURATION_SECONDS,
        &[("store", "memory"), ("operation", "extend")],
    );
    assert!(
        renewals >= 2,
        "a 100 ms body under a 30 ms lease is renewed every 10 ms: {renewals}"
    );
}

/// `Idempotency::purge_expired` times the store's purge.
#[test]
fn a_purge_through_the_engine_is_timed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        runtime().block_on(async {
            let engine = Idempotency::new(Arc::new(MemoryStore::new()));
            assert_eq!(engine.purge_expired().await.unwrap(), 0);
        });
    });
    assert_eq!(
        histogram_len(
            &metrics(&snapshotter),
            STORE_OPERATION_DURATION_SECONDS,
            &[("store", "memory"), ("operation", "purge_expired")]
        ),
        1
    );
}

/// A call that waited, then got the key (its holder failed) and ran its body: its wait ends
/// when it acquires, not when its body returns.
#[test]
fn a_wait_is_measured_until_the_key_is_acquired() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let body = Duration::from_millis(200);
    metrics::with_local_recorder(&recorder, || {
        runtime().block_on(async {
            let engine = Idempotency::new(Arc::new(MemoryStore::new()));
            let call = Call::new("jobs::run", Fingerprint::of(&1).unwrap()).key("job-1");
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
            let failing = engine.run(call, async {
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                Err::<u8, _>(AppError::Declined("busy".into()))
            });
            let waiting = async {
                started_rx.await.unwrap();
                let finish = async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    finish_tx.send(()).unwrap();
                };
                let slow = async {
                    tokio::time::sleep(body).await;
                    Ok::<_, AppError>(2u8)
                };
                tokio::join!(engine.run(call, slow), finish).0
            };
            let (failed, ran) = tokio::join!(failing, waiting);
            failed.unwrap_err();
            assert!(!ran.unwrap().is_replayed(), "the waiter ran its body");
        });
    });
    let metrics = metrics(&snapshotter);
    let key = (
        WAIT_DURATION_SECONDS.to_owned(),
        labels(&[("function", "jobs::run")]),
    );
    let Some(DebugValue::Histogram(waits)) = metrics.get(&key) else {
        panic!("no wait recorded: {metrics:#?}");
    };
    assert_eq!(waits.len(), 1);
    assert!(
        waits[0].0 < body.as_secs_f64(),
        "the wait ({} s) is not the body's time",
        waits[0].0
    );
}

/// A thread that recorded with no recorder, or with another one, records into the recorder
/// installed now: what a thread keeps between calls is never a recorder's handle.
#[test]
fn each_call_records_into_the_recorder_installed_at_the_time() {
    let runtime = runtime();
    let store = Arc::new(MemoryStore::new());
    let engine = Idempotency::new(store);
    let arguments = Fingerprint::of(ARGUMENT).unwrap();
    let run = |key: &'static str| {
        runtime.block_on(engine.run(Call::new(FUNCTION, arguments).key(key), async {
            Ok::<_, AppError>(1u32)
        }))
    };
    // With no recorder: nothing to see, and nothing kept that would hide the next ones.
    run("key-before").unwrap();
    // Then two recorders in turn, each seeing its own call only.
    for _ in 0..2 {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || run("key-before")).unwrap();
        let seen = metrics(&snapshotter);
        assert_eq!(calls(&seen, FUNCTION, "replayed"), 1);
        assert_eq!(
            histogram_len(
                &seen,
                STORE_OPERATION_DURATION_SECONDS,
                &[("store", "memory"), ("operation", "claim")]
            ),
            1
        );
        assert_eq!(
            histogram_len(
                &seen,
                CALL_DURATION_SECONDS,
                &[("function", FUNCTION), ("outcome", "replayed")]
            ),
            1
        );
    }
}

/// The outcomes the routine test cannot reach are counted as their events are logged: a store
/// that is down, a result the store would not record, a completion fenced off, a call dropped
/// while it claims, and a body that panics.
#[test]
fn store_errors_unrecorded_and_fenced_results_drops_and_panics_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let arguments = Fingerprint::of(ARGUMENT).unwrap();
    let call = move |key: &'static str| Call::new(FUNCTION, arguments).key(key);
    let ok = || async { Ok::<_, AppError>(1u32) };
    metrics::with_local_recorder(&recorder, || {
        runtime().block_on(async {
            let down = Idempotency::new(Arc::new(DownStore));
            down.run(call("key-down"), ok()).await.unwrap_err();

            let refusing = Idempotency::new(Arc::new(Forwarding::new(
                Arc::new(MemoryStore::new()),
                RefusedCompletes { fenced: false },
            )));
            let outcome = refusing.run(call("key-refused"), ok()).await.unwrap();
            assert_eq!(outcome, Outcome::Unrecorded(1));

            let fencing = Idempotency::new(Arc::new(Forwarding::new(
                Arc::new(MemoryStore::new()),
                RefusedCompletes { fenced: true },
            )));
            let outcome = fencing.run(call("key-fenced"), ok()).await.unwrap();
            assert_eq!(outcome, Outcome::Unrecorded(1));

            let stalled = Idempotency::new(Arc::new(Forwarding::new(
                Arc::new(MemoryStore::new()),
                StalledClaims,
            )));
            tokio::time::timeout(
                Duration::from_millis(1),
                stalled.run(call("key-stalled"), ok()),
            )
            .await
            .unwrap_err();

            // A body that panics, on a task of this thread: the panic ends the task.
            let engine = Idempotency::new(Arc::new(MemoryStore::new()));
            let panicking = tokio::spawn(async move {
                engine
                    .run(call("key-panics"), async {
                        if ARGUMENT.len() > 1 {
                            panic!("the body panics");
                        }
                        Ok::<_, AppError>(1u32)
                    })
                    .await
            });
            assert!(panicking.await.unwrap_err().is_panic());
            // The panicking call's release runs on this runtime.
            tokio::time::sleep(Duration::from_millis(10)).await;
        });
    });
    let seen = metrics(&snapshotter);
    assert_eq!(calls(&seen, FUNCTION, "store_error"), 1);
    assert_eq!(calls(&seen, FUNCTION, "unrecorded"), 1);
    assert_eq!(calls(&seen, FUNCTION, "fenced"), 1);
    assert_eq!(
        calls(&seen, FUNCTION, "abandoned"),
        2,
        "dropped while claiming, and panicked"
    );
    let counted: u64 = seen
        .iter()
        .filter(|((name, _), _)| name == CALLS_TOTAL)
        .map(|(_, value)| match value {
            DebugValue::Counter(count) => *count,
            other => panic!("{CALLS_TOTAL} is a counter, found {other:?}"),
        })
        .sum();
    assert_eq!(counted, 5, "one count per call: {seen:?}");
    // Every claim held was given back, the panicking one's too.
    assert_eq!(
        seen.get(&(
            CLAIMS_IN_FLIGHT.to_owned(),
            labels(&[("function", FUNCTION)])
        )),
        Some(&DebugValue::Gauge(0.0.into()))
    );
}

/// The transactional mode counts its calls as the leased mode does: one committed, one
/// cancelled and one whose body panics, each once, and their claims in flight back to 0.
#[cfg(feature = "sqlite")]
#[test]
fn transactional_calls_are_counted_however_they_end() {
    use idempotent_core::stores::sqlite::SqliteStore;
    use rusqlite::{Connection, TransactionBehavior};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.sqlite3");
    let store = SqliteStore::open(&path).unwrap();
    let mut connection = Connection::open(&path).unwrap();
    let call = |key: &'static str| Call::new(FUNCTION, Fingerprint::of(&1).unwrap()).key(key);
    let options = Options::new();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let outcome = runtime()
            .block_on(
                store.run_in_transaction(&tx, &options, call("order-1"), async {
                    Ok::<u32, AppError>(1)
                }),
            )
            .unwrap();
        assert_eq!(outcome, Outcome::Executed(1));
        tx.commit().unwrap();

        support::abandon_two_transactional_calls(
            &store,
            &mut connection,
            FUNCTION,
            ["order-2", "order-3"],
        );
    });
    let seen = metrics(&snapshotter);
    assert_eq!(calls(&seen, FUNCTION, "executed"), 1, "{seen:?}");
    assert_eq!(calls(&seen, FUNCTION, "abandoned"), 2, "{seen:?}");
    assert_eq!(
        seen.get(&(
            CLAIMS_IN_FLIGHT.to_owned(),
            labels(&[("function", FUNCTION)])
        )),
        Some(&DebugValue::Gauge(0.0.into())),
        "{seen:?}"
    );
}
