//! Every outcome is a `tracing` event with the function, the key hash, the outcome and the time.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_core::conformance::Forwarding;
use idempotent_core::{
    Call, Fingerprint, Idempotency, ManualClock, MemoryStore, OnConflict, Options, Outcome,
};
use support::{AppError, DownStore, RefusedCompletes};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

type Fields = BTreeMap<String, String>;

/// Keeps the fields of every event of the crate (targets `idempotent` and `idempotent::*`)
/// but the audit trail's, or (made by [`Captured::audit`]) of the audit trail's only.
#[derive(Clone, Default)]
struct Captured {
    events: Arc<Mutex<Vec<(tracing::Level, Fields)>>>,
    audit: bool,
}

struct FieldVisitor<'a>(&'a mut Fields);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        // The calls' events, and the HTTP layer's (`idempotent::http`); or the audit trail's.
        let target = event.metadata().target();
        if !target.starts_with("idempotent") || (target == "idempotent::audit") != self.audit {
            return;
        }
        let mut fields = Fields::new();
        event.record(&mut FieldVisitor(&mut fields));
        self.events
            .lock()
            .unwrap()
            .push((*event.metadata().level(), fields));
    }
}

impl Captured {
    fn audit() -> Self {
        Self {
            audit: true,
            ..Self::default()
        }
    }

    fn outcomes(&self) -> Vec<(tracing::Level, Fields)> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

/// `elapsed_us` is the call's time in microseconds: at least the body's known sleep, at most
/// the whole call as measured around it. Off by a unit (nanoseconds, milliseconds), it falls
/// outside one bound or the other.
#[test]
fn elapsed_us_lies_between_the_bodys_sleep_and_the_whole_call() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = Idempotency::new(Arc::new(MemoryStore::new()));
    let call = Call::new("shop::slow", Fingerprint::of(&1).unwrap()).key("slow-1");
    let body_sleep = std::time::Duration::from_millis(20);

    let started = std::time::Instant::now();
    runtime.block_on(async {
        engine
            .run(call, async {
                tokio::time::sleep(body_sleep).await;
                Ok::<_, AppError>(1u32)
            })
            .await
            .unwrap();
    });
    let whole_call = started.elapsed();

    let events = captured.outcomes();
    assert_eq!(events.len(), 1, "one event for one call: {events:?}");
    assert_eq!(events[0].1["outcome"], "executed");
    let elapsed: u128 = events[0].1["elapsed_us"]
        .parse()
        .expect("elapsed_us is a number");
    assert!(
        elapsed >= body_sleep.as_micros() && elapsed <= whole_call.as_micros(),
        "elapsed_us = {elapsed} is not between the body's sleep ({} us) and the whole call ({} us)",
        body_sleep.as_micros(),
        whole_call.as_micros()
    );
}

