//! The Redis store against the raw `redis` crate doing the same round trips: `GET` for a
//! replay; `SET NX PX` then `SET` for a first call.
//!
//! Cases (group `redis`): `replay-1` and `first_call-1` (one caller), `replay-64` and
//! `first_call-64` (64 concurrent tasks over one multiplexed connection; one iteration is one
//! call by each task), and `race` (64 tasks call one fresh key at once). The baselines of the
//! race poll `GET` every millisecond, as a hand-written lock without pub/sub would. The bench
//! starts its own `redis-server` (idempotent-test-support).

mod common;

use std::future::Future;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idempotent_core::stores::redis::RedisStore;
use redis::aio::MultiplexedConnection;

use common::{Call, OrderRequest, Receipt, Round, ShopError};

/// Concurrent tasks over the one connection.
const TASKS: usize = 64;
const LEASE_MS: u64 = 30_000;
const TTL_MS: u64 = 120_000;

type Shop = common::Shop<RedisStore>;

/// The raw client: the record is the fingerprint (32 bytes) while in progress, the
/// fingerprint and the receipt's JSON once done.
#[derive(Clone)]
struct Raw {
    connection: MultiplexedConnection,
}

fn raw_key(request: &OrderRequest) -> String {
    format!("raw:{}", request.order_id)
}

fn done(record: &[u8], fingerprint: &[u8; 32]) -> Option<Result<Receipt, ShopError>> {
    if record.len() <= 32 {
        return None;
    }
    if &record[..32] != fingerprint {
        return Some(Err(ShopError::Other("key reused".into())));
    }
    Some(serde_json::from_slice(&record[32..]).map_err(|error| ShopError::Other(error.to_string())))
}

fn failed(error: redis::RedisError) -> ShopError {
    ShopError::Other(error.to_string())
}

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
    async fn replay(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        let mut connection = self.connection.clone();
        let record: Option<Vec<u8>> = redis::cmd("GET")
            .arg(raw_key(request))
            .query_async(&mut connection)
            .await
            .map_err(failed)?;
        done(&record.unwrap_or_default(), &fingerprint)
            .unwrap_or_else(|| Err(ShopError::Other("not recorded".into())))
    }

    /// Claims with `SET NX PX`; `Ok(true)` when this call holds the key.
    async fn claim(&self, key: &str, fingerprint: &[u8; 32]) -> Result<bool, ShopError> {
        let mut connection = self.connection.clone();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(fingerprint.as_slice())
            .arg("NX")
            .arg("PX")
            .arg(LEASE_MS)
            .query_async(&mut connection)
            .await
            .map_err(failed)?;
        Ok(claimed.is_some())
    }

    async fn record(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
        receipt: &Receipt,
    ) -> Result<(), ShopError> {
        let mut value = fingerprint.to_vec();
        serde_json::to_writer(&mut value, receipt).expect("a receipt serializes");
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(TTL_MS)
            .query_async::<()>(&mut connection)
            .await
            .map_err(failed)
    }

    async fn first_call(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        let key = raw_key(request);
        if !self.claim(&key, &fingerprint).await? {
            return Err(ShopError::Other("not a first call".into()));
        }
        let receipt = common::receipt(request);
        self.record(&key, &fingerprint, &receipt).await?;
        Ok(receipt)
    }

    async fn race_order(
        &self,
        request: &OrderRequest,
        task: usize,
        round: &Round,
    ) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        let key = raw_key(request);
        if self.claim(&key, &fingerprint).await? {
            round.executed_by(task);
            tokio::time::sleep(common::RACE_BODY).await;
            let receipt = common::receipt(request);
            self.record(&key, &fingerprint, &receipt).await?;
            return Ok(receipt);
        }
        loop {
            let mut connection = self.connection.clone();
            let record: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .map_err(failed)?;
            if let Some(result) = done(&record.unwrap_or_default(), &fingerprint) {
                return result;
            }
            tokio::time::sleep(common::POLL).await;
        }
    }
}

fn bench(c: &mut Criterion) {
    let runtime = common::runtime();
    let server = idempotent_test_support::RedisServer::start();
    let shop = Arc::new(Shop {
        store: Arc::new({
            let _entered = runtime.enter();
            RedisStore::builder(server.url())
                .build()
                .expect("a valid Redis URL")
        }),
    });
    let raw = Arc::new(Raw {
        connection: runtime.block_on(async {
            redis::Client::open(server.url())
                .expect("a valid Redis URL")
                .get_multiplexed_async_connection()
                .await
                .expect("connect to Redis")
        }),
    });
    let request = Arc::new(common::order("order-1001".to_string()));
    runtime.block_on(async {
        shop.place_order(&request).await.unwrap();
        raw.first_call(&request).await.unwrap();
    });

    let mut group = c.benchmark_group("redis");
    // One caller: a task on a worker, as a request handler would be (not the bench's own
    // thread, whose every round trip would cost two extra cross-thread wake-ups); then TASKS
    // concurrent tasks over the one multiplexed connection.
    for tasks in [1, TASKS] {
        group.throughput(Throughput::Elements(tasks as u64));
        for (case, call) in [("replay", Call::Replay), ("first_call", Call::FirstCall)] {
            let case = format!("{case}-{tasks}");
            let id = |variant: &str| format!("{case}/{variant}");
            common::bench_calls(
                &mut group,
                &runtime,
                &id("idempotent"),
                tasks,
                call,
                &shop,
                &request,
            );
            common::bench_calls(
                &mut group,
                &runtime,
                &id("baseline"),
                tasks,
                call,
                &raw,
                &request,
            );
        }
    }

    group.throughput(Throughput::Elements(1));
    common::bench_races(&mut group, &runtime, "redis", &shop, &raw);
    group.finish();
    drop(runtime);
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
