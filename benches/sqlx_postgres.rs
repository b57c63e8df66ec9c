//! The PostgreSQL store on sqlx (`SqlxPgStore`) against bare sqlx on the same pool, in three
//! variants per case:
//!
//! - `<case>/idempotent`: the store, through `#[idempotent]`.
//! - `<case>/same_statements`: bare sqlx running the store's own statements (its claim, and
//!   for a first call its complete; the texts come from the core crate, persistent statements
//!   that sqlx prepares once per connection) on a table made with the store's own schema SQL,
//!   with the parameters the store passes (32-byte key and fingerprint, lease and TTL in ms,
//!   the JSON output under `{"ok": ..}`), the replayed output decoded with serde_json. The
//!   difference to `idempotent` is the library's own cost over the driver.
//! - `<case>/baseline`: the floor, bare sqlx making only the round trips: one `SELECT $1`
//!   of the 32-byte key for a replay, two for a first call.
//!
//! The three share one `sqlx::PgPool` per case: one connection (`-1conn`, one caller) or
//! eight (`-8conn`, eight concurrent tasks; one iteration is one call by each task). Cases
//! (group `sqlx_postgres`): `replay-1conn`, `first_call-1conn`, `replay-8conn`,
//! `first_call-8conn`. The bench starts its own PostgreSQL server (idempotent-test-support).
//!
//! With `IDEMPOTENT_BENCH_INTERLEAVED=<rounds>` the bench skips criterion and times the three
//! variants in turns instead (each round times every variant once, in a rotating order, on
//! `IDEMPOTENT_BENCH_CALLS` calls per task, 400 by default), then prints per case each
//! variant's median time per call (for `-8conn`, an iteration's time divided by the tasks, as
//! the report gives it) over the rounds and the median of the per-round ratios:
//! on a busy machine, load that comes and goes then weighs on every variant alike.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use idempotent_core::__hooks::{PostgresStatementTexts, postgres_statement_texts};
use idempotent_core::stores::sqlx_postgres::SqlxPgStore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgPool, Row, SqlSafeStr, SqlStr};

use common::{Call, OrderRequest, Receipt, ShopError};

const TASKS: usize = 8;
const LEASE_MS: i64 = 30_000;
/// The ttl of every record the cases write, as `common::Shop` sets it (`ttl = "1h"`): longer
/// than a whole run, so no recorded key expires while a later case still replays it.
const TTL_MS: i64 = 3_600_000;

type Shop = common::Shop<SqlxPgStore>;

/// The table of the same-statements variant: made with the store's schema SQL, apart from
/// the store's own table.
const SAME_TABLE: &str = "same_statements_records";
/// The record format the store writes (its `format` column).
const SAME_FORMAT: i16 = 1;

/// A recorded output as the store encodes it: `{"ok": <value>}`.
#[derive(Serialize, Deserialize)]
enum Recorded<T> {
    #[serde(rename = "ok")]
    Ok(T),
}

fn failed(error: sqlx::Error) -> ShopError {
    ShopError::Other(error.to_string())
}

/// A 32-byte key and fingerprint, as the store passes.
fn parameters(request: &OrderRequest) -> ([u8; 32], [u8; 32]) {
    let key: [u8; 32] = Sha256::digest(request.order_id.as_bytes()).into();
    (key, common::json_fingerprint(request))
}

/// Bare sqlx on the store's claim and complete statements.
struct Same {
    pool: PgPool,
    claim: SqlStr,
    complete: SqlStr,
}

impl Same {
    async fn new(pool: PgPool, texts: &PostgresStatementTexts) -> Same {
        sqlx::raw_sql(AssertSqlSafe(texts.schema.clone()))
            .execute(&pool)
            .await
            .expect("the same-statements table");
        let sql = |text: &str| AssertSqlSafe(Arc::<str>::from(text)).into_sql_str();
        Same {
            pool,
            claim: sql(&texts.claim),
            complete: sql(&texts.complete),
        }
    }

    async fn claim(&self, key: &[u8; 32], fingerprint: &[u8; 32]) -> Result<PgRow, ShopError> {
        sqlx::query(self.claim.clone())
            .bind(key.as_slice())
            .bind(fingerprint.as_slice())
            .bind(LEASE_MS)
            .fetch_one(&self.pool)
            .await
            .map_err(failed)
    }

