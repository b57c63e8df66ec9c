//! The SQLite store against the raw `rusqlite` driver running equivalent statements on a
//! table of the same shape, in a file of its own with the same settings (WAL,
//! `synchronous = FULL`), on Tokio's blocking threads as async code must: a `SELECT` for a
//! replay; an `INSERT` then an `UPDATE` for a first call.
//!
//! Cases (group `sqlite`): `replay`, `first_call` (one caller), and `race` (64 tasks call one
//! fresh key at once; the baseline polls its `SELECT` every millisecond). No targets: the
//! numbers are for reference.

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use idempotent_core::stores::sqlite::SqliteStore;
use rusqlite::{Connection, OptionalExtension, params};

use common::{Call, OrderRequest, Receipt, Round, ShopError};

const LEASE_MS: i64 = 30_000;
/// The ttl of every record the cases write, as `common::Shop` sets it (`ttl = "1h"`): longer
/// than a whole run, so no recorded key expires while a later case still replays it.
const TTL_MS: i64 = 3_600_000;

type Shop = common::Shop<SqliteStore>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raw_records (
    key BLOB NOT NULL PRIMARY KEY,
    fingerprint BLOB, fence INTEGER, state TEXT, until INTEGER, output BLOB, format INTEGER
);
CREATE INDEX IF NOT EXISTS raw_records_until ON raw_records (until);";

const SELECT: &str =
    "SELECT fingerprint, state, output FROM raw_records WHERE key = ?1 AND until > ?2";
const INSERT: &str =
    "INSERT INTO raw_records (key, fingerprint, fence, state, until, output, format)
     VALUES (?1, ?2, 1, 'in_progress', ?3, NULL, 1)";
const INSERT_IF_ABSENT: &str =
    "INSERT OR IGNORE INTO raw_records (key, fingerprint, fence, state, until, output, format)
     VALUES (?1, ?2, 1, 'in_progress', ?3, NULL, 1)";
const UPDATE: &str =
    "UPDATE raw_records SET state = 'completed', output = ?2, until = ?3 WHERE key = ?1";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn failed(error: rusqlite::Error) -> ShopError {
    ShopError::Other(error.to_string())
}

/// The raw driver: one connection, used on a blocking thread per statement.
#[derive(Clone)]
struct Raw {
    connection: Arc<Mutex<Connection>>,
}

type Row = (Vec<u8>, String, Option<Vec<u8>>);

impl common::Caller for Raw {
    fn replay(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        Raw::replay(self, request)
    }

    fn first_call(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        Raw::first_call(self, request)
    }
}

impl common::Racer for Raw {
    fn race(
        &self,
        task: usize,
        request: &OrderRequest,
        round: &Round,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.race_order(request, task, round)
    }
}

impl Raw {
    fn open(path: &std::path::Path) -> Raw {
        let connection = Connection::open(path).expect("open the raw database");
        let _: String = connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .unwrap();
        connection
            .pragma_update(None, "synchronous", "FULL")
            .unwrap();
        connection.execute_batch(SCHEMA).unwrap();
        Raw {
            connection: Arc::new(Mutex::new(connection)),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, ShopError> {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || op(&connection.lock().unwrap()))
            .await
            .expect("a blocking task")
            .map_err(failed)
    }

    async fn read(&self, key: &str, fingerprint: &[u8; 32]) -> Result<Option<Receipt>, ShopError> {
        let key = key.as_bytes().to_vec();
        let row: Option<Row> = self
            .blocking(move |connection| {
                connection
                    .prepare_cached(SELECT)?
                    .query_row(params![key, now_ms()], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .optional()
            })
            .await?;
        let Some((recorded, state, output)) = row else {
            return Ok(None);
        };
        if recorded != fingerprint.as_slice() {
            return Err(ShopError::Other("key reused".into()));
        }
        match (state.as_str(), output) {
            ("completed", Some(output)) => serde_json::from_slice(&output)
                .map(Some)
                .map_err(|error| ShopError::Other(error.to_string())),
            _ => Ok(None),
        }
    }

    async fn claim(
        &self,
        statement: &'static str,
        key: &str,
        fingerprint: &[u8; 32],
    ) -> Result<bool, ShopError> {
        let (key, fingerprint) = (key.as_bytes().to_vec(), fingerprint.to_vec());
        let inserted = self
            .blocking(move |connection| {
                connection.prepare_cached(statement)?.execute(params![
                    key,
                    fingerprint,
                    now_ms() + LEASE_MS
                ])
            })
            .await?;
        Ok(inserted == 1)
    }

    async fn record(&self, key: &str, receipt: &Receipt) -> Result<(), ShopError> {
        let key = key.as_bytes().to_vec();
        let output = serde_json::to_vec(receipt).expect("a receipt serializes");
        let updated = self
            .blocking(move |connection| {
                connection
                    .prepare_cached(UPDATE)?
                    .execute(params![key, output, now_ms() + TTL_MS])
            })
            .await?;
        assert_eq!(updated, 1, "the raw record was updated");
        Ok(())
    }

    async fn replay(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        self.read(&request.order_id, &fingerprint)
            .await?
            .ok_or_else(|| ShopError::Other("not recorded".into()))
    }

    async fn first_call(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        if !self.claim(INSERT, &request.order_id, &fingerprint).await? {
            return Err(ShopError::Other("not a first call".into()));
        }
        let receipt = common::receipt(request);
        self.record(&request.order_id, &receipt).await?;
        Ok(receipt)
    }

    async fn race_order(
        &self,
        request: &OrderRequest,
        task: usize,
        round: &Round,
    ) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        if self
            .claim(INSERT_IF_ABSENT, &request.order_id, &fingerprint)
            .await?
        {
            round.executed_by(task);
            tokio::time::sleep(common::RACE_BODY).await;
            let receipt = common::receipt(request);
            self.record(&request.order_id, &receipt).await?;
            return Ok(receipt);
        }
        loop {
            if let Some(receipt) = self.read(&request.order_id, &fingerprint).await? {
                return Ok(receipt);
            }
            tokio::time::sleep(common::POLL).await;
        }
    }
}

fn bench(c: &mut Criterion) {
    let runtime = common::runtime();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let shop = Arc::new(Shop {
        store: Arc::new(SqliteStore::open(dir.path().join("store.sqlite3")).expect("the store")),
    });
    let raw = Arc::new(Raw::open(&dir.path().join("raw.sqlite3")));
    let request = Arc::new(common::order("order-1001".to_string()));
    runtime.block_on(async {
        shop.place_order(&request).await.unwrap();
        raw.first_call(&request).await.unwrap();
    });

    let mut group = c.benchmark_group("sqlite");
    // One caller: a task on a worker, as a request handler would be.
    for (case, call) in [("replay", Call::Replay), ("first_call", Call::FirstCall)] {
        let id = |variant: &str| format!("{case}/{variant}");
        common::bench_calls(
            &mut group,
            &runtime,
            &id("idempotent"),
            1,
            call,
            &shop,
            &request,
        );
        common::bench_calls(
            &mut group,
            &runtime,
            &id("baseline"),
            1,
            call,
            &raw,
            &request,
        );
    }

    common::bench_races(&mut group, &runtime, "sqlite", &shop, &raw);
    group.finish();
    drop((shop, raw));
    drop(runtime);
}

criterion_group!(benches, bench);
criterion_main!(benches);
