//! Storage growth: what a record takes on each store, and purging many expired records.
//!
//! `cargo bench --all-features --bench storage` (about two minutes; the servers are started
//! here, through idempotent-test-support) prints two tables:
//!
//! - **bytes per record**: `RECORDS` calls through the library, each recording an output of
//!   100 bytes of JSON; the store's growth divided by the records. Memory: the store's own
//!   count (`MemoryStore::bytes`). SQLite: the database file after a WAL checkpoint. PostgreSQL:
//!   `pg_total_relation_size` of the table (heap, index, TOAST). Redis: `used_memory`.
//! - **purge-expired**: `EXPIRED` records that ended an hour ago, written straight into the
//!   table (the library's own format), then purged, once with the one-statement
//!   `Store::purge_expired` and once in batches of `BATCH` (`Admin::purge_expired_batch`, as the
//!   CLI's `purge-expired` does): the total time, and the longest single statement. Each
//!   statement is its own transaction, so the longest one is the longest any lock is held: on
//!   PostgreSQL (with `fsync=on`) the row locks of the rows deleted, on SQLite (the store's
//!   defaults) the database's write lock. Redis
//!   deletes each record when it ends: nothing is left to purge.
//!
//! Run without `--bench` (as `cargo test --all-targets` runs it) it does the same on a few
//! hundred records, to check that the measurement still works.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_core::admin::Admin;
use idempotent_core::stores::postgres::PostgresStore;
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::stores::sqlite::SqliteStore;
use idempotent_core::{Call, Error, Fingerprint, Idempotency, MemoryStore, Options, Store};
use idempotent_test_support::{PostgresOptions, PostgresServer, RedisServer};

/// Records written for the bytes per record.
const RECORDS: u64 = 10_000;
/// Expired records purged.
const EXPIRED: u64 = 1_000_000;
/// Records deleted per batch.
const BATCH: u64 = 1_000;

/// How much to do: the full measurement, or a check that it works.
#[derive(Clone, Copy)]
struct Scale {
    records: u64,
    expired: u64,
}

/// Writes `n` records of a 100-byte output through the library, keyed `<prefix>-<i>` (keys
/// of one length, so records of one size).
async fn write_records(store: Arc<dyn Store>, prefix: &str, n: u64) {
    let engine = Idempotency::new(store).with_options(
        Options::new()
            .with_ttl(Duration::from_secs(3600))
            .with_lease(Duration::from_secs(30)),
    );
    // A JSON string of 100 bytes: the quotes and 98 characters.
    let output = "x".repeat(98);
    assert_eq!(serde_json::to_vec(&output).unwrap().len(), 100);
    for i in 0..n {
        let key = format!("{prefix}-{i:08}");
        let call = Call::new("storage::growth", Fingerprint::of(&i).unwrap()).key(&key);
        let recorded = engine
            .run(call, async { Ok::<_, Error>(output.clone()) })
            .await
            .unwrap();
        assert!(!recorded.is_replayed());
    }
}

fn per_record(before: u64, after: u64, records: u64) -> String {
    format!(
        "{:.0}",
        after.saturating_sub(before) as f64 / records as f64
    )
}

/// SQLite's file after a checkpoint (so the WAL's pages are counted once, in the file).
fn sqlite_file_bytes(path: &Path) -> u64 {
    let connection = rusqlite::Connection::open(path).unwrap();
    connection
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    std::fs::metadata(path).unwrap().len()
}

async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

async fn pg_table_bytes(client: &tokio_postgres::Client) -> u64 {
    client
        .query_one(
            "SELECT pg_total_relation_size('idempotent_records')::bigint",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0) as u64
}

fn redis_used_memory(server: &RedisServer) -> u64 {
    let info = server.command(&["INFO", "memory"]);
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .expect("INFO memory has used_memory")
}

/// Writes `n` records that ended an hour ago into PostgreSQL's table, in the store's format.
async fn pg_expired(client: &tokio_postgres::Client, n: u64) {
    client
        .execute(
            "INSERT INTO idempotent_records (key, fingerprint, fence, state, until, output, format)
             SELECT sha256(('expired-' || i)::text::bytea), sha256(('fp-' || i)::text::bytea), i,
                    1, statement_timestamp() - interval '1 hour',
                    convert_to('{\"ok\":\"' || repeat('x', 98) || '\"}', 'UTF8'), 1
             FROM generate_series(1, $1::bigint) AS i",
            &[&(n as i64)],
        )
        .await
        .unwrap();
    client
        .execute("VACUUM ANALYZE idempotent_records", &[])
        .await
        .unwrap();
}

/// Writes `n` records that ended an hour ago into SQLite's table, in the store's format.
fn sqlite_expired(path: &Path, n: u64) {
    let connection = rusqlite::Connection::open(path).unwrap();
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000;
    connection
        .execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO idempotent_records (key, fingerprint, fence, state, until, output, format)
             SELECT randomblob(32), randomblob(32), 1000000000 + i, 'completed', ?2,
                    CAST('{\"ok\":\"' || printf('%.98c', 'x') || '\"}' AS BLOB), 1
             FROM n",
            rusqlite::params![n as i64, ended],
        )
        .unwrap();
}

/// The purge's figures: the total and the longest statement.
struct Purged {
    records: u64,
    total: Duration,
    longest: Duration,
    statements: u64,
}

