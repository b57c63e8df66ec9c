//! The consumer's rules, on the in-process source (`queue::channel`) and the memory store:
//! one handler run per message id, the acknowledgement after the record, failed messages given
//! back and dead-lettered, deliveries kept while handlers run, and a shutdown that drains and
//! releases.
#![cfg(feature = "queue")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_core::conformance::{Completing, Forwarding, Hooks};
use idempotent_core::queue::{
    self, ChannelSource, Consumer, DeadLetterReason, Delivery, Message, Source, SourceError,
};
use idempotent_core::{
    BoxFuture, FencedWrite, Idempotency, MemoryStore, OnConflict, Options, StoreError,
};
use tokio::sync::Notify;

const BOUND: Duration = Duration::from_secs(30);

fn engine(options: Options) -> Idempotency {
    Idempotency::new(Arc::new(MemoryStore::new())).with_options(options)
}

/// Runs per message id.
#[derive(Debug, Default, Clone)]
struct Runs(Arc<Mutex<HashMap<String, u32>>>);

impl Runs {
    fn add(&self, id: &str) {
        *self.0.lock().unwrap().entry(id.to_owned()).or_default() += 1;
    }
    fn of(&self, id: &str) -> u32 {
        self.0.lock().unwrap().get(id).copied().unwrap_or(0)
    }
    fn all(&self) -> HashMap<String, u32> {
        self.0.lock().unwrap().clone()
    }
}

/// Runs `consumer` with `handler` until the source is settled, within the bound.
async fn drain<S: Source, H, Fut, E>(
    consumer: &Consumer<S>,
    source: &ChannelSource,
    handler: H,
) -> queue::Report
where
    H: Fn(Message) -> Fut + Sync,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    tokio::time::timeout(BOUND, consumer.run(handler, source.settled()))
        .await
        .expect("the consumer settled every message within 30 s")
        .expect("the channel source never fails")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_id_runs_once_and_every_copy_is_acknowledged() {
    let (publisher, source) = queue::channel(Duration::from_secs(30));
    for n in 0..100 {
        publisher.publish(format!("order-{n}"), format!("{{\"n\":{n}}}"));
        if n % 5 == 0 {
            publisher.publish(format!("order-{n}"), format!("{{\"n\":{n}}}"));
        }
    }
    let runs = Runs::default();
    let consumer = Consumer::new("orders::place", source.clone())
        .with_engine(engine(Options::new()))
        .concurrency(8);
    let report = drain(&consumer, &source, |message: Message| {
        let runs = runs.clone();
        async move {
            tokio::task::yield_now().await;
            runs.add(message.id());
            Ok::<_, std::io::Error>(())
        }
    })
    .await;

    let all = runs.all();
    assert_eq!(all.len(), 100, "every id ran: {all:?}");
    assert!(all.values().all(|&n| n == 1), "no id ran twice: {all:?}");
    assert_eq!(
        (report.received, report.processed, report.duplicates),
        (120, 100, 20)
    );
    assert!(source.is_settled() && source.dead_letters().is_empty());
}

/// The order of what the store and the source were asked, for one message.
#[derive(Debug, Default, Clone)]
struct Events(Arc<Mutex<Vec<&'static str>>>);

impl Events {
    fn push(&self, event: &'static str) {
        self.0.lock().unwrap().push(event);
    }
    fn all(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Debug)]
struct LogCompletes {
    events: Events,
    fail: bool,
}

impl Hooks for LogCompletes {
    fn complete<'a>(
        &'a self,
        op: Completing<'a>,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            if self.fail {
                self.events.push("complete refused");
                return Err(StoreError::Unavailable {
                    message: "the test refuses every complete".into(),
                    source: None,
                });
            }
            let written = op.send().await;
            self.events.push("recorded");
            written
        })
    }
}

/// A source that logs its settlements and otherwise is the channel.
#[derive(Debug, Clone)]
struct Logged {
    inner: ChannelSource,
    events: Events,
    receive_failures: Arc<Mutex<Vec<SourceError>>>,
}

impl Logged {
    fn new(inner: ChannelSource, events: Events) -> Self {
        Self {
            inner,
            events,
            receive_failures: Arc::default(),
        }
    }
}

