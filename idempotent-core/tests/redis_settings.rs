//! The Redis store reads each server's eviction and persistence settings when it is made: a
//! WARN for each setting under which Redis may lose records, or, with
//! `require_durable_settings(true)`, a refusal. Real servers started with those settings.
#![cfg(feature = "redis")]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{Call, Fingerprint, Idempotency, StoreError};
use idempotent_test_support::{RedisOptions, RedisServer, free_port};
use support::{AppError, Runs};
use tracing::Level;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// The target of the store's events.
const TARGET: &str = "idempotent_core::stores::redis";

type Fields = BTreeMap<String, String>;

/// The events of the store's target: level and fields (the message as `message`).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<(Level, Fields)>>>);

struct FieldVisitor<'a>(&'a mut Fields);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut fields = Fields::new();
        event.record(&mut FieldVisitor(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), fields));
    }
}

impl Captured {
    /// Captures the events of this thread until the guard is dropped (the tests run on a
    /// current-thread runtime, so the store's tasks run on this thread too).
    fn install() -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(captured.clone());
        let guard = tracing::subscriber::set_default(subscriber);
        (captured, guard)
    }

    fn events(&self) -> Vec<(Level, Fields)> {
        self.0.lock().unwrap().clone()
    }

    fn at(&self, level: Level) -> Vec<Fields> {
        self.events()
            .into_iter()
            .filter(|(seen, _)| *seen == level)
            .map(|(_, fields)| fields)
            .collect()
    }

    /// Waits (at most 30 s) until an event at `level` has come, for a check that runs in the
    /// background.
    async fn wait_for(&self, level: Level) -> Vec<Fields> {
        let started = Instant::now();
        loop {
            let found = self.at(level);
            if !found.is_empty() {
                return found;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no {level} event within 30 s; the store's events: {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn field<'a>(fields: &'a Fields, name: &str) -> &'a str {
    fields
        .get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("the event has no field {name}: {fields:?}"))
}

/// `appendonly yes` and `maxmemory-policy noeviction` (Redis' default): every record kept.
fn durable() -> RedisOptions {
    RedisOptions {
        appendonly: true,
        extra_args: vec![],
    }
}

/// The append-only file on, so that only eviction is wrong.
fn evicting() -> RedisOptions {
    RedisOptions {
        appendonly: true,
        extra_args: vec!["--maxmemory-policy".into(), "allkeys-lru".into()],
    }
}

/// The test servers' default: no append-only file, no snapshots.
fn unpersisted() -> RedisOptions {
    RedisOptions::default()
}

/// Runs one call through `store`, then again: the store works.
async fn assert_works(store: RedisStore) {
    let engine = Idempotency::new(Arc::new(store));
    let runs = Runs::default();
    let call = Call::new("redis::settings", Fingerprint::of(&1).unwrap()).key("order-1");
    for _ in 0..2 {
        let value = engine
            .run(call, async {
                runs.hit();
                Ok::<_, AppError>(7u32)
            })
            .await
            .expect("the store works");
        assert_eq!(value.into_value(), 7);
    }
    assert_eq!(runs.count(), 1, "the second call replays");
}

async fn refused(url: &str) -> String {
    match RedisStore::builder(url)
        .require_durable_settings(true)
        .connect()
        .await
    {
        Err(StoreError::Backend { message, .. }) => message,
        Err(other) => panic!("refused with another error than Backend: {other:?}"),
        Ok(_) => panic!("require_durable_settings accepted an unsafe server at {url}"),
    }
}

#[tokio::test]
async fn an_evicting_policy_is_one_warning_naming_the_policy_and_the_fix() {
    let server = RedisServer::start_with(evicting());
    let (captured, _guard) = Captured::install();

    let store = RedisStore::builder(server.url())
        .connect()
        .await
        .expect("a warning, not a refusal");

    let warnings = captured.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    let warning = &warnings[0];
    assert_eq!(field(warning, "node"), server.url());
    assert_eq!(field(warning, "setting"), "maxmemory-policy");
    assert_eq!(field(warning, "value"), "allkeys-lru");
    assert!(field(warning, "fix").contains("maxmemory-policy noeviction"));
    let message = field(warning, "message");
    assert!(
        message.contains("may evict idempotency records")
            && message.contains("current policy: 'allkeys-lru'"),
        "{message}"
    );
    assert_works(store).await;
}

/// Every record has a TTL, so a `volatile-*` policy evicts them too, and says so.
#[tokio::test]
async fn a_volatile_policy_is_a_warning_too() {
    let server = RedisServer::start_with(RedisOptions {
        appendonly: true,
        extra_args: vec!["--maxmemory-policy".into(), "volatile-lru".into()],
    });
    let (captured, _guard) = Captured::install();

    RedisStore::builder(server.url()).connect().await.unwrap();

    let warnings = captured.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert_eq!(field(&warnings[0], "value"), "volatile-lru");
    let message = field(&warnings[0], "message");
    assert!(message.contains("every record has a TTL"), "{message}");
}

#[tokio::test]
async fn no_persistence_is_one_warning_that_a_restart_loses_every_record() {
    let server = RedisServer::start_with(unpersisted());
    let (captured, _guard) = Captured::install();

    let store = RedisStore::builder(server.url()).connect().await.unwrap();

    let warnings = captured.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    let warning = &warnings[0];
    assert_eq!(field(warning, "node"), server.url());
    assert_eq!(field(warning, "setting"), "appendonly, save");
    assert_eq!(field(warning, "value"), "appendonly no, save \"\"");
    assert!(field(warning, "fix").contains("appendonly yes"));
    let message = field(warning, "message");
    assert!(
        message.contains("a restart loses every idempotency record"),
        "{message}"
    );
    assert_works(store).await;
}

#[tokio::test]
async fn snapshots_alone_are_a_warning_that_a_crash_loses_the_last_writes() {
    let server = RedisServer::start_with(RedisOptions {
        appendonly: false,
        extra_args: vec!["--save".into(), "3600 1".into()],
    });
    let (captured, _guard) = Captured::install();

    RedisStore::builder(server.url()).connect().await.unwrap();

    let warnings = captured.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert_eq!(
        field(&warnings[0], "value"),
        "appendonly no, save \"3600 1\""
    );
    let message = field(&warnings[0], "message");
    assert!(
        message.contains("a crash loses the idempotency records written since the last snapshot"),
        "{message}"
    );
}

#[tokio::test]
async fn a_durable_server_gives_no_warning() {
    let server = RedisServer::start_with(durable());
    let (captured, _guard) = Captured::install();

    let store = RedisStore::builder(server.url()).connect().await.unwrap();

    assert_eq!(
        captured.events(),
        vec![],
        "nothing to say about this server"
    );
    assert_works(store).await;
}

/// `build()` does not connect: it checks in the background, on the runtime.
#[tokio::test]
async fn build_checks_in_the_background() {
    let server = RedisServer::start_with(evicting());
    let (captured, _guard) = Captured::install();

    let store = RedisStore::builder(server.url()).build().unwrap();

    let warnings = captured.wait_for(Level::WARN).await;
    assert_eq!(field(&warnings[0], "setting"), "maxmemory-policy");
    assert_works(store).await;
}

#[tokio::test]
async fn require_durable_settings_refuses_each_unsafe_server_and_accepts_a_durable_one() {
    let evicting = RedisServer::start_with(evicting());
    let unpersisted = RedisServer::start_with(unpersisted());
    let durable = RedisServer::start_with(durable());

    let message = refused(&evicting.url()).await;
    for part in [
        evicting.url().as_str(),
        "maxmemory-policy is allkeys-lru",
        "set maxmemory-policy noeviction",
        "drop require_durable_settings(true)",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    assert!(!message.contains("appendonly"), "{message}");

    let message = refused(&unpersisted.url()).await;
    for part in [
        "appendonly, save is appendonly no, save \"\"",
        "set appendonly yes",
        "drop require_durable_settings(true)",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }

    let store = RedisStore::builder(durable.url())
        .require_durable_settings(true)
        .connect()
        .await
        .expect("a durable server is accepted");
    assert_works(store).await;
}

/// `build()` cannot refuse what it has not read: with the option it fails at once.
#[tokio::test]
async fn require_durable_settings_makes_build_point_to_connect() {
    let server = RedisServer::start_with(durable());
    let Err(StoreError::Backend { message, .. }) = RedisStore::builder(server.url())
        .require_durable_settings(true)
        .build()
    else {
        panic!("build() with require_durable_settings must fail");
    };
    assert!(message.contains("connect().await"), "{message}");
}

/// Where `CONFIG` is renamed away (as many managed services do), the settings are read from
/// `INFO`: an INFO-level event says so, the eviction WARN still comes, and the store works.
#[tokio::test]
async fn without_config_the_settings_are_read_from_info() {
    let mut options = evicting();
    options
        .extra_args
        .extend(["--rename-command".into(), "CONFIG".into(), "".into()]);
    let server = RedisServer::start_with(options);
    let (captured, _guard) = Captured::install();

    let store = RedisStore::builder(server.url()).connect().await.unwrap();

    let infos = captured.at(Level::INFO);
    assert_eq!(infos.len(), 1, "one INFO event: {infos:?}");
    assert!(
        field(&infos[0], "message").contains("read from INFO"),
        "{infos:?}"
    );
    assert!(
        field(&infos[0], "error").contains("unknown command"),
        "{infos:?}"
    );
    let warnings = captured.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert_eq!(field(&warnings[0], "value"), "allkeys-lru");
    assert_works(store).await;

    let message = refused(&server.url()).await;
    assert!(
        message.contains("maxmemory-policy is allkeys-lru"),
        "{message}"
    );
}

/// `INFO` shows whether the append-only file is on, not the snapshot points.
#[tokio::test]
async fn without_config_no_append_only_file_is_a_warning() {
    let server = RedisServer::start_with(RedisOptions {
        appendonly: false,
        extra_args: vec!["--rename-command".into(), "CONFIG".into(), "".into()],
    });
    let (captured, _guard) = Captured::install();

    RedisStore::builder(server.url()).connect().await.unwrap();

    let warnings = captured.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert_eq!(field(&warnings[0], "setting"), "appendonly");
    assert_eq!(field(&warnings[0], "value"), "no");
}

/// A user that may run neither `CONFIG` nor `INFO`: the store works, an INFO-level event
/// says the settings were not checked; with the option, the store is refused (it was asked
/// for a server seen to keep every record).
#[tokio::test]
async fn unreadable_settings_are_logged_and_refused_only_when_required() {
    let server = RedisServer::start_with(durable());
    let reply = server.command(&[
        "ACL",
        "SETUSER",
        "worker",
        "on",
        ">worker-sekret",
        "~*",
        "&*",
        "+@all",
        "-config",
        "-info",
    ]);
    assert_eq!(reply, "OK");
    let url = format!("redis://worker:worker-sekret@127.0.0.1:{}/", server.port());
    let shown = format!("redis://worker:***@127.0.0.1:{}/", server.port());
    let (captured, _guard) = Captured::install();

    let store = RedisStore::builder(&url).connect().await.unwrap();

    assert_eq!(captured.at(Level::WARN), Vec::<Fields>::new());
    let infos = captured.at(Level::INFO);
    assert_eq!(infos.len(), 1, "one INFO event: {infos:?}");
    assert_eq!(field(&infos[0], "node"), shown, "the password is masked");
    let message = field(&infos[0], "message");
    assert!(message.contains("not checked"), "{message}");
    assert!(
        field(&infos[0], "error").contains("no permissions"),
        "{infos:?}"
    );
    assert_works(store).await;

    let message = refused(&url).await;
    assert!(
        message.contains("could not be read") && message.contains(&shown),
        "{message}"
    );
    assert!(!message.contains("worker-sekret"), "{message}");
}

/// A Redis Cluster node with no slots yet, its cluster bus on a free port (answered too).
fn cluster_node(options: RedisOptions) -> (RedisServer, u16) {
    let mut options = options;
    let bus_port = free_port();
    options.extra_args.extend([
        "--cluster-enabled".into(),
        "yes".into(),
        "--cluster-port".into(),
        bus_port.to_string(),
    ]);
    (RedisServer::start_with(options), bus_port)
}

/// Waits (at most 30 s) until `node` says the cluster is `ok`.
async fn wait_for_cluster(node: &RedisServer) {
    let started = Instant::now();
    loop {
        let info = node.command(&["CLUSTER", "INFO"]);
        if info.lines().any(|line| line.trim() == "cluster_state:ok") {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the cluster is not ok within 30 s: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// On a Redis Cluster every node the builder was given is checked, and the WARN and the
/// refusal name the node at fault.
#[tokio::test]
async fn every_cluster_node_is_checked_and_named() {
    let (durable, _) = cluster_node(durable());
    let (evicting, evicting_bus) = cluster_node(evicting());
    assert_eq!(
        durable.command(&["CLUSTER", "ADDSLOTSRANGE", "0", "8191"]),
        "OK"
    );
    assert_eq!(
        evicting.command(&["CLUSTER", "ADDSLOTSRANGE", "8192", "16383"]),
        "OK"
    );
    let (port, bus) = (evicting.port().to_string(), evicting_bus.to_string());
    assert_eq!(
        durable.command(&["CLUSTER", "MEET", "127.0.0.1", &port, &bus]),
        "OK"
    );
    wait_for_cluster(&durable).await;
    wait_for_cluster(&evicting).await;
    let urls = [durable.url(), evicting.url()];
    let (captured, _guard) = Captured::install();

    let store = RedisStore::cluster_builder(urls.clone())
        .connect()
        .await
        .expect("a warning, not a refusal");

    let warnings = captured.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert_eq!(field(&warnings[0], "node"), evicting.url());
    assert_eq!(field(&warnings[0], "value"), "allkeys-lru");
    assert_works(store).await;

    let Err(StoreError::Backend { message, .. }) = RedisStore::cluster_builder(urls)
        .require_durable_settings(true)
        .connect()
        .await
    else {
        panic!("the evicting node must be refused");
    };
    assert!(
        message.contains(&format!("{} may lose", evicting.url()))
            && !message.contains(&format!("{} may lose", durable.url())),
        "{message}"
    );
}