    async fn replay_one(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let (key, fingerprint) = parameters(request);
        let row = self.claim(&key, &fingerprint).await?;
        let get = |error: sqlx::Error| ShopError::Other(error.to_string());
        if row.try_get::<bool, _>(0).map_err(get)? {
            return Err(ShopError::Other("not recorded".into()));
        }
        if row.try_get::<Option<i16>, _>(6).map_err(get)? != Some(SAME_FORMAT) {
            return Err(ShopError::Other("unknown record format".into()));
        }
        if row.try_get::<Option<&[u8]>, _>(2).map_err(get)? != Some(fingerprint.as_slice()) {
            return Err(ShopError::Other("key reused".into()));
        }
        if row.try_get::<Option<i16>, _>(3).map_err(get)? != Some(1) {
            return Err(ShopError::Other("in progress".into()));
        }
        let output: &[u8] = row
            .try_get::<Option<&[u8]>, _>(4)
            .map_err(get)?
            .ok_or_else(|| ShopError::Other("no output".into()))?;
        let Recorded::Ok(receipt) = serde_json::from_slice::<Recorded<Receipt>>(output)
            .map_err(|error| ShopError::Other(error.to_string()))?;
        Ok(receipt)
    }

    async fn first_call_one(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let (key, fingerprint) = parameters(request);
        let row = self.claim(&key, &fingerprint).await?;
        assert!(row.get::<bool, _>(0), "a fresh key is claimed");
        let fence: i64 = row.get(1);
        let receipt = common::receipt(request);
        let output = serde_json::to_vec(&Recorded::Ok(&receipt)).expect("a receipt serializes");
        let done = sqlx::query(self.complete.clone())
            .bind(key.as_slice())
            .bind(fence)
            .bind(output)
            .bind(TTL_MS)
            .fetch_all(&self.pool)
            .await
            .map_err(failed)?;
        assert_eq!(done.len(), 1, "the record was completed");
        Ok(receipt)
    }
}

impl common::Caller for Same {
    fn replay(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.replay_one(request)
    }

    fn first_call(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.first_call_one(request)
    }
}

/// The floor: bare sqlx making the round trips only, a `SELECT $1` of the key each.
struct Floor {
    pool: PgPool,
}

impl Floor {
    async fn round_trip(&self, key: &[u8; 32]) -> Result<(), ShopError> {
        let echoed: Vec<u8> = sqlx::query_scalar("SELECT $1::bytea")
            .bind(key.as_slice())
            .fetch_one(&self.pool)
            .await
            .map_err(failed)?;
        assert_eq!(echoed.len(), 32);
        Ok(())
    }

