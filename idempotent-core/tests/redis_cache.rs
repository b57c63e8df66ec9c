//! The Redis store's local cache of completed records (`RedisStoreBuilder::local_cache`),
//! against real `redis-server`s started for these tests.
#![cfg(feature = "redis-cache")]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use idempotent_core::conformance::Harness;
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{
    Call, CanonicalArguments, Claim, Error, Fingerprint, Idempotency, Options, Outcome, StorageKey,
    Store, StoreError,
};
use idempotent_test_support::RedisServer;
use support::{AppError, Runs};

/// One server for the conformance suite; the other tests start their own, to count commands.
static SHARED: LazyLock<&'static RedisServer> =
    LazyLock::new(idempotent_test_support::shared_redis);

const HOUR: Duration = Duration::from_secs(3600);
/// The longest a test waits for a state (a record's expiry, an entry's `max_age`).
const PATIENCE: Duration = Duration::from_secs(30);

fn cached_store(url: &str, max_bytes: u64, max_age: Duration) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::builder(url)
            .local_cache(max_bytes, max_age)
            .build()
            .expect("a valid URL"),
    )
}

fn conformance_harness() -> Harness {
    let store = Arc::new(
        RedisStore::builder(SHARED.url())
            .key_prefix("cached:")
            .local_cache(1 << 20, Duration::from_secs(60))
            .build()
            .expect("a valid URL"),
    );
    Harness::with_real_time(store, Duration::from_millis(300)).expiry_is_native(true)
}

idempotent_core::conformance_suite!(conformance_harness());

/// The commands the server ran since its stats were last reset, but for the test's own
/// `INFO` and `CONFIG RESETSTAT`.
fn commands_run(server: &RedisServer) -> BTreeMap<String, u64> {
    let mut stats = server.command_stats();
    stats.retain(|command, _| command != "info" && !command.starts_with("config"));
    stats
}

/// A body that counts its runs and returns the count: each run's output differs, so a stale
/// replay is told from a fresh one.
fn counting(runs: &Runs) -> impl Future<Output = Result<u32, AppError>> + use<> {
    let runs = runs.clone();
    async move {
        runs.hit();
        Ok(runs.count())
    }
}

fn call(key: &str) -> Call<'_> {
    Call::new("redis::cache", Fingerprint::of(&1).unwrap()).key(key)
}

