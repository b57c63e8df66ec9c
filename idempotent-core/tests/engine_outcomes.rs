//! One test per way an idempotent call can end.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idempotent_core::{
    Bytes, Call, CanonicalArguments, Claim, Fingerprint, Idempotency, MAX_DURATION, ManualClock,
    MemoryStore, OnConflict, Options, Outcome, Store,
};
use support::{AppError, DownStore, Runs, TokioClock, Unserializable};
use tokio::sync::oneshot;

fn engine(store: Arc<dyn Store>) -> Idempotency {
    Idempotency::new(store)
}

fn call(key: &'static str) -> Call<'static> {
    Call::new("tests::charge", Fingerprint::of(&("cart", 4200)).unwrap()).key(key)
}

fn reject() -> Options {
    Options::new().with_on_conflict(OnConflict::Reject)
}

async fn charge(runs: &Runs, receipt: &str) -> Result<String, AppError> {
    runs.hit();
    Ok(receipt.to_string())
}

#[tokio::test]
async fn executed_runs_the_body_once_and_records() {
    let store = Arc::new(MemoryStore::new());
    let runs = Runs::default();
    let outcome = engine(store.clone())
        .run(call("k"), charge(&runs, "r1"))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Executed("r1".to_string()));
    assert_eq!(runs.count(), 1);
    let key = call("k").storage_key().unwrap();
    let fingerprint = Fingerprint::of(&("cart", 4200)).unwrap();
    assert_eq!(
        store
            .claim(
                &key,
                &CanonicalArguments::from(fingerprint),
                Duration::from_secs(1)
            )
            .await
            .unwrap(),
        Claim::Completed {
            output: Bytes::from_static(br#"{"ok":"r1"}"#)
        },
        "the recorded bytes are the tagged JSON of the Ok value"
    );
}

#[tokio::test]
async fn replayed_returns_the_recorded_value_without_running() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let runs = Runs::default();
    engine.run(call("k"), charge(&runs, "first")).await.unwrap();
    for _ in 0..3 {
        let retry = engine
            .run(call("k"), charge(&runs, "second"))
            .await
            .unwrap();
        assert_eq!(retry, Outcome::Replayed("first".to_string()));
    }
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn waited_then_replayed() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let runs = Runs::default();
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let holder = {
        let (engine, runs) = (engine.clone(), runs.clone());
        tokio::spawn(async move {
            engine
                .run(call("k"), async {
                    runs.hit();
                    let _ = started_tx.send(());
                    let _ = finish_rx.await;
                    Ok::<_, AppError>("from the holder".to_string())
                })
                .await
        })
    };
    started_rx.await.unwrap();
    let waiter = {
        let (engine, runs) = (engine.clone(), runs.clone());
        tokio::spawn(async move {
            engine
                .run(call("k"), charge(&runs, "from the waiter"))
                .await
        })
    };
    // Let the waiter find the key in progress before the holder finishes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    finish_tx.send(()).unwrap();
    assert_eq!(
        holder.await.unwrap().unwrap(),
        Outcome::Executed("from the holder".into())
    );
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        Outcome::Replayed("from the holder".into())
    );
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn conflict_in_reject_mode() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let key = call("k").storage_key().unwrap();
    let fingerprint = Fingerprint::of(&("cart", 4200)).unwrap();
    let lease = Duration::from_secs(30);
    assert!(matches!(
        store
            .claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));
    let runs = Runs::default();
    let error = engine(store)
        .with_options(reject())
        .run(call("k"), charge(&runs, "x"))
        .await
        .unwrap_err();
    assert!(error.idempotency().starts_with("Conflict"), "{error:?}");
    assert_eq!(runs.count(), 0);
}

#[tokio::test]
async fn waiting_gives_up_with_a_conflict_after_its_timeout() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let key = call("k").storage_key().unwrap();
    let fingerprint = Fingerprint::of(&("cart", 4200)).unwrap();
    store
        .claim(
            &key,
            &CanonicalArguments::from(fingerprint),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let runs = Runs::default();
    let options = Options::new().with_on_conflict(OnConflict::Wait {
        timeout: Duration::from_millis(100),
    });
    let error = engine(store)
        .with_options(options)
        .run(call("k"), charge(&runs, "x"))
        .await
        .unwrap_err();
    assert!(error.idempotency().starts_with("Conflict"), "{error:?}");
    assert_eq!(runs.count(), 0);
}