impl Source for Logged {
    type Receipt = u64;
    async fn receive(&self, max: usize) -> Result<Vec<Delivery<u64>>, SourceError> {
        if let Some(error) = self.receive_failures.lock().unwrap().pop() {
            self.events.push("receive failed");
            return Err(error);
        }
        self.inner.receive(max).await
    }
    async fn ack(&self, delivery: &Delivery<u64>) -> Result<(), SourceError> {
        self.events.push("ack");
        self.inner.ack(delivery).await
    }
    async fn retry(&self, delivery: &Delivery<u64>, delay: Duration) -> Result<(), SourceError> {
        self.events.push("retry");
        self.inner.retry(delivery, delay).await
    }
    async fn dead_letter(
        &self,
        delivery: &Delivery<u64>,
        reason: &DeadLetterReason,
    ) -> Result<(), SourceError> {
        self.events.push("dead-letter");
        self.inner.dead_letter(delivery, reason).await
    }
    fn lease(&self) -> Duration {
        self.inner.lease()
    }
    async fn keep(&self, delivery: &Delivery<u64>) -> Result<(), SourceError> {
        self.events.push("keep");
        self.inner.keep(delivery).await
    }
    async fn release(&self, delivery: &Delivery<u64>) -> Result<(), SourceError> {
        self.events.push("release");
        self.inner.release(delivery).await
    }
}

#[tokio::test]
async fn the_acknowledgement_follows_the_record() {
    let events = Events::default();
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let store = Forwarding::new(
        Arc::new(MemoryStore::new()),
        LogCompletes {
            events: events.clone(),
            fail: false,
        },
    );
    let consumer = Consumer::new(
        "orders::place",
        Logged::new(channel.clone(), events.clone()),
    )
    .with_engine(Idempotency::new(Arc::new(store)));
    let handler_events = events.clone();
    let report = drain(&consumer, &channel, move |_message: Message| {
        let events = handler_events.clone();
        async move {
            events.push("handler");
            Ok::<_, std::io::Error>(())
        }
    })
    .await;
    assert_eq!(events.all(), ["handler", "recorded", "ack"]);
    assert_eq!(report.processed, 1);
}

#[tokio::test]
async fn a_handler_that_ran_but_could_not_be_recorded_is_acknowledged_once() {
    let events = Events::default();
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let store = Forwarding::new(
        Arc::new(MemoryStore::new()),
        LogCompletes {
            events: events.clone(),
            fail: true,
        },
    );
    // The engine retries a refused complete for half a lease.
    let engine = Idempotency::new(Arc::new(store))
        .with_options(Options::new().with_lease(Duration::from_millis(200)));
    let consumer = Consumer::new(
        "orders::place",
        Logged::new(channel.clone(), events.clone()),
    )
    .with_engine(engine);
    let runs = Runs::default();
    let report = drain(&consumer, &channel, |message: Message| {
        let runs = runs.clone();
        async move {
            runs.add(message.id());
            Ok::<_, std::io::Error>(())
        }
    })
    .await;
    let all = events.all();
    assert_eq!(all.last(), Some(&"ack"), "{all:?}");
    assert!(
        !all.contains(&"retry"),
        "a redelivery would run the handler again: {all:?}"
    );
    assert_eq!(runs.of("order-1"), 1);
    assert_eq!((report.processed, report.unrecorded), (1, 1));
}

#[tokio::test]
async fn a_failing_handler_is_never_acknowledged_and_is_dead_lettered_on_the_last_delivery() {
    let events = Events::default();
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let consumer = Consumer::new(
        "orders::place",
        Logged::new(channel.clone(), events.clone()),
    )
    .with_engine(engine(Options::new()))
    .max_deliveries(3)
    .retry_delay(Duration::from_millis(10));
    let runs = Runs::default();
    let report = drain(&consumer, &channel, |message: Message| {
        let runs = runs.clone();
        async move {
            runs.add(message.id());
            Err::<(), _>(format!("declined on delivery {}", message.deliveries()))
        }
    })
    .await;
    assert_eq!(
        runs.of("order-1"),
        3,
        "the handler ran on each delivery allowed"
    );
    assert_eq!(events.all(), ["retry", "retry", "dead-letter"]);
    let dead = channel.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id.as_deref(), Some("order-1"));
    assert_eq!(
        dead[0].reason,
        DeadLetterReason::HandlerFailed {
            deliveries: 3,
            error: "declined on delivery 3".into()
        }
    );
    assert_eq!(
        (report.retried, report.dead_lettered, report.processed),
        (2, 1, 0)
    );
}

