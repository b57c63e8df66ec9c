//! `RedisCluster` against real `redis-server`s: three primaries and three replicas, a failover,
//! and a failover that loses an acknowledged write.
//!
//! Each test starts its own cluster (six servers); the durations printed are for the report of
//! how long a start and a failover take, never asserted.

use std::io;
use std::time::Instant;

use idempotent_test_support::RedisCluster;

/// The value of `name:value` in the text of `INFO` or `CLUSTER INFO`.
fn field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|line| {
        line.trim()
            .strip_prefix(name)?
            .strip_prefix(':')
            .map(str::to_owned)
    })
}

/// The port of node `index`'s primary, as node `index` says in `INFO replication`.
fn primary_port_of(cluster: &RedisCluster, index: usize) -> Option<u16> {
    let replication = cluster.command(index, &["INFO", "replication"]);
    if field(&replication, "role").as_deref() != Some("slave") {
        return None;
    }
    field(&replication, "master_port")?.parse().ok()
}

#[test]
fn starts_three_primaries_each_with_a_replica_and_keys_live_on_their_slots_primary() {
    let started = Instant::now();
    let cluster = RedisCluster::start();
    eprintln!("RedisCluster::start took {:?}", started.elapsed());

    let urls = cluster.urls();
    assert_eq!(urls.len(), RedisCluster::NODES);
    for (index, url) in urls.iter().enumerate() {
        assert_eq!(
            url,
            &format!("redis://127.0.0.1:{}/", cluster.node(index).port())
        );
        assert_eq!(cluster.command(index, &["PING"]), "PONG");
        let info = cluster.command(index, &["CLUSTER", "INFO"]);
        assert_eq!(
            field(&info, "cluster_state").as_deref(),
            Some("ok"),
            "{info}"
        );
        assert_eq!(
            field(&info, "cluster_known_nodes").as_deref(),
            Some("6"),
            "{info}"
        );
        assert_eq!(field(&info, "cluster_size").as_deref(), Some("3"), "{info}");
    }

    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), RedisCluster::PRIMARIES, "{primaries:?}");
    assert_eq!(
        cluster.primary_urls(),
        primaries
            .iter()
            .map(|&index| cluster.node(index).url())
            .collect::<Vec<_>>()
    );
    let mut replicas = Vec::new();
    for &primary in &primaries {
        let replica = cluster.replica_of(primary);
        assert!(!primaries.contains(&replica), "{replica} is a primary");
        // The replica itself says whose replica it is.
        assert_eq!(
            primary_port_of(&cluster, replica),
            Some(cluster.node(primary).port())
        );
        replicas.push(replica);
    }
    replicas.sort_unstable();
    replicas.dedup();
    assert_eq!(replicas.len(), 3, "one replica per primary: {replicas:?}");

    // The slot is Redis's own, hash tags included, and the key lives on that slot's primary.
    for key in [
        "foo",
        "bar",
        "",
        "{user1000}.following",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "idempotent:checkout:é",
    ] {
        let slot = RedisCluster::slot_of(key);
        assert_eq!(
            cluster.command(0, &["CLUSTER", "KEYSLOT", key]),
            slot.to_string(),
            "{key:?}"
        );
    }
    let mut owners = Vec::new();
    for n in 0..30 {
        let key = format!("key:{n}");
        let owner = cluster.node_for_key(&key);
        assert!(primaries.contains(&owner), "{key} on {owner}");
        assert_eq!(cluster.command(owner, &["SET", &key, &n.to_string()]), "OK");
        assert_eq!(cluster.command(owner, &["GET", &key]), n.to_string());
        // Every other primary redirects to the owner, at an address the test can reach.
        for &other in primaries.iter().filter(|&&other| other != owner) {
            let error = cluster.try_command(other, &["GET", &key]).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::Other);
            assert_eq!(
                error.to_string(),
                format!(
                    "MOVED {} 127.0.0.1:{}",
                    RedisCluster::slot_of(&key),
                    cluster.node(owner).port()
                )
            );
        }
        owners.push(owner);
    }
    owners.sort_unstable();
    owners.dedup();
    assert_eq!(owners, primaries, "30 keys reach every shard");
    // Keys with one hash tag share a node.
    let tagged = cluster.node_for_key("{order:7}:claim");
    assert_eq!(cluster.node_for_key("{order:7}:record"), tagged);
}

