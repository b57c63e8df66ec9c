//! The PostgreSQL store against the raw `tokio-postgres` driver, in three variants per case:
//!
//! - `<case>/idempotent`: the store, through `#[idempotent]`.
//! - `<case>/same_statements`: the raw driver running the store's own statements (its claim,
//!   and for a first call its complete; the texts come from the core crate, prepared once per
//!   connection) on a table made with the store's own schema SQL, with the parameters the
//!   store passes (32-byte key and fingerprint, lease and TTL in ms, the JSON output under
//!   `{"ok": ..}`), the replayed output decoded with serde_json. The difference to
//!   `idempotent` is the library's own cost over the driver; the throughput target
//!   (BENCHMARKS.md) is judged on it.
//! - `<case>/baseline`: the raw driver running simpler statements on a table of the same
//!   shape: a `SELECT` for a replay; an `INSERT` then an `UPDATE` for a first call. The
//!   difference to `same_statements` is the cost of the store's SQL design (the claim's CTE
//!   that reads the live row before it may insert, the fence sequence, the `waiting` check).
//!
//! Cases (group `postgres`): `replay-1conn` and `first_call-1conn` (one caller; a store with
//! one pooled connection against one raw connection), `replay-8conn` and `first_call-8conn`
//! (8 concurrent tasks; a store with 8 pooled connections against 8 raw connections, task `i`
//! on connection `i`; one iteration is one call by each task), and `race` (64 tasks call one
//! fresh key at once on the 8-connection store, against `baseline` only, which polls its
//! `SELECT` every millisecond). The bench starts its own PostgreSQL server
//! (idempotent-test-support).

mod common;

use std::future::Future;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idempotent_core::__hooks::{PostgresStatementTexts, postgres_statement_texts};
use idempotent_core::stores::postgres::PostgresStore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::{Client, NoTls, Statement};

use common::{Call, OrderRequest, Receipt, Round, ShopError};

const TASKS: usize = 8;
const LEASE_MS: i64 = 30_000;
/// The ttl of every record the cases write, as `common::Shop` sets it (`ttl = "1h"`): longer
/// than a whole run, so no recorded key expires while a later case still replays it.
const TTL_MS: i64 = 3_600_000;

type Shop = common::Shop<PostgresStore>;

const SCHEMA: &str = "
CREATE SEQUENCE IF NOT EXISTS raw_fences;
CREATE TABLE IF NOT EXISTS raw_records (
    key bytea PRIMARY KEY,
    fingerprint bytea NOT NULL,
    fence bigint NOT NULL,
    state smallint NOT NULL,
    until timestamptz NOT NULL,
    output bytea,
    format smallint NOT NULL
);
CREATE INDEX IF NOT EXISTS raw_records_until ON raw_records (until);";

/// One raw connection with its prepared statements.
struct RawConnection {
    client: Client,
    select: Statement,
    insert: Statement,
    insert_if_absent: Statement,
    update: Statement,
}

/// The raw driver: `connections[i]` serves task `i`.
struct Raw {
    connections: Vec<RawConnection>,
}

impl common::Caller for Raw {
    fn replay(
        &self,
        task: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.connections[task].replay(request)
    }

    fn first_call(
        &self,
        task: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.connections[task].first_call(request)
    }
}

/// The race's 64 tasks share the connections: task `i` on connection `i % TASKS`.
impl common::Racer for Raw {
    fn race(
        &self,
        task: usize,
        request: &OrderRequest,
        round: &Round,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.connections[task % TASKS].race_order(request, task, round)
    }
}

fn failed(error: tokio_postgres::Error) -> ShopError {
    ShopError::Other(error.to_string())
}

impl RawConnection {
    async fn connect(url: &str) -> RawConnection {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        client.batch_execute(SCHEMA).await.expect("the raw table");
        let insert_values = "INSERT INTO raw_records (key, fingerprint, fence, state, until, output, format)
             VALUES ($1, $2, nextval('raw_fences'), 0, now() + $3::bigint * interval '1 millisecond', NULL, 1)";
        RawConnection {
            select: client
                .prepare(
                    "SELECT fingerprint, state, output FROM raw_records WHERE key = $1 AND until > now()",
                )
                .await
                .unwrap(),
            insert: client
                .prepare(&format!("{insert_values} RETURNING fence"))
                .await
                .unwrap(),
            insert_if_absent: client
                .prepare(&format!(
                    "{insert_values} ON CONFLICT (key) DO NOTHING RETURNING fence"
                ))
                .await
                .unwrap(),
            update: client
                .prepare(
                    "UPDATE raw_records SET state = 1, output = $3, until = now() + $4::bigint * interval '1 millisecond'
                     WHERE key = $1 AND fence = $2",
                )
                .await
                .unwrap(),
            client,
        }
    }

