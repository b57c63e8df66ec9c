//! The Redis store against the raw `redis` crate doing the same round trips: `GET` for a
//! replay; `SET NX PX` then `SET` for a first call.
//!
//! Cases (group `redis`): `replay-1` and `first_call-1` (one caller), `replay-64` and
//! `first_call-64` (64 concurrent tasks over one multiplexed connection; one iteration is one
//! call by each task), `hot_replay-64` (64 tasks, each call a replay of one of `HOT_KEYS`
//! recorded keys) and `race` (64 tasks call one fresh key at once). The baselines of the race
//! poll `GET` every millisecond, as a hand-written lock without pub/sub would. The bench starts
//! its own `redis-server` (idempotent-test-support).
//!
//! Variants: `idempotent` (the store through `#[idempotent]`); `baseline` (the raw client
//! doing the same round trips and the same SHA-256 over JSON, kept beside the value, and the
//! JSON decode); `floor` (the raw client doing only the round trips: `GET` of a value the size
//! of the store's completed record, or `SET NX PX` and `SET PX` of prebuilt values the sizes of
//! its claim and completed records, on a fresh key from a counter; no hashing, encoding or
//! decoding). The sizes are read from the store's own records (`STRLEN`) before the cases run.
//!
//! With `IDEMPOTENT_BENCH_INTERLEAVED=<rounds>` (and `IDEMPOTENT_BENCH_CALLS`, calls per task
//! and round, 400 by default) the bench skips criterion and times the variants of the
//! `replay-*`, `first_call-*` and `hot_replay-64` cases in turns, judging the targets on the
//! medians of the per-round ratios to the floor (`interleaved`).
//!
//! `hot_replay-64/idempotent_cached` is the store with a local cache of completed records
//! (feature `redis-cache`); `first_call-*/idempotent_wait` the store with
//! `wait_for_replicas(1, 100 ms)`, the server having one replica (the cost of the `WAIT`s).

mod common;

use std::fmt;
use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use idempotent_core::conformance::{Claiming, Completing, Forwarding, Hooks};
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{BoxFuture, Claim, FencedWrite, StorageKey, Store, StoreError};
use redis::Value;
use redis::aio::MultiplexedConnection;

use common::{Call, OrderRequest, Receipt, Round, ShopError};

/// Concurrent tasks over the one connection.
const TASKS: usize = 64;
/// Recorded keys in the hot set of `hot_replay-64`.
const HOT_KEYS: usize = 1_000;
const LEASE_MS: u64 = 30_000;
/// The ttl of every record the cases write, as `common::Shop` sets it (`ttl = "1h"`): longer
/// than a whole run, so no recorded key expires while a later case still replays it.
const TTL_MS: u64 = 3_600_000;

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

/// The key the floor's replays read (`replay-1`, `replay-64`).
const FLOOR_REPLAY_KEY: &str = "floor:replay";

/// The floor's hot set: key `i` stands for the store's record of `order-{i:04}`.
fn floor_hot_key(i: usize) -> String {
    format!("floor:hot:{i:04}")
}

/// The bare client: only the round trips, on values built beforehand.
#[derive(Clone)]
struct Floor {
    connection: MultiplexedConnection,
    /// What a first call's `SET NX PX` writes: the size of the store's claim record.
    claim: Arc<[u8]>,
    /// What a first call's `SET PX` writes: the size of the store's completed record.
    completed: Arc<[u8]>,
}

/// The floor's fresh keys: `floor:` and a counter in 16 hex digits, on the stack.
fn floor_key() -> [u8; 22] {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut key = *b"floor:0000000000000000";
    for (i, digit) in key[6..].iter_mut().enumerate() {
        *digit = HEX[(n >> (60 - 4 * i) & 0xf) as usize];
    }
    key
}

impl Floor {
    /// `GET key`; panics if the key holds nothing (the floor would not be a replay).
    async fn replay(&self, key: &str) {
        let mut connection = self.connection.clone();
        let record: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("the floor's GET");
        black_box(
            record
                .expect("the floor's replayed key holds no record: it is set before the cases run"),
        );
    }