#[tokio::test]
async fn a_hot_replay_sends_no_command_and_a_mismatch_is_answered_from_the_cache() {
    let server = RedisServer::start();
    let engine = Idempotency::new(cached_store(&server.url(), 1 << 20, HOUR));
    let runs = Runs::default();
    assert!(
        !engine
            .run(call("order-1"), counting(&runs))
            .await
            .unwrap()
            .is_replayed()
    );

    server.reset_stats();
    for _ in 0..10 {
        let outcome = engine.run(call("order-1"), counting(&runs)).await.unwrap();
        assert!(matches!(outcome, Outcome::Replayed(1)), "{outcome:?}");
    }
    let other_arguments = Call::new("redis::cache", Fingerprint::of(&2).unwrap()).key("order-1");
    let mismatch = engine.run(other_arguments, counting(&runs)).await;
    assert!(
        matches!(&mismatch, Err(AppError::Idempotency(error)) if error == &format!("{:?}", Error::KeyReused)),
        "{mismatch:?}"
    );
    let sent = commands_run(&server);
    assert!(
        sent.is_empty(),
        "ten replays and a mismatch of a key this store completed are answered from its cache: {sent:?}"
    );
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn a_claim_that_finds_a_completed_record_fills_the_cache_in_one_round_trip() {
    let server = RedisServer::start();
    let writer = Idempotency::new(cached_store(&server.url(), 1 << 20, HOUR));
    let reader_store = cached_store(&server.url(), 1 << 20, HOUR);
    let reader = Idempotency::new(reader_store.clone());
    let runs = Runs::default();
    writer.run(call("order-2"), counting(&runs)).await.unwrap();

    server.reset_stats();
    let first = reader.run(call("order-2"), counting(&runs)).await.unwrap();
    assert!(matches!(first, Outcome::Replayed(1)), "{first:?}");
    let sent = commands_run(&server);
    assert_eq!(
        sent,
        BTreeMap::from([("pttl".to_string(), 1), ("set".to_string(), 1)]),
        "the claim (SET NX GET) and the record's PTTL, in one pipeline"
    );

    server.reset_stats();
    let second = reader.run(call("order-2"), counting(&runs)).await.unwrap();
    assert!(matches!(second, Outcome::Replayed(1)), "{second:?}");
    let mismatch = reader_store
        .claim(
            &call("order-2").storage_key().unwrap(),
            &CanonicalArguments::from(Fingerprint::of(&2).unwrap()),
            HOUR,
        )
        .await
        .unwrap();
    assert_eq!(mismatch, Claim::Mismatch);
    let sent = commands_run(&server);
    assert!(
        sent.is_empty(),
        "the reader's cache answers from then on: {sent:?}"
    );
    assert_eq!(runs.count(), 1);
}

/// Calls `call` through `engine` every 20 ms until `done` accepts the outcome; panics with the
/// last outcome after [`PATIENCE`].
async fn call_until(
    engine: &Idempotency,
    call: Call<'_>,
    runs: &Runs,
    what: &str,
    done: impl Fn(&Outcome<u32>) -> bool,
) -> Outcome<u32> {
    let started = Instant::now();
    loop {
        let outcome = engine.run(call, counting(runs)).await.unwrap();
        if done(&outcome) {
            return outcome;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "waited {PATIENCE:?} for {what}; the last call answered {outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_forget_deletes_this_stores_entry_and_other_caches_replay_it_until_their_max_age() {
    let server = RedisServer::start();
    let max_age = Duration::from_millis(300);
    let a = Idempotency::new(cached_store(&server.url(), 1 << 20, max_age));
    let b = Idempotency::new(cached_store(&server.url(), 1 << 20, max_age));
    let runs = Runs::default();
    let key = call("order-3");
    // The record lives an hour: only the forget and `max_age` end what the caches hold.
    assert!(!a.run(key, counting(&runs)).await.unwrap().is_replayed());
    let replay = b.run(key, counting(&runs)).await.unwrap();
    assert!(matches!(replay, Outcome::Replayed(1)), "{replay:?}");

    assert!(a.forget(key).await.unwrap(), "the record was there");
    let again = a.run(key, counting(&runs)).await.unwrap();
    assert!(
        matches!(again, Outcome::Executed(2)),
        "A's own entry went with the forget, so its next call runs the body: {again:?}"
    );
    server.reset_stats();
    let stale = b.run(key, counting(&runs)).await.unwrap();
    assert!(
        matches!(stale, Outcome::Replayed(1)),
        "B's cache was not told of the forget: it replays the forgotten record: {stale:?}"
    );
    assert!(commands_run(&server).is_empty(), "from its cache");

    // Once B's entry is `max_age` old, B reads the record again: the one A recorded.
    let fresh = call_until(&b, key, &runs, "B's entry to end", |outcome| {
        !matches!(outcome, Outcome::Replayed(1))
    })
    .await;
    assert!(matches!(fresh, Outcome::Replayed(2)), "{fresh:?}");
    assert_eq!(runs.count(), 2);
}

#[tokio::test]
async fn after_a_forget_and_max_age_another_store_runs_the_body() {
    let server = RedisServer::start();
    let max_age = Duration::from_millis(300);
    let a = Idempotency::new(cached_store(&server.url(), 1 << 20, max_age));
    let b = Idempotency::new(cached_store(&server.url(), 1 << 20, max_age));
    let runs = Runs::default();
    let key = call("order-4");
    a.run(key, counting(&runs)).await.unwrap();
    b.run(key, counting(&runs)).await.unwrap();

    assert!(a.forget(key).await.unwrap());
    let stale = b.run(key, counting(&runs)).await.unwrap();
    assert!(matches!(stale, Outcome::Replayed(1)), "{stale:?}");
    let ran = call_until(&b, key, &runs, "B's entry to end", |outcome| {
        !matches!(outcome, Outcome::Replayed(1))
    })
    .await;
    assert!(
        matches!(ran, Outcome::Executed(2)),
        "the record is gone: B runs the body once its entry ends: {ran:?}"
    );
}

/// Waits until the server no longer holds `key`'s record (its `PX` ran out).
async fn until_expired(server: &RedisServer, store: &RedisStore, key: &StorageKey) {
    let record = store.record_key(key);
    let started = Instant::now();
    loop {
        let exists = server.command(&["EXISTS", &record]);
        if exists == "0" {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the record {record} was still there after {PATIENCE:?} (EXISTS answered {exists:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_entry_ends_with_its_records_ttl() {
    let server = RedisServer::start();
    // The cache would keep its entries an hour: only the records' ttl can end them.
    let a_store = cached_store(&server.url(), 1 << 20, HOUR);
    let b_store = cached_store(&server.url(), 1 << 20, HOUR);
    let short = || {
        Options::new()
            .with_lease(Duration::from_millis(500))
            .with_ttl(Duration::from_millis(500))
    };
    let a = Idempotency::new(a_store.clone()).with_options(short());
    let b = Idempotency::new(b_store.clone()).with_options(short());
    let runs = Runs::default();
    let key = call("order-5");
    // A's entry made by its `complete`, B's by its claim and the record's PTTL.
    assert!(!a.run(key, counting(&runs)).await.unwrap().is_replayed());
    let replay = b.run(key, counting(&runs)).await.unwrap();
    assert!(matches!(replay, Outcome::Replayed(1)), "{replay:?}");

    until_expired(&server, &a_store, &key.storage_key().unwrap()).await;
    let after = b.run(key, counting(&runs)).await.unwrap();
    assert!(
        matches!(after, Outcome::Executed(2)),
        "the record expired, so B's entry (from the claim's PTTL) must have too: {after:?}"
    );
    // B's new record may or may not have expired by now; A's old one never answers.
    let after = a.run(key, counting(&runs)).await.unwrap();
    assert!(
        !matches!(after, Outcome::Replayed(1)),
        "the record expired, so A's entry (from its complete) must have too: {after:?}"
    );
}

#[tokio::test]
async fn the_cache_is_bounded() {
    let server = RedisServer::start();
    // Outputs of a few bytes: each entry weighs about 256 bytes, so 100 fit.
    let store = cached_store(&server.url(), 100 * 256, HOUR);
    let engine = Idempotency::new(store.clone());
    let runs = Runs::default();
    let keys: Vec<String> = (0..1000).map(|i| format!("bounded-{i}")).collect();
    for key in &keys {
        engine.run(call(key), counting(&runs)).await.unwrap();
    }
    let entries = store.local_cache_entries().expect("the store has a cache");
    assert!(
        (1..=100).contains(&entries),
        "1,000 records made, at most 100 entries of about 256 bytes kept in 25,600: {entries}"
    );
    // The evicted keys are read from the server again, and still replay.
    for key in &keys[..10] {
        let outcome = engine.run(call(key), counting(&runs)).await.unwrap();
        assert!(outcome.is_replayed(), "{key}: {outcome:?}");
    }
    assert_eq!(runs.count(), 1000);
    assert_eq!(
        RedisStore::builder(server.url())
            .build()
            .unwrap()
            .local_cache_entries(),
        None
    );
}

#[tokio::test]
async fn a_key_of_another_type_is_still_reported_corrupt_with_the_cache_on() {
    let server = RedisServer::start();
    let store = cached_store(&server.url(), 1 << 20, HOUR);
    let key = call("not-a-record").storage_key().unwrap();
    server.command(&["LPUSH", &store.record_key(&key), "x"]);
    let claim = store
        .claim(
            &key,
            &CanonicalArguments::from(Fingerprint::of(&1).unwrap()),
            HOUR,
        )
        .await;
    assert!(
        matches!(&claim, Err(StoreError::Corrupt { key: hex, .. }) if *hex == key.to_hex()),
        "the pipeline's WRONGTYPE goes to the claim script, which reports the key: {claim:?}"
    );
}

#[tokio::test]
async fn on_a_redis_cluster_the_claim_and_its_pttl_go_to_the_keys_shard() {
    let cluster = idempotent_test_support::RedisCluster::start();
    let cached = || {
        Arc::new(
            RedisStore::cluster_builder(cluster.urls())
                .local_cache(1 << 20, HOUR)
                .build()
                .expect("valid URLs"),
        )
    };
    let a = Idempotency::new(cached());
    let b_store = cached();
    let b = Idempotency::new(b_store.clone());
    let runs = Runs::default();
    // Enough keys to land on every shard.
    let keys: Vec<String> = (0..30).map(|i| format!("sharded-{i}")).collect();
    for key in &keys {
        a.run(call(key), counting(&runs)).await.unwrap();
    }
    for key in &keys {
        let outcome = b.run(call(key), counting(&runs)).await.unwrap();
        assert!(outcome.is_replayed(), "{key}: {outcome:?}");
    }
    assert_eq!(
        b_store.local_cache_entries(),
        Some(30),
        "each replay through B made an entry from its claim's PTTL"
    );

    // The replicas apply the writes above from their primaries' streams, and count them as
    // commands: let them catch up first, or a loaded machine sees those writes below.
    for primary in cluster.primaries() {
        cluster.wait_until_replicated(primary);
    }
    for node in 0..idempotent_test_support::RedisCluster::NODES {
        cluster.node(node).reset_stats();
    }
    for key in &keys {
        let outcome = b.run(call(key), counting(&runs)).await.unwrap();
        assert!(outcome.is_replayed(), "{key}: {outcome:?}");
    }
    for node in 0..idempotent_test_support::RedisCluster::NODES {
        let stats = cluster.node(node).command_stats();
        for command in ["set", "pttl", "evalsha", "get"] {
            assert_eq!(
                stats.get(command),
                None,
                "node {node} ran {command} for a cached replay: {stats:?}"
            );
        }
    }
    assert_eq!(runs.count(), 30);
}