#[tokio::test]
async fn mismatch_when_the_key_is_reused_with_other_arguments() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let runs = Runs::default();
    engine.run(call("k"), charge(&runs, "r")).await.unwrap();
    let other = Call::new("tests::charge", Fingerprint::of(&("cart", 9999)).unwrap()).key("k");
    let error = engine.run(other, charge(&runs, "r2")).await.unwrap_err();
    assert!(error.idempotency().starts_with("KeyReused"), "{error:?}");
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn store_error_means_the_body_never_runs() {
    let runs = Runs::default();
    let error = engine(Arc::new(DownStore))
        .run(call("k"), charge(&runs, "r"))
        .await
        .unwrap_err();
    assert!(
        error.idempotency().starts_with("Store(Unavailable"),
        "{error:?}"
    );
    assert_eq!(runs.count(), 0);
}

#[tokio::test]
async fn output_that_fails_to_serialize_releases_the_key() {
    let engine = engine(Arc::new(MemoryStore::new())).with_options(reject());
    let runs = Runs::default();
    let error = engine
        .run(call("k"), async {
            runs.hit();
            Ok::<_, AppError>(Unserializable)
        })
        .await
        .unwrap_err();
    assert!(error.idempotency().starts_with("Encode"), "{error:?}");
    // Maps with non-string keys are what serde_json refuses in practice.
    let error = engine
        .run(call("k2"), async {
            runs.hit();
            Ok::<_, AppError>(HashMap::from([((1u8, 2u8), 3u8)]))
        })
        .await
        .unwrap_err();
    assert!(error.idempotency().starts_with("Encode"), "{error:?}");
    // Not stuck: in reject mode an in-progress key would be a Conflict.
    let retry = engine.run(call("k"), charge(&runs, "fixed")).await.unwrap();
    assert_eq!(retry, Outcome::Executed("fixed".into()));
    assert_eq!(runs.count(), 3);
}

#[tokio::test]
async fn output_over_the_size_limit_is_refused_and_released() {
    let engine =
        engine(Arc::new(MemoryStore::new())).with_options(reject().with_max_output_bytes(64));
    let runs = Runs::default();
    let error = engine
        .run(call("k"), charge(&runs, &"x".repeat(100)))
        .await
        .unwrap_err();
    assert!(error.idempotency().contains("OutputTooLarge"), "{error:?}");
    let retry = engine.run(call("k"), charge(&runs, "short")).await.unwrap();
    assert_eq!(retry, Outcome::Executed("short".into()));
}

#[tokio::test]
async fn recorded_value_of_another_type_is_a_decode_error_not_a_rerun() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let runs = Runs::default();
    engine
        .run(call("k"), charge(&runs, "a string"))
        .await
        .unwrap();
    let error = engine
        .run(call("k"), async {
            runs.hit();
            Ok::<u64, AppError>(7)
        })
        .await
        .unwrap_err();
    assert!(error.idempotency().starts_with("Decode"), "{error:?}");
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn err_from_the_body_releases_the_key_by_default() {
    let engine = engine(Arc::new(MemoryStore::new())).with_options(reject());
    let runs = Runs::default();
    let first = engine
        .run(call("k"), async {
            runs.hit();
            Err::<String, _>(AppError::Declined("insufficient funds".into()))
        })
        .await;
    assert_eq!(first, Err(AppError::Declined("insufficient funds".into())));
    let retry = engine.run(call("k"), charge(&runs, "paid")).await.unwrap();
    assert_eq!(retry, Outcome::Executed("paid".into()));
    assert_eq!(runs.count(), 2);
}

#[tokio::test]
async fn err_from_the_body_is_recorded_with_cache_errors() {
    let engine = engine(Arc::new(MemoryStore::new())).with_options(reject());
    let runs = Runs::default();
    let declined = || AppError::Declined("insufficient funds".into());
    let first = engine
        .run_caching_errors(call("k"), async {
            runs.hit();
            Err::<String, _>(declined())
        })
        .await;
    assert_eq!(first, Err(declined()));
    let retry = engine
        .run_caching_errors(call("k"), charge(&runs, "paid"))
        .await;
    assert_eq!(retry, Err(declined()));
    assert_eq!(runs.count(), 1);
}

