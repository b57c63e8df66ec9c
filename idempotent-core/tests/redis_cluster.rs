//! The Redis store on a real Redis Cluster (3 primaries, 3 replicas) started for these tests:
//! the conformance suite, keys on every shard, and waits over shard channels. Failovers are in
//! `redis_cluster_failover.rs`, each on a cluster of its own.
#![cfg(feature = "redis")]

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use idempotent_core::conformance::Harness;
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{
    Bytes, Call, CanonicalArguments, Claim, Fingerprint, Idempotency, StorageKey, Store,
};
use idempotent_test_support::RedisCluster;
use support::{AppError, Runs};

/// One cluster for every test here (the failover tests start their own).
static SHARED: LazyLock<RedisCluster> = LazyLock::new(RedisCluster::start);

fn store_on(cluster: &RedisCluster) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::cluster_builder(cluster.urls())
            .build()
            .expect("valid URLs"),
    )
}

fn store() -> Arc<RedisStore> {
    store_on(&SHARED)
}

fn conformance_harness() -> Harness {
    Harness::with_real_time(store(), Duration::from_millis(300)).expiry_is_native(true)
}

idempotent_core::conformance_suite!(conformance_harness());

#[tokio::test]
async fn calls_run_once_per_key_on_every_shard() {
    let engine = Idempotency::new(store());
    let runs = Runs::default();
    let body = |n: u32| {
        let runs = &runs;
        async move {
            runs.hit();
            Ok::<_, AppError>(n)
        }
    };
    // 200 keys spread over the 16384 slots, hence over the three primaries.
    let store = store();
    let shards: BTreeSet<usize> = (0..200u32)
        .map(|n| {
            let key = StorageKey::derive("cluster::spread", None, format!("order-{n}").as_bytes())
                .unwrap();
            SHARED.node_for_key(&store.record_key(&key))
        })
        .collect();
    assert_eq!(
        shards.len(),
        3,
        "the keys live on every primary: {shards:?}"
    );
    for round in 0..2 {
        for n in 0..200u32 {
            let key = format!("order-{n}");
            let call = Call::new("cluster::spread", Fingerprint::of(&n).unwrap()).key(&key);
            let outcome = engine.run(call, body(n)).await.unwrap();
            assert_eq!(
                outcome.is_replayed(),
                round == 1,
                "order-{n}, round {round}"
            );
            assert_eq!(outcome.into_value(), n);
        }
    }
    assert_eq!(runs.count(), 200);
}

#[tokio::test]
async fn a_waiter_is_woken_by_the_shard_channel() {
    let store = store();
    let key = StorageKey::derive("cluster::wait", None, b"k").unwrap();
    let shard = SHARED.node_for_key(&store.record_key(&key));
    let published = || {
        SHARED
            .node(shard)
            .command_stats()
            .get("spublish")
            .copied()
            .unwrap_or(0)
    };
    let before = published();
    let fingerprint = CanonicalArguments::from(Fingerprint::from_bytes([1; 32]));
    let hour = Duration::from_secs(3600);
    let Claim::Acquired { fence } = store.claim(&key, &fingerprint, hour).await.unwrap() else {
        panic!("a fresh key is free");
    };
    let waiter = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.wait(&key, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the holder's lease is an hour");
    store
        .complete(&key, fence, Bytes::from_static(b"{}"), hour)
        .await
        .unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
    assert!(woken.is_ok(), "the completion's SPUBLISH wakes the waiter");
    assert!(
        published() > before,
        "the completion was announced on the record's shard (SPUBLISH on node {shard})"
    );
    assert!(
        SHARED
            .node(shard)
            .command_stats()
            .get("ssubscribe")
            .is_some_and(|&n| n >= 1),
        "the waiter subscribed on the record's shard"
    );
}