#[tokio::test]
async fn a_handler_that_fails_then_succeeds_is_processed() {
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let consumer = Consumer::new("orders::place", channel.clone())
        .with_engine(engine(Options::new()))
        .max_deliveries(3)
        .retry_delay(Duration::from_millis(10));
    let runs = Runs::default();
    let report = drain(&consumer, &channel, |message: Message| {
        let runs = runs.clone();
        async move {
            runs.add(message.id());
            if message.deliveries() < 3 {
                return Err("not yet");
            }
            Ok(())
        }
    })
    .await;
    assert_eq!(runs.of("order-1"), 3);
    assert_eq!(
        (report.retried, report.processed, report.dead_lettered),
        (2, 1, 0)
    );
    assert!(channel.dead_letters().is_empty());
}

#[tokio::test]
async fn a_message_without_an_id_or_with_a_reused_one_is_dead_lettered_without_running() {
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish_without_id("anonymous");
    publisher.publish("order-1", "first payload");
    let consumer =
        Consumer::new("orders::place", channel.clone()).with_engine(engine(Options::new()));
    let runs = Runs::default();
    let handler = |message: Message| {
        let runs = runs.clone();
        async move {
            runs.add(message.id());
            Ok::<_, std::io::Error>(())
        }
    };
    drain(&consumer, &channel, handler).await;
    publisher.publish("order-1", "another payload under the same id");
    publisher.publish("", "an empty id");
    let report = drain(&consumer, &channel, handler).await;

    assert_eq!(runs.all(), HashMap::from([("order-1".to_owned(), 1)]));
    let reasons: Vec<_> = channel
        .dead_letters()
        .into_iter()
        .map(|dead| dead.reason.code())
        .collect();
    assert_eq!(reasons, ["no-message-id", "id-reused", "invalid-id"]);
    assert_eq!(report.dead_lettered, 3);
}

/// Receives `times` deliveries of everything ready and settles none, as consumers that die.
async fn die_holding(channel: &ChannelSource, times: u32) {
    for _ in 0..times {
        let taken = tokio::time::timeout(BOUND, async {
            loop {
                let deliveries = channel.receive(100).await.unwrap();
                if !deliveries.is_empty() {
                    break deliveries;
                }
            }
        })
        .await
        .expect("the message was delivered again within 30 s");
        assert!(!taken.is_empty());
    }
}

#[tokio::test]
async fn a_message_whose_consumers_keep_dying_is_dead_lettered_without_running_again() {
    let (publisher, channel) = queue::channel(Duration::from_millis(300));
    publisher.publish("order-1", "a");
    die_holding(&channel, 3).await;
    let consumer = Consumer::new("orders::place", channel.clone())
        .with_engine(engine(Options::new()))
        .max_deliveries(3);
    let runs = Runs::default();
    let report = drain(&consumer, &channel, |message: Message| {
        let runs = runs.clone();
        async move {
            runs.add(message.id());
            Ok::<_, std::io::Error>(())
        }
    })
    .await;
    assert_eq!(runs.of("order-1"), 0);
    assert_eq!(
        channel.dead_letters()[0].reason,
        DeadLetterReason::TooManyDeliveries { deliveries: 4 }
    );
    assert_eq!(report.dead_lettered, 1);
}

