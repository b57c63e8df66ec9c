//! The PostgreSQL store against a real server started for these tests.
#![cfg(feature = "postgres")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use idempotent_core::conformance::Harness;
use idempotent_core::stores::postgres::PostgresStore;
use idempotent_core::{
    Bytes, Call, CanonicalArguments, Claim, Fingerprint, Idempotency, StorageKey, Store, StoreError,
};
use idempotent_test_support::{PostgresServer, database_of, shared_postgres};
use support::{AppError, Runs};

/// A store on a database of its own in the shared server.
async fn fresh_store(prefix: &str) -> (Arc<PostgresStore>, String) {
    let url = shared_postgres().create_unique_database(prefix);
    let store = PostgresStore::builder(&url)
        .max_connections(4)
        .build()
        .await
        .expect("connect and create the tables");
    (Arc::new(store), url)
}

async fn conformance_harness() -> Harness {
    let (store, _) = fresh_store("conformance").await;
    Harness::with_real_time(store, Duration::from_millis(300))
}

idempotent_core::conformance_suite!(conformance_harness().await);

/// Statements the store ran in `database`, by pg_stat_statements.
fn statements_run(server: &PostgresServer, database: &str) -> u64 {
    let count = server.psql_in(
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
    let (store, url) = fresh_store("statements").await;
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
    let call = Call::new("pg::statements", Fingerprint::of(&1).unwrap()).key("order-1");

    server.psql_in(database, "SELECT pg_stat_statements_reset()");
    assert!(!engine.run(call, body()).await.unwrap().is_replayed());
    assert_eq!(statements_run(server, database), 2, "claim and complete");

    server.psql_in(database, "SELECT pg_stat_statements_reset()");
    assert!(engine.run(call, body()).await.unwrap().is_replayed());
    assert_eq!(
        statements_run(server, database),
        1,
        "the claim answers the replay"
    );
    assert_eq!(runs.count(), 1);
}

#[tokio::test]
async fn the_schema_is_versioned_and_a_newer_one_is_refused() {
    let server = shared_postgres();
    let (store, url) = fresh_store("schema").await;
    let database = database_of(&url);
    assert_eq!(
        server
            .psql_in(database, "SELECT version FROM idempotent_records_schema")
            .trim(),
        "2"
    );
    drop(store);
    // A second store on the same tables (another process, or a restart) accepts them.
    PostgresStore::builder(&url)
        .build()
        .await
        .expect("same schema");

    server.psql_in(
        database,
        "UPDATE idempotent_records_schema SET version = 99",
    );
    let error = PostgresStore::builder(&url).build().await.unwrap_err();
    assert!(error.to_string().contains("schema version 99"), "{error}");
}

#[tokio::test]
async fn a_version_1_table_is_brought_up_to_version_2() {
    let server = shared_postgres();
    let url = server.create_unique_database("schema_v1");
    let database = database_of(&url);
    // The tables as the first release created them.
    server.psql_in(
        database,
        "CREATE TABLE idempotent_records_schema (version integer NOT NULL);
         INSERT INTO idempotent_records_schema VALUES (1);
         CREATE SEQUENCE idempotent_records_fences;
         CREATE TABLE idempotent_records (
             key bytea PRIMARY KEY, fingerprint bytea NOT NULL, fence bigint NOT NULL,
             state smallint NOT NULL, until timestamptz NOT NULL, output bytea,
             format smallint NOT NULL);
         INSERT INTO idempotent_records
             VALUES ('\\x01', '\\x02', 1, 0, now() + interval '1 hour', NULL, 1);",
    );
    let store = PostgresStore::builder(&url)
        .build()
        .await
        .expect("a version 1 table is upgraded");
    assert_eq!(
        server
            .psql_in(
                database,
                "SELECT max(version) FROM idempotent_records_schema"
            )
            .trim(),
        "2"
    );
    assert_eq!(
        server
            .psql_in(database, "SELECT waiting FROM idempotent_records")
            .trim(),
        "f",
        "the existing row keeps its data and gets the new column"
    );
    let key = StorageKey::derive("pg::upgraded", None, b"k").unwrap();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let Claim::Acquired { fence } = store
        .claim(
            &key,
            &CanonicalArguments::from(fingerprint),
            Duration::from_secs(30),
        )
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    assert!(
        store
            .complete(
                &key,
                fence,
                Bytes::from_static(b"{}"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
            .is_applied()
    );
}

/// The payloads of notifications on `channel`, from a connection of the test's own.
async fn notifications(
    url: &str,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(notification))) => {
                    let _ = sender.send(notification.payload().to_owned());
                }
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    (client, receiver)
}

#[tokio::test]
async fn completions_and_releases_notify_only_when_a_waiter_marked_the_record() {
    let server = shared_postgres();
    let (store, url) = fresh_store("notify").await;
    let database = database_of(&url);
    server.psql_in(
        database,
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    );
    let (_client, mut notified) = notifications(&url, "idempotent_records_done").await;
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let hour = Duration::from_secs(3600);
    let claim = async |key: &StorageKey| match store
        .claim(key, &CanonicalArguments::from(fingerprint), hour)
        .await
    {
        Ok(Claim::Acquired { fence }) => fence,
        other => panic!("a fresh key is free: {other:?}"),
    };
    let quiet = Duration::from_millis(400);

    // Nobody waits: nothing is published, for a completion or a release.
    let alone = StorageKey::derive("pg::notify", None, b"alone").unwrap();
    let fence = claim(&alone).await;
    assert!(
        store
            .complete(&alone, fence, Bytes::from_static(b"{}"), hour)
            .await
            .unwrap()
            .is_applied()
    );
    let released = StorageKey::derive("pg::notify", None, b"released alone").unwrap();
    let fence = claim(&released).await;
    assert!(store.release(&released, fence).await.unwrap().is_applied());
    let heard = tokio::time::timeout(quiet, notified.recv()).await;
    assert!(heard.is_err(), "no waiter, no notification: {heard:?}");

    // A waiter marks the record; the completion, and a release, then notify it. The waiter
    // looks once and then waits for the notification: it does not poll.
    for (name, complete) in [("waited", true), ("waited release", false)] {
        let key = StorageKey::derive("pg::notify", None, name.as_bytes()).unwrap();
        let fence = claim(&key).await;
        server.psql_in(database, "SELECT pg_stat_statements_reset()");
        let waiter = {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.wait(&key, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(quiet).await;
        assert!(!waiter.is_finished(), "{name}: the holder is alive");
        let looks = statements_run(server, database);
        assert!(
            looks <= 2,
            "{name}: LISTEN and one look at the record, no polling: {looks} statements"
        );
        let write = if complete {
            store
                .complete(&key, fence, Bytes::from_static(b"{}"), hour)
                .await
        } else {
            store.release(&key, fence).await
        };
        assert!(write.unwrap().is_applied());
        let heard = tokio::time::timeout(Duration::from_secs(5), notified.recv()).await;
        assert_eq!(
            heard.expect("a notification").as_deref(),
            Some(key.to_hex().as_str()),
            "{name}"
        );
        let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(woken.is_ok(), "{name}: the notification wakes the waiter");
    }
}

#[tokio::test]
async fn corrupt_rows_are_a_typed_error_and_can_be_purged() {
    let server = shared_postgres();
    let (store, url) = fresh_store("corrupt").await;
    let database = database_of(&url);
    let key = StorageKey::derive("pg::corrupt", None, b"k").unwrap();
    let hex = key.to_hex();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(30);
    let insert = |fingerprint: &str, state: i32, output: &str, format: i32| {
        server.psql_in(
            database,
            &format!("DELETE FROM idempotent_records WHERE key = '\\x{hex}'"),
        );
        server.psql_in(
            database,
            &format!(
                "INSERT INTO idempotent_records VALUES ('\\x{hex}', '\\x{fingerprint}', 1, {state},
                 now() + interval '1 hour', {output}, {format})"
            ),
        );
    };
    let ours = "01".repeat(32);
    for (fingerprint_hex, state, output, format) in [
        (ours.as_str(), 1, "'\\x7b7d'", 9), // a record format from the future
        (ours.as_str(), 7, "NULL", 1),      // an unknown state
        ("0102", 1, "'\\x7b7d'", 1),        // a fingerprint of the wrong length
        (ours.as_str(), 1, "NULL", 1),      // completed without output
    ] {
        insert(fingerprint_hex, state, output, format);
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
async fn an_invalid_table_name_is_refused_before_any_sql() {
    let url = shared_postgres().create_unique_database("tables");
    let error = PostgresStore::builder(&url)
        .table("x; DROP TABLE y")
        .build()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("invalid table name"), "{error}");
}

/// A connection of the test's own, outside any store.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// Waits until `done` or until a backend of `database` other than `own` waits for a lock; true
/// if one does.
async fn until_done_or_blocked(
    observer: &tokio_postgres::Client,
    database: &str,
    done: impl Fn() -> bool,
) -> bool {
    for _ in 0..500 {
        if done() {
            return false;
        }
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                &[&database],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the start neither finished nor waited for a lock in 10 s");
}

#[tokio::test]
async fn a_start_on_a_healthy_schema_takes_no_table_lock() {
    let url = shared_postgres().create_unique_database("startup");
    let database = database_of(&url);
    let timeout = Duration::from_millis(500);
    let builder = PostgresStore::builder(&url)
        .max_connections(2)
        .timeout(timeout);
    let store = builder.clone().build().await.unwrap();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(30);
    let held = StorageKey::derive("pg::startup", None, b"held").unwrap();
    assert!(matches!(
        store
            .claim(&held, &CanonicalArguments::from(fingerprint), lease)
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));

    // A transaction of the application holds that row (any open transaction on the table
    // would do: a row lock is the common case).
    let mut holder = connect(&url).await;
    let transaction = holder.transaction().await.unwrap();
    transaction
        .execute(
            "SELECT 1 FROM idempotent_records WHERE key = $1 FOR UPDATE",
            &[&held.as_bytes().as_slice()],
        )
        .await
        .unwrap();

    // Another server starts on the same, healthy, tables.
    let second = tokio::spawn(builder.build());
    let observer = connect(&url).await;
    let blocked = until_done_or_blocked(&observer, database, || second.is_finished()).await;

    // The first server's calls on other keys go on within the store's timeout.
    for n in 0..3 {
        let key = StorageKey::derive("pg::startup", None, format!("other {n}").as_bytes()).unwrap();
        let claimed = store
            .claim(&key, &CanonicalArguments::from(fingerprint), lease)
            .await;
        assert!(
            matches!(claimed, Ok(Claim::Acquired { .. })),
            "a call on another key while a second store starts (which waited for a lock: \
             {blocked}): {claimed:?}"
        );
    }
    transaction.rollback().await.unwrap();
    second.await.unwrap().expect("the second store starts");
}

#[tokio::test]
async fn an_upgrade_waits_for_the_table_no_longer_than_the_timeout() {
    let server = shared_postgres();
    let url = server.create_unique_database("upgrade_locked");
    let database = database_of(&url);
    server.psql_in(
        database,
        "CREATE TABLE idempotent_records_schema (version integer NOT NULL);
         INSERT INTO idempotent_records_schema VALUES (1);
         CREATE SEQUENCE idempotent_records_fences;
         CREATE TABLE idempotent_records (
             key bytea PRIMARY KEY, fingerprint bytea NOT NULL, fence bigint NOT NULL,
             state smallint NOT NULL, until timestamptz NOT NULL, output bytea,
             format smallint NOT NULL);
         INSERT INTO idempotent_records
             VALUES ('\\x01', '\\x02', 1, 0, now() + interval '1 hour', NULL, 1);",
    );
    let mut holder = connect(&url).await;
    let transaction = holder.transaction().await.unwrap();
    transaction
        .execute(
            "SELECT 1 FROM idempotent_records WHERE key = '\\x01' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let builder = PostgresStore::builder(&url).timeout(Duration::from_millis(300));
    let error = builder.clone().build().await.unwrap_err();
    assert!(
        error.to_string().contains("55P03"),
        "the upgrade gives up on the lock (lock_timeout), and says so: {error}"
    );
    // It gave up: the application's own statements on the table are not queued behind it.
    transaction
        .execute("UPDATE idempotent_records SET fence = 2", &[])
        .await
        .unwrap();
    transaction.rollback().await.unwrap();

    builder
        .build()
        .await
        .expect("upgraded once the table is free");
    assert_eq!(
        server
            .psql_in(
                database,
                "SELECT max(version) FROM idempotent_records_schema"
            )
            .trim(),
        "2"
    );
}

#[tokio::test]
async fn stores_starting_together_create_the_tables_once() {
    let server = shared_postgres();
    let url = server.create_unique_database("starters");
    let starts: Vec<_> = (0..4)
        .map(|_| tokio::spawn(PostgresStore::builder(&url).max_connections(1).build()))
        .collect();
    for start in starts {
        start.await.unwrap().expect("every starter starts");
    }
    assert_eq!(
        server
            .psql_in(
                database_of(&url),
                "SELECT count(*) FROM idempotent_records_schema"
            )
            .trim(),
        "1"
    );
}

/// How many backends of `database` wait for a lock.
async fn lock_waiters(observer: &tokio_postgres::Client, database: &str) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_statement_that_times_out_is_ended_on_the_server() {
    let server = shared_postgres();
    let url = server.create_unique_database("timeouts");
    let database = database_of(&url);
    let timeout = Duration::from_millis(500);
    let store = PostgresStore::builder(&url)
        .max_connections(1)
        .timeout(timeout)
        .build()
        .await
        .unwrap();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(60);

    // A dead record (its lease ran out), whose row a transaction elsewhere holds: a claim
    // taking it over waits for that row lock.
    let locked = StorageKey::derive("pg::timeouts", None, b"locked").unwrap();
    let hex = locked.to_hex();
    server.psql_in(
        database,
        &format!(
            "INSERT INTO idempotent_records VALUES ('\\x{hex}', '\\x{}', 1, 0,
             now() - interval '1 hour', NULL, 1)",
            "01".repeat(32)
        ),
    );
    let mut holder = connect(&url).await;
    let transaction = holder.transaction().await.unwrap();
    transaction
        .execute(
            "SELECT 1 FROM idempotent_records WHERE key = $1 FOR UPDATE",
            &[&locked.as_bytes().as_slice()],
        )
        .await
        .unwrap();

    let timed_out = store
        .claim(&locked, &CanonicalArguments::from(fingerprint), lease)
        .await;
    assert!(
        matches!(timed_out, Err(StoreError::Unavailable { .. })),
        "the claim cannot have the row in time: {timed_out:?}"
    );
    // The only pooled connection is not left queued behind that claim: the next call, on
    // another key, works.
    let other = StorageKey::derive("pg::timeouts", None, b"other").unwrap();
    let next = store
        .claim(&other, &CanonicalArguments::from(fingerprint), lease)
        .await;
    assert!(
        matches!(next, Ok(Claim::Acquired { .. })),
        "the next call after a timeout: {next:?}"
    );

    // The timed-out claim is no longer waiting on the server, so when the row is let go no
    // claim applies that nobody holds.
    let observer = connect(&url).await;
    for _ in 0..50 {
        if lock_waiters(&observer, database).await == 0 {
            break;
        }
        tokio::time::sleep(timeout / 10).await;
    }
    transaction.commit().await.unwrap();
    tokio::time::sleep(timeout / 5).await;
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
    let retried = store
        .claim(&locked, &CanonicalArguments::from(fingerprint), lease)
        .await;
    assert!(
        matches!(retried, Ok(Claim::Acquired { .. })),
        "a retry of the timed-out call takes the key: {retried:?}"
    );
}

#[tokio::test]
async fn a_cancelled_call_leaves_no_statement_running_on_the_server() {
    let server = shared_postgres();
    let url = server.create_unique_database("cancelled");
    let database = database_of(&url);
    // A timeout far longer than the test waits: what ends the statement here is the call
    // being dropped, not the store's or the server's timeouts.
    let timeout = Duration::from_secs(30);
    let store = PostgresStore::builder(&url)
        .max_connections(1)
        .timeout(timeout)
        .build()
        .await
        .unwrap();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(60);
    let locked = StorageKey::derive("pg::cancelled", None, b"locked").unwrap();
    let hex = locked.to_hex();
    server.psql_in(
        database,
        &format!(
            "INSERT INTO idempotent_records VALUES ('\\x{hex}', '\\x{}', 1, 0,
             now() - interval '1 hour', NULL, 1)",
            "01".repeat(32)
        ),
    );
    let mut holder = connect(&url).await;
    let transaction = holder.transaction().await.unwrap();
    transaction
        .execute(
            "SELECT 1 FROM idempotent_records WHERE key = $1 FOR UPDATE",
            &[&locked.as_bytes().as_slice()],
        )
        .await
        .unwrap();

    // The caller gives up on the claim while it waits for the row (its future is dropped).
    let observer = connect(&url).await;
    let arguments = CanonicalArguments::from(fingerprint);
    let claim = store.claim(&locked, &arguments, lease);
    let gave_up = tokio::time::timeout(Duration::from_millis(300), claim).await;
    assert!(gave_up.is_err(), "the claim waits for the row: {gave_up:?}");

    let other = StorageKey::derive("pg::cancelled", None, b"other").unwrap();
    let next = tokio::time::timeout(
        Duration::from_secs(5),
        store.claim(&other, &CanonicalArguments::from(fingerprint), lease),
    )
    .await;
    assert!(
        matches!(next, Ok(Ok(Claim::Acquired { .. }))),
        "the next call, on the only pooled connection: {next:?}"
    );
    for _ in 0..50 {
        if lock_waiters(&observer, database).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    transaction.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
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
        "the dropped claim applied afterwards, held by nobody"
    );
}

/// 8 keys x 8 concurrent callers through the engine on `store`: every call gets its key's
/// value, and each key runs once.
async fn concurrent_calls(store: Arc<PostgresStore>) -> Result<(), String> {
    let engine = Idempotency::new(store);
    let runs = Runs::default();
    let calls = (0..64u32).map(|n| {
        let (engine, runs) = (engine.clone(), runs.clone());
        tokio::spawn(async move {
            let key = n % 8;
            let name = format!("k{key}");
            let call = Call::new("pg::isolation", Fingerprint::of(&key).unwrap()).key(&name);
            let outcome = engine
                .run(call, async move {
                    runs.hit();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, AppError>(format!("value {key}"))
                })
                .await
                .map_err(|error| format!("key {key}: {error:?}"))?;
            let value = outcome.into_value();
            if value != format!("value {key}") {
                return Err(format!("key {key} answered {value}"));
            }
            Ok(())
        })
    });
    let mut failures = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        if let Err(failure) = call.await.unwrap() {
            failures.push(failure);
        }
    }
    if !failures.is_empty() {
        return Err(format!(
            "{} calls failed, e.g. {}",
            failures.len(),
            failures[0]
        ));
    }
    if runs.count() != 8 {
        return Err(format!("{} executions for 8 keys", runs.count()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_work_whatever_the_database_default_isolation() {
    let server = shared_postgres();
    for level in ["serializable", "repeatable read"] {
        let url = server.create_unique_database("isolation");
        let database = database_of(&url);
        server.psql(&format!(
            "ALTER DATABASE \"{database}\" SET default_transaction_isolation = '{level}'"
        ));
        assert_eq!(
            server.psql_in(database, "SHOW default_transaction_isolation"),
            level
        );
        let store = PostgresStore::builder(&url)
            .max_connections(8)
            .build()
            .await
            .unwrap();
        for round in 0..3 {
            // A fresh set of keys each round: first calls race to claim.
            server.psql_in(database, "DELETE FROM idempotent_records");
            if let Err(failure) = concurrent_calls(Arc::new(store.clone())).await {
                panic!("default isolation {level}, round {round}: {failure}");
            }
        }
    }
}

/// Waiters that look at a key in progress at the same moment all keep waiting. Each look marks
/// the row (`waiting`) unless it is marked already; two looks that both see it unmarked race
/// for the mark, and the one that finds the row marked by the other since its snapshot must
/// not take that change for the key having left progress (and return at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_that_look_at_once_all_keep_waiting() {
    let (store, _) = fresh_store("look_race").await;
    let hour = Duration::from_secs(3600);
    let arguments = CanonicalArguments::from(Fingerprint::from_bytes([1; 32]));
    for round in 0..10 {
        let key = StorageKey::derive("tests::look_race", None, format!("k{round}").as_bytes())
            .expect("a valid key");
        let Claim::Acquired { .. } = store.claim(&key, &arguments, hour).await.unwrap() else {
            panic!("a fresh key is free");
        };
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.wait(&key, hour).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let returned = waiters.iter().filter(|waiter| waiter.is_finished()).count();
        for waiter in &waiters {
            waiter.abort();
        }
        assert_eq!(
            returned, 0,
            "round {round}: {returned} of 8 waiters on a key in progress with an hour's lease returned at once"
        );
    }
}
