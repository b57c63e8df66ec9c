//! The PostgreSQL store on a `sqlx::PgPool` against a real server started for these tests: the
//! conformance suite, what is particular to it, and the tables it shares with `PostgresStore`.
#![cfg(feature = "sqlx-postgres")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use idempotent_core::conformance::Harness;
use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
use idempotent_core::{
    Call, CanonicalArguments, Claim, Fingerprint, Idempotency, StorageKey, Store, StoreError,
};
use idempotent_test_support::{database_of, shared_postgres};
use sqlx::postgres::PgPoolOptions;
use support::{AppError, Runs};

/// A pool of at most `max` connections to `url`, as the store's docs advise: without a ping
/// before each acquire (sqlx's default), which doubles every statement's round trips. (With
/// it, `sub_millisecond_leases_hold_one_millisecond` found no two claims within a millisecond
/// in 200 tries on a loaded machine.)
async fn pool(url: &str, max: u32) -> sqlx::PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .test_before_acquire(false)
        .connect(url)
        .await
        .expect("connect the pool")
}

/// A store on a database of its own in the shared server, on a pool of 5 connections.
async fn fresh_store(prefix: &str) -> (Arc<SqlxPgStore>, String) {
    let url = shared_postgres().create_unique_database(prefix);
    let store = SqlxPgStore::builder(pool(&url, 5).await)
        .build()
        .await
        .expect("create the tables");
    (Arc::new(store), url)
}

async fn conformance_harness() -> Harness {
    let (store, _) = fresh_store("sqlx_conformance").await;
    Harness::with_real_time(store, Duration::from_millis(300))
}

idempotent_core::conformance_suite!(conformance_harness().await);

/// Calls the store's statements made in `database`, by pg_stat_statements.
fn statements_run(database: &str) -> u64 {
    let count = shared_postgres().psql_in(
        database,
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query NOT ILIKE '%pg_stat_statements%'",
    );
    count.trim().parse().expect("a count")
}

#[tokio::test]
async fn a_replay_is_one_statement_and_a_first_call_two() {
    let server = shared_postgres();
    let (store, url) = fresh_store("sqlx_statements").await;
    let database = database_of(&url);
    server.psql_in(
        database,
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    );
    let engine = Idempotency::new(store);
    let runs = Runs::default();
    let body = || async {
        runs.hit();
        Ok::<_, AppError>("receipt".to_string())
    };
    let call = Call::new("sqlx::statements", Fingerprint::of(&1).unwrap()).key("order-1");

    server.psql_in(database, "SELECT pg_stat_statements_reset()");
    assert!(!engine.run(call, body()).await.unwrap().is_replayed());
    assert_eq!(statements_run(database), 2, "claim and complete");

    server.psql_in(database, "SELECT pg_stat_statements_reset()");
    assert!(engine.run(call, body()).await.unwrap().is_replayed());
    assert_eq!(statements_run(database), 1, "the claim answers the replay");
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn the_schema_is_versioned_and_a_newer_one_is_refused() {
    let server = shared_postgres();
    let (store, url) = fresh_store("sqlx_schema").await;
    let database = database_of(&url);
    assert_eq!(
        server
            .psql_in(database, "SELECT version FROM idempotent_records_schema")
            .trim(),
        "2"
    );
    SqlxPgStore::builder(store.pool().clone())
        .build()
        .await
        .expect("same schema");
    server.psql_in(
        database,
        "UPDATE idempotent_records_schema SET version = 99",
    );
    let error = SqlxPgStore::builder(store.pool().clone())
        .build()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("schema version 99"), "{error}");
}

#[tokio::test]
async fn an_invalid_table_name_is_refused_before_any_sql() {
    let url = shared_postgres().create_unique_database("sqlx_tables");
    let error = SqlxPgStore::builder(pool(&url, 1).await)
        .table("x; DROP TABLE y")
        .build()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("invalid table name"), "{error}");
}

