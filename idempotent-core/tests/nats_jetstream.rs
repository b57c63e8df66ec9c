//! The JetStream source against a real `nats-server` (one per test, JetStream on, a free
//! port): publish-side deduplication, consumer-side idempotency beyond the duplicate window,
//! redelivery and dead letters, a consumer that dies, a slow handler kept past AckWait, and a
//! graceful shutdown that leaves nothing ack-pending.

#![cfg(feature = "nats")]

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context, stream};
use idempotent_core::queue::nats::{JetStreamPublisher, JetStreamSource, dead_letter_headers};
use idempotent_core::queue::{Consumer, Message, Source, SourceErrorKind};
use idempotent_core::{Idempotency, MemoryStore};
use idempotent_test_support::NatsServer;
use tokio::sync::Notify;

const STREAM: &str = "ORDERS";
const CONSUMER: &str = "orders-worker";

/// How long a test waits for a state before it fails.
const PATIENCE: Duration = Duration::from_secs(30);

async fn jetstream(server: &NatsServer) -> Context {
    let client = async_nats::connect(server.url())
        .await
        .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", server.url()));
    jetstream::new(client)
}

async fn create_stream(context: &Context, duplicate_window: Duration) -> stream::Stream {
    context
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["orders.>".into()],
            duplicate_window,
            ..Default::default()
        })
        .await
        .expect("the stream is created")
}

fn engine(store: &Arc<MemoryStore>) -> Idempotency {
    Idempotency::new(Arc::clone(store) as Arc<_>)
}

/// Waits (at most [`PATIENCE`]) until `check` answers `Ok`; panics with its last `Err`, which
/// says what was seen.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match check().await {
            Ok(()) => return,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what} did not happen within {PATIENCE:?}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// `(num_ack_pending, num_pending, num_redelivered)` of the source's consumer.
async fn pending(source: &JetStreamSource) -> (usize, u64, usize) {
    let info = source.consumer_info().await.expect("the consumer info");
    (info.num_ack_pending, info.num_pending, info.num_redelivered)
}

