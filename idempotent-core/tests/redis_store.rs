//! The Redis store against a real `redis-server` started for these tests.
#![cfg(feature = "redis")]

mod support;

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use idempotent_core::conformance::{Completing, Forwarding, Harness, Hooks};
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{
    BoxFuture, Bytes, Call, CanonicalArguments, Claim, FencedWrite, Fingerprint, Idempotency,
    OnConflict, Options, Outcome, StorageKey, Store, StoreError,
};
use idempotent_test_support::{ProxyMode, RedisOptions, RedisServer, TcpProxy};
use support::{AppError, Runs};

/// One server for the suite; tests that stop or inspect a server start their own.
static SHARED: LazyLock<&'static RedisServer> =
    LazyLock::new(idempotent_test_support::shared_redis);

fn store_at(url: &str) -> Arc<RedisStore> {
    Arc::new(RedisStore::builder(url).build().expect("a valid URL"))
}

fn conformance_harness() -> Harness {
    Harness::with_real_time(store_at(&SHARED.url()), Duration::from_millis(300))
        .expiry_is_native(true)
}

idempotent_core::conformance_suite!(conformance_harness());

/// The suite again with every claim run as the claim script, as on a server older than Redis
/// 7.0, which refuses `SET .. NX .. GET`.
mod claims_by_script {
    use super::*;

    fn harness() -> Harness {
        let store = RedisStore::builder(SHARED.url())
            .claims_by_script_only()
            .build()
            .expect("a valid URL");
        Harness::with_real_time(Arc::new(store), Duration::from_millis(300)).expiry_is_native(true)
    }

    idempotent_core::conformance_suite!(harness());
}

fn evalsha_calls(server: &RedisServer) -> u64 {
    server.command_stats().get("evalsha").copied().unwrap_or(0)
}

/// How many `command`s `stats` (a `command_stats`) counts, asserting it counts no other.
fn only(stats: &std::collections::BTreeMap<String, u64>, command: &str, what: &str) -> u64 {
    for (other, _) in stats.iter().filter(|(other, _)| other.as_str() != command) {
        // The stats' reset, and a new store's check of the server's settings.
        assert!(
            other.starts_with("config|") || other == "info",
            "{what}: only {command}, but also {other}: {stats:?}"
        );
    }
    stats.get(command).copied().unwrap_or(0)
}

#[tokio::test]
async fn a_replay_is_one_native_command_and_a_get_once_the_store_saw_the_key_completed() {
    let server = RedisServer::start();
    let engine = Idempotency::new(store_at(&server.url()));
    let runs = Runs::default();
    let body = || async {
        runs.hit();
        Ok::<_, AppError>("receipt".to_string())
    };
    // Load the scripts (the first EVALSHA of each meets NOSCRIPT), then count from zero.
    let warm_up = Call::new("redis::trips", Fingerprint::of(&0).unwrap()).key("warm-up");
    engine.run(warm_up, body()).await.unwrap();
    engine.run(warm_up, body()).await.unwrap();

    server.reset_stats();
    let call = Call::new("redis::trips", Fingerprint::of(&1).unwrap()).key("order-1");
    assert!(!engine.run(call, body()).await.unwrap().is_replayed());
    let first_call = server.command_stats();
    // Commands a script runs count too: the completion script's SET is the second.
    assert_eq!(
        (first_call.get("set"), first_call.get("evalsha")),
        (Some(&2), Some(&1)),
        "the claim is one native SET NX GET, the completion the one script: {first_call:?}"
    );
    assert_eq!(
        first_call.get("publish"),
        None,
        "nobody waited, so nothing is published: {first_call:?}"
    );

    // The store that completed the key reads it: one GET.
    server.reset_stats();
    assert!(engine.run(call, body()).await.unwrap().is_replayed());
    let replay = server.command_stats();
    assert_eq!(
        only(&replay, "get", "a replay where the key was completed"),
        1
    );

    // Another process's store has not seen it: one native SET NX GET, which finds it
    // completed; from then on it reads it too.
    let other = Idempotency::new(store_at(&server.url()));
    server.reset_stats();
    assert!(other.run(call, body()).await.unwrap().is_replayed());
    assert_eq!(
        only(&server.command_stats(), "set", "a replay by another store"),
        1
    );
    server.reset_stats();
    assert!(other.run(call, body()).await.unwrap().is_replayed());
    assert_eq!(only(&server.command_stats(), "get", "its next replay"), 1);
    assert_eq!(runs.count(), 2);
}