    async fn calls(
        &self,
        request: &OrderRequest,
        round_trips: usize,
    ) -> Result<Receipt, ShopError> {
        let (key, _) = parameters(request);
        for _ in 0..round_trips {
            self.round_trip(&key).await?;
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
        self.calls(request, 1)
    }

    fn first_call(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.calls(request, 2)
    }
}

/// The three variants on one pool of `connections`.
struct Variants {
    shop: Arc<Shop>,
    same: Arc<Same>,
    floor: Arc<Floor>,
}

async fn variants(url: &str, connections: u32, texts: &PostgresStatementTexts) -> Variants {
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .connect(url)
        .await
        .expect("connect to PostgreSQL");
    let store = SqlxPgStore::builder(pool.clone())
        .build()
        .await
        .expect("create the tables");
    Variants {
        shop: Arc::new(Shop {
            store: Arc::new(store),
        }),
        same: Arc::new(Same::new(pool.clone(), texts).await),
        floor: Arc::new(Floor { pool }),
    }
}

/// Records `request` in each variant, for the replays.
async fn record(variants: &Variants, request: &OrderRequest) {
    variants.shop.place_order(request).await.unwrap();
    variants.same.first_call_one(request).await.unwrap();
}

fn criterion_bench(c: &mut Criterion) {
    let runtime = common::runtime();
    let server = idempotent_test_support::PostgresServer::start();
    let url = server.create_database("bench");
    let texts = postgres_statement_texts(SAME_TABLE).expect("a valid table name");
    let request = Arc::new(common::order("order-1001".to_string()));
    let (one, eight) = runtime.block_on(async {
        let one = variants(&url, 1, &texts).await;
        let eight = variants(&url, TASKS as u32, &texts).await;
        record(&one, &request).await;
        (one, eight)
    });

    let mut group = c.benchmark_group("sqlx_postgres");
    for (conn, tasks, variants) in [("1conn", 1, &one), ("8conn", TASKS, &eight)] {
        group.throughput(Throughput::Elements(tasks as u64));
        for (case, call) in [("replay", Call::Replay), ("first_call", Call::FirstCall)] {
            let case = format!("{case}-{conn}");
            let id = |variant: &str| format!("{case}/{variant}");
            let (shop, same, floor) = (&variants.shop, &variants.same, &variants.floor);
            common::bench_calls(
                &mut group,
                &runtime,
                &id("idempotent"),
                tasks,
                call,
                shop,
                &request,
            );
            common::bench_calls(
                &mut group,
                &runtime,
                &id("same_statements"),
                tasks,
                call,
                same,
                &request,
            );
            common::bench_calls(
                &mut group,
                &runtime,
                &id("baseline"),
                tasks,
                call,
                floor,
                &request,
            );
        }
    }
    group.finish();
    drop((one, eight));
    drop(runtime);
    drop(server);
}

/// Times `calls` calls per task of `call` through `caller` by `tasks` tasks: per call.
async fn time_calls<C: common::Caller>(
    caller: &Arc<C>,
    tasks: usize,
    calls: u64,
    call: Call,
    request: &Arc<OrderRequest>,
) -> Duration {
    common::time_ops(
        tasks,
        calls,
        &common::task_loop(common::calls(caller, call, request)),
    )
    .await
}

fn interleaved(rounds: usize, calls: u64) {
    let runtime = common::runtime();
    let server = idempotent_test_support::PostgresServer::start();
    let url = server.create_database("bench");
    let texts = postgres_statement_texts(SAME_TABLE).expect("a valid table name");
    let request = Arc::new(common::order("order-1001".to_string()));
    println!(
        "| case | idempotent | same_statements | floor | idempotent / same_statements | idempotent / floor |"
    );
    println!("|---|---|---|---|---|---|");
    runtime.block_on(async {
        let one = variants(&url, 1, &texts).await;
        let eight = variants(&url, TASKS as u32, &texts).await;
        record(&one, &request).await;
        for (conn, tasks, variants) in [("1conn", 1, &one), ("8conn", TASKS, &eight)] {
            for (case, call) in [("replay", Call::Replay), ("first_call", Call::FirstCall)] {
                // Warm-up: every connection has prepared every statement.
                time_calls(&variants.shop, tasks, 50, call, &request).await;
                time_calls(&variants.same, tasks, 50, call, &request).await;
                time_calls(&variants.floor, tasks, 50, call, &request).await;
                let mut times: [Vec<f64>; 3] = Default::default();
                let (mut vs_same, mut vs_floor) = (Vec::new(), Vec::new());
                for round in 0..rounds {
                    let mut this = [0.0; 3];
                    for turn in 0..3 {
                        let variant = (round + turn) % 3;
                        let per_call = match variant {
                            0 => time_calls(&variants.shop, tasks, calls, call, &request).await,
                            1 => time_calls(&variants.same, tasks, calls, call, &request).await,
                            _ => time_calls(&variants.floor, tasks, calls, call, &request).await,
                        };
                        this[variant] = per_call.as_nanos() as f64;
                    }
                    for (variant, time) in this.iter().enumerate() {
                        times[variant].push(*time);
                    }
                    vs_same.push(this[0] / this[1]);
                    vs_floor.push(this[0] / this[2]);
                }
                let us = |values: &mut Vec<f64>| common::median(values) / 1000.0;
                println!(
                    "| {case}-{conn} | {:.0} µs | {:.0} µs | {:.0} µs | {:.2}x | {:.2}x |",
                    us(&mut times[0]),
                    us(&mut times[1]),
                    us(&mut times[2]),
                    common::median(&mut vs_same),
                    common::median(&mut vs_floor),
                );
            }
        }
    });
    drop(runtime);
    drop(server);
}

fn main() {
    if let Some((rounds, calls)) = common::interleaving(400) {
        interleaved(rounds, calls);
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    criterion_bench(&mut criterion);
    criterion.final_summary();
}
