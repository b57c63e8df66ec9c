//! Queue consumers across processes, on real brokers, with consumers killed mid-handler.
//!
//! A producer publishes 10,000 messages, every tenth of them twice, and a few the handler
//! always refuses. Three consumer processes (this test binary, started again as children)
//! share the work. One of them is killed with SIGKILL while its handlers are at work (at its
//! 800th handler run), restarted under a new consumer name (as a new machine would be), and
//! killed again the same way. Then:
//!
//! - every message's effect is there exactly once: none lost, none twice;
//! - the refused messages are in the dead-letter destination after the allowed deliveries,
//!   each once, and have no effect;
//! - the children, stopped gracefully, leave nothing pending in the broker.
//!
//! Two fleets:
//! - Redis Streams with records in Redis (`RedisStore`). The effect (a counter in Redis) and
//!   the record are two writes, so the kill is placed where a handler is at work *before* its
//!   effect: when a child is to die, its handlers past the effect are let record it, the
//!   others stop before it, and then the child is killed.
//! - NATS JetStream with the transactional inbox on PostgreSQL: the effect (a row) and the
//!   record commit together, so the kill is placed *after* the effect is written and before
//!   the commit, in every handler at work: the writes die with the transactions.
#![cfg(all(feature = "redis-streams", feature = "nats", feature = "sqlx-postgres"))]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotent_core::queue::nats::{JetStreamPublisher, JetStreamSource};
use idempotent_core::queue::redis_streams::{self, RedisStreamsSource};
use idempotent_core::queue::{Consumer, Message, Report};
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
use idempotent_core::{Idempotency, Options};
use idempotent_test_support::{NatsServer, RedisServer, shared_postgres};
use sqlx::{Postgres, Transaction};

const MESSAGES: usize = 10_000;
const POISON: usize = 5;
const CONSUMERS: usize = 3;
const KILLS: usize = 2;
const MAX_DELIVERIES: u32 = 3;
/// The source's lease and the store's: how soon a killed child's work goes to another.
const LEASE: Duration = Duration::from_secs(2);
/// Everything settles within this, or the test fails saying what it saw.
const BOUND: Duration = Duration::from_secs(300);

const STREAM: &str = "orders";
const GROUP: &str = "placers";
const DEAD_LETTERS: &str = "orders:dead-letter";
const JS_STREAM: &str = "ORDERS";
const JS_SUBJECT: &str = "orders.placed";
const JS_DEAD_STREAM: &str = "ORDERS_DEAD";
const JS_DEAD_SUBJECT: &str = "orders.dead-letter";
const JS_CONSUMER: &str = "placers";

fn id(n: usize) -> String {
    format!("m-{n:05}")
}

/// The handler run, counted from the child's start, at which the doomed consumer is killed.
const KILL_AT_RUN: u64 = 800;

fn payload(n: usize) -> String {
    format!(r#"{{"n":{n}}}"#)
}

const POISON_PAYLOAD: &str = r#"{"poison":true}"#;

// ---- The child ------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fleet {
    /// Redis Streams, records in Redis.
    Redis,
    /// JetStream, the transactional inbox on PostgreSQL.
    Nats,
}

impl Fleet {
    fn name(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Nats => "nats",
        }
    }
}

/// The child's part: what its handlers do when the child is about to be killed.
struct Freeze {
    /// The handler run at which this child is killed, if it is the doomed one.
    kill_at_run: Option<u64>,
    /// Handler runs so far.
    runs: AtomicU64,
    /// Set at that run: every handler of this child stops (before its effect, or after it for
    /// the inbox) and waits to be killed.
    frozen: AtomicBool,
}

