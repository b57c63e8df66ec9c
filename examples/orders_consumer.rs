//! Orders from a queue, placed exactly once while the queue delivers at least once.
//!
//! `cargo run --example orders_consumer` runs on the embedded default: an in-process broker
//! (`queue::channel`) and the memory store, with no setup. A producer publishes 1,000 orders
//! and, as a producer whose publish acknowledgements were lost does, publishes every tenth one
//! again; it also publishes three orders the handler always refuses and one message without a
//! message id. Three consumers share the work. One of them crashes (its task is aborted)
//! while its handler is at work, and a new one takes its place; the broker gives the crashed
//! consumer's deliveries to the others once their lease runs out.
//!
//! The handler "places" an order by counting it in a ledger of effects. The run ends with
//! that ledger: received, duplicates discarded, processed, dead-lettered, and the effects
//! applied twice or never, which must both be 0 (the example exits with status 1 otherwise).
//!
//! On a real broker: `--broker redis --url redis://127.0.0.1:6379/` (a Redis Streams consumer
//! group, records in Redis), or `--broker nats --url nats://127.0.0.1:4222` (a JetStream
//! durable consumer, publishes deduplicated by `Nats-Msg-Id`).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_core::queue::nats::{JetStreamPublisher, JetStreamSource};
use idempotent_core::queue::redis_streams::{self, RedisStreamsSource};
use idempotent_core::queue::{self, Consumer, Message, Report, Source};
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{Idempotency, MemoryStore, Options};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

const ORDERS: usize = 1_000;
const POISON: usize = 3;
/// The refused orders and the message without an id.
const DEAD_LETTERS: usize = POISON + 1;
const CONSUMERS: usize = 3;
const MAX_DELIVERIES: u32 = 3;
/// How long a delivery (and a claim) stays a consumer's without its heartbeat: how soon a
/// crashed consumer's work goes to another.
const LEASE: Duration = Duration::from_secs(2);
/// The order whose handler crashes its consumer, the first time a handler reaches it.
const CRASH_AT: &str = "order-0100";

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    sku: String,
    quantity: u32,
    /// The handler refuses it on every delivery.
    #[serde(default)]
    poison: bool,
}

/// The effects the handler applied, by order id: each must be 1.
#[derive(Debug, Default, Clone)]
struct Effects(Arc<Mutex<HashMap<String, u32>>>);

impl Effects {
    fn apply(&self, id: &str) {
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry(id.to_owned())
            .or_default() += 1;
    }
    fn snapshot(&self) -> HashMap<String, u32> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// The handler's refusal of a poison order.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("out of stock, permanently")
    }
}

/// A run's tag: the time it started, so that runs on one broker do not meet.
fn run_tag() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    format!("run-{millis}-")
}

/// Redis Streams: one stream per run, the consumers in one group, the records in the same
/// Redis.
struct RedisBroker {
    url: String,
    tag: String,
    stream: String,
    connection: redis::aio::MultiplexedConnection,
}

impl RedisBroker {
    async fn connect(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|error| format!("bad --url: {error}"))?;
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|error| format!("could not connect to Redis: {error}"))?;
        let tag = run_tag();
        Ok(Self {
            url: url.to_owned(),
            stream: format!("orders_consumer:{tag}orders"),
            tag,
            connection,
        })
    }
}

impl Broker for RedisBroker {
    type Source = RedisStreamsSource;
    async fn publish(&self, id: Option<&str>, payload: &str) -> Result<(), String> {
        let mut connection = self.connection.clone();
        match id {
            Some(id) => redis_streams::publish(&mut connection, &self.stream, id, payload)
                .await
                .map(drop)
                .map_err(|error| error.to_string()),
            None => redis::cmd("XADD")
                .arg(&self.stream)
                .arg("*")
                .arg("payload")
                .arg(payload)
                .query_async::<String>(&mut connection)
                .await
                .map(drop)
                .map_err(|error| format!("XADD failed: {error}")),
        }
    }
    async fn source(&self, consumer: usize) -> Result<Self::Source, String> {
        RedisStreamsSource::builder(self.url.clone(), self.stream.clone(), "placers")
            .consumer(format!("consumer-{consumer}"))
            .lease(LEASE)
            .poll_interval(Duration::from_millis(200))
            .build()
            .await
            .map_err(|error| error.to_string())
    }
    async fn dead_letters(&self) -> Result<usize, String> {
        let mut connection = self.connection.clone();
        redis::cmd("XLEN")
            .arg(format!("{}:dead-letter", self.stream))
            .query_async::<usize>(&mut connection)
            .await
            .map_err(|error| format!("XLEN failed: {error}"))
    }
    fn tag(&self) -> &str {
        &self.tag
    }
}