#[test]
fn every_outcome_is_an_event_with_function_key_outcome_and_duration() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let engine = Idempotency::new(Arc::new(MemoryStore::new()))
        .with_options(Options::new().with_on_conflict(OnConflict::Reject));
    let args = Fingerprint::of(&42).unwrap();
    let call = Call::new("shop::checkout", args).key("order-1");
    let expected_key = &call.storage_key().unwrap().to_hex()[..16];
    let ok = || async { Ok::<_, AppError>(1u32) };

    let started = std::time::Instant::now();
    runtime.block_on(async {
        engine.run(call, ok()).await.unwrap();
        engine.run(call, ok()).await.unwrap();
        let other_args = Call::new("shop::checkout", Fingerprint::of(&43).unwrap()).key("order-1");
        engine.run(other_args, ok()).await.unwrap_err();
        engine
            .run(Call::new("shop::checkout", args).key("order-2"), async {
                Err::<u32, _>(AppError::Declined("card".into()))
            })
            .await
            .unwrap_err();
    });
    let all_calls = started.elapsed();
    let events = captured.outcomes();
    let outcomes: Vec<&str> = events.iter().map(|(_, f)| f["outcome"].as_str()).collect();
    assert_eq!(outcomes, ["executed", "replayed", "mismatch", "failed"]);
    for (_, fields) in &events[..3] {
        assert_eq!(fields["function"], "shop::checkout");
        assert_eq!(
            fields["key"], expected_key,
            "the key field is the storage key's hash prefix"
        );
        let elapsed: u128 = fields["elapsed_us"]
            .parse()
            .expect("elapsed_us is a number");
        assert!(
            elapsed <= all_calls.as_micros(),
            "elapsed_us = {elapsed}: no call took longer than all four ({} us)",
            all_calls.as_micros()
        );
        assert_eq!(fields["waited"], "false");
    }
    assert_eq!(
        events[2].0,
        tracing::Level::INFO,
        "a reused key is the caller's mistake"
    );

    runtime.block_on(async {
        let down = Idempotency::new(Arc::new(DownStore));
        down.run(call, ok()).await.unwrap_err();
        engine
            .run(Call::new("shop::checkout", args).key(""), ok())
            .await
            .unwrap_err();
    });
    let events = captured.outcomes();
    assert_eq!(events[0].1["outcome"], "store_error");
    assert_eq!(events[0].0, tracing::Level::ERROR);
    assert_eq!(events[1].1["outcome"], "invalid_input");
    assert_eq!(
        events[1].1["key"], "-",
        "no key hash exists for a refused key"
    );
    assert!(
        !events
            .iter()
            .any(|(_, f)| f.values().any(|v| v.contains("order-1"))),
        "the raw key is never logged"
    );

    runtime.block_on(async {
        // decode_error: the record holds a u32, the caller now expects a String.
        engine
            .run(call, async { Ok::<_, AppError>(String::new()) })
            .await
            .unwrap_err();
        // encode_error: serde_json refuses maps with non-string keys.
        let bad = std::collections::HashMap::from([((1u8, 1u8), 1u8)]);
        let key3 = Call::new("shop::checkout", args).key("order-3");
        engine
            .run(key3, async { Ok::<_, AppError>(bad) })
            .await
            .unwrap_err();
        // conflict, then waited, then abandoned: hold order-4 from another caller.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let key4 = Call::new("shop::checkout", args).key("order-4");
        let holder = engine.run(key4, async {
            let _ = started_tx.send(());
            let _ = finish_rx.await;
            Ok::<_, AppError>(4u32)
        });
        let others = async {
            started_rx.await.unwrap();
            engine.run(key4, ok()).await.unwrap_err();
            let waiting_engine = Idempotency::new(engine.store().clone());
            let waiting = waiting_engine.run(key4, ok());
            let finish = async {
                tokio::task::yield_now().await;
                finish_tx.send(()).unwrap();
            };
            tokio::join!(waiting, finish).0.unwrap()
        };
        let (held, waited) = tokio::join!(holder, others);
        assert!(!held.unwrap().is_replayed() && waited.is_replayed());
        let key5 = Call::new("shop::checkout", args).key("order-5");
        let abandoned = engine.run(key5, std::future::pending::<Result<u32, AppError>>());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(1), abandoned)
                .await
                .is_err()
        );
    });
    let events = captured.outcomes();
    let outcomes: Vec<&str> = events.iter().map(|(_, f)| f["outcome"].as_str()).collect();
    assert_eq!(
        outcomes,
        [
            "decode_error",
            "encode_error",
            "conflict",
            "executed",
            "waited",
            "abandoned"
        ]
    );
    assert_eq!(events[4].1["waited"], "true");
    assert_eq!(events[5].0, tracing::Level::WARN);
}