    /// `SET key <claim> NX PX` and `SET key <completed> PX` on a fresh key.
    async fn first_call(&self) {
        let key = floor_key();
        let mut connection = self.connection.clone();
        let claimed: Value = redis::cmd("SET")
            .arg(&key[..])
            .arg(&self.claim[..])
            .arg("NX")
            .arg("PX")
            .arg(LEASE_MS)
            .query_async(&mut connection)
            .await
            .expect("the floor's SET NX PX");
        assert!(
            !matches!(claimed, Value::Nil),
            "the floor's fresh key was already set"
        );
        redis::cmd("SET")
            .arg(&key[..])
            .arg(&self.completed[..])
            .arg("PX")
            .arg(TTL_MS)
            .query_async::<()>(&mut connection)
            .await
            .expect("the floor's SET PX");
    }

    /// Sets `key` to a record the size of `completed`, for the replays.
    async fn record(&self, key: &str) {
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(key)
            .arg(&self.completed[..])
            .arg("PX")
            .arg(TTL_MS)
            .query_async::<()>(&mut connection)
            .await
            .expect("the floor's SET PX");
    }
}

/// Watches a `RedisStore`'s records: the size (`STRLEN`) of the operation's record after each
/// claim and each complete passed on.
struct RecordSizes {
    store: RedisStore,
    connection: MultiplexedConnection,
    seen: Mutex<Vec<usize>>,
}

impl fmt::Debug for RecordSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordSizes")
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl RecordSizes {
    async fn note(&self, key: &StorageKey) {
        let mut connection = self.connection.clone();
        let size: usize = redis::cmd("STRLEN")
            .arg(self.store.record_key(key))
            .query_async(&mut connection)
            .await
            .expect("STRLEN of the store's record");
        self.seen.lock().unwrap().push(size);
    }

    /// The sizes of the record of `request`'s key, as one call through `#[idempotent]` on
    /// `store` leaves it: after the claim, and after the complete when the call ran its body.
    async fn of(
        store: &RedisStore,
        connection: &MultiplexedConnection,
        request: &OrderRequest,
    ) -> Vec<usize> {
        let hooks = RecordSizes {
            store: store.clone(),
            connection: connection.clone(),
            seen: Mutex::new(Vec::new()),
        };
        let watched = Arc::new(Forwarding::new(
            Arc::new(store.clone()) as Arc<dyn Store>,
            hooks,
        ));
        let shop = common::Shop {
            store: Arc::clone(&watched),
        };
        shop.place_order(request)
            .await
            .expect("the watched call succeeds");
        let seen = watched.seen.lock().unwrap().clone();
        assert!(
            !seen.is_empty() && seen.iter().all(|&size| size > 0),
            "the store's record of {} was not found after its claim and complete (sizes {seen:?})",
            request.order_id
        );
        seen
    }
}

impl Hooks for RecordSizes {
    fn claim<'a>(&'a self, op: Claiming<'a>) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let key = *op.key;
            let claim = op.send().await;
            self.note(&key).await;
            claim
        })
    }

    fn complete<'a>(
        &'a self,
        op: Completing<'a>,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let key = *op.key;
            let written = op.send().await;
            self.note(&key).await;
            written
        })
    }
}

/// The hot set: `HOT_KEYS` orders whose ids have the length of the replay case's
/// (`order-0000` to `order-0999`), so their records have its record's size.
fn hot_set() -> Arc<Vec<OrderRequest>> {
    Arc::new(
        (0..HOT_KEYS)
            .map(|i| common::order(format!("order-{i:04}")))
            .collect(),
    )
}