impl Freeze {
    async fn trap_or_wait(&self, message: &Message) {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if self.kill_at_run == Some(run) {
            self.frozen.store(true, Ordering::SeqCst);
            // Those past the freeze point finish meanwhile; the parent kills after a pause.
            println!("trapped {}", message.id());
        }
        if self.frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent"))
}

/// The child process: consumes until the stop file appears, then prints its report.
#[test]
#[ignore = "entry point of the consumer processes the fleet tests start"]
fn queue_fleet_child() {
    let Ok(fleet) = std::env::var("QUEUE_FLEET") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(async move {
        let stop = PathBuf::from(env("QUEUE_FLEET_STOP"));
        let shutdown = async move {
            while !stop.exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let freeze = Freeze {
            kill_at_run: std::env::var("QUEUE_FLEET_KILL_AT_RUN")
                .ok()
                .map(|run| run.parse().expect("a run number")),
            runs: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
        };
        match fleet.as_str() {
            "redis" => redis_child(&freeze, shutdown).await,
            "nats" => nats_child(&freeze, shutdown).await,
            other => panic!("unknown fleet {other}"),
        }
    });
    println!("report {report:?}");
}

fn refuse_poison(message: &Message) -> Result<(), String> {
    if message.payload() == POISON_PAYLOAD.as_bytes() {
        return Err("refused: poison".to_owned());
    }
    Ok(())
}

async fn redis_child(freeze: &Freeze, shutdown: impl Future<Output = ()>) -> Report {
    let url = env("QUEUE_FLEET_BROKER");
    let source = RedisStreamsSource::builder(url.clone(), STREAM, GROUP)
        .consumer(env("QUEUE_FLEET_CONSUMER"))
        .dead_letter_stream(DEAD_LETTERS)
        .lease(LEASE)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("join the consumer group");
    let store = RedisStore::builder(url.clone())
        .build()
        .expect("connect the store");
    let effects = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect for the effects");
    let consumer = Consumer::new("orders::place", source)
        .with_engine(
            Idempotency::new(Arc::new(store)).with_options(Options::new().with_lease(LEASE)),
        )
        .max_deliveries(MAX_DELIVERIES)
        .retry_delay(Duration::from_millis(50))
        .concurrency(16);
    let handler = |message: Message| {
        let mut effects = effects.clone();
        async move {
            refuse_poison(&message)?;
            // Killed here: before the effect.
            freeze.trap_or_wait(&message).await;
            redis::cmd("HINCRBY")
                .arg("effects")
                .arg(message.id())
                .arg(1)
                .query_async::<i64>(&mut effects)
                .await
                .map_err(|error| error.to_string())?;
            Ok::<_, String>(())
        }
    };
    consumer.run(handler, shutdown).await.expect("consume")
}

async fn nats_child(freeze: &Freeze, shutdown: impl Future<Output = ()>) -> Report {
    let source =
        JetStreamSource::builder_for_url(env("QUEUE_FLEET_BROKER"), JS_STREAM, JS_CONSUMER)
            .lease(LEASE)
            .poll_interval(Duration::from_millis(200))
            .dead_letter_subject(JS_DEAD_SUBJECT)
            .build()
            .await
            .expect("bind the durable consumer");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .test_before_acquire(false)
        .connect(&env("QUEUE_FLEET_STORE"))
        .await
        .expect("connect the pool");
    let store = SqlxPgStore::builder(pool)
        .build()
        .await
        .expect("the tables");
    let consumer = Consumer::new("orders::place", source)
        .max_deliveries(MAX_DELIVERIES)
        .retry_delay(Duration::from_millis(50))
        .concurrency(16);
    let handler = async |tx: &mut Transaction<'_, Postgres>, message: &Message| {
        refuse_poison(message)?;
        sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind(message.id())
            .execute(&mut **tx)
            .await
            .map_err(|error| error.to_string())?;
        // Killed here: after the effect is written, before the commit.
        freeze.trap_or_wait(message).await;
        Ok::<_, String>(())
    };
    consumer
        .run_in_transactions(&store, handler, shutdown)
        .await
        .expect("consume")
}

// ---- The parent -----------------------------------------------------------------------------

/// The children, and the kills.
struct Children {
    fleet: Fleet,
    broker: String,
    store: String,
    stop: PathBuf,
    running: Vec<(String, Child)>,
    started: usize,
    killed: Vec<String>,
    trapped: std::sync::mpsc::Receiver<(String, String)>,
    trapped_sender: std::sync::mpsc::Sender<(String, String)>,
    reports: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Children {
    fn new(fleet: Fleet, broker: String, store: String, dir: &Path) -> Self {
        let (trapped_sender, trapped) = std::sync::mpsc::channel();
        Self {
            fleet,
            broker,
            store,
            stop: dir.join("stop"),
            running: Vec::new(),
            started: 0,
            killed: Vec::new(),
            trapped,
            trapped_sender,
            reports: Arc::default(),
        }
    }

    /// Starts a child; the doomed one is killed at its `KILL_AT_RUN`th handler run.
    fn start(&mut self, doomed: bool) {
        let name = format!("consumer-{}", self.started);
        self.started += 1;
        let mut command = Command::new(std::env::current_exe().unwrap());
        if doomed {
            command.env("QUEUE_FLEET_KILL_AT_RUN", KILL_AT_RUN.to_string());
        }
        let mut child = command
            .args([
                "--exact",
                "queue_fleet_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("QUEUE_FLEET", self.fleet.name())
            .env("QUEUE_FLEET_BROKER", &self.broker)
            .env("QUEUE_FLEET_STORE", &self.store)
            .env("QUEUE_FLEET_CONSUMER", &name)
            .env("QUEUE_FLEET_STOP", &self.stop)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a consumer process");
        let stdout = child.stdout.take().unwrap();
        let (sender, reports, who) = (
            self.trapped_sender.clone(),
            self.reports.clone(),
            name.clone(),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest's "test ... " has no line end of its own: the child's line follows.
                if let Some((_, id)) = line.split_once("trapped ") {
                    let _ = sender.send((who.clone(), id.to_owned()));
                }
                if let Some((_, report)) = line.split_once("report ") {
                    reports.lock().unwrap().push(format!("{who}: {report}"));
                }
            }
        });
        self.running.push((name, child));
    }

    /// Kills (SIGKILL) the child whose handler took the trap, and starts another in its place,
    /// itself doomed until the kills are done.
    fn kill_trapped(&mut self) {
        while let Ok((who, id)) = self.trapped.try_recv() {
            // The handlers past the freeze point finish their writes meanwhile.
            std::thread::sleep(Duration::from_millis(300));
            if let Some(at) = self.running.iter().position(|(name, _)| *name == who) {
                let (name, mut child) = self.running.remove(at);
                child.kill().expect("SIGKILL the consumer");
                child.wait().unwrap();
                self.killed.push(format!("{name} at {id}"));
                self.start(self.killed.len() < KILLS);
            }
        }
    }

    /// Stops every child gracefully and waits for each to exit successfully.
    fn stop_all(&mut self) {
        std::fs::write(&self.stop, b"stop").unwrap();
        for (name, mut child) in self.running.drain(..) {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "{name} exited with {status}");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{name} did not stop within 60 s of being asked");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the broker and the records show at one moment.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    /// Ids with an effect.
    effects: usize,
    /// Ids with more than one.
    twice: Vec<String>,
    dead_letters: usize,
    /// Delivered and not settled.
    pending: u64,
    /// Not delivered yet.
    unread: u64,
}

impl Seen {
    fn done(&self) -> bool {
        self.effects == MESSAGES
            && self.dead_letters == POISON
            && self.pending == 0
            && self.unread == 0
    }
}

/// Runs the fleet: children start, the producer publishes, two children die, the rest finish;
/// returns what was seen at the end and the ids dead-lettered.
async fn run_fleet(
    mut children: Children,
    publish: impl Future<Output = ()>,
    look: impl AsyncFn() -> Seen,
) -> (Seen, Vec<String>) {
    // One consumer is killed mid-handler, restarted, and killed again.
    for n in 0..CONSUMERS {
        children.start(n == 0);
    }
    // The producer publishes while the consumers consume and the doomed one is killed.
    let mut publishing = std::pin::pin!(publish);
    let mut published = false;
    let deadline = Instant::now() + BOUND;
    let mut seen = Seen::default();
    while !(published && seen.done() && children.killed.len() == KILLS) {
        assert!(
            Instant::now() < deadline,
            "not settled within {BOUND:?}: published {published}, {seen:?}, killed {:?}, running {:?}",
            children.killed,
            children
                .running
                .iter()
                .map(|(name, _)| name)
                .collect::<Vec<_>>()
        );
        if published {
            tokio::time::sleep(Duration::from_millis(200)).await;
        } else {
            tokio::select! {
                () = &mut publishing => published = true,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        children.kill_trapped();
        if published {
            seen = look().await;
        }
    }
    children.stop_all();
    let reports = children.reports.lock().unwrap().clone();
    assert_eq!(
        reports.len(),
        CONSUMERS,
        "each surviving child reported: {reports:?}"
    );
    (look().await, children.killed.clone())
}

/// What the producer publishes, in order: each message, the retry of every tenth one forty
/// messages later, and the refused ones among them.
fn publish_order() -> Vec<(String, String)> {
    let retry = |n: usize| (id(n), payload(n));
    let mut order = Vec::with_capacity(MESSAGES + MESSAGES / 10 + POISON);
    for n in 0..MESSAGES {
        order.push((id(n), payload(n)));
        if n >= 40 && (n - 40) % 10 == 0 {
            order.push(retry(n - 40));
        }
        if n % (MESSAGES / POISON) == 7 {
            order.push((format!("poison-{n}"), POISON_PAYLOAD.to_owned()));
        }
    }
    order.extend((MESSAGES - 40..MESSAGES).filter(|n| n % 10 == 0).map(retry));
    order
}

/// Whether the retry of `id` is published after the stream's duplicate window (half of them).
fn retried_late(id: &str) -> bool {
    id.strip_prefix("m-")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| (n / 10) % 2 == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_consumers_killed_mid_handler_record_each_message_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut connection)
        .await
        .unwrap();
    let children = Children::new(Fleet::Redis, redis.url(), redis.url(), dir.path());
    let publish = {
        let mut connection = connection.clone();
        async move {
            let order = publish_order();
            assert_eq!(order.len(), MESSAGES + MESSAGES / 10 + POISON);
            for (id, payload) in order {
                redis_streams::publish(&mut connection, STREAM, &id, payload)
                    .await
                    .expect("XADD");
            }
        }
    };
    let look = async || {
        let mut connection = connection.clone();
        let effects: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg("effects")
            .query_async(&mut connection)
            .await
            .unwrap();
        let dead_letters: u64 = redis::cmd("XLEN")
            .arg(DEAD_LETTERS)
            .query_async(&mut connection)
            .await
            .unwrap();
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .query_async(&mut connection)
            .await
            .unwrap();
        let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(STREAM)
            .query_async(&mut connection)
            .await
            .unwrap();
        let unread = match groups[0].get("lag") {
            Some(redis::Value::Int(lag)) => u64::try_from(*lag).unwrap(),
            other => panic!("XINFO GROUPS gives the group's lag: {other:?}"),
        };
        let mut twice: Vec<String> = effects
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| id.clone())
            .collect();
        twice.sort();
        Seen {
            effects: effects.len(),
            twice,
            dead_letters: usize::try_from(dead_letters).unwrap(),
            pending: pending.0,
            unread,
        }
    };
    let (seen, killed) = run_fleet(children, publish, look).await;
    // The doomed consumer, then its replacement: one consumer, killed twice.
    assert!(
        killed.len() == KILLS
            && killed[0].starts_with("consumer-0 at ")
            && killed[1].starts_with("consumer-3 at "),
        "{killed:?}"
    );
    assert!(
        seen.twice.is_empty(),
        "effects applied twice: {:?}",
        seen.twice
    );
    assert!(seen.done(), "after the graceful stop: {seen:?}");

    let dead: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(DEAD_LETTERS)
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .unwrap();
    let dead = format!("{dead:?}");
    for n in (0..MESSAGES).filter(|n| n % (MESSAGES / POISON) == 7) {
        assert_eq!(dead.matches(&format!("poison-{n}")).count(), 1, "{dead}");
    }
    assert!(dead.contains("handler-failed"), "{dead}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_consumers_killed_before_their_commits_apply_each_effect_once() {
    use async_nats::jetstream;

    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let database = shared_postgres().create_unique_database("queue_fleet");
    shared_postgres().psql_in(
        idempotent_test_support::database_of(&database),
        "CREATE TABLE effects (message_id text NOT NULL)",
    );
    let client = async_nats::connect(nats.url()).await.unwrap();
    let context = jetstream::new(client);
    // A short duplicate window: the copies published within it are dropped by the server,
    // those published after it are stored and left to the consumers.
    context
        .create_stream(jetstream::stream::Config {
            name: JS_STREAM.into(),
            subjects: vec![JS_SUBJECT.into()],
            duplicate_window: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();
    context
        .create_stream(jetstream::stream::Config {
            name: JS_DEAD_STREAM.into(),
            subjects: vec![JS_DEAD_SUBJECT.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // The durable consumer, created once here so that the children only bind to it.
    drop(
        JetStreamSource::builder(context.clone(), JS_STREAM, JS_CONSUMER)
            .lease(LEASE)
            .build()
            .await
            .unwrap(),
    );
    let children = Children::new(Fleet::Nats, nats.url(), database.clone(), dir.path());
    let publisher = JetStreamPublisher::new(context.clone());
    let deduplicated = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publish = {
        let deduplicated = deduplicated.clone();
        async move {
            let mut first = std::collections::HashSet::new();
            let mut late = Vec::new();
            let publish = async |id: &str, payload: String| {
                let published = publisher
                    .publish(JS_SUBJECT, id, payload)
                    .await
                    .expect("publish");
                if published.duplicate {
                    deduplicated.fetch_add(1, Ordering::SeqCst);
                }
            };
            for (id, payload) in publish_order() {
                if !first.insert(id.clone()) && retried_late(&id) {
                    late.push((id, payload));
                    continue;
                }
                publish(&id, payload).await;
            }
            // The window has passed for every late retry.
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            for (id, payload) in late {
                publish(&id, payload).await;
            }
        }
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database)
        .await
        .unwrap();
    let look = async || {
        let effects: Vec<(String, i64)> =
            sqlx::query_as("SELECT message_id, count(*) FROM effects GROUP BY message_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        let mut twice: Vec<String> = effects
            .iter()
            .filter(|(_, n)| *n > 1)
            .map(|(id, _)| id.clone())
            .collect();
        twice.sort();
        let mut dead = context.get_stream(JS_DEAD_STREAM).await.unwrap();
        let dead_letters = dead.info().await.unwrap().state.messages;
        let stream = context.get_stream(JS_STREAM).await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(JS_CONSUMER).await.unwrap();
        let info = consumer.info().await.unwrap();
        Seen {
            effects: effects.len(),
            twice,
            dead_letters: usize::try_from(dead_letters).unwrap(),
            pending: u64::try_from(info.num_ack_pending).unwrap(),
            unread: info.num_pending,
        }
    };
    let (seen, killed) = run_fleet(children, publish, look).await;
    // The doomed consumer, then its replacement: one consumer, killed twice.
    assert!(
        killed.len() == KILLS
            && killed[0].starts_with("consumer-0 at ")
            && killed[1].starts_with("consumer-3 at "),
        "{killed:?}"
    );
    assert!(
        seen.twice.is_empty(),
        "effects applied twice: {:?}",
        seen.twice
    );
    assert!(seen.done(), "after the graceful stop: {seen:?}");
    // The retries within the window were dropped by the server, the late ones stored and left
    // to the consumers' records.
    let deduplicated = deduplicated.load(Ordering::SeqCst);
    assert!(
        deduplicated > 0 && deduplicated <= MESSAGES / 20,
        "retries the server dropped: {deduplicated}"
    );
    let mut stream = context.get_stream(JS_STREAM).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    assert_eq!(
        usize::try_from(stored).unwrap(),
        MESSAGES + MESSAGES / 10 - deduplicated + POISON,
        "the stream holds each message, the retries not dropped, and the refused ones"
    );
}
