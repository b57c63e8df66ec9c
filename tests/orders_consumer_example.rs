//! `examples/orders_consumer.rs` on the real brokers: `--broker redis` and `--broker nats`
//! against servers started here. (`scripts/test` runs it in-process too.) The example
//! binary is the one `cargo build --example orders_consumer` builds beside this test
//! (`scripts/test` builds it first: `cargo test` builds examples only as test harnesses).
#![cfg(all(feature = "redis-streams", feature = "nats"))]

use std::path::PathBuf;
use std::process::Command;

use idempotent_test_support::{NatsServer, RedisServer};

fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let example = profile.join("examples").join("orders_consumer");
    assert!(
        example.exists(),
        "{} is missing: build it first with `cargo build --example orders_consumer` (scripts/test does)",
        example.display()
    );
    example
}

/// Runs the example on `broker` at `url`; returns its output, having checked its exit status
/// and ledger.
fn run(broker: &str, url: &str) -> String {
    let output = Command::new(example())
        .args(["--broker", broker, "--url", url])
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the example failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for line in [
        "dead-lettered              4",
        "effects applied twice      0",
        "effects never applied      0",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains("crashed while placing order-0100"),
        "{stdout}"
    );
    stdout
}

fn count(stdout: &str, label: &str) -> u64 {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} count in:\n{stdout}"))
}

#[test]
fn on_redis_streams_every_order_is_placed_once() {
    let redis = RedisServer::start();
    let first = run("redis", &redis.url());
    settled_every_copy(&first);
    // A second run on the same server has a stream and ids of its own.
    let second = run("redis", &redis.url());
    settled_every_copy(&second);
}

/// Each of the 1,100 copies (1,000 orders, 100 published twice) was counted once as processed
/// or as a duplicate, give or take those the crashed consumer held (at most its 8 handlers'
/// worth): one it counted but did not acknowledge is counted again when it comes back, and the
/// run may end before one it did not count is taken over. The duplicates are counted by the
/// consumers: Redis does not drop them.
fn settled_every_copy(stdout: &str) {
    let duplicates = count(stdout, "duplicates discarded");
    let settled = count(stdout, "processed") + duplicates;
    assert!(
        duplicates > 0 && (1_092..=1_108).contains(&settled),
        "{stdout}"
    );
}

#[test]
fn on_jetstream_the_server_drops_the_retried_publishes() {
    let nats = NatsServer::start();
    let stdout = run("nats", &nats.url());
    assert_eq!(count(&stdout, "dropped at publish"), 100, "{stdout}");
}

#[test]
fn a_broker_that_is_not_there_is_an_error_not_a_hang() {
    let port = idempotent_test_support::free_port();
    for (broker, url) in [
        ("redis", format!("redis://127.0.0.1:{port}/")),
        ("nats", format!("nats://127.0.0.1:{port}")),
    ] {
        let output = Command::new(example())
            .args(["--broker", broker, "--url", &url])
            .output()
            .expect("run the example");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{broker}: {stderr}");
        assert!(stderr.contains("could not connect"), "{broker}: {stderr}");
    }
}