#[test]
fn a_failover_promotes_the_replica_and_keeps_a_replicated_key() {
    let mut cluster = RedisCluster::start();
    let key = "{failover}:kept";
    let primary = cluster.node_for_key(key);
    let replica = cluster.replica_of(primary);
    assert_eq!(cluster.command(primary, &["SET", key, "yes"]), "OK");
    assert_eq!(cluster.wait_until_replicated(primary), replica);

    let started = Instant::now();
    let promoted = cluster.kill_primary_and_wait_for_failover(primary);
    eprintln!(
        "kill_primary_and_wait_for_failover took {:?}",
        started.elapsed()
    );
    assert_eq!(promoted, replica);
    assert!(!cluster.node_mut(primary).is_running());
    assert_eq!(cluster.node_for_key(key), replica);
    assert!(cluster.primaries().contains(&replica));
    assert!(!cluster.primaries().contains(&primary));
    assert_eq!(cluster.command(replica, &["GET", key]), "yes");
    // The surviving nodes serve every slot again.
    for index in (0..RedisCluster::NODES).filter(|&index| index != primary) {
        let info = cluster.command(index, &["CLUSTER", "INFO"]);
        assert_eq!(
            field(&info, "cluster_state").as_deref(),
            Some("ok"),
            "node {index}: {info}"
        );
    }

    // The killed primary comes back as the replica of the node elected in its place.
    let started = Instant::now();
    cluster.restart(primary);
    eprintln!("restart of the old primary took {:?}", started.elapsed());
    assert_eq!(cluster.replica_of(replica), primary);
    assert_eq!(
        primary_port_of(&cluster, primary),
        Some(cluster.node(replica).port())
    );
    assert_eq!(cluster.node_for_key(key), replica);
    // And it has the data again (a replica answers reads after READONLY only; GET through
    // MOVED proves nothing, so ask for the key count of its slot).
    let slot = RedisCluster::slot_of(key).to_string();
    assert_eq!(
        cluster.command(primary, &["CLUSTER", "COUNTKEYSINSLOT", &slot]),
        "1"
    );
}

#[test]
fn a_failover_with_a_held_back_replica_loses_the_acknowledged_write() {
    let mut cluster = RedisCluster::start();
    let kept = "{lost-write}:before";
    let lost = "{lost-write}:after";
    let primary = cluster.node_for_key(kept);
    assert_eq!(cluster.node_for_key(lost), primary);
    assert_eq!(cluster.command(primary, &["SET", kept, "1"]), "OK");

    let replica = cluster.hold_back_replica(primary);
    assert!(cluster.node(replica).is_paused());
    // Acknowledged by the primary, which has it...
    assert_eq!(cluster.command(primary, &["SET", lost, "1"]), "OK");
    assert_eq!(cluster.command(primary, &["GET", lost]), "1");
    // ...and no replica to send it to.
    let replication = cluster.command(primary, &["INFO", "replication"]);
    assert_eq!(
        field(&replication, "connected_slaves").as_deref(),
        Some("0"),
        "{replication}"
    );

    let started = Instant::now();
    let promoted = cluster.kill_primary_with_lagging_replica_and_wait_for_failover(primary);
    eprintln!(
        "kill_primary_with_lagging_replica_and_wait_for_failover took {:?}",
        started.elapsed()
    );
    assert_eq!(promoted, replica);
    assert!(!cluster.node(replica).is_paused());
    assert_eq!(cluster.node_for_key(lost), replica);
    assert_eq!(cluster.command(replica, &["GET", kept]), "1");
    assert_eq!(
        cluster.command(replica, &["GET", lost]),
        "(nil)",
        "the write acknowledged while the replica was held back survived the failover"
    );
}