/// Waits until `key` can be acquired again, or fails the test after 5 s.
async fn assert_released(store: &Arc<dyn Store>, key: &'static str) {
    let storage_key = call(key).storage_key().unwrap();
    let fingerprint = Fingerprint::of(&("cart", 4200)).unwrap();
    let acquired = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match store
                .claim(
                    &storage_key,
                    &CanonicalArguments::from(fingerprint),
                    Duration::from_secs(3600),
                )
                .await
                .unwrap()
            {
                Claim::Acquired { .. } => return,
                Claim::InProgress { .. } => store
                    .wait(&storage_key, Duration::from_secs(1))
                    .await
                    .unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(
        acquired.is_ok(),
        "the key was not released (its lease is an hour)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_in_the_body_releases_and_propagates() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine =
        engine(store.clone()).with_options(Options::new().with_lease(Duration::from_secs(3600)));
    let task = tokio::spawn(async move {
        engine
            .run(call("k"), async {
                if "boom".len() == 4 {
                    panic!("body exploded");
                }
                Ok::<String, AppError>(String::new())
            })
            .await
    });
    let joined = task.await.unwrap_err();
    assert!(joined.is_panic(), "the panic propagates to the caller");
    assert_released(&store, "k").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_call_releases_promptly() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine =
        engine(store.clone()).with_options(Options::new().with_lease(Duration::from_secs(3600)));
    let (started_tx, started_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        engine
            .run(call("k"), async {
                let _ = started_tx.send(());
                std::future::pending::<()>().await;
                Ok::<String, AppError>(String::new())
            })
            .await
    });
    started_rx.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_released(&store, "k").await;
}

#[tokio::test(start_paused = true)]
async fn a_body_longer_than_the_lease_keeps_its_claim() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(TokioClock::new()).build());
    let lease = Duration::from_secs(3);
    let engine = engine(store.clone()).with_options(reject().with_lease(lease));
    let runs = Runs::default();
    let holder = {
        let (engine, runs) = (engine.clone(), runs.clone());
        tokio::spawn(async move {
            engine
                .run(call("k"), async {
                    runs.hit();
                    tokio::time::sleep(lease * 5).await;
                    Ok::<_, AppError>("slow".to_string())
                })
                .await
        })
    };
    // Other callers, once a second for five leases' time: none may take the key over.
    for second in 1..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let error = engine
            .run(call("k"), charge(&runs, "usurper"))
            .await
            .unwrap_err();
        assert!(
            error.idempotency().starts_with("Conflict"),
            "at {second}s: {error:?}"
        );
    }
    assert_eq!(
        holder.await.unwrap().unwrap(),
        Outcome::Executed("slow".into())
    );
    assert_eq!(
        engine.run(call("k"), charge(&runs, "x")).await.unwrap(),
        Outcome::Replayed("slow".into())
    );
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn a_holder_whose_lease_was_taken_over_reports_unrecorded() {
    let clock = ManualClock::new();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    let lease = Duration::from_secs(30);
    let engine = engine(store.clone()).with_options(reject().with_lease(lease));
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let slow = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .run(call("k"), async {
                    let _ = started_tx.send(());
                    let _ = finish_rx.await;
                    Ok::<_, AppError>("late".to_string())
                })
                .await
        })
    };
    started_rx.await.unwrap();
    // The holder stalls past its lease (its heartbeat would come after 10 real seconds).
    clock.advance(lease + Duration::from_secs(1));
    let runs = Runs::default();
    assert_eq!(
        engine
            .run(call("k"), charge(&runs, "new holder"))
            .await
            .unwrap(),
        Outcome::Executed("new holder".into())
    );
    finish_tx.send(()).unwrap();
    assert_eq!(
        slow.await.unwrap().unwrap(),
        Outcome::Unrecorded("late".into())
    );
    assert_eq!(
        engine.run(call("k"), charge(&runs, "x")).await.unwrap(),
        Outcome::Replayed("new holder".into()),
        "the late holder changed nothing"
    );
}

