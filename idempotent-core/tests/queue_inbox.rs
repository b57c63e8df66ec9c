//! The transactional inbox on PostgreSQL (sqlx): the handler's writes and the id's record
//! commit together, and the acknowledgement follows the commit. The broker here is the
//! in-process channel; `tests/queue_fleet.rs` (root package) runs it across processes on real
//! brokers, with consumers killed mid-handler.
#![cfg(all(feature = "queue", feature = "sqlx-postgres"))]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotent_core::queue::{self, ChannelSource, Consumer, DeadLetterReason, Message};
use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
use idempotent_core::{Idempotency, MemoryStore};
use idempotent_test_support::shared_postgres;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;

const BOUND: Duration = Duration::from_secs(30);

async fn fresh(prefix: &str) -> (SqlxPgStore, sqlx::PgPool) {
    let url = shared_postgres().create_unique_database(prefix);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .expect("connect the pool");
    sqlx::query("CREATE TABLE effects (message_id text NOT NULL, delivery int NOT NULL)")
        .execute(&pool)
        .await
        .expect("create the effects table");
    let store = SqlxPgStore::builder(pool.clone())
        .build()
        .await
        .expect("create the tables");
    (store, pool)
}

/// The handler's effect: one row per run, in the inbox transaction.
async fn apply(tx: &mut Transaction<'_, Postgres>, message: &Message) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO effects (message_id, delivery) VALUES ($1, $2)")
        .bind(message.id())
        .bind(i32::try_from(message.deliveries()).unwrap_or(i32::MAX))
        .execute(&mut **tx)
        .await
        .map(|_| ())
}

async fn effects(pool: &sqlx::PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT message_id, count(*) FROM effects GROUP BY message_id",
    )
    .fetch_all(pool)
    .await
    .expect("read the effects")
    .into_iter()
    .collect()
}

fn consumer(channel: &ChannelSource) -> Consumer<ChannelSource> {
    // The engine's store is not used by the inbox (the records are in the transaction); a
    // memory store shows it.
    Consumer::new("orders::place", channel.clone())
        .with_engine(Idempotency::new(Arc::new(MemoryStore::new())))
        .retry_delay(Duration::from_millis(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_effects_happen_once_per_id_across_consumers() {
    let (store, pool) = fresh("inbox_once").await;
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    for n in 0..200 {
        publisher.publish(format!("order-{n}"), format!("{{\"n\":{n}}}"));
        if n % 10 == 0 {
            publisher.publish(format!("order-{n}"), format!("{{\"n\":{n}}}"));
        }
    }
    let consumers = [
        consumer(&channel).concurrency(4),
        consumer(&channel).concurrency(4),
    ];
    let run = |consumer: &'static Consumer<ChannelSource>, store: &'static SqlxPgStore| {
        consumer.run_in_transactions(store, apply, channel.settled())
    };
    let consumers: &'static [Consumer<ChannelSource>; 2] = Box::leak(Box::new(consumers));
    let store: &'static SqlxPgStore = Box::leak(Box::new(store));
    let (a, b) = tokio::time::timeout(BOUND, async {
        tokio::join!(run(&consumers[0], store), run(&consumers[1], store))
    })
    .await
    .expect("the consumers settled every message within 30 s");
    let (a, b) = (a.unwrap(), b.unwrap());

    let effects = effects(&pool).await;
    assert_eq!(effects.len(), 200, "every message's effect is there");
    assert!(effects.values().all(|&n| n == 1), "none twice: {effects:?}");
    assert_eq!(a.processed + b.processed, 200);
    assert_eq!(a.duplicates + b.duplicates, 20);
    assert!(channel.is_settled());
}

#[tokio::test]
async fn a_failed_handler_leaves_no_effect_and_its_retry_leaves_one() {
    let (store, pool) = fresh("inbox_rollback").await;
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let attempts = AtomicU32::new(0);
    let report = tokio::time::timeout(
        BOUND,
        consumer(&channel).max_deliveries(3).run_in_transactions(
            &store,
            async |tx: &mut Transaction<'_, Postgres>, message: &Message| {
                apply(tx, message).await.map_err(|e| e.to_string())?;
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err("failed after its write".to_owned());
                }
                Ok(())
            },
            channel.settled(),
        ),
    )
    .await
    .expect("settled within 30 s")
    .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    let rows: Vec<(String, i32)> = sqlx::query_as("SELECT message_id, delivery FROM effects")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows,
        [("order-1".to_owned(), 2)],
        "only the second delivery's write committed"
    );
    assert_eq!((report.retried, report.processed), (1, 1));
}

#[tokio::test]
async fn a_consumer_stopped_before_its_commit_leaves_nothing_and_the_next_one_applies_it() {
    let (store, pool) = fresh("inbox_stopped").await;
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let written = Arc::new(Notify::new());
    let stopped = consumer(&channel).drain_timeout(Duration::from_millis(50));
    let shutdown = {
        let written = written.clone();
        async move { written.notified().await }
    };
    let report = tokio::time::timeout(
        BOUND,
        stopped.run_in_transactions(
            &store,
            async |tx: &mut Transaction<'_, Postgres>, message: &Message| {
                apply(tx, message).await?;
                written.notify_one();
                std::future::pending::<()>().await;
                Ok::<_, sqlx::Error>(())
            },
            shutdown,
        ),
    )
    .await
    .expect("stopped within 30 s")
    .unwrap();
    assert!(report.released >= 1 && report.processed == 0, "{report:?}");
    assert!(
        effects(&pool).await.is_empty(),
        "the write was rolled back with the transaction"
    );

    let report = tokio::time::timeout(
        BOUND,
        consumer(&channel).run_in_transactions(&store, apply, channel.settled()),
    )
    .await
    .expect("settled within 30 s")
    .unwrap();
    assert_eq!(report.processed, 1);
    assert_eq!(
        effects(&pool).await,
        HashMap::from([("order-1".to_owned(), 1)])
    );
}

#[tokio::test]
async fn a_handler_failing_on_every_delivery_is_dead_lettered_with_nothing_written() {
    let (store, pool) = fresh("inbox_dead").await;
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let report = tokio::time::timeout(
        BOUND,
        consumer(&channel).max_deliveries(2).run_in_transactions(
            &store,
            async |tx: &mut Transaction<'_, Postgres>, message: &Message| {
                apply(tx, message).await.map_err(|e| e.to_string())?;
                Err::<(), _>("always".to_owned())
            },
            channel.settled(),
        ),
    )
    .await
    .expect("settled within 30 s")
    .unwrap();
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(
        channel.dead_letters()[0].reason,
        DeadLetterReason::HandlerFailed {
            deliveries: 2,
            error: "always".into()
        }
    );
    assert!(effects(&pool).await.is_empty());
}