/// A future that completes once nothing is pending or ack-pending on the consumer and the
/// consumer has settled `settled` deliveries.
async fn drained<S: Source>(source: &JetStreamSource, consumer: &Consumer<S>, settled: u64) {
    eventually("the consumer's draining", || async {
        let (ack_pending, pending, _) = pending(source).await;
        let report = consumer.report();
        if ack_pending == 0 && pending == 0 && report.settled() >= settled {
            Ok(())
        } else {
            Err(format!(
                "ack pending {ack_pending}, pending {pending}, report {report:?}"
            ))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_twice_within_the_window_is_stored_once() {
    let server = NatsServer::start();
    let context = jetstream(&server).await;
    let stream = create_stream(&context, Duration::from_secs(120)).await;
    let publisher = JetStreamPublisher::new(context.clone());

    let first = publisher
        .publish("orders.placed", "order-1", "{}")
        .await
        .expect("published");
    let again = publisher
        .publish("orders.placed", "order-1", "{}")
        .await
        .expect("published again");
    let other = publisher
        .publish("orders.placed", "order-2", "{}")
        .await
        .expect("published");

    assert!(!first.duplicate, "{first:?}");
    assert!(
        again.duplicate,
        "the second publish of order-1 was not reported a duplicate: {again:?}"
    );
    assert_eq!(again.sequence, first.sequence);
    assert!(!other.duplicate);
    let info = stream.get_info().await.expect("stream info");
    assert_eq!(info.state.messages, 2, "the stream holds {:?}", info.state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republish_after_the_window_runs_the_handler_once_and_both_copies_are_acked() {
    let server = NatsServer::start();
    let context = jetstream(&server).await;
    let stream = create_stream(&context, Duration::from_millis(100)).await;
    let publisher = JetStreamPublisher::new(context.clone());
    publisher
        .publish("orders.placed", "order-1", r#"{"total":4200}"#)
        .await
        .expect("published");
    // Once the window is over, the same id is stored again: two stream messages, one id.
    eventually("a second copy of order-1 in the stream", || async {
        let published = publisher
            .publish("orders.placed", "order-1", r#"{"total":4200}"#)
            .await
            .map_err(|error| error.to_string())?;
        if published.duplicate {
            Err(format!("still a duplicate: {published:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    assert_eq!(stream.get_info().await.expect("info").state.messages, 2);

    let source = JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("the source");
    let store = Arc::new(MemoryStore::new());
    let consumer = Consumer::new("orders::place", source.clone()).with_engine(engine(&store));
    let runs = AtomicU32::new(0);
    let report = consumer
        .run(
            |message: Message| {
                let runs = &runs;
                async move {
                    assert_eq!(message.id(), "order-1");
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(())
                }
            },
            drained(&source, &consumer, 2),
        )
        .await
        .expect("the run");

    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran once per copy"
    );
    assert_eq!((report.processed, report.duplicates), (1, 1), "{report:?}");
    let (ack_pending, pending, _) = pending(&source).await;
    assert_eq!((ack_pending, pending), (0, 0), "both copies are acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_redelivered_then_dead_lettered_with_its_headers_and_not_again() {
    let server = NatsServer::start();
    let context = jetstream(&server).await;
    create_stream(&context, Duration::from_secs(120)).await;
    let publisher = JetStreamPublisher::new(context.clone());
    publisher
        .publish("orders.placed", "poison", "not an order")
        .await
        .expect("published");

    let source = JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
        .poll_interval(Duration::from_millis(200))
        .create_dead_letter_stream("ORDERS_DEAD")
        .build()
        .await
        .expect("the source");
    assert_eq!(source.dead_letter_subject(), "ORDERS.dead-letter");
    let store = Arc::new(MemoryStore::new());
    let consumer = Consumer::new("orders::place", source.clone())
        .with_engine(engine(&store))
        .max_deliveries(3)
        .retry_delay(Duration::from_millis(50));
    let seen = Mutex::new(Vec::new());
    let dead = context.get_stream("ORDERS_DEAD").await.expect("created");
    let shutdown = async {
        eventually("the dead letter", || async {
            let messages = dead
                .get_info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .messages;
            if messages == 1 {
                Ok(())
            } else {
                Err(format!("{messages} dead letters"))
            }
        })
        .await;
        // A message published after it is processed; by then the poison one is settled.
        publisher
            .publish("orders.placed", "order-2", "{}")
            .await
            .expect("published");
        drained(&source, &consumer, 4).await;
    };
    let report = consumer
        .run(
            |message: Message| {
                let seen = &seen;
                async move {
                    seen.lock()
                        .unwrap()
                        .push((message.id().to_owned(), message.deliveries()));
                    if message.id() == "poison" {
                        Err(std::io::Error::other("cannot parse the order"))
                    } else {
                        Ok(())
                    }
                }
            },
            shutdown,
        )
        .await
        .expect("the run");

    let seen = seen.into_inner().unwrap();
    let poison: Vec<u32> = seen
        .iter()
        .filter(|(id, _)| id == "poison")
        .map(|(_, deliveries)| *deliveries)
        .collect();
    assert_eq!(
        poison,
        [1, 2, 3],
        "the deliveries of the poison message: {seen:?}"
    );
    assert_eq!(
        (report.retried, report.dead_lettered, report.processed),
        (2, 1, 1),
        "{report:?}"
    );
    let (ack_pending, pending, _) = pending(&source).await;
    assert_eq!(
        (ack_pending, pending),
        (0, 0),
        "the poison message is still pending"
    );

    let dead_letters = dead.get_info().await.expect("info").state.messages;
    assert_eq!(dead_letters, 1, "dead letters of one message");
    let letter = dead.get_raw_message(1).await.expect("the dead letter");
    let header = |name: &str| {
        letter
            .headers
            .get(name)
            .map(|value| value.as_str().to_owned())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", letter.headers))
    };
    assert_eq!(&letter.payload[..], b"not an order");
    assert_eq!(header("Nats-Msg-Id"), "poison");
    assert_eq!(header(dead_letter_headers::REASON), "handler-failed");
    assert!(header(dead_letter_headers::DETAIL).contains("cannot parse the order"));
    assert_eq!(header(dead_letter_headers::DELIVERIES), "3");
    assert_eq!(header(dead_letter_headers::SOURCE_STREAM), STREAM);
    assert_eq!(header(dead_letter_headers::SOURCE_SEQUENCE), "1");
    assert_eq!(header(dead_letter_headers::SOURCE_SUBJECT), "orders.placed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_an_id_is_dead_lettered_under_its_place_in_the_stream() {
    let server = NatsServer::start();
    let context = jetstream(&server).await;
    create_stream(&context, Duration::from_secs(120)).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Trace-Id", "t-1");
    // Orders to the source stream that must not reach the dead-letter stream.
    headers.insert("Nats-Expected-Stream", STREAM);
    context
        .publish_with_headers("orders.placed", headers, "anonymous".into())
        .await
        .expect("sent")
        .await
        .expect("stored");
    let source = JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
        .poll_interval(Duration::from_millis(200))
        .dead_letter_subject("dead.orders")
        .create_dead_letter_stream("ORDERS_DEAD")
        .build()
        .await
        .expect("the source");
    let store = Arc::new(MemoryStore::new());
    let consumer = Consumer::new("orders::place", source.clone()).with_engine(engine(&store));
    let report = consumer
        .run(
            |_message: Message| async {
                panic!("the handler ran for a message without an id");
                #[allow(unreachable_code)]
                Ok::<_, std::io::Error>(())
            },
            drained(&source, &consumer, 1),
        )
        .await
        .expect("the run");
    assert_eq!(report.dead_lettered, 1, "{report:?}");

    let dead = context.get_stream("ORDERS_DEAD").await.expect("created");
    let letter = dead.get_raw_message(1).await.expect("the dead letter");
    let header = |name: &str| {
        letter
            .headers
            .get(name)
            .map(|value| value.as_str().to_owned())
    };
    assert_eq!(letter.subject.as_str(), "dead.orders");
    assert_eq!(header("Nats-Msg-Id").as_deref(), Some("ORDERS:1"));
    assert_eq!(
        header(dead_letter_headers::REASON).as_deref(),
        Some("no-message-id")
    );
    assert_eq!(header("Trace-Id").as_deref(), Some("t-1"));
    assert_eq!(header("Nats-Expected-Stream"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_dies_mid_handler_leaves_the_message_to_another_after_ack_wait() {
    let server = NatsServer::start();
    let context = jetstream(&server).await;
    create_stream(&context, Duration::from_secs(120)).await;
    JetStreamPublisher::new(context.clone())
        .publish("orders.placed", "order-1", "{}")
        .await
        .expect("published");
    let build = || {
        JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(200))
            .build()
    };
    let store = Arc::new(MemoryStore::new());

    // The first consumer takes the message and dies in its handler: its run is dropped.
    let started = Arc::new(Notify::new());
    let first =
        Consumer::new("orders::place", build().await.expect("source")).with_engine(engine(&store));
    let dying = {
        let started = Arc::clone(&started);
        async move {
            first
                .run(
                    move |_message: Message| {
                        let started = Arc::clone(&started);
                        async move {
                            started.notify_one();
                            std::future::pending::<Result<(), std::io::Error>>().await
                        }
                    },
                    std::future::pending(),
                )
                .await
        }
    };
    tokio::select! {
        result = dying => panic!("the first consumer stopped on its own: {result:?}"),
        () = started.notified() => {}
    }

    // Another consumer of the same durable gets it once AckWait is over.
    let source = build().await.expect("source");
    assert_eq!(source.lease(), Duration::from_secs(1));
    let second = Consumer::new("orders::place", source.clone()).with_engine(engine(&store));
    let seen = Mutex::new(Vec::new());
    let report = second
        .run(
            |message: Message| {
                let seen = &seen;
                async move {
                    seen.lock()
                        .unwrap()
                        .push((message.id().to_owned(), message.deliveries()));
                    Ok::<_, std::io::Error>(())
                }
            },
            drained(&source, &second, 1),
        )
        .await
        .expect("the run");
    // Usually on its second delivery. A redelivery that reaches a pull request just as the
    // client lets it expire (the poll interval) is lost until the next AckWait, so under load
    // it can be a later one; what must hold is that the second consumer runs it, once.
    let seen = seen.into_inner().unwrap();
    assert!(
        matches!(&seen[..], [(id, deliveries)] if id == "order-1" && *deliveries >= 2),
        "the second consumer ran the message once, on a redelivery: {seen:?}"
    );
    assert_eq!(report.processed, 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_ack_wait_keeps_its_message() {
    let server = NatsServer::start();
    let context = jetstream(&server).await;
    create_stream(&context, Duration::from_secs(120)).await;
    JetStreamPublisher::new(context.clone())
        .publish("orders.placed", "order-1", "{}")
        .await
        .expect("published");
    let source = JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("source");
    let store = Arc::new(MemoryStore::new());
    let consumer = Consumer::new("orders::place", source.clone()).with_engine(engine(&store));
    let report = consumer
        .run(
            |_message: Message| async {
                // Four AckWaits: without the progress reports, it would be redelivered.
                tokio::time::sleep(Duration::from_secs(4)).await;
                Ok::<_, std::io::Error>(())
            },
            drained(&source, &consumer, 1),
        )
        .await
        .expect("the run");
    assert_eq!(
        (report.received, report.processed, report.duplicates),
        (1, 1, 0),
        "the message was delivered again while its handler ran: {report:?}"
    );
    let (ack_pending, pending, redelivered) = pending(&source).await;
    assert_eq!((ack_pending, pending, redelivered), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_releases_what_is_in_flight_at_once() {
    let server = NatsServer::start();
    let context = jetstream(&server).await;
    create_stream(&context, Duration::from_secs(120)).await;
    let publisher = JetStreamPublisher::new(context.clone());
    for id in ["order-1", "order-2", "order-3"] {
        publisher
            .publish("orders.placed", id, "{}")
            .await
            .expect("published");
    }
    // A long AckWait: what is released must come back at once, not after it.
    let source = JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
        .lease(Duration::from_secs(300))
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("source");
    let store = Arc::new(MemoryStore::new());
    let consumer = Consumer::new("orders::place", source.clone())
        .with_engine(engine(&store))
        .drain_timeout(Duration::from_millis(100));
    let started = AtomicU32::new(0);
    let all_started = async {
        eventually("three handlers at work", || async {
            match started.load(Ordering::SeqCst) {
                3 => Ok(()),
                n => Err(format!("{n} started")),
            }
        })
        .await;
    };
    let report = consumer
        .run(
            |_message: Message| {
                let started = &started;
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Result<(), std::io::Error>>().await
                }
            },
            all_started,
        )
        .await
        .expect("the run");
    // A message released while a pull was waiting may come back in it, and is released again.
    assert!(
        report.received >= 3 && report.released == report.received && report.processed == 0,
        "{report:?}"
    );
    // nats-server counts a NAKed message in num_ack_pending until it is delivered again, so
    // what shows the release is the next consumer getting them within PATIENCE, far below the
    // 300 s AckWait a message left unreleased would wait.
    // Another consumer processes them now, on their second delivery.
    let next = Consumer::new("orders::place", source.clone()).with_engine(engine(&store));
    let deliveries = Mutex::new(Vec::new());
    let report = next
        .run(
            |message: Message| {
                let deliveries = &deliveries;
                async move {
                    deliveries.lock().unwrap().push(message.deliveries());
                    Ok::<_, std::io::Error>(())
                }
            },
            drained(&source, &next, 3),
        )
        .await
        .expect("the second run");
    assert_eq!(report.processed, 3, "{report:?}");
    let (ack_pending, pending, _) = pending(&source).await;
    assert_eq!((ack_pending, pending), (0, 0));
    let deliveries = deliveries.into_inner().unwrap();
    assert!(
        deliveries.len() == 3 && deliveries.iter().all(|&n| n >= 2),
        "not redeliveries: {deliveries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigurations_are_refused_with_what_to_do() {
    let server = NatsServer::start();
    let context = jetstream(&server).await;

    let error = JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
        .build()
        .await
        .expect_err("there is no stream yet");
    assert_eq!(error.kind(), SourceErrorKind::Refused);
    assert!(
        error.to_string().contains("create the stream first"),
        "{error}"
    );

    let error = JetStreamPublisher::new(context.clone())
        .publish("orders.placed", "order-1", "{}")
        .await
        .expect_err("no stream captures the subject");
    assert!(
        error.to_string().contains("create the stream first"),
        "{error}"
    );

    create_stream(&context, Duration::from_secs(120)).await;
    let error = JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
        .dead_letter_subject("orders.dead")
        .build()
        .await
        .expect_err("the stream captures the dead-letter subject");
    assert_eq!(error.kind(), SourceErrorKind::Refused);
    assert!(
        error
            .to_string()
            .contains("dead letters would be delivered again"),
        "{error}"
    );

    // Dead-lettering without a stream on the subject fails, and the message stays pending.
    let source = JetStreamSource::builder(context.clone(), STREAM, CONSUMER)
        .build()
        .await
        .expect("source");
    JetStreamPublisher::new(context.clone())
        .publish("orders.placed", "order-1", "{}")
        .await
        .expect("published");
    let deliveries = source.receive(10).await.expect("received");
    assert_eq!(deliveries.len(), 1);
    let error = source
        .dead_letter(
            &deliveries[0],
            &idempotent_core::queue::DeadLetterReason::IdReused,
        )
        .await
        .expect_err("no stream captures the dead-letter subject");
    assert!(
        error.to_string().contains("create a stream that captures"),
        "{error}"
    );
    assert_eq!(pending(&source).await.0, 1);

    let error = JetStreamSource::builder_for_url(
        format!("nats://127.0.0.1:{}", idempotent_test_support::free_port()),
        STREAM,
        CONSUMER,
    )
    .build()
    .await
    .expect_err("nothing listens there");
    assert_eq!(error.kind(), SourceErrorKind::Unavailable);
    assert!(
        error.to_string().contains("is nats-server running"),
        "{error}"
    );
}

/// A URL's password stays out of the build's error (its message, its sources and its
/// `Debug`) and out of the builder's `Debug`.
#[tokio::test]
async fn a_password_in_the_url_stays_out_of_errors_and_debug_output() {
    let url = format!(
        "nats://orders:s3cret-pw@127.0.0.1:{}",
        idempotent_test_support::free_port()
    );
    let builder = JetStreamSource::builder_for_url(url, STREAM, CONSUMER);
    let debug = format!("{builder:?}");
    assert!(!debug.contains("s3cret-pw"), "{debug}");
    let error = builder.build().await.expect_err("nothing listens there");
    let mut text = format!("{error} {error:?}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(&format!(" {cause} {cause:?}"));
        source = cause.source();
    }
    assert!(text.contains("could not connect"), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");
}