/// NATS JetStream: one stream per run (deduplicating publishes within two minutes), a durable
/// consumer, a dead-letter stream.
struct NatsBroker {
    context: async_nats::jetstream::Context,
    publisher: JetStreamPublisher,
    tag: String,
    stream: String,
    subject: String,
    dropped: std::sync::atomic::AtomicUsize,
}

impl NatsBroker {
    async fn connect(url: &str) -> Result<Self, String> {
        let client = async_nats::connect(url)
            .await
            .map_err(|error| format!("could not connect to NATS at {url}: {error}"))?;
        let context = async_nats::jetstream::new(client);
        let tag = run_tag();
        let stream = format!("ORDERS_{}", tag.trim_end_matches('-').replace('-', "_"));
        let subject = format!("orders_consumer.{}", tag.trim_end_matches('-'));
        context
            .create_stream(async_nats::jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![subject.clone()],
                ..Default::default()
            })
            .await
            .map_err(|error| format!("could not create the stream {stream}: {error}"))?;
        Ok(Self {
            publisher: JetStreamPublisher::new(context.clone()),
            context,
            tag,
            stream,
            subject,
            dropped: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn dead_letter_stream(&self) -> String {
        format!("{}_DEAD", self.stream)
    }
}

impl Broker for NatsBroker {
    type Source = JetStreamSource;
    async fn publish(&self, id: Option<&str>, payload: &str) -> Result<(), String> {
        match id {
            Some(id) => {
                let published = self
                    .publisher
                    .publish(self.subject.clone(), id, payload.to_owned())
                    .await
                    .map_err(|error| error.to_string())?;
                if published.duplicate {
                    self.dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
            None => self
                .context
                .publish(self.subject.clone(), payload.to_owned().into())
                .await
                .map_err(|error| format!("publish failed: {error}"))?
                .await
                .map(drop)
                .map_err(|error| format!("publish not acknowledged: {error}")),
        }
    }
    async fn source(&self, _consumer: usize) -> Result<Self::Source, String> {
        JetStreamSource::builder(self.context.clone(), self.stream.clone(), "placers")
            .lease(LEASE)
            .poll_interval(Duration::from_millis(200))
            .dead_letter_subject(format!("{}.dead-letter", self.subject))
            .create_dead_letter_stream(self.dead_letter_stream())
            .build()
            .await
            .map_err(|error| error.to_string())
    }
    async fn dead_letters(&self) -> Result<usize, String> {
        let mut stream = self
            .context
            .get_stream(self.dead_letter_stream())
            .await
            .map_err(|error| format!("no dead-letter stream: {error}"))?;
        let info = stream
            .info()
            .await
            .map_err(|error| format!("could not read the dead-letter stream: {error}"))?;
        usize::try_from(info.state.messages).map_err(|error| error.to_string())
    }
    fn tag(&self) -> &str {
        &self.tag
    }
    fn dropped_at_publish(&self) -> usize {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What the run saw, added up over every consumer.
#[derive(Debug, Default)]
struct Ledger {
    report: Report,
    dead_lettered_in_broker: usize,
    /// Publishes the broker itself dropped as duplicates (JetStream's duplicate window).
    dropped_at_publish: usize,
    applied_twice: usize,
    never_applied: usize,
}

/// Publishes and consumes one broker's way.
trait Broker {
    type Source: Source + Clone + Send + Sync + 'static;
    /// Publishes a message, under the producer's id when there is one.
    async fn publish(&self, id: Option<&str>, payload: &str) -> Result<(), String>;
    /// The source a consumer reads (each consumer gets its own name in the group).
    async fn source(&self, consumer: usize) -> Result<Self::Source, String>;
    /// The messages in the dead-letter destination.
    async fn dead_letters(&self) -> Result<usize, String>;
    /// What the run's message ids start with.
    fn tag(&self) -> &str {
        ""
    }
    /// Publishes the broker dropped as duplicates of earlier ones.
    fn dropped_at_publish(&self) -> usize {
        0
    }
}

/// The embedded default: an in-process broker.
struct InProcess {
    publisher: queue::ChannelPublisher,
    source: queue::ChannelSource,
}

impl Broker for InProcess {
    type Source = queue::ChannelSource;
    async fn publish(&self, id: Option<&str>, payload: &str) -> Result<(), String> {
        match id {
            Some(id) => self.publisher.publish(id, payload.to_owned()),
            None => self.publisher.publish_without_id(payload.to_owned()),
        }
        Ok(())
    }
    async fn source(&self, _consumer: usize) -> Result<Self::Source, String> {
        Ok(self.source.clone())
    }
    async fn dead_letters(&self) -> Result<usize, String> {
        Ok(self.source.dead_letters().len())
    }
}

/// The id of order `n`, after the run's tag (empty in-process; on a broker, a tag of the run,
/// so that a second run does not find the first one's records).
fn order_id(tag: &str, n: usize) -> String {
    format!("{tag}order-{n:04}")
}

async fn produce(broker: &impl Broker) -> Result<(), String> {
    let tag = broker.tag();
    for n in 0..ORDERS {
        let payload = format!(r#"{{"sku":"sku-{}","quantity":{}}}"#, n % 37, 1 + n % 5);
        broker.publish(Some(&order_id(tag, n)), &payload).await?;
        if n % 10 == 0 {
            // The producer did not see its acknowledgement and published again.
            broker.publish(Some(&order_id(tag, n)), &payload).await?;
        }
    }
    for n in 0..POISON {
        let payload = r#"{"sku":"sku-discontinued","quantity":1,"poison":true}"#;
        broker
            .publish(Some(&format!("{tag}poison-{n}")), payload)
            .await?;
    }
    broker
        .publish(None, r#"{"sku":"sku-1","quantity":1}"#)
        .await?;
    Ok(())
}

async fn run(broker: impl Broker, engine: Idempotency) -> Result<Ledger, String> {
    produce(&broker).await?;
    let effects = Effects::default();
    // The first handler to reach the crashing order (whichever copy, whichever consumer)
    // takes this and says which consumer it runs in; that consumer is then crashed.
    let (crashing, crashed) = tokio::sync::oneshot::channel::<usize>();
    let crashing = Arc::new(Mutex::new(Some(crashing)));
    let (stop, stopped) = watch::channel(false);
    let handler = |consumer: usize| {
        let effects = effects.clone();
        let crashing = crashing.clone();
        move |message: Message| {
            let effects = effects.clone();
            let crashing = crashing.clone();
            async move {
                let order: Order = message
                    .json()
                    .map_err(|error| format!("not an order: {error}"))?;
                if order.poison {
                    return Err(Refused.to_string());
                }
                if message.id().ends_with(CRASH_AT) {
                    let crash = crashing.lock().expect("not poisoned").take();
                    if let Some(crash) = crash {
                        // The consumer dies here, before the order is placed.
                        let _ = crash.send(consumer);
                        std::future::pending::<()>().await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                effects.apply(message.id());
                Ok::<_, String>(())
            }
        }
    };

    let mut consumers = Vec::new();
    let mut tasks: Vec<tokio::task::JoinHandle<Result<Report, queue::SourceError>>> = Vec::new();
    let mut crashed = Some(crashed);
    for n in 0..=CONSUMERS {
        // The last one is the crashed consumer's replacement, started after the crash.
        if n == CONSUMERS {
            let victim = crashed
                .take()
                .expect("one crash")
                .await
                .map_err(|_| "no consumer reached the crashing order".to_owned())?;
            tasks[victim].abort();
            println!(
                "consumer {victim} crashed while placing {CRASH_AT}; consumer {n} takes its place"
            );
        }
        let consumer = Arc::new(
            Consumer::new("orders::place", broker.source(n).await?)
                .with_engine(engine.clone())
                .max_deliveries(MAX_DELIVERIES)
                .retry_delay(Duration::from_millis(20))
                .concurrency(8),
        );
        let mut stopped = stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let running = Arc::clone(&consumer);
        let handler = handler(n);
        tasks.push(tokio::spawn(
            async move { running.run(handler, shutdown).await },
        ));
        consumers.push(consumer);
    }

    // Every order placed and every refused message dead-lettered: stop the consumers.
    let done = async {
        loop {
            let placed = effects.snapshot().len();
            let dead = broker.dead_letters().await.unwrap_or(0);
            if placed >= ORDERS && dead >= DEAD_LETTERS {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(120), done)
        .await
        .is_err()
    {
        eprintln!("the orders were not all placed within 120 s");
    }
    let _ = stop.send(true);
    for task in tasks {
        match task.await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(format!("a consumer stopped: {error}")),
            Err(error) if error.is_cancelled() => {} // the crashed one
            Err(error) => return Err(format!("a consumer panicked: {error}")),
        }
    }

    let mut ledger = Ledger {
        dead_lettered_in_broker: broker.dead_letters().await?,
        ..Ledger::default()
    };
    for consumer in &consumers {
        let report = consumer.report();
        ledger.report.received += report.received;
        ledger.report.duplicates += report.duplicates;
        ledger.report.processed += report.processed;
        ledger.report.dead_lettered += report.dead_lettered;
        ledger.report.retried += report.retried;
        ledger.report.released += report.released;
    }
    let effects = effects.snapshot();
    ledger.applied_twice = effects.values().filter(|&&n| n > 1).count();
    ledger.never_applied = (0..ORDERS)
        .filter(|&n| !effects.contains_key(&order_id(broker.tag(), n)))
        .count();
    ledger.dropped_at_publish = broker.dropped_at_publish();
    Ok(ledger)
}

fn print(ledger: &Ledger) {
    let report = &ledger.report;
    println!("received              {:>6}", report.received);
    if ledger.dropped_at_publish > 0 {
        println!("dropped at publish    {:>6}", ledger.dropped_at_publish);
    }
    println!("duplicates discarded  {:>6}", report.duplicates);
    println!("processed             {:>6}", report.processed);
    println!("retried               {:>6}", report.retried);
    println!(
        "dead-lettered         {:>6}",
        ledger.dead_lettered_in_broker
    );
    println!("effects applied twice {:>6}", ledger.applied_twice);
    println!("effects never applied {:>6}", ledger.never_applied);
}

/// Where the messages are: `--broker memory|redis|nats` and `--url`.
#[derive(Debug, PartialEq, Eq)]
enum Where {
    InProcess,
    Redis(String),
    Nats(String),
}

const USAGE: &str = "usage: orders_consumer [--broker memory|redis|nats] [--url URL]
  --broker memory  an in-process broker and the memory store (the default)
  --broker redis   a Redis Streams consumer group; records in the same Redis
  --broker nats    a JetStream durable consumer; records in the memory store
  --url URL        the broker's URL (redis://... or nats://...)";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Where, String> {
    let (mut broker, mut url) = (None, None);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match name.as_str() {
            "--broker" => broker = Some(value()?),
            "--url" => url = Some(value()?),
            "--help" | "-h" => return Err(USAGE.to_owned()),
            _ => return Err(format!("unknown argument {arg}\n{USAGE}")),
        }
    }
    match (broker.as_deref().unwrap_or("memory"), url) {
        ("memory", None) => Ok(Where::InProcess),
        ("memory", Some(_)) => Err(format!("--url is for --broker redis or nats\n{USAGE}")),
        ("redis", Some(url)) => Ok(Where::Redis(url)),
        ("nats", Some(url)) => Ok(Where::Nats(url)),
        ("redis" | "nats", None) => Err(format!("--broker needs --url\n{USAGE}")),
        (other, _) => Err(format!("unknown broker {other}\n{USAGE}")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let place = match parse_args(std::env::args().skip(1)) {
        Ok(place) => place,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let options = Options::new().with_lease(LEASE);
    let ledger = match place {
        Where::InProcess => {
            let (publisher, source) = queue::channel(LEASE);
            let engine = Idempotency::new(Arc::new(MemoryStore::new())).with_options(options);
            run(InProcess { publisher, source }, engine).await
        }
        Where::Redis(url) => match RedisBroker::connect(&url).await {
            Ok(broker) => match RedisStore::builder(url).build() {
                Ok(store) => {
                    run(
                        broker,
                        Idempotency::new(Arc::new(store)).with_options(options),
                    )
                    .await
                }
                Err(error) => Err(format!("could not open the Redis store: {error}")),
            },
            Err(error) => Err(error),
        },
        Where::Nats(url) => match NatsBroker::connect(&url).await {
            Ok(broker) => {
                let engine = Idempotency::new(Arc::new(MemoryStore::new())).with_options(options);
                run(broker, engine).await
            }
            Err(error) => Err(error),
        },
    };
    let ledger = match ledger {
        Ok(ledger) => ledger,
        Err(error) => {
            eprintln!("orders_consumer: {error}");
            return ExitCode::FAILURE;
        }
    };
    print(&ledger);
    if ledger.applied_twice > 0 || ledger.never_applied > 0 {
        eprintln!("FAILED: every order must be placed exactly once");
        return ExitCode::FAILURE;
    }
    if ledger.dead_lettered_in_broker != DEAD_LETTERS {
        eprintln!(
            "FAILED: {} messages dead-lettered, {} expected (the refused orders and the one without an id)",
            ledger.dead_lettered_in_broker, DEAD_LETTERS
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Where, String> {
        parse_args(args.iter().map(|arg| (*arg).to_owned()))
    }

    #[test]
    fn arguments() {
        assert_eq!(parse(&[]), Ok(Where::InProcess));
        assert_eq!(
            parse(&["--broker", "redis", "--url=redis://h/"]),
            Ok(Where::Redis("redis://h/".into()))
        );
        assert!(
            parse(&["--broker", "nats"])
                .unwrap_err()
                .contains("needs --url")
        );
        assert!(
            parse(&["--broker", "kafka", "--url", "x"])
                .unwrap_err()
                .contains("unknown broker")
        );
    }
}