#[tokio::test]
async fn a_key_seen_completed_but_forgotten_or_taken_since_is_claimed_as_usual() {
    let server = RedisServer::start();
    let (mine, theirs) = (store_at(&server.url()), store_at(&server.url()));
    let engine = Idempotency::new(Arc::clone(&mine) as Arc<dyn Store>)
        .with_options(Options::default().with_on_conflict(OnConflict::Reject));
    let other = Idempotency::new(Arc::clone(&theirs) as Arc<dyn Store>);
    let runs = Runs::default();
    let body = || async {
        runs.hit();
        Ok::<_, AppError>(format!("receipt {}", runs.count()))
    };
    let call = Call::new("redis::hints", Fingerprint::of(&1).unwrap()).key("order-1");
    engine.run(call, body()).await.unwrap();
    assert!(engine.run(call, body()).await.unwrap().is_replayed());

    // Forgotten by another process: this store still takes it for completed, reads nothing,
    // and claims it; the body runs again, as for any forgotten key.
    assert!(other.forget(call).await.unwrap());
    let again = engine.run(call, body()).await.unwrap();
    assert_eq!(again, Outcome::Executed("receipt 2".to_string()));
    assert_eq!(runs.count(), 2);
    assert_eq!(
        engine.run(call, body()).await.unwrap(),
        Outcome::Replayed("receipt 2".to_string())
    );

    // Forgotten and claimed by another process, whose body is still running: this store
    // reads a claim, not a record, and the claim it sends next finds the key held.
    assert!(other.forget(call).await.unwrap());
    let key = call.storage_key().unwrap();
    let Claim::Acquired { .. } = theirs
        .claim(
            &key,
            &CanonicalArguments::from(Fingerprint::of(&1).unwrap()),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
    else {
        panic!("a forgotten key is free");
    };
    let held = engine.run(call, body()).await;
    assert!(
        matches!(held, Err(AppError::Idempotency(ref error)) if error.starts_with("Conflict")),
        "{held:?}"
    );
    assert_eq!(runs.count(), 2, "the body did not run");
    // The GET that found a claim cleared the hint: the next call claims without reading
    // (the one GET counted is the claim script's own, which reads the claim's lease).
    server.reset_stats();
    assert!(engine.run(call, body()).await.is_err());
    let stats = server.command_stats();
    assert_eq!(
        (stats.get("get"), stats.get("evalsha")),
        (Some(&1), Some(&1)),
        "no GET of the store's own once the hint is cleared: {stats:?}"
    );

    // Another call's arguments under a key seen completed: a mismatch, read with the GET.
    let reused = Call::new("redis::hints", Fingerprint::of(&2).unwrap()).key("order-2");
    engine
        .run(
            Call::new("redis::hints", Fingerprint::of(&1).unwrap()).key("order-2"),
            body(),
        )
        .await
        .unwrap();
    server.reset_stats();
    let mismatch = engine.run(reused, body()).await;
    assert!(
        matches!(mismatch, Err(AppError::Idempotency(ref error)) if error.starts_with("KeyReused")),
        "{mismatch:?}"
    );
    assert_eq!(only(&server.command_stats(), "get", "a mismatch"), 1);

    // A store that found the mismatch with its claim reads the key from then on.
    let third = Idempotency::new(store_at(&server.url()) as Arc<dyn Store>);
    assert!(third.run(reused, body()).await.is_err());
    server.reset_stats();
    assert!(third.run(reused, body()).await.is_err());
    assert_eq!(
        only(&server.command_stats(), "get", "a mismatch found before"),
        1
    );

    // Forgotten by this store: its next call claims without reading first (the one GET
    // counted is the complete script's own).
    let order_2 = Call::new("redis::hints", Fingerprint::of(&1).unwrap()).key("order-2");
    assert!(engine.forget(order_2).await.unwrap());
    server.reset_stats();
    assert!(!engine.run(order_2, body()).await.unwrap().is_replayed());
    let stats = server.command_stats();
    assert_eq!(
        (stats.get("get"), stats.get("evalsha")),
        (Some(&1), Some(&1)),
        "no GET of the store's own after its forget: {stats:?}"
    );
}

#[tokio::test]
async fn waiters_are_woken_by_pub_sub_not_by_polling() {
    let server = RedisServer::start();
    let store = store_at(&server.url());
    let key = StorageKey::derive("redis::wait", None, b"k").unwrap();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let hour = Duration::from_secs(3600);
    let Claim::Acquired { fence } = store
        .claim(&key, &CanonicalArguments::from(fingerprint), hour)
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    // Load the script that looks at the record (its first EVALSHA meets NOSCRIPT).
    let absent = StorageKey::derive("redis::wait", None, b"absent").unwrap();
    store.wait(&absent, Duration::from_secs(1)).await.unwrap();
    server.reset_stats();
    let waiter = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.wait(&key, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !waiter.is_finished(),
        "the holder is alive and its lease is an hour"
    );
    let while_waiting = evalsha_calls(&server);
    assert!(
        while_waiting <= 1,
        "one look at the record, no polling: {while_waiting} scripts run"
    );
    assert!(
        server
            .command_stats()
            .get("subscribe")
            .is_some_and(|&n| n >= 1)
    );

    store
        .complete(&key, fence, Bytes::from_static(b"{}"), hour)
        .await
        .unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
    assert!(woken.is_ok(), "the completion's message wakes the waiter");
}

#[tokio::test]
async fn an_outage_fails_calls_fast_without_running_the_body_and_recovery_needs_no_restart() {
    let mut server = RedisServer::start();
    let engine = Idempotency::new(store_at(&server.url()))
        .with_options(Options::new().with_on_conflict(OnConflict::Reject));
    let runs = Runs::default();
    let body = |value: u32| {
        let runs = runs.clone();
        async move {
            runs.hit();
            Ok::<_, AppError>(value)
        }
    };
    let call =
        |key: &'static str| Call::new("redis::outage", Fingerprint::of(&key).unwrap()).key(key);
    assert_eq!(
        engine
            .run(call("before"), body(1))
            .await
            .unwrap()
            .into_value(),
        1
    );

    server.stop();
    for key in ["during-1", "during-2", "during-3"] {
        let started = Instant::now();
        let error = engine.run(call(key), body(2)).await.unwrap_err();
        // The default timeouts, 1 s to connect and 1 s for an answer: within 2 s.
        assert!(
            started.elapsed() <= Duration::from_secs(2) + SCHEDULING,
            "took {:?}",
            started.elapsed()
        );
        assert!(error.idempotency().starts_with("Store("), "{error:?}");
    }
    assert_eq!(runs.count(), 1, "the body never runs without a claim");

    server.restart();
    let recovered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match engine.run(call("after"), body(3)).await {
                Ok(outcome) => return outcome.into_value(),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert_eq!(
        recovered,
        Ok(3),
        "the same store object works again after the restart"
    );
    assert_eq!(runs.count(), 2);
}

fn signal(server: &RedisServer, signal: &str) {
    let pid = server.pid().expect("the server runs").to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test]
async fn a_hung_server_fails_calls_within_the_timeouts() {
    let server = RedisServer::start();
    let engine = Idempotency::new(Arc::new(
        RedisStore::builder(server.url())
            .connect_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
    ));
    let runs = Runs::default();
    let body = || async {
        runs.hit();
        Ok::<_, AppError>(1u32)
    };
    let call =
        |key: &'static str| Call::new("redis::hung", Fingerprint::of(&key).unwrap()).key(key);
    engine.run(call("before"), body()).await.unwrap();

    // The server accepts nothing and answers nothing, as when its machine stalls.
    signal(&server, "-STOP");
    let started = Instant::now();
    let error = engine.run(call("during"), body()).await.unwrap_err();
    let waited = started.elapsed();
    signal(&server, "-CONT");
    assert!(error.idempotency().starts_with("Store("), "{error:?}");
    // 500 ms to connect plus 500 ms for an answer.
    assert!(
        waited <= Duration::from_secs(1) + SCHEDULING,
        "500 ms timeouts took {waited:?}"
    );
    assert_eq!(runs.count(), 1, "the body never runs without a claim");

    let recovered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if engine.run(call("after"), body()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        recovered.is_ok(),
        "calls succeed once the server answers again"
    );
}

#[tokio::test]
async fn foreign_data_under_a_key_is_a_typed_error_and_can_be_purged() {
    let server = RedisServer::start();
    let store = store_at(&server.url());
    let key = StorageKey::derive("redis::corrupt", None, b"k").unwrap();
    let record_key = store.record_key(&key);
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(30);
    // Completed records with the caller's fingerprint but no readable fence: not replays.
    let no_fence = format!("2c{}||out", fingerprint.to_hex());
    let text_fence = format!("2c{}|x1|out", fingerprint.to_hex());
    for foreign in [
        vec!["SET", &record_key, "garbage"],
        // A later format, and this format cut short.
        vec!["SET", &record_key, "3c|1|"],
        vec!["SET", &record_key, "2c0123|x"],
        vec!["SET", &record_key, &no_fence],
        vec!["SET", &record_key, &text_fence],
        vec!["HSET", &record_key, "v", "99", "st", "c"],
        vec!["HSET", &record_key, "st", "c"],
        vec![
            "HSET",
            &record_key,
            "v",
            "1",
            "st",
            "?",
            "fence",
            "x",
            "until",
            "1",
        ],
    ] {
        server.command(&["DEL", &record_key]);
        server.command(&foreign);
        match store
            .claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await
        {
            Err(StoreError::Corrupt { key: hex, message }) => {
                assert_eq!(hex, key.to_hex());
                assert!(!message.is_empty());
            }
            other => panic!("{foreign:?}: expected a corrupt-record error, got {other:?}"),
        }
    }
    // An operator deletes the record; the key works again.
    server.command(&["DEL", &record_key]);
    assert!(matches!(
        store
            .claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));
}

#[tokio::test]
async fn the_key_prefix_namespaces_records() {
    let server = RedisServer::start();
    let a = Arc::new(
        RedisStore::builder(server.url())
            .key_prefix("app-a:")
            .build()
            .unwrap(),
    );
    let b = Arc::new(
        RedisStore::builder(server.url())
            .key_prefix("app-b:")
            .build()
            .unwrap(),
    );
    let key = StorageKey::derive("redis::prefix", None, b"k").unwrap();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(30);
    assert!(matches!(
        a.claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));
    assert!(matches!(
        b.claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));
    assert!(
        server
            .command(&["EXISTS", &a.record_key(&key)])
            .contains('1')
    );
    assert!(a.record_key(&key).starts_with("app-a:"));
}

#[test]
fn a_malformed_url_is_a_clear_error() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let error = RedisStore::builder("not a url").build().unwrap_err();
    assert!(error.to_string().contains("invalid Redis URL"), "{error}");
}

#[tokio::test]
async fn scripts_are_loaded_again_after_the_server_forgets_them() {
    let server = RedisServer::start();
    let engine = Idempotency::new(store_at(&server.url()));
    let runs = Runs::default();
    let body = || async {
        runs.hit();
        Ok::<_, AppError>(7u32)
    };
    let call =
        |key: &'static str| Call::new("redis::noscript", Fingerprint::of(&key).unwrap()).key(key);
    engine.run(call("a"), body()).await.unwrap();
    // As after a failover to a replica, or a restart without persistence of scripts.
    server.command(&["SCRIPT", "FLUSH"]);
    server.reset_stats();
    assert!(engine.run(call("a"), body()).await.unwrap().is_replayed());
    assert!(!engine.run(call("b"), body()).await.unwrap().is_replayed());
    let stats = server.command_stats();
    assert!(
        stats.get("script|load").is_some_and(|&n| n >= 1),
        "reloaded after NOSCRIPT: {stats:?}"
    );
    assert_eq!(runs.count(), 2);
}

/// The value of `field` in `INFO replication`.
fn replication_field(server: &RedisServer, field: &str) -> String {
    let info = server.command(&["INFO", "replication"]);
    info.lines()
        .find_map(|line| line.trim().strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_default()
        .to_string()
}

/// Waits until `replica` follows `primary` and has received all it wrote.
fn wait_for_sync(replica: &RedisServer, primary: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = replication_field(replica, "master_link_status") == "up";
        if up
            && replication_field(replica, "master_repl_offset")
                == replication_field(primary, "master_repl_offset")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not catch up: {}",
            replica.command(&["INFO", "replication"])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `primary` streams its writes to `replica`: after a full synchronisation a
/// primary holds the stream back until the replica's first acknowledgement (up to a second),
/// and a `WAIT` in between counts no replica. A write, then the replica's offset reaching it,
/// shows the stream flows.
fn wait_until_streaming(primary: &RedisServer, replica: &RedisServer) {
    primary.command(&["SET", "streaming-probe", "1"]);
    wait_for_sync(replica, primary);
}

/// A server that starts a replica's full synchronisation at once (Redis waits 5 s by default,
/// for more replicas to share it).
fn replicable_server() -> RedisServer {
    RedisServer::start_with(RedisOptions {
        extra_args: vec!["--repl-diskless-sync-delay".into(), "0".into()],
        ..RedisOptions::default()
    })
}

/// `to` becomes the primary and `from` its replica, and the address clients use (the proxy)
/// leads to `to` from now on, as a failover behind a DNS name or a virtual IP does. Clients'
/// open connections still reach `from`, which keeps them and answers writes with `READONLY`.
fn fail_over(from: &RedisServer, to: &RedisServer, proxy: &TcpProxy) {
    // A planned failover: the replica has everything the primary wrote.
    wait_for_sync(to, from);
    assert_eq!(to.command(&["REPLICAOF", "NO", "ONE"]), "OK");
    let port = to.port().to_string();
    assert_eq!(from.command(&["REPLICAOF", "127.0.0.1", &port]), "OK");
    proxy.redirect(to.port());
    wait_for_sync(from, to);
}

#[tokio::test]
async fn a_failover_is_followed_without_failing_calls_and_back() {
    let a = replicable_server();
    let b = replicable_server();
    assert_eq!(
        b.command(&["REPLICAOF", "127.0.0.1", &a.port().to_string()]),
        "OK"
    );
    wait_for_sync(&b, &a);
    let proxy = TcpProxy::start(a.port());
    let engine = Idempotency::new(store_at(&proxy.redis_url()));
    let runs = Runs::default();
    let body = |value: u32| {
        let runs = runs.clone();
        async move {
            runs.hit();
            Ok::<_, AppError>(value)
        }
    };
    let call =
        |key: &'static str| Call::new("redis::failover", Fingerprint::of(&key).unwrap()).key(key);
    let run = async |key: &'static str, value: u32| {
        engine
            .run(call(key), body(value))
            .await
            .unwrap_or_else(|error| panic!("call {key}: {error:?}"))
    };

    assert!(!run("on-a", 1).await.is_replayed());

    fail_over(&a, &b, &proxy);
    // The store's connection still reaches a, now a replica: it must move to b.
    assert!(!run("on-b", 2).await.is_replayed());
    assert!(run("on-a", 1).await.is_replayed(), "b had a's record");

    fail_over(&b, &a, &proxy);
    assert!(!run("back-on-a", 3).await.is_replayed());
    assert!(run("on-b", 2).await.is_replayed(), "a synced b's record");
    assert_eq!(runs.count(), 3, "each key ran once");
}

/// The server's clock in microseconds, as the claim script reads it.
fn server_micros(server: &RedisServer) -> u64 {
    let time = server.command(&["TIME"]);
    let mut parts = time.lines().map(|part| part.parse::<u64>().unwrap());
    let (seconds, micros) = (parts.next().unwrap(), parts.next().unwrap());
    seconds * 1_000_000 + micros
}

#[tokio::test]
async fn a_key_fences_grow_past_its_tombstone_even_from_a_clock_ahead() {
    // A released record written while the server's clock read an hour later than it does now:
    // as after the clock stepped back, or a failover to a node whose clock is behind.
    let server = RedisServer::start();
    let store = store_at(&server.url());
    let key = StorageKey::derive("redis::fence-ahead", None, b"k").unwrap();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(30);
    let ahead = server_micros(&server) + 3_600_000_000;
    let tombstone = format!("2r|{ahead}|");
    server.command(&["SET", &store.record_key(&key), &tombstone, "PX", "10000"]);
    let mut last = ahead;
    // Each release leaves a tombstone with the fence, so the next claim grows past it, though
    // the clock reads an hour less.
    for round in 0..3 {
        let Claim::Acquired { fence } = store
            .claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await
            .unwrap()
        else {
            panic!("round {round}: a released key is free");
        };
        assert!(
            fence.get() > last,
            "round {round}: fence {} is not above the key's last one, {last}",
            fence.get()
        );
        last = fence.get();
        store.release(&key, fence).await.unwrap();
    }
}

/// The channels with subscribers on `server` whose names start with `prefix`.
fn subscribed_channels(server: &RedisServer, prefix: &str) -> Vec<String> {
    let pattern = format!("{prefix}*");
    let channels = server.command(&["PUBSUB", "CHANNELS", &pattern]);
    let mut subscribed = Vec::new();
    for channel in channels.lines().filter(|line| !line.is_empty()) {
        let numsub = server.command(&["PUBSUB", "NUMSUB", channel]);
        let count = numsub.lines().nth(1).unwrap_or("0");
        if count != "0" {
            subscribed.push(format!("{channel} ({count})"));
        }
    }
    subscribed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_cancelled_at_any_point_leave_no_channel_subscribed() {
    let server = RedisServer::start();
    let prefix = "cancel:";
    let store = Arc::new(
        RedisStore::builder(server.url())
            .key_prefix(prefix)
            .build()
            .unwrap(),
    );
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let hour = Duration::from_secs(3600);
    let keys: Vec<_> = (0..16)
        .map(|i| StorageKey::derive("redis::cancel", None, format!("k{i}").as_bytes()).unwrap())
        .collect();
    let mut fences = Vec::new();
    for key in &keys {
        let Claim::Acquired { fence } = store
            .claim(key, &CanonicalArguments::from(fingerprint), hour)
            .await
            .unwrap()
        else {
            panic!("a fresh key is free");
        };
        fences.push(fence);
    }

    // Waiters cancelled after 0 to 3 ms: before their SUBSCRIBE is sent, before it is
    // confirmed, during their look at the record, and while they wait. Now and then the
    // server drops the subscriber connection, so some waiters meet a new one.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let waiters = 3000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..waiters {
        let key = keys[(next() % keys.len() as u64) as usize];
        let patience = Duration::from_micros(next() % 3000);
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let _ = tokio::time::timeout(patience, store.wait(&key, hour)).await;
        });
        if i % 500 == 250 {
            server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        }
        if i % 64 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("a waiter panicked");
    }

    // Unsubscribing a channel nobody waits on any more is done in the background: give it time.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = subscribed_channels(&server, prefix);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = subscribed_channels(&server, prefix);
    }
    assert!(
        left.is_empty(),
        "{} channels still subscribed after every waiter was cancelled: {:?}",
        left.len(),
        &left[..left.len().min(5)]
    );

    // And waiting still works: a waiter is woken by a completion.
    let waiter = {
        let (store, key) = (Arc::clone(&store), keys[0]);
        tokio::spawn(async move { store.wait(&key, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    store
        .complete(&keys[0], fences[0], Bytes::from_static(b"{}"), hour)
        .await
        .unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
    assert!(woken.is_ok(), "the completion's message wakes the waiter");
}

/// How late a timer may fire on a busy test machine: what a bound in these tests allows beyond
/// the durations the store was configured with.
const SCHEDULING: Duration = Duration::from_millis(50);

#[tokio::test]
async fn a_black_holed_host_fails_calls_within_the_connect_and_response_timeouts() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.port());
    // The defaults: 1 s to connect, 1 s for an answer, so "within 2 s" (RedisStoreBuilder).
    let bound = Duration::from_secs(2);
    let engine = Idempotency::new(store_at(&proxy.redis_url()))
        .with_options(Options::new().with_on_conflict(OnConflict::Reject));
    let runs = Runs::default();
    let body = || async {
        runs.hit();
        Ok::<_, AppError>(1u32)
    };
    let call =
        |key: &'static str| Call::new("redis::black-hole", Fingerprint::of(&key).unwrap()).key(key);
    engine.run(call("before"), body()).await.unwrap();

    proxy.set_mode(ProxyMode::BlackHole);
    // The first call meets the open connection, which no longer answers; the next ones connect
    // anew (the TCP connection is accepted, nothing answers); a store that never connected
    // does only that.
    let fresh = Idempotency::new(store_at(&proxy.redis_url()));
    let mut slowest = Duration::ZERO;
    for (engine, key) in [
        (&engine, "during-1"),
        (&engine, "during-2"),
        (&engine, "during-3"),
        (&fresh, "during-fresh"),
    ] {
        let started = Instant::now();
        let error = engine.run(call(key), body()).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            error.idempotency().starts_with("Store("),
            "{key}: {error:?}"
        );
        assert!(
            took <= bound + SCHEDULING,
            "{key}: a black-holed host took {took:?}, over the {bound:?} bound"
        );
        slowest = slowest.max(took);
    }
    eprintln!("black-holed host: slowest failed call {slowest:?} (bound {bound:?})");
    assert_eq!(runs.count(), 1, "the body never runs without a claim");

    proxy.set_mode(ProxyMode::Forward);
    let recovered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if engine.run(call("after"), body()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        recovered.is_ok(),
        "calls succeed once the host answers again"
    );
    assert_eq!(runs.count(), 2);
}