#[tokio::test]
async fn invalid_keys_and_options_are_refused_before_claiming() {
    let engine = engine(Arc::new(DownStore));
    let runs = Runs::default();
    let empty = Call::new("f", Fingerprint::of(&1).unwrap()).key("");
    let error = engine.run(empty, charge(&runs, "x")).await.unwrap_err();
    assert!(
        error.idempotency().starts_with("InvalidKey(Empty)"),
        "{error:?}"
    );
    let long = "k".repeat(256);
    let error = engine
        .run(
            Call::new("f", Fingerprint::of(&1).unwrap()).key(&long),
            charge(&runs, "x"),
        )
        .await
        .unwrap_err();
    assert!(
        error.idempotency().starts_with("InvalidKey(TooLong"),
        "{error:?}"
    );
    let refused_options = [
        ("a zero ttl", Options::new().with_ttl(Duration::ZERO)),
        ("a zero lease", Options::new().with_lease(Duration::ZERO)),
        (
            "a lease longer than the ttl",
            Options::new()
                .with_ttl(Duration::from_secs(1))
                .with_lease(Duration::from_secs(2)),
        ),
        (
            "a ttl of Duration::MAX",
            Options::new().with_ttl(Duration::MAX),
        ),
        (
            "a ttl just over MAX_DURATION",
            Options::new().with_ttl(MAX_DURATION + Duration::from_millis(1)),
        ),
        (
            "a lease of Duration::MAX",
            Options::new()
                .with_ttl(Duration::MAX)
                .with_lease(Duration::MAX),
        ),
        (
            "a lease just over MAX_DURATION",
            Options::new()
                .with_ttl(MAX_DURATION)
                .with_lease(MAX_DURATION + Duration::from_millis(1)),
        ),
    ];
    for (what, options) in refused_options {
        let error = engine
            .clone()
            .with_options(options)
            .run(call("k"), charge(&runs, "x"))
            .await
            .unwrap_err();
        assert!(
            error.idempotency().starts_with("InvalidOptions"),
            "{what}: {error:?}"
        );
    }
    // The maximum itself is accepted: the call goes on to the store (which is down).
    let at_the_maximum = Options::new()
        .with_ttl(MAX_DURATION)
        .with_lease(MAX_DURATION);
    let error = engine
        .with_options(at_the_maximum)
        .run(call("k"), charge(&runs, "x"))
        .await
        .unwrap_err();
    assert!(error.idempotency().starts_with("Store("), "{error:?}");
    assert_eq!(runs.count(), 0);
}

#[tokio::test]
async fn without_a_key_the_fingerprint_is_the_key() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let runs = Runs::default();
    let by_args = |amount: u32| Call::new("tests::send", Fingerprint::of(&amount).unwrap());
    engine.run(by_args(1), charge(&runs, "one")).await.unwrap();
    assert_eq!(
        engine.run(by_args(1), charge(&runs, "x")).await.unwrap(),
        Outcome::Replayed("one".into())
    );
    assert_eq!(
        engine.run(by_args(2), charge(&runs, "two")).await.unwrap(),
        Outcome::Executed("two".into())
    );
    assert_eq!(runs.count(), 2);
}