/// The HTTP layer returns a response too large to record as it came, and says so with a WARN
/// that names the function and the limit, never the key.
#[cfg(feature = "http")]
#[test]
fn a_response_too_large_to_record_is_a_warn_without_the_key() {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use idempotent_core::http::IdempotencyLayer;
    use tower::{Layer, Service};

    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layer = IdempotencyLayer::new("shop::export")
        .with_store(Arc::new(MemoryStore::new()))
        .with_options(Options::new().with_max_output_bytes(4096));
    let route = axum::Router::new().route(
        "/export",
        axum::routing::post(|| async { vec![b'x'; 10_000] }),
    );
    let mut service = layer.layer(route);

    let length = runtime.block_on(async {
        std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut service, cx))
            .await
            .unwrap();
        let request = Request::post("/export")
            .header("idempotency-key", "\"export-secret-key\"")
            .body(Body::empty())
            .unwrap();
        let response = service.call(request).await.unwrap();
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len()
    });
    assert_eq!(length, 10_000, "the response is returned whole");

    let events = captured.outcomes();
    let warns: Vec<_> = events
        .iter()
        .filter(|(level, _)| *level == tracing::Level::WARN)
        .collect();
    assert_eq!(warns.len(), 1, "{events:?}");
    let fields = &warns[0].1;
    assert_eq!(fields["name"], "shop::export");
    assert_eq!(fields["limit"], "4096");
    assert!(fields["message"].contains("unrecorded"), "{fields:?}");
    assert!(
        events.iter().all(|(_, fields)| fields
            .values()
            .all(|value| !value.contains("export-secret-key"))),
        "no event holds the key: {events:?}"
    );
}

fn capture(captured: &Captured) -> tracing::subscriber::DefaultGuard {
    tracing::subscriber::set_default(tracing_subscriber::registry().with(captured.clone()))
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A call dropped while it claims, or while it waits for another holder of its key, emits
/// `abandoned` too (it emitted nothing before it held a claim).
#[test]
fn a_call_dropped_while_it_claims_or_waits_is_an_abandoned_event() {
    let captured = Captured::default();
    let _guard = capture(&captured);
    let runtime = current_thread();
    let args = Fingerprint::of(&1).unwrap();
    let call = Call::new("shop::checkout", args).key("order-1");
    let ok = || async { Ok::<_, AppError>(1u32) };

    runtime.block_on(async {
        let stalled = Idempotency::new(Arc::new(Forwarding::new(
            Arc::new(MemoryStore::new()),
            support::StalledClaims,
        )));
        let claiming = stalled.run(call, ok());
        tokio::time::timeout(Duration::from_millis(1), claiming)
            .await
            .unwrap_err();
    });
    let events = captured.outcomes();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].1["outcome"], "abandoned");
    assert_eq!(events[0].1["waited"], "false");
    assert_eq!(events[0].0, tracing::Level::WARN);

    runtime.block_on(async {
        let engine = Idempotency::new(Arc::new(MemoryStore::new()));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let holder = engine.run(call, async {
            let _ = started_tx.send(());
            let _ = finish_rx.await;
            Ok::<_, AppError>(4u32)
        });
        let waiter = async {
            started_rx.await.unwrap();
            let waiting = engine.run(call, ok());
            tokio::time::timeout(Duration::from_millis(5), waiting)
                .await
                .unwrap_err();
            finish_tx.send(()).unwrap();
        };
        tokio::join!(holder, waiter).0.unwrap();
    });
    let events = captured.outcomes();
    let outcomes: Vec<(&str, &str)> = events
        .iter()
        .map(|(_, f)| (f["outcome"].as_str(), f["waited"].as_str()))
        .collect();
    assert_eq!(outcomes, [("abandoned", "true"), ("executed", "false")]);
}

/// A result the store failed to record is returned (`Outcome::Unrecorded`, which the
/// attribute cannot return) and said once: one `WARN`, with the store's error.
#[test]
fn an_unrecorded_result_is_one_warn_with_the_stores_error() {
    let captured = Captured::default();
    let _guard = capture(&captured);
    let engine = Idempotency::new(Arc::new(Forwarding::new(
        Arc::new(MemoryStore::new()),
        RefusedCompletes { fenced: false },
    )));
    let call = Call::new("shop::checkout", Fingerprint::of(&1).unwrap()).key("order-1");
    let outcome = current_thread()
        .block_on(engine.run(call, async { Ok::<_, AppError>(1u32) }))
        .unwrap();
    assert_eq!(outcome, Outcome::Unrecorded(1));
    let events = captured.outcomes();
    assert_eq!(events.len(), 1, "one event: {events:?}");
    let (level, fields) = &events[0];
    assert_eq!(*level, tracing::Level::WARN);
    assert_eq!(fields["outcome"], "unrecorded");
    assert!(fields["error"].contains("disk full"), "{fields:?}");
}