#[tokio::test]
async fn a_response_timeout_leaves_what_the_server_did() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.port());
    let timeout = Duration::from_millis(300);
    let through_proxy = Arc::new(
        RedisStore::builder(proxy.redis_url())
            .connect_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .unwrap(),
    );
    let direct = store_at(&server.url());
    let lease = Duration::from_secs(1);
    let engine = Idempotency::new(through_proxy.clone()).with_options(
        Options::new()
            .with_lease(lease)
            .with_on_conflict(OnConflict::Reject),
    );
    let runs = Runs::default();
    let body = || async {
        runs.hit();
        Ok::<_, AppError>(7u32)
    };
    let call = Call::new("redis::lost-answer", Fingerprint::of(&0).unwrap()).key("k");
    // Load the scripts while answers still arrive.
    engine
        .run(
            Call::new("redis::lost-answer", Fingerprint::of(&1).unwrap()).key("warm-up"),
            body(),
        )
        .await
        .unwrap();

    // The claim is carried out; its answer is lost.
    proxy.set_mode(ProxyMode::DropReplies);
    let started = Instant::now();
    let error = engine.run(call, body()).await.unwrap_err();
    assert!(error.idempotency().starts_with("Store("), "{error:?}");
    assert_eq!(
        runs.count(),
        1,
        "no claim was seen, so the body did not run"
    );
    // What is left: the claim, holding the key until its lease ends.
    let key = StorageKey::derive("redis::lost-answer", None, b"k").unwrap();
    let fingerprint = Fingerprint::of(&0).unwrap();
    match direct
        .claim(&key, &CanonicalArguments::from(fingerprint), lease)
        .await
        .unwrap()
    {
        Claim::InProgress { retry_after } => assert!(retry_after <= lease),
        other => panic!("the lost claim holds the key: {other:?}"),
    }
    proxy.set_mode(ProxyMode::Forward);
    let conflict = engine.run(call, body()).await.unwrap_err();
    assert!(
        conflict.idempotency().starts_with("Conflict"),
        "in progress until the lease ends: {conflict:?}"
    );
    tokio::time::sleep(lease.saturating_sub(started.elapsed()) + Duration::from_millis(50)).await;
    let outcome = engine.run(call, body()).await.unwrap();
    assert!(!outcome.is_replayed());
    assert_eq!(
        runs.count(),
        2,
        "the body ran once, after the lost claim's lease"
    );

    // A write whose answer is lost may have been applied: a complete is.
    let other = StorageKey::derive("redis::lost-answer", None, b"other").unwrap();
    let Claim::Acquired { fence } = direct
        .claim(&other, &CanonicalArguments::from(fingerprint), lease)
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    proxy.set_mode(ProxyMode::DropReplies);
    let lost = through_proxy
        .complete(
            &other,
            fence,
            Bytes::from_static(b"{}"),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        matches!(lost, Err(StoreError::Unavailable { .. })),
        "a timeout is Unavailable: {lost:?}"
    );
    match direct
        .claim(&other, &CanonicalArguments::from(fingerprint), lease)
        .await
        .unwrap()
    {
        Claim::Completed { output } => assert_eq!(&output[..], b"{}"),
        other => panic!("the complete was applied though its answer was lost: {other:?}"),
    }
}