    /// The recorded receipt, if the record is done.
    async fn read(&self, key: &[u8], fingerprint: &[u8; 32]) -> Result<Option<Receipt>, ShopError> {
        let row = self
            .client
            .query_opt(&self.select, &[&key])
            .await
            .map_err(failed)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let recorded: &[u8] = row.get(0);
        if recorded != fingerprint.as_slice() {
            return Err(ShopError::Other("key reused".into()));
        }
        if row.get::<_, i16>(1) != 1 {
            return Ok(None);
        }
        let output: &[u8] = row.get(2);
        serde_json::from_slice(output)
            .map(Some)
            .map_err(|error| ShopError::Other(error.to_string()))
    }

    async fn record(&self, key: &[u8], fence: i64, receipt: &Receipt) -> Result<(), ShopError> {
        let output = serde_json::to_vec(receipt).expect("a receipt serializes");
        let updated = self
            .client
            .execute(&self.update, &[&key, &fence, &output, &TTL_MS])
            .await
            .map_err(failed)?;
        assert_eq!(updated, 1, "the raw record was updated");
        Ok(())
    }

    async fn replay(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        self.read(request.order_id.as_bytes(), &fingerprint)
            .await?
            .ok_or_else(|| ShopError::Other("not recorded".into()))
    }

    async fn first_call(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        let key = request.order_id.as_bytes();
        let row = self
            .client
            .query_one(&self.insert, &[&key, &fingerprint.as_slice(), &LEASE_MS])
            .await
            .map_err(failed)?;
        let receipt = common::receipt(request);
        self.record(key, row.get(0), &receipt).await?;
        Ok(receipt)
    }

    async fn race_order(
        &self,
        request: &OrderRequest,
        task: usize,
        round: &Round,
    ) -> Result<Receipt, ShopError> {
        let fingerprint = common::json_fingerprint(request);
        let key = request.order_id.as_bytes();
        let claimed = self
            .client
            .query_opt(
                &self.insert_if_absent,
                &[&key, &fingerprint.as_slice(), &LEASE_MS],
            )
            .await
            .map_err(failed)?;
        if let Some(row) = claimed {
            round.executed_by(task);
            tokio::time::sleep(common::RACE_BODY).await;
            let receipt = common::receipt(request);
            self.record(key, row.get(0), &receipt).await?;
            return Ok(receipt);
        }
        loop {
            if let Some(receipt) = self.read(key, &fingerprint).await? {
                return Ok(receipt);
            }
            tokio::time::sleep(common::POLL).await;
        }
    }
}

/// The table of the same-statements baseline: made with the store's schema SQL, apart from
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

/// One raw connection with the store's own claim and complete statements, prepared once.
struct SameConnection {
    client: Client,
    claim: Statement,
    complete: Statement,
}

/// The raw driver on the store's statements: `connections[i]` serves task `i`.
struct Same {
    connections: Vec<SameConnection>,
}

impl common::Caller for Same {
    fn replay(
        &self,
        task: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.connections[task].replay(request)
    }

    fn first_call(
        &self,
        task: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.connections[task].first_call(request)
    }
}

impl SameConnection {
    async fn connect(url: &str, texts: &PostgresStatementTexts) -> SameConnection {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        client
            .batch_execute(&texts.schema)
            .await
            .expect("the same-statements table");
        SameConnection {
            claim: client.prepare(&texts.claim).await.unwrap(),
            complete: client.prepare(&texts.complete).await.unwrap(),
            client,
        }
    }

    /// A 32-byte key and fingerprint, as the store passes.
    fn parameters(request: &OrderRequest) -> ([u8; 32], [u8; 32]) {
        let key: [u8; 32] = Sha256::digest(request.order_id.as_bytes()).into();
        (key, common::json_fingerprint(request))
    }