#[tokio::test]
async fn corrupt_rows_are_a_typed_error() {
    let server = shared_postgres();
    let (store, url) = fresh_store("sqlx_corrupt").await;
    let database = database_of(&url);
    let key = StorageKey::derive("sqlx::corrupt", None, b"k").unwrap();
    let hex = key.to_hex();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(30);
    let ours = "01".repeat(32);
    for (fingerprint_hex, state, output, format) in [
        (ours.as_str(), 1, "'\\x7b7d'", 9), // a record format from the future
        (ours.as_str(), 7, "NULL", 1),      // an unknown state
        ("0102", 1, "'\\x7b7d'", 1),        // a fingerprint of the wrong length
        (ours.as_str(), 1, "NULL", 1),      // completed without output
    ] {
        server.psql_in(
            database,
            &format!(
                "DELETE FROM idempotent_records WHERE key = '\\x{hex}';
                 INSERT INTO idempotent_records VALUES ('\\x{hex}', '\\x{fingerprint_hex}', 1,
                 {state}, now() + interval '1 hour', {output}, {format})"
            ),
        );
        match store
            .claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await
        {
            Err(StoreError::Corrupt { key: at, message }) => {
                assert_eq!(at, hex);
                assert!(!message.is_empty());
            }
            other => panic!("state {state}, format {format}: expected Corrupt, got {other:?}"),
        }
    }
    server.psql_in(
        database,
        &format!("DELETE FROM idempotent_records WHERE key = '\\x{hex}'"),
    );
    assert!(matches!(
        store
            .claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));
}

