//! The SQLite store, each test on a fresh database file in a temporary folder.
#![cfg(feature = "sqlite")]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idempotent_core::conformance::Harness;
use idempotent_core::stores::sqlite::SqliteStore;
use idempotent_core::{
    Bytes, Call, Claim, Fence, FencedWrite, Fingerprint, Idempotency, Store, StoreError,
};
use support::{AppError, Runs, acquire, args, key};
use tempfile::TempDir;

const HOUR: Duration = Duration::from_secs(3600);

/// A store on a fresh database file; the harness keeps its temporary folder alive.
fn conformance_harness() -> Harness {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store = SqliteStore::open(dir.path().join("conformance.sqlite3")).expect("open");
    Harness::with_real_time(Arc::new(store), Duration::from_millis(300)).keep(dir)
}

idempotent_core::conformance_suite!(conformance_harness());

/// A temporary folder and the database file path in it.
fn database() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("idempotent.sqlite3");
    (dir, path)
}

/// A plain connection beside the store, as an operator (or another program) would have.
fn raw(path: &Path) -> rusqlite::Connection {
    let connection = rusqlite::Connection::open(path).unwrap();
    connection.busy_timeout(Duration::from_secs(5)).unwrap();
    connection
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_records_survive_a_restart() {
    let (_dir, path) = database();
    let output: Vec<u8> = (0..=255u8).chain(*b"{\"receipt\":1}").collect();
    let arguments = args(7);
    let first = SqliteStore::open(&path).unwrap();
    let fence = acquire(&first, &key("restart", 0), &arguments, HOUR).await;
    assert_eq!(
        first
            .complete(&key("restart", 0), fence, output.clone().into(), HOUR)
            .await
            .unwrap(),
        FencedWrite::Applied
    );
    drop(first);

    let second = SqliteStore::open(&path).unwrap();
    assert_eq!(
        second
            .claim(&key("restart", 0), &arguments, HOUR)
            .await
            .unwrap(),
        Claim::Completed {
            output: output.into()
        },
        "the record and its exact bytes are read back from the file"
    );
    let journal: String = raw(&path)
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    drop(second);

    // The same through the engine: the body runs once across the two store objects.
    let runs = Runs::default();
    let body = |value: &'static str| {
        let runs = runs.clone();
        async move {
            runs.hit();
            Ok::<_, AppError>(value.to_string())
        }
    };
    let call = Call::new("sqlite::restart", Fingerprint::of(&42).unwrap()).key("order-1");
    let before = Idempotency::new(Arc::new(SqliteStore::open(&path).unwrap()));
    let executed = before.run(call, body("first")).await.unwrap();
    assert!(!executed.is_replayed());
    drop(before);
    let after = Idempotency::new(Arc::new(SqliteStore::open(&path).unwrap()));
    let replayed = after.run(call, body("second")).await.unwrap();
    assert!(replayed.is_replayed());
    assert_eq!(replayed.into_value(), "first");
    assert_eq!(runs.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_through_several_store_objects_have_one_winner() {
    let (_dir, path) = database();
    let stores: Vec<Arc<SqliteStore>> = (0..4)
        .map(|_| Arc::new(SqliteStore::open(&path).unwrap()))
        .collect();
    let mut last_fence = Fence::new(0);
    for round in 0..3 {
        let key = key(&format!("race-{round}"), 0);
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let racers: Vec<_> = (0..64)
            .map(|i| {
                let store = Arc::clone(&stores[i % stores.len()]);
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.claim(&key, &args(1), HOUR).await.unwrap()
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut in_progress = 0;
        for racer in racers {
            match racer.await.unwrap() {
                Claim::Acquired { fence } => winners.push(fence),
                Claim::InProgress { .. } => in_progress += 1,
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert_eq!(in_progress, 63);
        // Fences grow across store objects (one counter in the file).
        assert!(
            winners[0] > last_fence,
            "{:?} after {last_fence}",
            winners[0]
        );
        last_fence = winners[0];
        // The winner's fence works through any store object.
        let other = &stores[(round + 1) % stores.len()];
        assert_eq!(
            other.release(&key, winners[0]).await.unwrap(),
            FencedWrite::Applied
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_keep_growing_after_records_are_deleted() {
    let (_dir, path) = database();
    let store = SqliteStore::open(&path).unwrap();
    let arguments = args(1);
    let first = acquire(&store, &key("deleted", 0), &arguments, HOUR).await;
    raw(&path)
        .execute("DELETE FROM idempotent_records", [])
        .unwrap();
    let reopened = SqliteStore::open(&path).unwrap();
    let second = acquire(&reopened, &key("deleted", 0), &arguments, HOUR).await;
    assert!(second > first, "{second} after {first}");
    assert_eq!(
        store
            .complete(
                &key("deleted", 0),
                first,
                Bytes::from_static(b"stale"),
                HOUR
            )
            .await
            .unwrap(),
        FencedWrite::Fenced
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_rows_are_typed_errors_until_deleted() {
    let (_dir, path) = database();
    let store = SqliteStore::open(&path).unwrap();
    let key = key("corrupt", 0);
    let arguments = args(3);
    let connection = raw(&path);
    let cases = [
        // Expired too (`until = 0`), so housekeeping would delete them if it did not check
        // the format and the state.
        ("an unknown format version", "format = 99, until = 0"),
        ("an unknown state", "state = 'paused', until = 0"),
        ("a short fingerprint", "fingerprint = X'0102'"),
        ("a NULL fence", "fence = NULL"),
        ("a NULL lease end", "until = NULL"),
        ("a text fence", "fence = 'seven'"),
        (
            "a completed record without output",
            "state = 'completed', output = NULL",
        ),
    ];
    for (what, damage) in cases {
        let fence = acquire(&store, &key, &arguments, HOUR).await;
        let damage = format!("UPDATE idempotent_records SET {damage}");
        assert_eq!(connection.execute(&damage, []).unwrap(), 1, "{what}");
        let corrupt = |operation: &str, result: Result<String, StoreError>| match result {
            Err(StoreError::Corrupt { key: hex, message }) => {
                assert_eq!(hex, key.to_hex());
                println!("{what}, {operation}: {message}");
            }
            other => panic!("{what}: {operation} should report a corrupt record, got {other:?}"),
        };
        let claim = || async {
            store
                .claim(&key, &arguments, HOUR)
                .await
                .map(|c| format!("{c:?}"))
        };
        corrupt("claim", claim().await);
        let write = store
            .complete(&key, fence, Bytes::from_static(b"x"), HOUR)
            .await;
        corrupt("complete", write.map(|w| format!("{w:?}")));
        corrupt(
            "release",
            store.release(&key, fence).await.map(|w| format!("{w:?}")),
        );
        corrupt(
            "extend",
            store
                .extend(&key, fence, HOUR)
                .await
                .map(|w| format!("{w:?}")),
        );
        corrupt("wait", store.wait(&key, HOUR).await.map(|()| String::new()));
        // Housekeeping does not choke on what it cannot read, and does not remove a row of
        // a format or state it does not know.
        store.purge_expired().await.unwrap();
        corrupt("claim after purge_expired", claim().await);

        // An operator deletes the row; the key works again.
        connection
            .execute(
                "DELETE FROM idempotent_records WHERE key = ?1",
                [key.as_bytes().as_slice()],
            )
            .unwrap();
        let fence = acquire(&store, &key, &arguments, HOUR).await;
        assert_eq!(
            store.release(&key, fence).await.unwrap(),
            FencedWrite::Applied
        );
    }
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_error() {
    let (_dir, path) = database();
    drop(SqliteStore::open(&path).unwrap());
    raw(&path)
        .execute("UPDATE idempotent_schema SET version = 2", [])
        .unwrap();
    let error = SqliteStore::open(&path).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("schema version 2") && message.contains("newer than this release"),
        "{message}"
    );

    // Also a file some later release created from scratch.
    let (_other_dir, other) = database();
    raw(&other)
        .execute_batch("CREATE TABLE idempotent_schema (version INTEGER NOT NULL); INSERT INTO idempotent_schema VALUES (7);")
        .unwrap();
    let message = SqliteStore::open(&other).unwrap_err().to_string();
    assert!(message.contains("schema version 7"), "{message}");
}

#[test]
fn an_in_memory_database_is_refused() {
    let message = SqliteStore::open(":memory:").unwrap_err().to_string();
    assert!(message.contains("MemoryStore"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_waiters_are_woken_by_notification_not_polling() {
    let (_dir, path) = database();
    let poll_interval = Duration::from_secs(10);
    let store = Arc::new(
        SqliteStore::builder(&path)
            .poll_interval(poll_interval)
            .build()
            .unwrap(),
    );
    let key = key("notified", 0);
    let arguments = args(1);
    let fence = acquire(store.as_ref(), &key, &arguments, HOUR).await;
    let waiter = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.wait(&key, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "the holder is alive with a 1 h lease"
    );
    store
        .complete(&key, fence, Bytes::from_static(b"{}"), HOUR)
        .await
        .unwrap();
    // Well inside one poll interval: only a notification can have woken it.
    let woken = tokio::time::timeout(poll_interval / 4, waiter).await;
    assert!(
        matches!(woken, Ok(Ok(Ok(())))),
        "the completion wakes the waiter at once, not at the next poll: {woken:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_by_other_store_objects_are_seen_by_polling() {
    let (_dir, path) = database();
    let waiting = Arc::new(
        SqliteStore::builder(&path)
            .poll_interval(Duration::from_millis(20))
            .build()
            .unwrap(),
    );
    let holding = SqliteStore::open(&path).unwrap();
    let key = key("polled", 0);
    let fence = acquire(&holding, &key, &args(1), HOUR).await;
    let waiter = {
        let waiting = Arc::clone(&waiting);
        tokio::spawn(async move { waiting.wait(&key, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    holding.release(&key, fence).await.unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
    assert!(matches!(woken, Ok(Ok(Ok(())))), "{woken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_past_the_busy_timeout_is_unavailable() {
    let (_dir, path) = database();
    let busy_timeout = Duration::from_millis(200);
    let store = SqliteStore::builder(&path)
        .busy_timeout(busy_timeout)
        .build()
        .unwrap();
    let blocker = raw(&path);
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    let error = store
        .claim(&key("locked", 0), &args(1), HOUR)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::Unavailable { message, .. } if message.contains("busy timeout")),
        "{error:?}"
    );
    // It waited out the busy timeout, and gave up soon after it: not a multiple of it.
    let waited = started.elapsed();
    assert!(
        waited >= busy_timeout && waited < busy_timeout * 5,
        "a {busy_timeout:?} busy timeout gave up after {waited:?}"
    );
    blocker.execute_batch("COMMIT").unwrap();
    acquire(&store, &key("locked", 0), &args(1), HOUR).await;
}