#[tokio::test]
async fn a_subscriber_connection_given_up_is_closed_and_leaves_no_channel_subscribed() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.port());
    let prefix = "late:";
    let timeout = Duration::from_millis(300);
    let store = Arc::new(
        RedisStore::builder(proxy.redis_url())
            .key_prefix(prefix)
            .connect_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .unwrap(),
    );
    let direct = Arc::new(
        RedisStore::builder(server.url())
            .key_prefix(prefix)
            .build()
            .unwrap(),
    );
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let hour = Duration::from_secs(3600);
    let key = |name: &str| StorageKey::derive("redis::late", None, name.as_bytes()).unwrap();
    let mut fences = std::collections::HashMap::new();
    for name in ["first", "second", "third"] {
        let Claim::Acquired { fence } = direct
            .claim(&key(name), &CanonicalArguments::from(fingerprint), hour)
            .await
            .unwrap()
        else {
            panic!("a fresh key is free");
        };
        fences.insert(name, fence);
    }
    let wait = |name: &'static str| {
        let store = Arc::clone(&store);
        let key = key(name);
        tokio::spawn(async move { store.wait(&key, hour).await })
    };

    // A waiter subscribes on the first subscriber connection.
    let first = wait("first");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next one's SUBSCRIBE goes unconfirmed: the store gives that connection up.
    proxy.set_mode(ProxyMode::BlackHole);
    let second = wait("second");
    let _ = tokio::time::timeout(Duration::from_secs(5), second).await;
    proxy.set_mode(ProxyMode::Forward);
    // A third waiter subscribes on a new connection.
    let third = wait("third");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The connection given up was closed (and its subscriptions with it): one is left.
    let subscribers = || -> Vec<u64> {
        let clients = server.command(&["CLIENT", "LIST", "TYPE", "pubsub"]);
        clients
            .lines()
            .filter_map(|line| line.strip_prefix("id=")?.split(' ').next()?.parse().ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while subscribers().len() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids = subscribers();
    assert_eq!(ids.len(), 1, "subscriber connections left open: {ids:?}");
    // The third waiter is woken by its key's completion.
    direct
        .complete(
            &key("third"),
            fences["third"],
            Bytes::from_static(b"{}"),
            hour,
        )
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), third).await;
    // The first waiter's subscription went with the connection given up: it was woken to look
    // again, not left to wait out an hour's lease for a message that can no longer come.
    let woken = tokio::time::timeout(Duration::from_secs(5), first).await;
    assert!(woken.is_ok(), "the first waiter is still waiting");

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = subscribed_channels(&server, prefix);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = subscribed_channels(&server, prefix);
    }
    assert!(left.is_empty(), "channels still subscribed: {left:?}");
}

