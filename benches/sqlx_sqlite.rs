//! The sqlx SQLite store against bare sqlx running the same statements on the same pool
//! (WAL, sqlx's defaults otherwise: `synchronous = FULL`), on a table of the same shape: the
//! record read for a replay; the read, the one-statement claim and the completing `UPDATE` for
//! a first call. And a floor: sqlx doing only the round trips (`SELECT 1` as many times).
//!
//! Cases (group `sqlx_sqlite`): `replay` and `first_call`, one caller, each as `idempotent`,
//! `baseline` and `floor`. No targets: the numbers are for reference.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use idempotent_core::stores::sqlx_sqlite::SqlxSqliteStore;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};

use common::{Call, OrderRequest, Receipt, ShopError};

const LEASE_MS: i64 = 30_000;
/// The ttl of every record the cases write, as `common::Shop` sets it (`ttl = "1h"`): longer
/// than a whole run, so no recorded key expires while a later case still replays it.
const TTL_MS: i64 = 3_600_000;

type Shop = common::Shop<SqlxSqliteStore>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raw_records (
    key BLOB NOT NULL PRIMARY KEY,
    fingerprint BLOB, fence INTEGER, state TEXT, until INTEGER, output BLOB, format INTEGER
);
CREATE TABLE IF NOT EXISTS raw_fence (id INTEGER PRIMARY KEY, last INTEGER NOT NULL);
INSERT OR IGNORE INTO raw_fence (id, last) VALUES (1, 0);";

const SELECT: &str = "SELECT format, state, fingerprint, fence, until, output
     FROM raw_records WHERE key = ?1";
const CLAIM: &str =
    "INSERT INTO raw_records (key, fingerprint, fence, state, until, output, format)
     VALUES (?1, ?2, coalesce((SELECT last FROM raw_fence WHERE id = 1), 0) + 1,
             'in_progress', ?3, NULL, 1)
     ON CONFLICT (key) DO UPDATE SET fence = excluded.fence WHERE raw_records.until <= ?4
     RETURNING fence";
const UPDATE: &str = "UPDATE raw_records SET state = 'completed', until = ?2, output = ?3
     WHERE key = ?1 AND state = 'in_progress' AND fence = ?4 AND ?5 < until";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn failed(error: sqlx::Error) -> ShopError {
    ShopError::Other(error.to_string())
}

/// A record's columns as `SELECT` reads them.
type Row = (i64, String, Vec<u8>, i64, i64, Option<Vec<u8>>);

/// Bare sqlx on the store's pool: the same statements on a table of the same shape.
struct Bare {
    pool: SqlitePool,
}

// The trait's signature, with its `Send` bound, spelled out as the other benches do.
#[allow(clippy::manual_async_fn)]
impl common::Caller for Bare {
    fn replay(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        async move {
            let fingerprint = common::json_fingerprint(request);
            let row: Option<Row> = sqlx::query_as(SELECT)
                .bind(request.order_id.as_bytes())
                .fetch_optional(&self.pool)
                .await
                .map_err(failed)?;
            match row {
                Some((1, state, recorded, _, until, Some(output)))
                    if state == "completed" && recorded == fingerprint && now_ms() < until =>
                {
                    serde_json::from_slice(&output).map_err(|e| ShopError::Other(e.to_string()))
                }
                _ => Err(ShopError::Other("not recorded".into())),
            }
        }
    }

    fn first_call(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        async move {
            let fingerprint = common::json_fingerprint(request);
            let key = request.order_id.as_bytes();
            let seen: Option<(i64,)> =
                sqlx::query_as("SELECT fence FROM raw_records WHERE key = ?1")
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(failed)?;
            if seen.is_some() {
                return Err(ShopError::Other("not a first call".into()));
            }
            let now = now_ms();
            let fence: i64 = sqlx::query_scalar(CLAIM)
                .bind(key)
                .bind(fingerprint.as_slice())
                .bind(now + LEASE_MS)
                .bind(now)
                .fetch_one(&self.pool)
                .await
                .map_err(failed)?;
            let receipt = common::receipt(request);
            let output = serde_json::to_vec(&receipt).expect("a receipt serializes");
            let now = now_ms();
            let updated = sqlx::query(UPDATE)
                .bind(key)
                .bind(now + TTL_MS)
                .bind(output)
                .bind(fence)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(failed)?;
            assert_eq!(updated.rows_affected(), 1, "the bare record was updated");
            Ok(receipt)
        }
    }
}

/// The round trips alone: `SELECT 1` once for a replay, three times for a first call.
struct Floor {
    pool: SqlitePool,
}

impl Floor {
    async fn round_trips(&self, n: usize, request: &OrderRequest) -> Result<Receipt, ShopError> {
        for _ in 0..n {
            let _: i64 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&self.pool)
                .await
                .map_err(failed)?;
        }
        Ok(common::receipt(request))
    }
}

impl common::Caller for Floor {
    fn replay(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.round_trips(1, request)
    }

    fn first_call(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.round_trips(3, request)
    }
}

fn bench(c: &mut Criterion) {
    let runtime = common::runtime();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let pool = runtime.block_on(async {
        let pool = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(dir.path().join("bench.sqlite3"))
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal),
        )
        .await
        .expect("the pool");
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .expect("the bare schema");
        pool
    });
    let store = runtime
        .block_on(SqlxSqliteStore::builder(pool.clone()).build())
        .expect("the store");
    let shop = Arc::new(Shop {
        store: Arc::new(store),
    });
    let bare = Arc::new(Bare { pool: pool.clone() });
    let floor = Arc::new(Floor { pool: pool.clone() });
    let request = Arc::new(common::order("order-1001".to_string()));
    runtime.block_on(async {
        shop.place_order(&request).await.unwrap();
        common::Caller::first_call(&*bare, 0, &request)
            .await
            .unwrap();
    });

    let mut group = c.benchmark_group("sqlx_sqlite");
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
            &bare,
            &request,
        );
        common::bench_calls(
            &mut group,
            &runtime,
            &id("floor"),
            1,
            call,
            &floor,
            &request,
        );
    }
    group.finish();
    drop((shop, bare, floor));
    runtime.block_on(pool.close());
    drop(runtime);
}

criterion_group!(benches, bench);
criterion_main!(benches);
