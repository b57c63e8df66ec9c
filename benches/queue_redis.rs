//! Messages per second through a queue `Consumer` on the Redis Streams source, against the bare
//! loop a hand-written consumer runs on the same stream of the same server: `XREADGROUP COUNT
//! n` and one `XACK` per entry.
//!
//! Cases (group `queue_redis`), each iteration consuming `MESSAGES` entries published
//! beforehand (untimed) with distinct message ids, and timed until the last one is settled:
//!
//! - `consume/bare`: the floor. `XREADGROUP GROUP g c COUNT 16 STREAMS s >` without `BLOCK`,
//!   then one `XACK` of the batch's ids, on one multiplexed connection: two round trips per 16
//!   messages, the least a hand-written consumer can do;
//! - `consume/memory_store`: a `Consumer` (concurrency 16, a handler that does nothing) on a
//!   `MemoryStore`: the source's own round trips and the consumer's work;
//! - `consume/redis_store`: the same on a `RedisStore` on the same server: plus the record's
//!   claim and completion (two `EVALSHA`s per message).
//!
//! The bench starts its own `redis-server` (idempotent-test-support).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idempotent_core::queue::redis_streams::RedisStreamsSource;
use idempotent_core::queue::{Consumer, Message};
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{Idempotency, MemoryStore};
use redis::aio::MultiplexedConnection;

/// Messages per iteration.
const MESSAGES: u64 = 2_000;
/// Entries per read, and handlers at work at once.
const BATCH: usize = 16;
const STREAM: &str = "bench:orders";
const GROUP: &str = "bench";

/// Publishes `MESSAGES` entries with ids unique to this iteration (one pipeline, untimed).
async fn publish(connection: &mut MultiplexedConnection, round: u64) {
    let mut pipe = redis::pipe();
    for i in 0..MESSAGES {
        pipe.cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("message-id")
            .arg(format!("r{round}-m{i}"))
            .arg("payload")
            .arg(r#"{"order_id":"order-1001","sku":"pen","quantity":2,"amount_cents":4200}"#)
            .ignore();
    }
    let () = pipe.query_async(connection).await.expect("XADD succeeds");
}

/// Drops the settled entries (untimed), so the stream does not grow over the run.
async fn trim(connection: &mut MultiplexedConnection) {
    let _: i64 = redis::cmd("XTRIM")
        .arg(STREAM)
        .arg("MAXLEN")
        .arg(0)
        .query_async(connection)
        .await
        .expect("XTRIM succeeds");
}

/// The bare loop: read a batch, acknowledge each entry, until `MESSAGES` are acknowledged.
async fn bare(connection: &MultiplexedConnection) {
    let mut acknowledged = 0;
    while acknowledged < MESSAGES {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("bare")
            .arg("COUNT")
            .arg(BATCH)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query_async(&mut connection.clone())
            .await
            .expect("XREADGROUP succeeds");
        let ids: Vec<String> = reply
            .keys
            .into_iter()
            .flat_map(|key| key.ids)
            .map(|entry| entry.id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        let acked: u64 = redis::cmd("XACK")
            .arg(STREAM)
            .arg(GROUP)
            .arg(&ids)
            .query_async(&mut connection.clone())
            .await
            .expect("XACK succeeds");
        acknowledged += acked;
    }
}

/// One iteration through a `Consumer` on `source` and `engine`: the time until `MESSAGES`
/// deliveries are settled (the shutdown after that is not timed).
async fn through_consumer(source: RedisStreamsSource, engine: Idempotency) -> Duration {
    let consumer = Consumer::new("bench::consume", source)
        .with_engine(engine)
        .concurrency(BATCH);
    let handled = AtomicU64::new(0);
    let handler = |_: Message| {
        handled.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, std::io::Error>(()) }
    };
    let started = Instant::now();
    let mut elapsed = Duration::ZERO;
    let shutdown = async {
        while consumer.report().settled() < MESSAGES {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        elapsed = started.elapsed();
    };
    let report = consumer
        .run(handler, shutdown)
        .await
        .expect("the run ends cleanly");
    assert_eq!(report.processed, MESSAGES, "{report:?}");
    assert_eq!(handled.load(Ordering::Relaxed), MESSAGES);
    elapsed
}

fn bench(c: &mut Criterion) {
    let runtime = common::runtime();
    let server = idempotent_test_support::RedisServer::start();
    let url = server.url();
    let connection = runtime.block_on(async {
        redis::Client::open(url.as_str())
            .expect("a valid Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis")
    });
    let source = |consumer: &'static str| {
        let url = url.clone();
        async move {
            RedisStreamsSource::builder(url, STREAM, GROUP)
                .consumer(consumer)
                .poll_interval(Duration::from_millis(5))
                .build()
                .await
                .expect("the source builds")
        }
    };
    let redis_store = Arc::new({
        let _entered = runtime.enter();
        RedisStore::builder(url.as_str())
            .build()
            .expect("a valid Redis URL")
    });
    // The group, created once.
    runtime.block_on(source("setup"));

    let round = AtomicU64::new(0);
    let mut group = c.benchmark_group("queue_redis");
    group
        .throughput(Throughput::Elements(MESSAGES))
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));

    group.bench_function("consume/bare", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let mut setup = connection.clone();
                    publish(&mut setup, round.fetch_add(1, Ordering::Relaxed)).await;
                    let started = Instant::now();
                    bare(&connection).await;
                    total += started.elapsed();
                    trim(&mut setup).await;
                }
                total
            })
        });
    });
    for (case, store) in [("memory_store", None), ("redis_store", Some(&redis_store))] {
        group.bench_function(format!("consume/{case}"), |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        let mut setup = connection.clone();
                        publish(&mut setup, round.fetch_add(1, Ordering::Relaxed)).await;
                        let engine = match store {
                            Some(store) => Idempotency::new(Arc::clone(store) as _),
                            None => Idempotency::new(Arc::new(MemoryStore::new())),
                        };
                        total += through_consumer(source("consumer").await, engine).await;
                        trim(&mut setup).await;
                    }
                    total
                })
            });
        });
    }
    group.finish();
    drop(runtime);
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