/// Hooks that keep what each `complete` sent through them met.
#[derive(Debug, Default)]
struct CompletesSeen {
    completes: Mutex<Vec<Result<FencedWrite, String>>>,
}

impl CompletesSeen {
    fn completes(&self) -> Vec<Result<FencedWrite, String>> {
        self.completes.lock().unwrap().clone()
    }
}

impl Hooks for CompletesSeen {
    fn complete<'a>(
        &'a self,
        op: Completing<'a>,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let write = op.send().await;
            let seen = match &write {
                Ok(applied) => Ok(*applied),
                Err(error) => Err(format!("{error:?}")),
            };
            self.completes.lock().unwrap().push(seen);
            write
        })
    }
}

/// The connection the claim went over is closed by the server while the body runs, so the
/// first `complete` fails on it: the engine sends it again, the caller gets its value as
/// executed, and a retry replays it without running the body.
#[tokio::test]
async fn a_complete_cut_off_by_a_killed_connection_is_sent_again() {
    let server = RedisServer::start();
    let store = Arc::new(Forwarding::new(
        store_at(&server.url()),
        CompletesSeen::default(),
    ));
    let engine = Idempotency::new(store.clone());
    let runs = Runs::default();
    let call = Call::new("redis::killed", Fingerprint::of(&0).unwrap()).key("order-1");

    let first = engine
        .run(call, async {
            runs.hit();
            // Every normal client but this command's own: the store's connection among them.
            let killed = server.command(&["CLIENT", "KILL", "TYPE", "normal"]);
            assert_ne!(
                killed, "0",
                "the store's connection was open and is now closed"
            );
            Ok::<_, AppError>("receipt".to_string())
        })
        .await
        .unwrap();
    assert_eq!(first, Outcome::Executed("receipt".to_string()));

    let completes = store.completes();
    assert!(
        matches!(completes.first(), Some(Err(error)) if error.starts_with("Unavailable")),
        "the first complete went over the killed connection and failed: {completes:?}"
    );
    assert_eq!(
        completes.last(),
        Some(&Ok(FencedWrite::Applied)),
        "a later one was applied: {completes:?}"
    );

    let retry = engine
        .run(call, async {
            runs.hit();
            Ok::<_, AppError>("another receipt".to_string())
        })
        .await
        .unwrap();
    assert_eq!(retry, Outcome::Replayed("receipt".to_string()));
    assert_eq!(runs.count(), 1, "the body ran once");
}