/// The audit trail: one event per change of a record, with the function, the key's hash, the
/// fence and the change, for a sequence of calls on the memory store.
#[test]
fn the_audit_trail_has_one_event_per_change_of_a_record() {
    let captured = Captured::audit();
    let _guard = capture(&captured);
    let runtime = current_thread();
    let clock = ManualClock::new();
    let lease = Duration::from_secs(10);
    let store = Arc::new(MemoryStore::builder().clock(clock.clone()).build());
    let engine = Idempotency::new(store.clone()).with_options(
        Options::new()
            .with_lease(lease)
            .with_ttl(Duration::from_secs(60)),
    );
    let args = Fingerprint::of(&1).unwrap();
    let call = |key: &'static str| Call::new("shop::checkout", args).key(key);
    let hash = |key: &'static str| call(key).storage_key().unwrap().to_hex()[..16].to_owned();
    let ok = || async { Ok::<_, AppError>(1u32) };

    let taken_over = runtime.block_on(async {
        engine.run(call("executed"), ok()).await.unwrap();
        engine.run(call("executed"), ok()).await.unwrap();
        engine
            .run(call("failed"), async {
                Err::<u32, _>(AppError::Declined("card".into()))
            })
            .await
            .unwrap_err();
        let abandoned = engine.run(
            call("abandoned"),
            std::future::pending::<Result<u32, AppError>>(),
        );
        tokio::time::timeout(Duration::from_millis(1), abandoned)
            .await
            .unwrap_err();
        // The abandoned call's release, on a task of its own.
        tokio::time::sleep(Duration::from_millis(10)).await;

        // The first holder's lease runs out while its body runs; another call takes the key
        // over and records; the first one's recording is then fenced.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let first = engine.run(call("taken"), async {
            let _ = started_tx.send(());
            let _ = finish_rx.await;
            Ok::<_, AppError>(1u32)
        });
        let second = async {
            started_rx.await.unwrap();
            clock.advance(lease + Duration::from_secs(1));
            engine.run(call("taken"), ok()).await.unwrap();
            finish_tx.send(()).unwrap();
        };
        let (first, ()) = tokio::join!(first, second);

        assert!(engine.forget(call("executed")).await.unwrap());
        assert!(
            !engine.forget(call("never")).await.unwrap(),
            "nothing to forget"
        );
        clock.advance(Duration::from_secs(120));
        engine.purge_expired().await.unwrap();
        first.unwrap()
    });
    assert_eq!(taken_over, Outcome::Unrecorded(1));

    let events = captured.outcomes();
    let trail: Vec<(String, String)> = events
        .iter()
        .map(|(level, fields)| {
            assert_eq!(*level, tracing::Level::DEBUG);
            (fields["outcome"].clone(), fields["key"].clone())
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("claimed", hash("executed")),
        ("completed", hash("executed")),
        ("claimed", hash("failed")),
        ("released", hash("failed")),
        ("claimed", hash("abandoned")),
        ("released", hash("abandoned")),
        ("claimed", hash("taken")),
        ("claimed", hash("taken")),
        ("completed", hash("taken")),
        ("taken_over", hash("taken")),
        ("forgotten", hash("executed")),
        ("purged", "-".to_owned()),
    ]
    .into_iter()
    .map(|(outcome, key)| (outcome.to_owned(), key))
    .collect();
    assert_eq!(trail, expected);

    let fence = |i: usize| events[i].1["fence"].parse::<u64>().unwrap();
    assert_eq!(
        fence(0),
        fence(1),
        "completed under the fence it was claimed with"
    );
    assert_eq!(fence(2), fence(3));
    assert_eq!(fence(4), fence(5));
    assert_eq!(
        fence(6),
        fence(9),
        "the first holder's fence was taken over"
    );
    assert!(fence(7) > fence(6), "by a later fence");
    assert_eq!(fence(7), fence(8));
    assert_eq!(events[10].1["fence"], "-");
    assert!(
        events[11].1["count"].parse::<u64>().unwrap() >= 1,
        "{:?}",
        events[11]
    );
    for (_, fields) in &events[..11] {
        assert_eq!(fields["function"], "shop::checkout");
    }
    assert!(
        events.iter().all(|(_, fields)| fields["key"] == "-"
            || (fields["key"].len() == 16 && fields["key"].bytes().all(|b| b.is_ascii_hexdigit()))),
        "keys are hash prefixes, never the raw key: {events:?}"
    );
}