async fn purge_at_once(store: &dyn Admin) -> Purged {
    let started = Instant::now();
    let records = store.purge_expired().await.unwrap();
    let total = started.elapsed();
    Purged {
        records,
        total,
        longest: total,
        statements: 1,
    }
}

async fn purge_in_batches(store: &dyn Admin) -> Purged {
    let started = Instant::now();
    let (mut records, mut longest, mut statements) = (0, Duration::ZERO, 0);
    loop {
        let batch_started = Instant::now();
        let deleted = store.purge_expired_batch(BATCH).await.unwrap();
        longest = longest.max(batch_started.elapsed());
        statements += 1;
        if deleted == 0 {
            break;
        }
        records += deleted;
    }
    Purged {
        records,
        total: started.elapsed(),
        longest,
        statements,
    }
}

fn purge_row(store: &str, how: &str, purged: &Purged) -> String {
    format!(
        "| {store} | {how} | {} | {} | {:.2} s | {:.1} ms |",
        purged.records,
        purged.statements,
        purged.total.as_secs_f64(),
        purged.longest.as_secs_f64() * 1000.0
    )
}

async fn measure(scale: Scale) {
    let mut bytes_rows = Vec::new();
    let mut purge_rows = Vec::new();

    // Memory: the store's own count.
    let memory = Arc::new(MemoryStore::new());
    write_records(memory.clone(), "order", scale.records).await;
    bytes_rows.push(format!(
        "| memory | {} | `MemoryStore::bytes` |",
        per_record(0, memory.bytes() as u64, scale.records)
    ));

    // SQLite: the file.
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("storage.sqlite3");
    let sqlite = Arc::new(SqliteStore::open(&path).unwrap());
    let before = sqlite_file_bytes(&path);
    write_records(sqlite.clone(), "order", scale.records).await;
    let after = sqlite_file_bytes(&path);
    bytes_rows.push(format!(
        "| SQLite | {} | the database file after a checkpoint |",
        per_record(before, after, scale.records)
    ));
    for (how, batched) in [("one statement", false), ("batches of 1,000", true)] {
        sqlite_expired(&path, scale.expired);
        let purged = if batched {
            purge_in_batches(&*sqlite).await
        } else {
            purge_at_once(&*sqlite).await
        };
        assert_eq!(purged.records, scale.expired, "SQLite, {how}");
        purge_rows.push(purge_row("SQLite", how, &purged));
    }

    // PostgreSQL: the table with its index and TOAST.
    // fsync on, as in production: each batch's commit flushes the WAL.
    let server = tokio::task::spawn_blocking(|| {
        PostgresServer::start_with(PostgresOptions {
            fsync: true,
            ..PostgresOptions::default()
        })
    })
    .await
    .unwrap();
    let url = server.create_database("storage");
    let postgres = Arc::new(PostgresStore::builder(url.clone()).build().await.unwrap());
    let client = pg_client(&url).await;
    // The table exists once the store has run a statement.
    write_records(postgres.clone(), "first", 1).await;
    client
        .execute("DELETE FROM idempotent_records", &[])
        .await
        .unwrap();
    client
        .execute("VACUUM FULL idempotent_records", &[])
        .await
        .unwrap();
    let before = pg_table_bytes(&client).await;
    write_records(postgres.clone(), "order", scale.records).await;
    let after = pg_table_bytes(&client).await;
    bytes_rows.push(format!(
        "| PostgreSQL | {} | `pg_total_relation_size` of the table (heap, primary key, `until` index, TOAST) |",
        per_record(before, after, scale.records)
    ));
    for (how, batched) in [("one statement", false), ("batches of 1,000", true)] {
        pg_expired(&client, scale.expired).await;
        let purged = if batched {
            purge_in_batches(&*postgres).await
        } else {
            purge_at_once(&*postgres).await
        };
        assert_eq!(purged.records, scale.expired, "PostgreSQL, {how}");
        purge_rows.push(purge_row("PostgreSQL", how, &purged));
    }

    // Redis: the server's memory.
    let redis_server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let redis = Arc::new(RedisStore::builder(redis_server.url()).build().unwrap());
    write_records(redis.clone(), "first", 1).await;
    let before = redis_used_memory(&redis_server);
    write_records(redis.clone(), "order", scale.records).await;
    let after = redis_used_memory(&redis_server);
    bytes_rows.push(format!(
        "| Redis | {} | `used_memory` (`INFO memory`) |",
        per_record(before, after, scale.records)
    ));
    purge_rows.push(
        "| Redis | – | – | – | – | – (each record is deleted by Redis when it ends) |".to_string(),
    );

    println!(
        "Bytes per record ({} records, each with a 100-byte output):\n",
        scale.records
    );
    println!("| store | bytes per record | measured as |");
    println!("|---|---:|---|");
    for row in &bytes_rows {
        println!("{row}");
    }
    println!(
        "\npurge-expired over {} records that ended an hour ago:\n",
        scale.expired
    );
    println!("| store | how | purged | statements | total | longest statement |");
    println!("|---|---|---:|---:|---:|---:|");
    for row in &purge_rows {
        println!("{row}");
    }
    drop((postgres, client, server, redis, redis_server));
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs the check.
    let scale = if std::env::args().any(|arg| arg == "--bench") {
        Scale {
            records: RECORDS,
            expired: EXPIRED,
        }
    } else {
        Scale {
            records: 200,
            expired: 2_500,
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(measure(scale));
}