#[tokio::test]
async fn a_recorded_message_past_the_limit_is_a_duplicate_not_a_dead_letter() {
    let (publisher, channel) = queue::channel(Duration::from_millis(300));
    let consumer = Consumer::new("orders::place", channel.clone())
        .with_engine(engine(Options::new()))
        .max_deliveries(2);
    let handler = |_message: Message| async { Ok::<_, std::io::Error>(()) };
    publisher.publish("order-1", "a");
    drain(&consumer, &channel, handler).await;
    // The acknowledgement of a second copy was lost twice (its consumers died after the
    // record): its third delivery is past the limit, and the record answers it.
    publisher.publish("order-1", "a");
    die_holding(&channel, 2).await;
    let report = drain(&consumer, &channel, handler).await;
    assert_eq!(
        (report.processed, report.duplicates, report.dead_lettered),
        (1, 1, 0)
    );
    assert!(channel.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_arriving_while_another_consumer_runs_the_handler_waits_and_is_a_duplicate() {
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    let store = Arc::new(MemoryStore::new());
    let first = Consumer::new("orders::place", channel.clone())
        .with_engine(Idempotency::new(store.clone()))
        .concurrency(1);
    let second = Consumer::new("orders::place", channel.clone())
        .with_engine(Idempotency::new(store))
        .concurrency(1);
    publisher.publish("order-1", "a");
    publisher.publish("order-1", "a");
    let runs = Runs::default();
    let handler = |message: Message| {
        let runs = runs.clone();
        async move {
            runs.add(message.id());
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::io::Error>(())
        }
    };
    let (a, b) = tokio::time::timeout(
        BOUND,
        futures_join(
            first.run(handler, channel.settled()),
            second.run(handler, channel.settled()),
        ),
    )
    .await
    .expect("both consumers stopped within 30 s");
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(runs.of("order-1"), 1);
    assert_eq!(a.received + b.received, 2, "each consumer took one copy");
    assert_eq!(
        (a.processed + b.processed, a.duplicates + b.duplicates),
        (1, 1)
    );
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_lease_keeps_its_delivery() {
    let events = Events::default();
    // A second of lease, kept every third of it: only a stall of over 600 ms would let it run
    // out while the handler (three leases long) runs.
    let (publisher, channel) = queue::channel(Duration::from_secs(1));
    publisher.publish("order-1", "a");
    let store = Arc::new(MemoryStore::new());
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            Consumer::new(
                "orders::place",
                Logged::new(channel.clone(), events.clone()),
            )
            .with_engine(Idempotency::new(store.clone()))
        })
        .collect();
    let runs = Runs::default();
    let handler = |message: Message| {
        let runs = runs.clone();
        async move {
            runs.add(message.id());
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, std::io::Error>(())
        }
    };
    let (a, b) = tokio::time::timeout(
        BOUND,
        futures_join(
            consumers[0].run(handler, channel.settled()),
            consumers[1].run(handler, channel.settled()),
        ),
    )
    .await
    .expect("both consumers stopped within 30 s");
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.received + b.received,
        1,
        "never delivered again while its handler ran"
    );
    assert!(
        events.all().iter().filter(|e| **e == "keep").count() >= 3,
        "{:?}",
        events.all()
    );
    assert_eq!(runs.of("order-1"), 1);
}

#[tokio::test]
async fn a_shutdown_lets_the_handlers_at_work_finish() {
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let consumer =
        Consumer::new("orders::place", channel.clone()).with_engine(engine(Options::new()));
    let started = Arc::new(Notify::new());
    let finish = Arc::new(Notify::new());
    let handler = |_message: Message| {
        let (started, finish) = (started.clone(), finish.clone());
        async move {
            started.notify_one();
            finish.notified().await;
            Ok::<_, std::io::Error>(())
        }
    };
    let shutdown = {
        let (started, finish) = (started.clone(), finish.clone());
        async move {
            started.notified().await;
            // The shutdown comes while the handler is at work; it is let finish after.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                finish.notify_one();
            });
        }
    };
    let report = tokio::time::timeout(BOUND, consumer.run(handler, shutdown))
        .await
        .expect("the consumer stopped within 30 s")
        .unwrap();
    assert_eq!((report.processed, report.released), (1, 0));
    assert!(channel.is_settled(), "nothing left pending");
}

#[tokio::test]
async fn a_shutdown_past_its_drain_timeout_releases_the_delivery_and_the_claim() {
    let events = Events::default();
    let (publisher, channel) = queue::channel(Duration::from_secs(60));
    publisher.publish("order-1", "a");
    let store = Arc::new(MemoryStore::new());
    let reject = Options::new()
        .with_lease(Duration::from_secs(60))
        .with_on_conflict(OnConflict::Reject);
    let stuck = Consumer::new(
        "orders::place",
        Logged::new(channel.clone(), events.clone()),
    )
    .with_engine(Idempotency::new(store.clone()).with_options(reject))
    .drain_timeout(Duration::from_millis(50));
    let started = Arc::new(Notify::new());
    let shutdown = {
        let started = started.clone();
        async move { started.notified().await }
    };
    let report = tokio::time::timeout(
        BOUND,
        stuck.run(
            |_message: Message| {
                let started = started.clone();
                async move {
                    started.notify_one();
                    std::future::pending::<Result<(), std::io::Error>>().await
                }
            },
            shutdown,
        ),
    )
    .await
    .expect("the drain timeout stopped the handler")
    .unwrap();
    // A receive under way when the shutdown came may take the released delivery again, and
    // releases it in turn.
    assert_eq!(report.processed, 0);
    assert!(report.released >= 1, "{report:?}");
    assert_eq!(events.all().last(), Some(&"release"));
    assert_eq!(channel.ready(), 1, "released for another consumer at once");

    // The claim went with it: another consumer runs the handler now, not after the lease.
    tokio::task::yield_now().await;
    let runs = Runs::default();
    let next = Consumer::new("orders::place", channel.clone())
        .with_engine(Idempotency::new(store).with_options(reject));
    let report = drain(&next, &channel, |message: Message| {
        let runs = runs.clone();
        async move {
            runs.add(message.id());
            Ok::<_, std::io::Error>(())
        }
    })
    .await;
    assert_eq!((runs.of("order-1"), report.processed), (1, 1));
}

