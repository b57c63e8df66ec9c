//! The Redis store over TLS (feature `redis-tls`), against a real `redis-server` whose port
//! speaks TLS only, with a CA and server certificate made for it.
#![cfg(feature = "redis-tls")]

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use idempotent_core::stores::redis::{RedisStore, RedisStoreBuilder};
use idempotent_core::{Bytes, Claim, FencedWrite, StorageKey, Store, StoreError};
use idempotent_test_support::RedisServer;
use support::{acquire, args};

fn tls_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start_tls)
}

/// A store on the TLS server under a prefix of its own, polling an hour apart (so a waiter
/// that returns was woken by pub/sub).
fn builder(url: &str, prefix: &str) -> RedisStoreBuilder {
    RedisStore::builder(url)
        .key_prefix(format!("tls:{prefix}:"))
        .poll_interval(Duration::from_secs(3600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_the_ca_on_the_builder_claims_replays_and_wakes_waiters() {
    let server = tls_server();
    assert!(server.url().starts_with("rediss://127.0.0.1:"));
    let store = Arc::new(
        builder(&server.url(), "works")
            .root_certificate_file(server.tls().unwrap().ca_file())
            .build()
            .unwrap(),
    );
    let lease = Duration::from_secs(60);
    let key = StorageKey::derive("redis::tls", None, b"replayed").unwrap();
    let fence = acquire(&*store, &key, &args(1), lease).await;
    let output = Bytes::from_static(b"receipt");
    assert_eq!(
        store
            .complete(&key, fence, output.clone(), lease)
            .await
            .unwrap(),
        FencedWrite::Applied
    );
    match store.claim(&key, &args(1), lease).await.unwrap() {
        Claim::Completed { output: replayed } => assert_eq!(replayed, output),
        other => panic!("expected the replay, got {other:?}"),
    }

    let held = StorageKey::derive("redis::tls", None, b"held").unwrap();
    let fence = acquire(&*store, &held, &args(1), lease).await;
    let waiter = tokio::spawn({
        let (store, held) = (Arc::clone(&store), held);
        async move { store.wait(&held, Duration::from_secs(3600)).await }
    });
    // The waiter subscribes on a connection of its own before the completion: a client of
    // the TCP port, which speaks TLS only (the helpers' clients use the Unix socket).
    let mut subscribed = false;
    for _ in 0..200 {
        let list = server.command(&["CLIENT", "LIST"]);
        subscribed = list
            .lines()
            .any(|line| line.contains("laddr=127.0.0.1") && line.contains("sub=1"));
        if subscribed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(subscribed, "a subscriber connected over the TLS port");
    assert!(
        !waiter.is_finished(),
        "the waiter waits while the key is held"
    );
    store
        .complete(&held, fence, Bytes::from_static(b"done"), lease)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the completion wakes the waiter (polling is an hour apart)")
        .unwrap()
        .unwrap();
}

/// A claim's error, which must come within the store's deadline (the test's own bound is far
/// above it: no hang).
async fn claim_error(store: RedisStore) -> StoreError {
    let key = StorageKey::derive("redis::tls", None, b"refused").unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        store.claim(&key, &args(1), Duration::from_secs(60)),
    )
    .await
    .expect("the store's timeouts bound the call")
    .unwrap_err()
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_clearly() {
    let server = tls_server();
    let store = builder(&server.url(), "wrong_ca")
        .root_certificate_file(server.tls().unwrap().other_ca_file())
        .build()
        .unwrap();
    let error = claim_error(store).await;
    let message = error.to_string();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    for part in [
        "invalid peer certificate",
        "UnknownIssuer",
        "root_certificate_file",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    // Nor do the webpki roots hold the test CA.
    let error = claim_error(builder(&server.url(), "webpki").build().unwrap()).await;
    assert!(
        error.to_string().contains("invalid peer certificate"),
        "{error}"
    );
}

#[tokio::test]
async fn insecure_encrypts_without_verifying() {
    let server = tls_server();
    let store = builder(&format!("{}#insecure", server.url()), "insecure")
        .build()
        .unwrap();
    let key = StorageKey::derive("redis::tls", None, b"insecure").unwrap();
    acquire(&store, &key, &args(1), Duration::from_secs(60)).await;
}

#[tokio::test]
async fn a_plain_url_to_the_tls_port_fails_within_the_timeouts() {
    let server = tls_server();
    let url = format!("redis://127.0.0.1:{}/", server.port());
    let store = builder(&url, "plain")
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let error = claim_error(store).await;
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains("rediss://"), "{error}");
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_used_is_a_clear_error_at_build() {
    let url = tls_server().url();
    let error = RedisStore::builder(&url)
        .root_certificate_file("/nonexistent/ca.pem")
        .build()
        .unwrap_err();
    assert!(matches!(error, StoreError::Backend { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("could not read the CA file /nonexistent/ca.pem"),
        "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let error = RedisStore::builder(&url)
        .root_certificate_file(&empty)
        .build()
        .unwrap_err();
    assert!(
        error.to_string().contains("holds no certificate"),
        "{error}"
    );
    // A CA file with a plain URL is a mistake, not silently ignored.
    let error = RedisStore::builder("redis://127.0.0.1:1/")
        .root_certificate_file(&empty)
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("write rediss://"), "{error}");
}
