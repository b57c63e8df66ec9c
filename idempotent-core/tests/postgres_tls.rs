//! The PostgreSQL store over TLS (feature `postgres-tls`), against a real server started with
//! `ssl=on` and a CA and server certificate made for it.
#![cfg(feature = "postgres-tls")]

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use idempotent_core::stores::postgres::PostgresStore;
use idempotent_core::{Bytes, Claim, FencedWrite, StorageKey, Store, StoreError};
use idempotent_test_support::{PostgresServer, database_of, shared_postgres};
use support::{acquire, args};

/// One server with TLS for this file's tests, each on a database of its own.
fn tls_server() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(PostgresServer::start_tls)
}

/// A fresh database on the TLS server, and its URL with `query` appended.
fn url_with(query: &str) -> (String, String) {
    let url = tls_server().create_unique_database("tls");
    let database = database_of(&url).to_owned();
    (format!("{url}?{query}"), database)
}

fn ca() -> String {
    tls_server().tls().unwrap().ca_file().display().to_string()
}

fn other_ca() -> String {
    tls_server()
        .tls()
        .unwrap()
        .other_ca_file()
        .display()
        .to_string()
}

/// The store's connections to `database`: (all, encrypted, listening and encrypted).
fn connections(database: &str) -> (u64, u64, u64) {
    let row = tls_server().psql(&format!(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl),
                count(*) FILTER (WHERE s.ssl AND a.query LIKE 'LISTEN%')
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.datname = '{database}'"
    ));
    let numbers: Vec<u64> = row.split('|').map(|n| n.parse().unwrap()).collect();
    (numbers[0], numbers[1], numbers[2])
}