#[tokio::test]
async fn a_statement_out_of_time_fails_the_call_and_its_connection_is_not_reused() {
    let (store, url) = fresh_store("sqlx_timeout").await;
    let store = SqlxPgStore::builder(store.pool().clone())
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let key = StorageKey::derive("sqlx::timeout", None, b"k").unwrap();
    // Another transaction holds the key's row: the claim waits for its lock.
    let blocker = pool(&url, 1).await;
    let mut tx = blocker.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO idempotent_records VALUES ($1, $2, 1, 0, now() - interval '1 hour', NULL, 1)",
    )
    .bind(key.as_bytes().as_slice())
    .bind([1u8; 32].as_slice())
    .execute(&mut *tx)
    .await
    .unwrap();
    let error = store
        .claim(
            &key,
            &CanonicalArguments::from(Fingerprint::from_bytes([1; 32])),
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::Unavailable { .. })
            && error.to_string().contains("took longer"),
        "{error}"
    );
    tx.rollback().await.unwrap();
    // The store goes on with other connections.
    let other = StorageKey::derive("sqlx::timeout", None, b"other").unwrap();
    assert!(matches!(
        store
            .claim(
                &other,
                &CanonicalArguments::from(Fingerprint::from_bytes([1; 32])),
                Duration::from_secs(30)
            )
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_woken_by_the_completion_and_after_the_listening_connection_is_lost() {
    let (store, url) = fresh_store("sqlx_waiters").await;
    let engine = Idempotency::new(store);
    let runs = Runs::default();
    let (started, release) = (tokio::sync::Notify::new(), tokio::sync::Notify::new());
    let call = Call::new("sqlx::wait", Fingerprint::of(&1).unwrap()).key("w");
    // The default options: a 30 s lease, and a conflict waits up to 60 s.
    let (first, second) = (&engine, &engine);
    let holder = async {
        first
            .run(call, async {
                runs.hit();
                started.notify_one();
                release.notified().await;
                Ok::<_, AppError>(7)
            })
            .await
    };
    let waiter = async {
        started.notified().await;
        // Kill the listening connection while the waiter waits: it looks again and waits on.
        let killer = pool(&url, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .execute(&killer)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        release.notify_one();
        second
            .run(call, async {
                runs.hit();
                Ok::<_, AppError>(8)
            })
            .await
    };
    let (held, waited) = tokio::join!(holder, waiter);
    assert_eq!(held.unwrap().into_value(), 7);
    let waited = waited.unwrap();
    assert!(waited.is_replayed());
    assert_eq!(waited.into_value(), 7);
    assert_eq!(runs.count(), 1);
}

/// The tables shared with `PostgresStore`: what one writes, the other reads.
#[cfg(feature = "postgres")]
mod across_stores {
    use super::*;
    use idempotent_core::stores::postgres::PostgresStore;

    async fn both(prefix: &str) -> (Arc<SqlxPgStore>, Arc<PostgresStore>) {
        let (sqlx_store, url) = fresh_store(prefix).await;
        let pg_store = PostgresStore::builder(&url)
            .max_connections(2)
            .build()
            .await
            .expect("the same tables, the same schema version");
        (sqlx_store, Arc::new(pg_store))
    }

    async fn completed_by_one_is_replayed_by_the_other(
        first: Arc<dyn Store>,
        second: Arc<dyn Store>,
    ) {
        let runs = Runs::default();
        let call = Call::new("cross::replay", Fingerprint::of(&1).unwrap()).key("order-1");
        let done = Idempotency::new(first)
            .run(call, async {
                runs.hit();
                Ok::<_, AppError>("receipt".to_string())
            })
            .await
            .unwrap();
        assert!(!done.is_replayed());
        let replayed = Idempotency::new(second)
            .run(call, async {
                runs.hit();
                Ok::<_, AppError>("again".to_string())
            })
            .await
            .unwrap();
        assert!(replayed.is_replayed());
        assert_eq!(replayed.into_value(), "receipt");
        assert_eq!(runs.count(), 1);
    }

    #[tokio::test]
    async fn a_record_completed_by_postgres_store_is_replayed_by_the_sqlx_store() {
        let (sqlx_store, pg_store) = both("cross_pg_sqlx").await;
        completed_by_one_is_replayed_by_the_other(pg_store, sqlx_store).await;
    }

    #[tokio::test]
    async fn a_record_completed_by_the_sqlx_store_is_replayed_by_postgres_store() {
        let (sqlx_store, pg_store) = both("cross_sqlx_pg").await;
        completed_by_one_is_replayed_by_the_other(sqlx_store, pg_store).await;
    }

    #[tokio::test]
    async fn a_claim_in_progress_in_one_is_in_progress_in_the_other() {
        let (sqlx_store, pg_store) = both("cross_progress").await;
        let arguments = CanonicalArguments::from(Fingerprint::from_bytes([3; 32]));
        let lease = Duration::from_secs(30);
        for (holder, other) in [
            (
                Arc::clone(&sqlx_store) as Arc<dyn Store>,
                Arc::clone(&pg_store) as Arc<dyn Store>,
            ),
            (pg_store as Arc<dyn Store>, sqlx_store as Arc<dyn Store>),
        ] {
            let key = StorageKey::derive("cross::progress", None, format!("{holder:?}").as_bytes())
                .unwrap();
            let Claim::Acquired { fence } = holder.claim(&key, &arguments, lease).await.unwrap()
            else {
                panic!("a free key is acquired");
            };
            assert!(
                matches!(
                    other.claim(&key, &arguments, lease).await.unwrap(),
                    Claim::InProgress { .. }
                ),
                "in progress for the other store"
            );
            // The other store's waiter is woken by the holder's release, on the shared channel.
            let waiting = other.wait(&key, Duration::from_secs(60));
            let releasing = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                holder.release(&key, fence).await.unwrap();
            };
            let (waited, ()) = tokio::join!(waiting, releasing);
            waited.unwrap();
            assert!(
                matches!(
                    other.claim(&key, &arguments, lease).await.unwrap(),
                    Claim::Acquired { fence: next } if next.get() > fence.get()
                ),
                "fences come from the one sequence"
            );
        }
    }
}