#[tokio::test]
async fn with_wait_for_replicas_a_claim_no_replica_received_is_released_and_its_body_never_runs() {
    let primary = replicable_server();
    let replica = replicable_server();
    let port = primary.port().to_string();
    assert_eq!(replica.command(&["REPLICAOF", "127.0.0.1", &port]), "OK");
    wait_for_sync(&replica, &primary);
    wait_until_streaming(&primary, &replica);

    let waiting_store = Arc::new(
        RedisStore::builder(primary.url())
            .wait_for_replicas(1, Duration::from_millis(200))
            .build()
            .unwrap(),
    );
    let waiting = Idempotency::new(Arc::clone(&waiting_store) as Arc<dyn Store>);
    let plain = Idempotency::new(store_at(&primary.url()));
    let runs = Runs::default();
    let body = || async {
        runs.hit();
        Ok::<_, AppError>("receipt".to_string())
    };
    let call = |key| Call::new("redis::wait-replicas", Fingerprint::of(&1).unwrap()).key(key);

    // With the replica following, claim and completion are acknowledged: one WAIT each.
    primary.reset_stats();
    let outcome = waiting.run(call("order-1"), body()).await.unwrap();
    assert!(!outcome.is_replayed());
    assert_eq!(
        primary.command_stats().get("wait"),
        Some(&2),
        "a WAIT after the claim and after the completion: {:?}",
        primary.command_stats()
    );
    assert!(
        waiting
            .run(call("order-1"), body())
            .await
            .unwrap()
            .is_replayed()
    );
    assert_eq!(runs.count(), 1);

    // A lease renewal is waited for too (a failover that lost it would end the lease early and
    // let another caller take the key over while the body runs); a fenced one is not.
    let key = StorageKey::derive("redis::wait-replicas", None, b"renewed").unwrap();
    let minute = Duration::from_secs(60);
    let Claim::Acquired { fence } = waiting_store
        .claim(
            &key,
            &CanonicalArguments::from(Fingerprint::from_bytes([2; 32])),
            minute,
        )
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    primary.reset_stats();
    assert_eq!(
        waiting_store.extend(&key, fence, minute).await.unwrap(),
        FencedWrite::Applied
    );
    let stale = idempotent_core::Fence::new(fence.get() - 1);
    assert_eq!(
        waiting_store.extend(&key, stale, minute).await.unwrap(),
        FencedWrite::Fenced
    );
    assert_eq!(
        primary.command_stats().get("wait"),
        Some(&1),
        "a WAIT after the applied renewal only: {:?}",
        primary.command_stats()
    );

    // The replica stops receiving: a claim only the primary has is released, and the body
    // does not run.
    signal(&replica, "-STOP");
    let refused = waiting.run(call("order-2"), body()).await;
    let stopped_runs = runs.count();
    signal(&replica, "-CONT");
    let Err(AppError::Idempotency(error)) = refused else {
        panic!("a claim no replica received must fail the call: {refused:?}");
    };
    assert!(error.starts_with("Store(Unavailable"), "{error}");
    assert!(error.contains("0 of the 1 replicas"), "{error}");
    assert!(error.contains("it was released"), "{error}");
    assert_eq!(stopped_runs, 1, "the body did not run on the refused claim");
    // Released: the retry claims it at once and runs the body once.
    wait_until_streaming(&primary, &replica);
    let retried = waiting.run(call("order-2"), body()).await.unwrap();
    assert!(!retried.is_replayed());
    assert_eq!(runs.count(), 2);

    // Without the option the same stopped replica goes unnoticed: the call runs.
    signal(&replica, "-STOP");
    let unwaited = plain.run(call("order-3"), body()).await;
    signal(&replica, "-CONT");
    assert!(unwaited.is_ok(), "{unwaited:?}");
    assert_eq!(runs.count(), 3);
}

#[test]
fn wait_for_replicas_needs_a_timeout_below_the_response_timeout() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    for (replicas, timeout) in [
        (1, Duration::from_secs(1)),
        (1, Duration::ZERO),
        (0, Duration::from_millis(100)),
    ] {
        let Err(StoreError::Backend { message, .. }) = RedisStore::builder("redis://127.0.0.1/")
            .wait_for_replicas(replicas, timeout)
            .build()
        else {
            panic!("wait_for_replicas({replicas}, {timeout:?}) must be refused");
        };
        assert!(message.contains("below the response timeout"), "{message}");
    }
    assert!(
        RedisStore::builder("redis://127.0.0.1/")
            .wait_for_replicas(1, Duration::from_millis(100))
            .build()
            .is_ok()
    );
}