/// What every case needs: the server (with one replica), the store variants, the raw client,
/// the recorded request and hot set, and the floor sized from the store's own records.
/// Fields drop in order: the stores, then the runtime, then the servers.
struct Setup {
    shop: Arc<Shop>,
    raw: Arc<Raw>,
    waiting: Arc<Shop>,
    #[cfg(feature = "redis-cache")]
    cached: Arc<Shop>,
    request: Arc<OrderRequest>,
    hot: Arc<Vec<OrderRequest>>,
    floor: Arc<Floor>,
    hot_floor_keys: Arc<Vec<String>>,
    runtime: tokio::runtime::Runtime,
    replica: idempotent_test_support::RedisServer,
    server: idempotent_test_support::RedisServer,
}

fn setup() -> Setup {
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
    // The same server with one replica, for the store that WAITs for it after each claim and
    // completion (`idempotent_wait`).
    let replica = idempotent_test_support::RedisServer::start();
    let primary_port = server.port().to_string();
    assert_eq!(
        replica.command(&["REPLICAOF", "127.0.0.1", &primary_port]),
        "OK"
    );
    let waiting = Arc::new(Shop {
        store: Arc::new({
            let _entered = runtime.enter();
            RedisStore::builder(server.url())
                .wait_for_replicas(1, Duration::from_millis(100))
                .build()
                .expect("a valid Redis URL")
        }),
    });
    #[cfg(feature = "redis-cache")]
    let cached = Arc::new(Shop {
        store: Arc::new({
            let _entered = runtime.enter();
            RedisStore::builder(server.url())
                .local_cache(64 << 20, Duration::from_secs(600))
                .build()
                .expect("a valid Redis URL")
        }),
    });
    let request = Arc::new(common::order("order-1001".to_string()));
    let hot = hot_set();
    let floor = Arc::new(runtime.block_on(async {
        shop.place_order(&request).await.unwrap();
        raw.first_call(&request).await.unwrap();
        // The sizes of the store's records: the replayed one, and a first call's claim and
        // completed records (the order id of the same length as the timed first calls').
        let replayed = *RecordSizes::of(&shop.store, &raw.connection, &request)
            .await
            .last()
            .expect("a size");
        let first = RecordSizes::of(
            &shop.store,
            &raw.connection,
            &common::order(common::fresh_id("first")),
        )
        .await;
        let [claim, completed] = first[..] else {
            panic!("a first call's claim and complete, each seen once; saw sizes {first:?}");
        };
        eprintln!(
            "redis: the floor's values are the store's record sizes: claim {claim} bytes, \
             completed {completed} bytes (first call), replayed {replayed} bytes"
        );
        let floor = Floor {
            connection: raw.connection.clone(),
            claim: vec![b'c'; claim].into(),
            completed: vec![b'r'; completed].into(),
        };
        let hot_floor = Floor {
            completed: vec![b'r'; replayed].into(),
            ..floor.clone()
        };
        hot_floor.record(FLOOR_REPLAY_KEY).await;
        for (i, order) in hot.iter().enumerate() {
            shop.place_order(order).await.unwrap();
            raw.first_call(order).await.unwrap();
            hot_floor.record(&floor_hot_key(i)).await;
        }
        // The replica has everything so far and acknowledges: a WAIT with nothing to wait for
        // answers at once.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while waiting
            .place_order(&common::order(common::fresh_id("replicated")))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the replica never acknowledged a claim: {}",
                server.command(&["INFO", "replication"])
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        floor
    }));
    let hot_floor_keys: Arc<Vec<String>> = Arc::new((0..HOT_KEYS).map(floor_hot_key).collect());
    Setup {
        shop,
        raw,
        waiting,
        #[cfg(feature = "redis-cache")]
        cached,
        request,
        hot,
        floor,
        hot_floor_keys,
        runtime,
        replica,
        server,
    }
}