    async fn claim(
        &self,
        key: &[u8; 32],
        fingerprint: &[u8; 32],
    ) -> Result<Vec<tokio_postgres::Row>, ShopError> {
        self.client
            .query(
                &self.claim,
                &[&key.as_slice(), &fingerprint.as_slice(), &LEASE_MS],
            )
            .await
            .map_err(failed)
    }

    async fn replay(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let (key, fingerprint) = Self::parameters(request);
        let rows = self.claim(&key, &fingerprint).await?;
        let row = rows
            .first()
            .ok_or_else(|| ShopError::Other("no claim row".into()))?;
        if row.get::<_, bool>(0) {
            return Err(ShopError::Other("not recorded".into()));
        }
        if row.get::<_, Option<i16>>(6) != Some(SAME_FORMAT) {
            return Err(ShopError::Other("unknown record format".into()));
        }
        if row.get::<_, Option<&[u8]>>(2) != Some(fingerprint.as_slice()) {
            return Err(ShopError::Other("key reused".into()));
        }
        if row.get::<_, Option<i16>>(3) != Some(1) {
            return Err(ShopError::Other("in progress".into()));
        }
        let output: &[u8] = row
            .get::<_, Option<&[u8]>>(4)
            .ok_or_else(|| ShopError::Other("no output".into()))?;
        let Recorded::Ok(receipt) = serde_json::from_slice::<Recorded<Receipt>>(output)
            .map_err(|error| ShopError::Other(error.to_string()))?;
        Ok(receipt)
    }

    async fn first_call(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        let (key, fingerprint) = Self::parameters(request);
        let rows = self.claim(&key, &fingerprint).await?;
        let row = rows
            .first()
            .ok_or_else(|| ShopError::Other("no claim row".into()))?;
        assert!(row.get::<_, bool>(0), "a fresh key is claimed");
        let fence: i64 = row.get(1);
        let receipt = common::receipt(request);
        let output = serde_json::to_vec(&Recorded::Ok(&receipt)).expect("a receipt serializes");
        let done = self
            .client
            .query(&self.complete, &[&key.as_slice(), &fence, &output, &TTL_MS])
            .await
            .map_err(failed)?;
        assert_eq!(done.len(), 1, "the record was completed");
        Ok(receipt)
    }
}

async fn shop(url: &str, connections: usize) -> Arc<Shop> {
    Arc::new(Shop {
        store: Arc::new(
            PostgresStore::builder(url)
                .max_connections(connections)
                .build()
                .await
                .expect("connect to PostgreSQL"),
        ),
    })
}

fn bench(c: &mut Criterion) {
    let runtime = common::runtime();
    let server = idempotent_test_support::PostgresServer::start();
    let url = server.create_database("bench");
    let texts = postgres_statement_texts(SAME_TABLE).expect("a valid table name");
    let (shop_1, shop_8, raw, same) = runtime.block_on(async {
        let mut connections = Vec::new();
        let mut same_connections = Vec::new();
        for _ in 0..TASKS {
            connections.push(RawConnection::connect(&url).await);
            same_connections.push(SameConnection::connect(&url, &texts).await);
        }
        (
            shop(&url, 1).await,
            shop(&url, TASKS).await,
            Arc::new(Raw { connections }),
            Arc::new(Same {
                connections: same_connections,
            }),
        )
    });
    let request = Arc::new(common::order("order-1001".to_string()));
    runtime.block_on(async {
        shop_1.place_order(&request).await.unwrap();
        raw.connections[0].first_call(&request).await.unwrap();
        same.connections[0].first_call(&request).await.unwrap();
    });

    let mut group = c.benchmark_group("postgres");
    // One caller: a task on a worker, as a request handler would be (not the bench's own
    // thread, whose every round trip would cost two extra cross-thread wake-ups); then TASKS
    // concurrent tasks, task `i` on raw connection `i`.
    for (conn, tasks, shop) in [("1conn", 1, &shop_1), ("8conn", TASKS, &shop_8)] {
        group.throughput(Throughput::Elements(tasks as u64));
        for (case, call) in [("replay", Call::Replay), ("first_call", Call::FirstCall)] {
            let case = format!("{case}-{conn}");
            let id = |variant: &str| format!("{case}/{variant}");
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
                &same,
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
    common::bench_races(&mut group, &runtime, "postgres", &shop_8, &raw);
    group.finish();
    drop((shop_1, shop_8, raw, same));
    drop(runtime);
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
