//! The PostgreSQL store on the service's own deadpool-postgres pool
//! ([`PostgresStore::from_pool`]), against a real server.
#![cfg(feature = "postgres")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use idempotent_core::conformance::Harness;
use idempotent_core::stores::postgres::PostgresStore;
use idempotent_core::{
    Call, CanonicalArguments, Claim, Fingerprint, Idempotency, StorageKey, Store, StoreError,
};
use idempotent_test_support::{database_of, shared_postgres};
use support::{AppError, Runs};

/// The service's pool on `url`, at most `max` connections.
fn service_pool(url: &str, max: usize) -> Pool {
    let manager = Manager::from_config(
        url.parse().unwrap(),
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager).max_size(max).build().unwrap()
}

async fn listening_harness() -> Harness {
    let url = shared_postgres().create_unique_database("own_pool");
    let store = PostgresStore::from_pool(service_pool(&url, 4))
        .listen_url(&url)
        .build()
        .await
        .expect("the store on the service's pool");
    Harness::with_real_time(Arc::new(store), Duration::from_millis(300))
}

idempotent_core::conformance_suite!(listening_harness().await);

/// Without a listening connection: waiters poll.
mod polling {
    use super::*;

    async fn polling_harness() -> Harness {
        let url = shared_postgres().create_unique_database("own_pool_polling");
        let store = PostgresStore::from_pool(service_pool(&url, 4))
            .poll_interval(Duration::from_millis(10))
            .build()
            .await
            .expect("the store on the service's pool");
        Harness::with_real_time(Arc::new(store), Duration::from_millis(300))
    }

    idempotent_core::conformance_suite!(polling_harness().await);
}

/// Backends connected to `database`.
fn backends(database: &str) -> u64 {
    shared_postgres()
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'"
        ))
        .parse()
        .unwrap()
}

/// 16 concurrent calls on a pool of 2, whose bodies write the service's own rows through the
/// same pool: the database never sees more than the pool's 2 connections and the store's
/// listening one, and every call gets its value, each key running once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_stays_within_the_services_pool() {
    let url = shared_postgres().create_unique_database("own_pool_limit");
    let database = database_of(&url).to_owned();
    let pool = service_pool(&url, 2);
    pool.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE orders (key text PRIMARY KEY)")
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool.clone())
        .listen_url(&url)
        .build()
        .await
        .unwrap();
    let engine = Idempotency::new(Arc::new(store));

    // Samples the database's backends while the calls run.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicU64::new(0));
    let sampler = std::thread::spawn({
        let (done, most, database) = (Arc::clone(&done), Arc::clone(&most), database.clone());
        move || {
            while !done.load(Ordering::Relaxed) {
                most.fetch_max(backends(&database), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });

    let runs = Runs::default();
    let calls: Vec<_> = (0..16u32)
        .map(|n| {
            let (engine, runs, pool) = (engine.clone(), runs.clone(), pool.clone());
            tokio::spawn(async move {
                let key = format!("order-{}", n % 4);
                let call = Call::new("pg::own_pool", Fingerprint::of(&(n % 4)).unwrap()).key(&key);
                let body = async {
                    runs.hit();
                    // The service's own write, on the same pool.
                    pool.get()
                        .await
                        .map_err(|error| AppError::Declined(error.to_string()))?
                        .execute("INSERT INTO orders VALUES ($1)", &[&key])
                        .await
                        .map_err(|error| AppError::Declined(error.to_string()))?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, AppError>(format!("receipt {key}"))
                };
                let outcome = engine.run(call, body).await.expect("the call");
                assert_eq!(outcome.into_value(), format!("receipt {key}"));
                assert!(pool.status().size <= 2, "{:?}", pool.status());
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    assert_eq!(runs.count(), 4, "each of the 4 keys ran once");
    let orders = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(orders, 4, "one order row per key");
    let most = most.load(Ordering::Relaxed);
    assert!(most >= 1, "the sampler saw the calls' connections");
    assert!(
        most <= 3,
        "at most the pool's 2 connections and the listening one: {most}"
    );
    assert!(pool.status().max_size == 2 && pool.status().size <= 2);
}

/// A statement that runs out of the store's timeout on a connection of the service's pool is
/// cancelled on the server, and that connection leaves the pool.
#[tokio::test]
async fn a_statement_that_times_out_on_the_services_pool_is_ended_on_the_server() {
    let server = shared_postgres();
    let url = server.create_unique_database("own_pool_timeout");
    let database = database_of(&url);
    let pool = service_pool(&url, 1);
    let timeout = Duration::from_millis(500);
    let store = PostgresStore::from_pool(pool.clone())
        .timeout(timeout)
        .build()
        .await
        .unwrap();
    let arguments = CanonicalArguments::from(Fingerprint::from_bytes([1; 32]));
    let lease = Duration::from_secs(60);

    // A dead record whose row a transaction elsewhere holds: a claim waits for the lock.
    let locked = StorageKey::derive("pg::own_pool", None, b"locked").unwrap();
    let hex = locked.to_hex();
    server.psql_in(
        database,
        &format!(
            "INSERT INTO idempotent_records VALUES ('\\x{hex}', '\\x{}', 1, 0,
             now() - interval '1 hour', NULL, 1)",
            "01".repeat(32)
        ),
    );
    let (mut holder, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let transaction = holder.transaction().await.unwrap();
    transaction
        .execute(
            "SELECT 1 FROM idempotent_records WHERE key = $1 FOR UPDATE",
            &[&locked.as_bytes().as_slice()],
        )
        .await
        .unwrap();

    let timed_out = store.claim(&locked, &arguments, lease).await;
    assert!(
        matches!(timed_out, Err(StoreError::Unavailable { .. })),
        "the claim cannot have the row in time: {timed_out:?}"
    );
    // The connection (the foreign connections carry no statement_timeout) is no longer
    // waiting for the lock on the server: the cancel request ended it.
    let mut waiting = String::new();
    for _ in 0..100 {
        waiting = server.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = '{database}' AND wait_event_type = 'Lock'"
        ));
        if waiting == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        waiting, "0",
        "the timed-out claim still waits on the server"
    );
    transaction.commit().await.unwrap();
    assert_eq!(
        server
            .psql_in(
                database,
                &format!(
                    "SELECT count(*) FROM idempotent_records
                     WHERE key = '\\x{hex}' AND until > now()"
                )
            )
            .trim(),
        "0",
        "a claim that timed out applied afterwards, held by nobody"
    );
    // The pool's only connection was taken out and closed; the pool makes a new one.
    let retried = store.claim(&locked, &arguments, lease).await;
    assert!(
        matches!(retried, Ok(Claim::Acquired { .. })),
        "a retry of the timed-out call takes the key: {retried:?}"
    );
}