#[tokio::test]
async fn a_complete_lost_to_a_dropped_connection_is_tried_again() {
    let store = support::FlakyComplete::around(MemoryStore::new(), 2, false);
    let engine = engine(store.clone());
    let runs = Runs::default();
    assert_eq!(
        engine.run(call("k"), charge(&runs, "kept")).await.unwrap(),
        Outcome::Executed("kept".into()),
        "recorded on the third attempt"
    );
    assert_eq!(
        engine.run(call("k"), charge(&runs, "x")).await.unwrap(),
        Outcome::Replayed("kept".into())
    );
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn a_complete_applied_but_unanswered_is_fenced_on_retry_and_the_record_kept() {
    let store = support::FlakyComplete::around(MemoryStore::new(), 1, true);
    let engine = engine(store);
    let runs = Runs::default();
    assert_eq!(
        engine.run(call("k"), charge(&runs, "kept")).await.unwrap(),
        Outcome::Unrecorded("kept".into()),
        "the retried complete is fenced (the first was applied), so this caller cannot tell"
    );
    assert_eq!(
        engine.run(call("k"), charge(&runs, "x")).await.unwrap(),
        Outcome::Replayed("kept".into()),
        "the first complete's record stands"
    );
    assert_eq!(runs.count(), 1);
}

// Paused time on the store's clock too: the retry below comes while the lease surely runs.
#[tokio::test(start_paused = true)]
async fn a_store_that_stays_down_after_the_body_ran_gives_the_value_unrecorded() {
    let store = support::FlakyComplete::around(
        MemoryStore::builder().clock(TokioClock::new()).build(),
        u32::MAX,
        false,
    );
    let engine = engine(store).with_options(reject().with_lease(Duration::from_millis(200)));
    let runs = Runs::default();
    assert_eq!(
        engine.run(call("k"), charge(&runs, "done")).await.unwrap(),
        Outcome::Unrecorded("done".into()),
        "the body ran: its value is returned, marked as not recorded"
    );
    assert_eq!(runs.count(), 1);
    // The claim is left to run out, never released: a retry at once must not run the body.
    let retry = engine
        .run(call("k"), charge(&runs, "again"))
        .await
        .unwrap_err();
    assert!(
        retry.idempotency().starts_with("Conflict"),
        "a retry while the unrecorded claim's lease runs is refused, got {retry:?}"
    );
    assert_eq!(
        runs.count(),
        1,
        "the body ran again after its complete failed"
    );
}

#[tokio::test]
async fn outputs_json_cannot_hold_are_refused_and_the_key_released() {
    let engine = engine(Arc::new(MemoryStore::new())).with_options(reject());
    let runs = Runs::default();
    for (key, value) in [
        ("nan", f64::NAN),
        ("inf", f64::INFINITY),
        ("-inf", f64::NEG_INFINITY),
    ] {
        let error = engine
            .run(call(key), async {
                runs.hit();
                Ok::<_, AppError>(vec![1.0, value])
            })
            .await
            .unwrap_err();
        assert!(
            error.idempotency().starts_with("Encode"),
            "{key}: {error:?}"
        );
        let retry = engine
            .run(call(key), async { Ok::<_, AppError>(vec![1.0]) })
            .await;
        assert_eq!(
            retry.unwrap(),
            Outcome::Executed(vec![1.0]),
            "{key}: the key was released"
        );
    }
    assert_eq!(runs.count(), 3);
}

#[tokio::test]
async fn empty_outputs_are_recorded_and_replayed() {
    let engine = engine(Arc::new(MemoryStore::new()));
    let runs = Runs::default();
    let unit = || async {
        runs.hit();
        Ok::<(), AppError>(())
    };
    assert_eq!(
        engine.run(call("unit"), unit()).await.unwrap(),
        Outcome::Executed(())
    );
    assert_eq!(
        engine.run(call("unit"), unit()).await.unwrap(),
        Outcome::Replayed(())
    );
    let empty = || async {
        runs.hit();
        Ok::<_, AppError>((String::new(), Vec::<u8>::new()))
    };
    assert!(
        !engine
            .run(call("empty"), empty())
            .await
            .unwrap()
            .is_replayed()
    );
    assert_eq!(
        engine.run(call("empty"), empty()).await.unwrap(),
        Outcome::Replayed((String::new(), Vec::new()))
    );
    assert_eq!(runs.count(), 2);
}

#[tokio::test]
async fn corrupt_recorded_output_is_a_decode_error_until_an_operator_forgets_it() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine = engine(store.clone());
    let key = call("k").storage_key().unwrap();
    let fingerprint = Fingerprint::of(&("cart", 4200)).unwrap();
    let runs = Runs::default();
    for garbage in [
        &b"\xff\x00garbage"[..],
        br#"{"ok": "trunc"#,
        br#"{"ok": 42}"#,
        br#"{"something": "else"}"#,
    ] {
        engine.forget(call("k")).await.unwrap();
        let Claim::Acquired { fence } = store
            .claim(
                &key,
                &CanonicalArguments::from(fingerprint),
                Duration::from_secs(30),
            )
            .await
            .unwrap()
        else {
            panic!("the key was forgotten");
        };
        store
            .complete(
                &key,
                fence,
                Bytes::copy_from_slice(garbage),
                Duration::from_secs(3600),
            )
            .await
            .unwrap();
        let error = engine.run(call("k"), charge(&runs, "x")).await.unwrap_err();
        assert!(
            error.idempotency().starts_with("Decode"),
            "{garbage:?}: {error:?}"
        );
    }
    assert_eq!(
        runs.count(),
        0,
        "a record that does not decode never runs the body again"
    );
    assert!(
        engine.forget(call("k")).await.unwrap(),
        "the operator's purge"
    );
    assert_eq!(
        engine.run(call("k"), charge(&runs, "fresh")).await.unwrap(),
        Outcome::Executed("fresh".into())
    );
    assert!(!engine.forget(call("never")).await.unwrap());
}