fn bench(c: &mut Criterion) {
    let Setup {
        shop,
        raw,
        waiting,
        #[cfg(feature = "redis-cache")]
        cached,
        request,
        hot,
        floor,
        hot_floor_keys,
        runtime,
        replica,
        server,
    } = setup();
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
            if let Call::FirstCall = call {
                common::bench_calls(
                    &mut group,
                    &runtime,
                    &id("idempotent_wait"),
                    tasks,
                    call,
                    &waiting,
                    &request,
                );
            }
            let floor = Arc::clone(&floor);
            match call {
                Call::Replay => {
                    common::bench_ops(&mut group, &runtime, &id("floor"), tasks, move |_, _| {
                        let floor = Arc::clone(&floor);
                        async move { floor.replay(FLOOR_REPLAY_KEY).await }
                    })
                }
                Call::FirstCall => {
                    common::bench_ops(&mut group, &runtime, &id("floor"), tasks, move |_, _| {
                        let floor = Arc::clone(&floor);
                        async move { floor.first_call().await }
                    })
                }
            }
        }
    }

    // The hot set: each call replays one of HOT_KEYS recorded keys (`common::hot_index`).
    group.throughput(Throughput::Elements(TASKS as u64));
    let hot_id = |variant: &str| format!("hot_replay-{TASKS}/{variant}");
    common::bench_hot_replays(
        &mut group,
        &runtime,
        &hot_id("idempotent"),
        TASKS,
        &shop,
        &hot,
    );
    #[cfg(feature = "redis-cache")]
    common::bench_hot_replays(
        &mut group,
        &runtime,
        &hot_id("idempotent_cached"),
        TASKS,
        &cached,
        &hot,
    );
    common::bench_hot_replays(&mut group, &runtime, &hot_id("baseline"), TASKS, &raw, &hot);
    common::bench_ops(
        &mut group,
        &runtime,
        &hot_id("floor"),
        TASKS,
        move |task, i| {
            let (floor, keys) = (Arc::clone(&floor), Arc::clone(&hot_floor_keys));
            async move {
                let key = &keys[common::hot_index(task, TASKS, i, keys.len())];
                floor.replay(key).await
            }
        },
    );

    group.throughput(Throughput::Elements(1));
    common::bench_races(&mut group, &runtime, "redis", &shop, &raw);
    group.finish();
    drop(runtime);
    drop(replica);
    drop(server);
}

/// A variant's op for the interleaved timing: boxed alike, so no variant pays for a box the
/// others do not.
use common::TaskLoop as Op;

