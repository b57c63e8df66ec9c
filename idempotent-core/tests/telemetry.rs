//! Every outcome is a `tracing` event with the function, the key hash, the outcome and the time.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use idempotent_core::{Call, Fingerprint, Idempotency, MemoryStore, OnConflict, Options};
use support::{AppError, DownStore};
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
