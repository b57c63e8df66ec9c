//! The Redis Streams source under a `Consumer`, against a real `redis-server` per test.
#![cfg(feature = "redis-streams")]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_core::queue::redis_streams::{self, PARKED_CONSUMER, RedisStreamsSource};
use idempotent_core::queue::{Consumer, Message, SourceErrorKind};
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{Idempotency, MemoryStore, Options};
use idempotent_test_support::RedisServer;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

const STREAM: &str = "orders";
const GROUP: &str = "billing";
const DEAD_LETTERS: &str = "orders:dead-letter";
/// How long a test waits for a state before it fails.
const PATIENCE: Duration = Duration::from_secs(30);

async fn connection(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("a valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("the test's server answers")
}

async fn source(server: &RedisServer, consumer: &str, lease: Duration) -> RedisStreamsSource {
    RedisStreamsSource::builder(server.url(), STREAM, GROUP)
        .consumer(consumer)
        .lease(lease)
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .expect("the source builds")
}

fn memory_engine() -> Idempotency {
    Idempotency::new(Arc::new(MemoryStore::new()))
}

fn redis_engine(server: &RedisServer) -> Idempotency {
    let store = RedisStore::builder(server.url())
        .build()
        .expect("a valid URL");
    Idempotency::new(Arc::new(store))
        .with_options(Options::new().with_lease(Duration::from_secs(2)))
}

async fn publish(connection: &mut MultiplexedConnection, id: &str, payload: &str) -> String {
    redis_streams::publish(connection, STREAM, id, payload)
        .await
        .expect("XADD succeeds")
}

/// `XPENDING <stream> <group>`: how many entries the group holds unacknowledged.
async fn pending_total(connection: &mut MultiplexedConnection) -> i64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .query_async(connection)
        .await
        .expect("XPENDING succeeds");
    match summary {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(count)) => *count,
            other => panic!("XPENDING's summary starts with {other:?}"),
        },
        other => panic!("XPENDING answered {other:?}"),
    }
}

/// `XPENDING <stream> <group> - + 100 <consumer>`: the entry ids `consumer` owns, with their
/// delivery counts.
async fn pending_of(connection: &mut MultiplexedConnection, consumer: &str) -> Vec<(String, i64)> {
    let rows: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(100)
        .arg(consumer)
        .query_async(connection)
        .await
        .expect("XPENDING succeeds");
    rows.into_iter()
        .map(|(id, _, _, count)| (id, count))
        .collect()
}

/// The dead-letter stream's entries, as field → value maps.
async fn dead_letters(connection: &mut MultiplexedConnection) -> Vec<HashMap<String, String>> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(DEAD_LETTERS)
        .arg("-")
        .arg("+")
        .query_async(connection)
        .await
        .expect("XRANGE succeeds");
    entries
        .into_iter()
        .map(|(_, fields)| fields.into_iter().collect())
        .collect()
}