/// In the transactional mode a call cancelled, or whose body panics, emits `abandoned` too
/// (its transaction's end settles the claim).
#[cfg(feature = "sqlite")]
#[test]
fn a_transactional_call_cancelled_or_panicking_is_an_abandoned_event() {
    use idempotent_core::stores::sqlite::SqliteStore;
    use rusqlite::Connection;

    let captured = Captured::default();
    let _guard = capture(&captured);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.sqlite3");
    let store = SqliteStore::open(&path).unwrap();
    let mut connection = Connection::open(&path).unwrap();
    support::abandon_two_transactional_calls(
        &store,
        &mut connection,
        "shop::checkout",
        ["order-1", "order-2"],
    );

    let events = captured.outcomes();
    let outcomes: Vec<&str> = events.iter().map(|(_, f)| f["outcome"].as_str()).collect();
    assert_eq!(outcomes, ["abandoned", "abandoned"], "{events:?}");
    assert!(
        events
            .iter()
            .all(|(level, _)| *level == tracing::Level::WARN)
    );
}

/// A holder whose renewal is fenced while its body runs, and whose recording is then fenced
/// too, says `taken_over` once; with `on_lease_loss = "cancel"` the renewal says it, as nothing
/// is written after.
#[test]
fn a_lease_taken_over_is_one_audit_event_whoever_sees_it() {
    use idempotent_core::OnLeaseLoss;

    for on_lease_loss in [OnLeaseLoss::Continue, OnLeaseLoss::Cancel] {
        let captured = Captured::audit();
        let _guard = capture(&captured);
        let clock = ManualClock::new();
        let lease = Duration::from_millis(300);
        let engine = Idempotency::new(Arc::new(
            MemoryStore::builder().clock(clock.clone()).build(),
        ))
        .with_options(
            Options::new()
                .with_lease(lease)
                .with_on_lease_loss(on_lease_loss),
        );
        let call = Call::new("shop::checkout", Fingerprint::of(&1).unwrap()).key("taken");
        current_thread().block_on(async {
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
            let first = engine.run(call, async {
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                Ok::<_, AppError>(1u32)
            });
            let second = async {
                started_rx.await.unwrap();
                clock.advance(Duration::from_secs(1));
                engine
                    .run(call, async { Ok::<_, AppError>(2u32) })
                    .await
                    .unwrap();
                // Past the first holder's next renewals.
                tokio::time::sleep(lease).await;
                let _ = finish_tx.send(());
            };
            let (first, ()) = tokio::join!(first, second);
            match on_lease_loss {
                OnLeaseLoss::Cancel => assert!(first.is_err(), "{first:?}"),
                _ => assert_eq!(first.unwrap(), Outcome::Unrecorded(1)),
            }
        });
        let trail: Vec<String> = captured
            .outcomes()
            .into_iter()
            .map(|(_, fields)| fields["outcome"].clone())
            .collect();
        assert_eq!(
            trail,
            ["claimed", "claimed", "completed", "taken_over"],
            "{on_lease_loss:?}"
        );
    }
}