/// One case of the interleaved timing: its variants, the last of which is the floor, and the
/// target of the first against the floor.
struct Case {
    name: String,
    tasks: usize,
    variants: Vec<(&'static str, Op)>,
    target: &'static str,
    /// The first variant's least throughput relative to the floor's.
    at_least: f64,
}

/// `IDEMPOTENT_BENCH_INTERLEAVED=<rounds>`: the replays and first calls (one caller, 64 tasks)
/// and the hot set, each variant timed in turns with the others of its case (each round times
/// every variant once on `calls` calls per task, in a rotating order). Prints per variant its
/// median time per call over the rounds and the median of its per-round throughputs relative
/// to the floor's, with the targets: load that comes and goes during the run then weighs on
/// every variant alike, where criterion times one variant after the other.
fn interleaved(rounds: usize, calls: u64) {
    let setup = setup();
    let floor = |call: Call| -> Op {
        let floor = Arc::clone(&setup.floor);
        match call {
            Call::Replay => common::task_loop(move |_, _| {
                let floor = Arc::clone(&floor);
                async move { floor.replay(FLOOR_REPLAY_KEY).await }
            }),
            Call::FirstCall => common::task_loop(move |_, _| {
                let floor = Arc::clone(&floor);
                async move { floor.first_call().await }
            }),
        }
    };
    let mut cases = Vec::new();
    for tasks in [1, TASKS] {
        for (case, call, at_least, target) in [
            (
                "replay",
                Call::Replay,
                if tasks == 1 { 0.90 } else { 0.80 },
                "a bare GET",
            ),
            (
                "first_call",
                Call::FirstCall,
                if tasks == 1 { 0.85 } else { 0.65 },
                "a bare SET NX PX + SET PX",
            ),
        ] {
            cases.push(Case {
                name: format!("{case}-{tasks}"),
                tasks,
                variants: vec![
                    (
                        "idempotent",
                        common::task_loop(common::calls(&setup.shop, call, &setup.request)),
                    ),
                    (
                        "baseline",
                        common::task_loop(common::calls(&setup.raw, call, &setup.request)),
                    ),
                    ("floor", floor(call)),
                ],
                target,
                at_least,
            });
        }
    }
    let hot_floor: Op = {
        let (floor, keys) = (Arc::clone(&setup.floor), Arc::clone(&setup.hot_floor_keys));
        common::task_loop(move |task, i| {
            let (floor, keys) = (Arc::clone(&floor), Arc::clone(&keys));
            async move {
                let key = &keys[common::hot_index(task, TASKS, i, keys.len())];
                floor.replay(key).await
            }
        })
    };
    let hot = |shop: &Arc<Shop>| -> Op {
        common::task_loop(common::hot_replays(shop, TASKS, &setup.hot))
    };
    #[cfg(feature = "redis-cache")]
    let (variants, at_least, target) = (
        vec![
            ("idempotent_cached", hot(&setup.cached)),
            ("idempotent", hot(&setup.shop)),
            ("floor", hot_floor),
        ],
        5.0,
        "a bare GET, with the local cache",
    );
    #[cfg(not(feature = "redis-cache"))]
    let (variants, at_least, target) = (
        vec![("idempotent", hot(&setup.shop)), ("floor", hot_floor)],
        0.0,
        "none without the feature redis-cache",
    );
    cases.push(Case {
        name: format!("hot_replay-{TASKS}"),
        tasks: TASKS,
        variants,
        target,
        at_least,
    });

    cases.retain(|case| common::selected(&case.name));
    println!(
        "| case | variant | median per call | client CPU per call | throughput vs floor | target | |"
    );
    println!("|---|---|---:|---:|---:|---|---|");
    for case in &cases {
        let n = case.variants.len();
        // A round's time per call, and the bench process's CPU time per call over it.
        let time = |variant: usize, calls: u64| {
            let cpu = common::process_cpu();
            let took = setup.runtime.block_on(common::time_ops(
                case.tasks,
                calls,
                &case.variants[variant].1,
            ));
            let cpu = common::process_cpu()
                .zip(cpu)
                .map(|(after, before)| after.saturating_sub(before))
                .unwrap_or_default();
            (
                took,
                cpu / u32::try_from(calls * case.tasks as u64).unwrap_or(u32::MAX),
            )
        };
        for variant in 0..n {
            time(variant, 50);
        }
        let mut times = vec![Vec::new(); n];
        let mut cpus = vec![Vec::new(); n];
        let mut vs_floor = vec![Vec::new(); n];
        for round in 0..rounds {
            let mut this = vec![0.0; n];
            for turn in 0..n {
                let variant = (round + turn) % n;
                let (took, cpu) = time(variant, calls);
                this[variant] = took.as_nanos() as f64;
                times[variant].push(this[variant]);
                cpus[variant].push(cpu.as_nanos() as f64);
            }
            for variant in 0..n {
                vs_floor[variant].push(this[n - 1] / this[variant]);
            }
        }
        for variant in 0..n {
            let ratio = common::median(&mut vs_floor[variant]);
            let (target, judged) = if variant == 0 && case.at_least > 0.0 {
                (
                    format!("≥ {:.0}% of {}", case.at_least * 100.0, case.target),
                    if ratio >= case.at_least {
                        "**met**"
                    } else {
                        "**missed**"
                    },
                )
            } else {
                ("–".to_string(), "–")
            };
            println!(
                "| {} | {} | {:.2} µs | {:.2} µs | {:.0}% | {target} | {judged} |",
                case.name,
                case.variants[variant].0,
                common::median(&mut times[variant]) / 1000.0,
                common::median(&mut cpus[variant]) / 1000.0,
                ratio * 100.0,
            );
        }
    }
}

fn main() {
    if let Some((rounds, calls)) = common::interleaving(400) {
        interleaved(rounds, calls);
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