/// Claim, complete and replay, then a waiter on a held key woken by the completion (through
/// the listening connection: polling is set to an hour), every connection encrypted.
async fn works_encrypted(store: PostgresStore, database: &str) {
    let store = Arc::new(store);
    let lease = Duration::from_secs(60);
    let key = StorageKey::derive("pg::tls", None, b"replayed").unwrap();
    let fence = acquire(&*store, &key, &args(1), lease).await;
    let output = Bytes::from_static(b"receipt");
    assert_eq!(
        store
            .complete(&key, fence, output.clone(), Duration::from_secs(60))
            .await
            .unwrap(),
        FencedWrite::Applied
    );
    match store.claim(&key, &args(1), lease).await.unwrap() {
        Claim::Completed { output: replayed } => assert_eq!(replayed, output),
        other => panic!("expected the replay, got {other:?}"),
    }

    let held = StorageKey::derive("pg::tls", None, b"held").unwrap();
    let fence = acquire(&*store, &held, &args(1), lease).await;
    let waiter = tokio::spawn({
        let (store, held) = (Arc::clone(&store), held);
        async move { store.wait(&held, Duration::from_secs(3600)).await }
    });
    // The waiter listens (on an encrypted connection) before the holder completes.
    let mut listening = 0;
    for _ in 0..200 {
        listening = connections(database).2;
        if listening == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(listening, 1, "one encrypted LISTEN connection");
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
    let (all, encrypted, _) = connections(database);
    assert!(all >= 2, "a pooled connection and the listening one: {all}");
    assert_eq!(encrypted, all, "every connection of the store is encrypted");
}

fn builder(url: &str) -> idempotent_core::stores::postgres::PostgresStoreBuilder {
    PostgresStore::builder(url)
        .max_connections(2)
        .poll_interval(Duration::from_secs(3600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_every_connection() {
    let (url, database) = url_with("sslmode=require");
    works_encrypted(builder(&url).build().await.unwrap(), &database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_with_the_ca_in_the_url() {
    let (url, database) = url_with(&format!("sslmode=verify-ca&sslrootcert={}", ca()));
    works_encrypted(builder(&url).build().await.unwrap(), &database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_ca_in_the_url() {
    let (url, database) = url_with(&format!("sslmode=verify-full&sslrootcert={}", ca()));
    works_encrypted(builder(&url).build().await.unwrap(), &database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_ca_on_the_builder() {
    let (url, database) = url_with("sslmode=verify-full");
    let store = builder(&url)
        .root_certificate_file(ca())
        .build()
        .await
        .unwrap();
    works_encrypted(store, &database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builders_ca_takes_precedence_over_the_urls() {
    let (url, database) = url_with(&format!("sslmode=verify-full&sslrootcert={}", other_ca()));
    let store = builder(&url)
        .root_certificate_file(ca())
        .build()
        .await
        .unwrap();
    works_encrypted(store, &database).await;
}

/// `error` is a `Backend` error whose message holds every one of `parts`.
fn assert_backend(error: StoreError, parts: &[&str]) {
    let StoreError::Backend { message, .. } = &error else {
        panic!("expected a Backend error, got {error:?}");
    };
    for part in parts {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    assert!(
        !error.to_string().contains("sekret"),
        "the password leaked: {error}"
    );
}

/// The TLS server's URL for `database` with the password `sekret` and `host` as the host name,
/// connecting to 127.0.0.1 whatever the name (`hostaddr`).
fn url_for_host(host: &str, query: &str) -> String {
    let url = tls_server().create_unique_database("tls_host");
    format!(
        "postgres://postgres:sekret@{host}:{}/{}?hostaddr=127.0.0.1&{query}",
        tls_server().port(),
        database_of(&url)
    )
}

#[tokio::test]
async fn verify_full_refuses_a_host_name_not_on_the_certificate() {
    let query = format!("sslmode=verify-full&sslrootcert={}", ca());
    let error = builder(&url_for_host("db.example.invalid", &query))
        .build()
        .await
        .unwrap_err();
    assert_backend(
        error,
        &[
            "sslmode=verify-full",
            "invalid peer certificate",
            "name the host",
        ],
    );
    // The same certificate names localhost: the same server is accepted under that name.
    builder(&url_for_host("localhost", &query))
        .build()
        .await
        .expect("localhost is on the certificate");
}

#[tokio::test]
async fn verify_ca_does_not_check_the_host_name() {
    let query = format!("sslmode=verify-ca&sslrootcert={}", ca());
    builder(&url_for_host("db.example.invalid", &query))
        .build()
        .await
        .expect("verify-ca checks the chain only");
}

#[tokio::test]
async fn verify_ca_and_verify_full_refuse_a_certificate_of_another_ca() {
    for mode in ["verify-ca", "verify-full"] {
        let query = format!("sslmode={mode}&sslrootcert={}", other_ca());
        let error = builder(&url_for_host("localhost", &query))
            .build()
            .await
            .unwrap_err();
        assert_backend(
            error,
            &[
                &format!("sslmode={mode}"),
                "invalid peer certificate",
                "UnknownIssuer",
            ],
        );
    }
    // The webpki roots do not hold the test CA either.
    let error = builder(&url_for_host("localhost", "sslmode=verify-full"))
        .build()
        .await
        .unwrap_err();
    assert_backend(error, &["sslmode=verify-full", "invalid peer certificate"]);
}

#[tokio::test]
async fn require_against_a_server_without_tls_is_an_error_not_plain_text() {
    let url = shared_postgres().create_unique_database("no_tls");
    let plain = url.replace("postgres@", "postgres:sekret@");
    for mode in ["require", "verify-ca", "verify-full"] {
        let error = builder(&format!("{plain}?sslmode={mode}&sslrootcert={}", ca()))
            .build()
            .await
            .unwrap_err();
        assert_backend(
            error,
            &[
                &format!("sslmode={mode}"),
                "does not accept TLS",
                "ssl = on",
            ],
        );
    }
    // The default, prefer, connects in plain text to a server without TLS.
    builder(&url).build().await.expect("prefer falls back");
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_used_is_a_clear_error() {
    let url = url_for_host("localhost", "sslmode=verify-full");
    let error = builder(&url)
        .root_certificate_file("/nonexistent/ca.pem")
        .build()
        .await
        .unwrap_err();
    assert_backend(
        error,
        &[
            "could not read the CA file /nonexistent/ca.pem",
            "sslmode=verify-full",
        ],
    );

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let error = builder(&url)
        .root_certificate_file(&empty)
        .build()
        .await
        .unwrap_err();
    assert_backend(error, &["holds no certificate", "BEGIN CERTIFICATE"]);
}

#[tokio::test]
async fn an_unknown_sslmode_is_refused_without_quoting_the_password() {
    let error = builder(&url_for_host("localhost", "sslmode=allow"))
        .build()
        .await
        .unwrap_err();
    assert_backend(
        error,
        &["sslmode=\"allow\" is not supported", "verify-full"],
    );
}

/// The service's own pool with TLS ([`PostgresStore::from_pool`]), and the listening
/// connection from `listen_url` with `verify-full`: every connection encrypted, and waiters
/// woken through the listening one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_pool_with_tls_and_a_verified_listening_connection() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let (url, database) = url_with(&format!("sslmode=verify-full&sslrootcert={}", ca()));
    // The service's pool, as a service would make it with tokio-postgres-rustls.
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca()).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let plain_url = url.split('?').next().unwrap();
    let mut config: tokio_postgres::Config = plain_url.parse().unwrap();
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .build()
        .unwrap();
    let store = PostgresStore::from_pool(pool)
        .listen_url(&url)
        .poll_interval(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    works_encrypted(store, &database).await;
}