/// Waits (up to [`PATIENCE`]) until `check` holds; fails with `what` and the last value seen.
async fn eventually<T: std::fmt::Debug, F, Fut>(
    what: &str,
    mut read: F,
    check: impl Fn(&T) -> bool,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen = read().await;
        if check(&seen) {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {PATIENCE:?} for {what}; last seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Handler runs per message id, and the delivery counts each saw.
#[derive(Default, Clone)]
struct Runs(Arc<Mutex<HashMap<String, Vec<u32>>>>);

impl Runs {
    fn hit(&self, message: &Message) {
        self.0
            .lock()
            .unwrap()
            .entry(message.id().to_owned())
            .or_default()
            .push(message.deliveries());
    }

    fn of(&self, id: &str) -> Vec<u32> {
        self.0.lock().unwrap().get(id).cloned().unwrap_or_default()
    }
}

/// A shutdown signal for `consumer`: once `settled` deliveries are settled.
async fn settled<S: idempotent_core::queue::Source>(consumer: &Consumer<S>, settled: u64) {
    eventually(
        &format!("{settled} settled deliveries"),
        || async { consumer.report() },
        |report| report.settled() >= settled,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_runs_the_handler_once_and_both_copies_are_acknowledged() {
    let server = RedisServer::start();
    let mut redis = connection(&server).await;
    let source = source(&server, "c-1", Duration::from_secs(30)).await;
    publish(&mut redis, "order-1", "a").await;
    publish(&mut redis, "order-1", "a").await; // the producer published again
    publish(&mut redis, "order-2", "b").await;

    let runs = Runs::default();
    let consumer = Consumer::new("billing::charge", source).with_engine(memory_engine());
    let handler = |message: Message| {
        let runs = runs.clone();
        async move {
            runs.hit(&message);
            Ok::<_, std::io::Error>(())
        }
    };
    let report = consumer
        .run(handler, settled(&consumer, 3))
        .await
        .expect("the run ends cleanly");

    assert_eq!((report.processed, report.duplicates), (2, 1), "{report:?}");
    assert_eq!(runs.of("order-1"), [1]);
    assert_eq!(runs.of("order-2"), [1]);
    assert_eq!(
        pending_total(&mut redis).await,
        0,
        "every copy is acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_stays_pending_while_its_handler_runs() {
    let server = RedisServer::start();
    let mut redis = connection(&server).await;
    let source = source(&server, "c-1", Duration::from_secs(30)).await;
    publish(&mut redis, "order-1", "a").await;

    let started = Arc::new(Notify::new());
    let finish = Arc::new(Notify::new());
    let consumer = Consumer::new("billing::charge", source).with_engine(memory_engine());
    let handler = |_message: Message| {
        let (started, finish) = (Arc::clone(&started), Arc::clone(&finish));
        async move {
            started.notify_one();
            finish.notified().await;
            Ok::<_, std::io::Error>(())
        }
    };
    let check = async {
        started.notified().await;
        let pending = pending_of(&mut redis.clone(), "c-1").await;
        assert_eq!(
            pending.len(),
            1,
            "the entry is pending while its handler runs: {pending:?}"
        );
        assert_eq!(consumer.report().processed, 0);
        finish.notify_one();
        settled(&consumer, 1).await;
    };
    let report = consumer
        .run(handler, check)
        .await
        .expect("the run ends cleanly");
    assert_eq!(report.processed, 1);
    assert_eq!(
        pending_total(&mut redis).await,
        0,
        "acknowledged once recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_is_redelivered_then_dead_lettered_and_acknowledged() {
    let server = RedisServer::start();
    let mut redis = connection(&server).await;
    let source = source(&server, "c-1", Duration::from_millis(400)).await;
    let entry_id = publish(&mut redis, "order-1", "{\"total\":1}").await;

    let runs = Runs::default();
    let consumer = Consumer::new("billing::charge", source)
        .with_engine(memory_engine())
        .max_deliveries(3)
        .retry_delay(Duration::from_millis(50));
    let handler = |message: Message| {
        let runs = runs.clone();
        async move {
            runs.hit(&message);
            Err::<(), _>(std::io::Error::other("card declined"))
        }
    };
    let report = consumer
        .run(handler, settled(&consumer, 3))
        .await
        .expect("the run ends cleanly");

    assert_eq!((report.retried, report.dead_lettered), (2, 1), "{report:?}");
    assert_eq!(runs.of("order-1"), [1, 2, 3], "the delivery count grows");
    let dead = dead_letters(&mut redis).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let dead = &dead[0];
    assert_eq!(dead["message-id"], "order-1");
    assert_eq!(dead["payload"], "{\"total\":1}");
    assert_eq!(dead["dead-letter-reason"], "handler-failed");
    assert!(
        dead["dead-letter-detail"].contains("card declined"),
        "{dead:?}"
    );
    assert_eq!(dead["deliveries"], "3");
    assert_eq!(dead["source-stream"], STREAM);
    assert_eq!(dead["source-id"], entry_id);
    assert_eq!(
        pending_total(&mut redis).await,
        0,
        "acknowledged in the source stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_without_a_message_id_is_dead_lettered() {
    let server = RedisServer::start();
    let mut redis = connection(&server).await;
    let source = source(&server, "c-1", Duration::from_secs(30)).await;
    let _: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg("payload")
        .arg("anonymous")
        .query_async(&mut redis)
        .await
        .expect("XADD succeeds");

    let consumer = Consumer::new("billing::charge", source).with_engine(memory_engine());
    let handler = |_: Message| async { Ok::<_, std::io::Error>(()) };
    let report = consumer
        .run(handler, settled(&consumer, 1))
        .await
        .expect("the run ends cleanly");

    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let dead = dead_letters(&mut redis).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["dead-letter-reason"], "no-message-id");
    assert_eq!(dead[0]["payload"], "anonymous");
    assert_eq!(pending_total(&mut redis).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumers_entry_is_taken_over_after_the_lease() {
    let server = RedisServer::start();
    let mut redis = connection(&server).await;
    let lease = Duration::from_millis(500);
    publish(&mut redis, "order-1", "a").await;
    let effects = Runs::default();

    // Consumer A takes the entry and dies in its handler, before the effect.
    let a = Consumer::new("billing::charge", source(&server, "a", lease).await)
        .with_engine(redis_engine(&server));
    let started = Notify::new();
    let handler_a = |_: Message| async {
        started.notify_one();
        std::future::pending::<Result<(), std::io::Error>>().await
    };
    tokio::select! {
        _ = a.run(handler_a, std::future::pending()) => panic!("A's run ended"),
        () = started.notified() => {}
    }
    // A's run is dropped here: nothing kept, released or acknowledged.
    let held = pending_of(&mut redis, "a").await;
    assert_eq!(held.len(), 1, "the dead consumer holds the entry: {held:?}");

    let b = Consumer::new("billing::charge", source(&server, "b", lease).await)
        .with_engine(redis_engine(&server));
    let handler_b = |message: Message| {
        let effects = effects.clone();
        async move {
            effects.hit(&message);
            Ok::<_, std::io::Error>(())
        }
    };
    let report = b
        .run(handler_b, settled(&b, 1))
        .await
        .expect("the run ends cleanly");

    assert_eq!(report.processed, 1, "{report:?}");
    assert_eq!(
        effects.of("order-1"),
        [2],
        "one effect, on the second delivery"
    );
    assert_eq!(pending_total(&mut redis).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_lease_keeps_its_entry() {
    let server = RedisServer::start();
    let mut redis = connection(&server).await;
    let lease = Duration::from_secs(1);
    publish(&mut redis, "order-1", "a").await;

    let runs = Runs::default();
    let engine = memory_engine();
    let a = Consumer::new("billing::charge", source(&server, "a", lease).await)
        .with_engine(engine.clone());
    let b = Consumer::new("billing::charge", source(&server, "b", lease).await).with_engine(engine);
    let handler = |message: Message| {
        let runs = runs.clone();
        async move {
            runs.hit(&message);
            // Three leases.
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, std::io::Error>(())
        }
    };
    let done = Notify::new();
    let (report_a, report_b) = tokio::join!(
        async {
            let report = a.run(handler, settled(&a, 1)).await;
            done.notify_one();
            report
        },
        async {
            // B starts once A has the entry, and runs until A is done.
            eventually(
                "A to take the entry",
                || async { a.report().received },
                |n| *n == 1,
            )
            .await;
            b.run(handler, done.notified()).await
        }
    );
    let (report_a, report_b) = (
        report_a.expect("A ends cleanly"),
        report_b.expect("B ends cleanly"),
    );

    assert_eq!(report_a.processed, 1, "{report_a:?}");
    assert_eq!(
        report_b.received, 0,
        "B never took the entry over: {report_b:?}"
    );
    assert_eq!(runs.of("order-1"), [1]);
    assert_eq!(pending_total(&mut redis).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_leaves_nothing_pending_and_others_take_the_rest_at_once() {
    let server = RedisServer::start();
    let mut redis = connection(&server).await;
    // A lease far longer than the test: only a release can hand the entries on in time.
    let lease = Duration::from_secs(300);
    for id in ["order-1", "order-2", "order-3"] {
        publish(&mut redis, id, "a").await;
    }
    let engine = memory_engine();

    let a = Consumer::new("billing::charge", source(&server, "a", lease).await)
        .with_engine(engine.clone())
        .drain_timeout(Duration::from_millis(200));
    let stuck = |_: Message| std::future::pending::<Result<(), std::io::Error>>();
    let report_a = a
        .run(stuck, async {
            eventually(
                "A to take the entries",
                || async { a.report().received },
                |n| *n == 3,
            )
            .await;
        })
        .await
        .expect("A ends cleanly");
    assert_eq!(report_a.released, 3, "{report_a:?}");
    let held = pending_of(&mut redis, "a").await;
    assert!(
        held.is_empty(),
        "the stopped consumer owns nothing: {held:?}"
    );
    assert_eq!(pending_of(&mut redis, PARKED_CONSUMER).await.len(), 3);

    let runs = Runs::default();
    let b = Consumer::new("billing::charge", source(&server, "b", lease).await).with_engine(engine);
    let handler = |message: Message| {
        let runs = runs.clone();
        async move {
            runs.hit(&message);
            Ok::<_, std::io::Error>(())
        }
    };
    let report_b = b
        .run(handler, settled(&b, 3))
        .await
        .expect("B ends cleanly");
    assert_eq!(report_b.processed, 3, "{report_b:?}");
    for id in ["order-1", "order-2", "order-3"] {
        assert_eq!(
            runs.of(id),
            [2],
            "{id}: taken over at once, its second delivery"
        );
    }
    assert_eq!(pending_total(&mut redis).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_creates_the_group_once_and_refuses_what_is_not_a_stream() {
    let server = RedisServer::start();
    let mut redis = connection(&server).await;
    source(&server, "c-1", Duration::from_secs(30)).await;
    // The group exists now (BUSYGROUP is not an error).
    source(&server, "c-2", Duration::from_secs(30)).await;
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(STREAM)
        .query_async(&mut redis)
        .await
        .expect("XINFO succeeds");
    assert_eq!(groups.len(), 1);

    let _: () = redis::cmd("SET")
        .arg("not-a-stream")
        .arg("x")
        .query_async(&mut redis)
        .await
        .expect("SET succeeds");
    let error = RedisStreamsSource::builder(server.url(), "not-a-stream", GROUP)
        .build()
        .await
        .expect_err("a string key is not a stream");
    assert_eq!(error.kind(), SourceErrorKind::Refused, "{error}");
    assert!(error.to_string().contains("name another key"), "{error}");
}

#[tokio::test]
async fn errors_never_show_the_password() {
    let error = RedisStreamsSource::builder("redis://user:sekret@127.0.0.1:1/", STREAM, GROUP)
        .build()
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(error.kind(), SourceErrorKind::Unavailable, "{error}");
    assert!(!error.to_string().contains("sekret"), "{error}");
    assert!(error.to_string().contains("user:***@"), "{error}");

    let error =
        RedisStreamsSource::builder("redis://user:sekret@127.0.0.1:notaport/", STREAM, GROUP)
            .build()
            .await
            .expect_err("a malformed URL");
    assert_eq!(error.kind(), SourceErrorKind::Refused, "{error}");
    assert!(!error.to_string().contains("sekret"), "{error}");
}