#[tokio::test]
async fn receive_failures_are_retried_and_a_refusal_stops_the_consumer() {
    let events = Events::default();
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let source = Logged::new(channel.clone(), events.clone());
    source.receive_failures.lock().unwrap().extend([
        SourceError::unavailable(
            "the broker did not answer",
            std::io::Error::other("timeout"),
        ),
        SourceError::unavailable(
            "the broker did not answer",
            std::io::Error::other("timeout"),
        ),
    ]);
    let consumer =
        Consumer::new("orders::place", source.clone()).with_engine(engine(Options::new()));
    let handler = |_message: Message| async { Ok::<_, std::io::Error>(()) };
    let report = drain(&consumer, &channel, handler).await;
    assert_eq!(report.processed, 1);
    assert_eq!(
        events
            .all()
            .iter()
            .filter(|e| **e == "receive failed")
            .count(),
        2
    );

    source
        .receive_failures
        .lock()
        .unwrap()
        .push(SourceError::refused(
            "no stream named orders: create it first",
        ));
    let stopped = tokio::time::timeout(BOUND, consumer.run(handler, std::future::pending()))
        .await
        .expect("a refusal stops the consumer");
    let error = stopped.expect_err("the refusal is returned");
    assert!(error.to_string().contains("create it first"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_receives_do_not_starve_the_handlers_at_work() {
    let events = Events::default();
    // The lease is kept every 200 ms; the receives fail while the handler runs, and their
    // backoff grows past the lease.
    let (publisher, channel) = queue::channel(Duration::from_millis(600));
    publisher.publish("order-1", "a");
    let flaky = Logged::new(channel.clone(), events.clone());
    let failures = flaky.receive_failures.clone();
    let store = Arc::new(MemoryStore::new());
    let first = Consumer::new("orders::place", flaky).with_engine(Idempotency::new(store.clone()));
    let second =
        Consumer::new("orders::place", channel.clone()).with_engine(Idempotency::new(store));
    let started = Arc::new(Notify::new());
    let handler = |_message: Message| {
        let (failures, started) = (failures.clone(), started.clone());
        async move {
            failures.lock().unwrap().extend((0..8).map(|_| {
                SourceError::unavailable(
                    "the broker did not answer",
                    std::io::Error::other("timeout"),
                )
            }));
            started.notify_one();
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, std::io::Error>(())
        }
    };
    let second_run = async {
        started.notified().await;
        second.run(handler, channel.settled()).await
    };
    let (a, b) = tokio::time::timeout(
        BOUND,
        futures_join(first.run(handler, channel.settled()), second_run),
    )
    .await
    .expect("both consumers stopped within 30 s");
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        events.all().contains(&"receive failed"),
        "{:?}",
        events.all()
    );
    assert_eq!(
        (a.received, b.received),
        (1, 0),
        "the delivery stayed the first consumer's while its receives failed"
    );
    assert_eq!(a.processed, 1);
}

#[tokio::test]
async fn a_consumer_runs_on_a_task_of_its_own() {
    let (publisher, channel) = queue::channel(Duration::from_secs(30));
    publisher.publish("order-1", "a");
    let consumer =
        Consumer::new("orders::place", channel.clone()).with_engine(engine(Options::new()));
    let settled = channel.settled();
    let counted = Arc::new(AtomicU32::new(0));
    let handler = {
        let counted = counted.clone();
        move |_message: Message| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            }
        }
    };
    let task = tokio::spawn(async move { consumer.run(handler, settled).await });
    let report = tokio::time::timeout(BOUND, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((report.processed, counted.load(Ordering::SeqCst)), (1, 1));
}
