//! The SQLite store on a sqlx pool, each test on a fresh database file in a temporary folder;
//! and the same file shared with the rusqlite store.
#![cfg(feature = "sqlx-sqlite")]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idempotent_core::conformance::Harness;
use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
use idempotent_core::{Claim, FencedWrite, Store, StoreError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
use support::{acquire, args, key};

const HOUR: Duration = Duration::from_secs(3600);

/// A pool on `path` as a service would open it, in WAL mode.
async fn pool(path: &Path) -> SqlitePool {
    SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal),
    )
    .await
    .expect("a pool")
}

async fn store(path: &Path) -> SqlxSqliteStore {
    SqlxSqliteStore::builder(pool(path).await)
        .build()
        .await
        .expect("the store")
}

idempotent_core::conformance_suite!(
    async {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let store = store(&dir.path().join("conformance.sqlite3")).await;
        Harness::with_real_time(Arc::new(store), Duration::from_millis(300)).keep(dir)
    }
    .await
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_in_wal_mode_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let pool = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(dir.path().join("delete.sqlite3"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Delete),
    )
    .await
    .unwrap();
    let refused = SqlxSqliteStore::builder(pool).build().await.unwrap_err();
    assert!(
        refused.to_string().contains("SqliteJournalMode::Wal"),
        "{refused}"
    );
    let memory = SqlitePool::connect("sqlite::memory:").await.unwrap();
    let refused = SqlxSqliteStore::builder(memory).build().await.unwrap_err();
    assert!(refused.to_string().contains("in-memory"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.sqlite3");
    let first = store(&path).await;
    sqlx::query("UPDATE idempotent_schema SET version = 2")
        .execute(first.pool())
        .await
        .unwrap();
    let refused = SqlxSqliteStore::builder(first.pool().clone())
        .build()
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("newer"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_keep_growing_after_records_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir.path().join("fences.sqlite3")).await;
    let arguments = args(1);
    let first = acquire(&store, &key("deleted", 0), &arguments, HOUR).await;
    sqlx::query("DELETE FROM idempotent_records")
        .execute(store.pool())
        .await
        .unwrap();
    let second = acquire(&store, &key("deleted", 0), &arguments, HOUR).await;
    assert!(second > first, "{second} after {first}");
    let other = acquire(&store, &key("other", 0), &arguments, HOUR).await;
    assert!(other > second, "{other} after {second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_rows_are_typed_errors_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir.path().join("corrupt.sqlite3")).await;
    let key = key("corrupt", 0);
    let arguments = args(3);
    let fence = acquire(&store, &key, &arguments, HOUR).await;
    sqlx::query("UPDATE idempotent_records SET fingerprint = X'0102'")
        .execute(store.pool())
        .await
        .unwrap();
    for _ in 0..2 {
        match store.claim(&key, &arguments, HOUR).await {
            Err(StoreError::Corrupt { key: hex, message }) => {
                assert_eq!(hex, key.to_hex());
                assert!(message.contains("fingerprint"), "{message}");
            }
            other => panic!("a corrupt record, got {other:?}"),
        }
        assert!(matches!(
            store.wait(&key, HOUR).await,
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(
            store
                .complete(&key, fence, b"x".to_vec().into(), HOUR)
                .await
                .unwrap(),
            FencedWrite::Fenced
        );
        store.purge_expired().await.unwrap();
    }
    assert!(store.remove(&key).await.unwrap());
    acquire(&store, &key, &arguments, HOUR).await;
}

/// The rusqlite store and the sqlx store on one file: each reads what the other wrote, and
/// fences grow across both.
#[cfg(feature = "sqlite")]
mod with_rusqlite {
    use super::*;
    use idempotent_core::stores::sqlite::SqliteStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_written_by_one_store_are_read_by_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.sqlite3");
        let output: Vec<u8> = (0..=255u8).collect();
        let arguments = args(5);

        // Written by rusqlite, read by sqlx.
        let rusqlite = SqliteStore::open(&path).unwrap();
        let sqlx = store(&path).await;
        let first = acquire(&rusqlite, &key("a", 0), &arguments, HOUR).await;
        assert!(matches!(
            sqlx.claim(&key("a", 0), &arguments, HOUR).await.unwrap(),
            Claim::InProgress { .. }
        ));
        assert_eq!(
            sqlx.claim(&key("a", 0), &args(6), HOUR).await.unwrap(),
            Claim::Mismatch
        );
        rusqlite
            .complete(&key("a", 0), first, output.clone().into(), HOUR)
            .await
            .unwrap();
        assert_eq!(
            sqlx.claim(&key("a", 0), &arguments, HOUR).await.unwrap(),
            Claim::Completed {
                output: output.clone().into()
            }
        );

        // Written by sqlx, read by rusqlite; the fence counter is one for both.
        let second = acquire(&sqlx, &key("b", 0), &arguments, HOUR).await;
        assert!(second > first, "{second} after {first}");
        assert!(matches!(
            rusqlite
                .claim(&key("b", 0), &arguments, HOUR)
                .await
                .unwrap(),
            Claim::InProgress { .. }
        ));
        assert_eq!(
            sqlx.complete(&key("b", 0), second, output.clone().into(), HOUR)
                .await
                .unwrap(),
            FencedWrite::Applied
        );
        assert_eq!(
            rusqlite
                .claim(&key("b", 0), &arguments, HOUR)
                .await
                .unwrap(),
            Claim::Completed {
                output: output.into()
            }
        );
        let third = acquire(&rusqlite, &key("c", 0), &arguments, HOUR).await;
        assert!(third > second, "{third} after {second}");

        // A lease that ended under one store is taken over by the other, with a larger fence.
        let short = Duration::from_millis(50);
        let held = acquire(&sqlx, &key("d", 0), &arguments, short).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        let taken = acquire(&rusqlite, &key("d", 0), &arguments, HOUR).await;
        assert!(taken > held, "{taken} after {held}");
        assert_eq!(
            sqlx.release(&key("d", 0), held).await.unwrap(),
            FencedWrite::Fenced
        );
    }
}
