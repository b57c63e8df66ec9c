//! What every store's bench shares: the function under test (`Shop`), its argument and output
//! types, the hand-written baselines' fingerprint, the runtime, fresh keys, and the same-key race:
//! its cases and its recorder (how long after the completion the last waiter returned).

#![allow(dead_code)] // Each bench binary uses a part of this module.

use std::future::Future;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, SamplingMode};
use idempotent_core::{Store, idempotent};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Tasks in the same-key race.
pub const RACE_TASKS: usize = 64;
/// How long the raced body runs: long enough that every task is waiting when it ends.
pub const RACE_BODY: Duration = Duration::from_millis(2);
/// How often the hand-written race baselines look again (they have no notification).
pub const POLL: Duration = Duration::from_millis(1);

/// The function under test, through `#[idempotent]` on a store of type `S`: `place_order`
/// returns the receipt; `race_order` also notes which task ran it and takes `RACE_BODY`.
pub struct Shop<S> {
    pub store: Arc<S>,
}

impl<S: Store + 'static> Shop<S> {
    #[idempotent(key = request.order_id, store = self.store, ttl = "1h")]
    pub async fn place_order(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        Ok(receipt(request))
    }

    #[idempotent(key = request.order_id, store = self.store, ttl = "1h", skip(task, round))]
    pub async fn race_order(
        &self,
        request: &OrderRequest,
        task: usize,
        round: &Round,
    ) -> Result<Receipt, ShopError> {
        round.executed_by(task);
        tokio::time::sleep(RACE_BODY).await;
        Ok(receipt(request))
    }
}

/// A variant the replay and first-call cases time: the store through `#[idempotent]`, or a
/// hand-written baseline. `task` is the calling task's number, for baselines that give each
/// task a connection of its own.
pub trait Caller: Send + Sync + 'static {
    /// A call whose key is recorded.
    fn replay(
        &self,
        task: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send;

    /// A call with a fresh key.
    fn first_call(
        &self,
        task: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send;
}

impl<S: Store + 'static> Caller for Shop<S> {
    fn replay(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.place_order(request)
    }

    fn first_call(
        &self,
        _: usize,
        request: &OrderRequest,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.place_order(request)
    }
}

/// A variant the same-key race times: the store through `#[idempotent]`, or a hand-written
/// baseline. The call runs `RACE_BODY` once per key, noting in `round` which task ran it.
/// `task` is the calling task's number, for baselines that spread the tasks over connections.
pub trait Racer: Send + Sync + 'static {
    fn race(
        &self,
        task: usize,
        request: &OrderRequest,
        round: &Round,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send;
}

impl<S: Store + 'static> Racer for Shop<S> {
    fn race(
        &self,
        task: usize,
        request: &OrderRequest,
        round: &Round,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.race_order(request, task, round)
    }
}

/// Which call a case times.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    /// `Caller::replay` of `request`, recorded beforehand.
    Replay,
    /// `Caller::first_call` of a fresh order, made inside the timed task.
    FirstCall,
}

/// Benches `id`: `tasks` concurrent tasks (see [`concurrent`]), each making `call` through
/// `caller` once per iteration.
pub fn bench_calls<C: Caller>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    id: &str,
    tasks: usize,
    call: Call,
    caller: &Arc<C>,
    request: &Arc<OrderRequest>,
) {
    bench_ops(group, runtime, id, tasks, calls(caller, call, request));
}

/// Benches `race/idempotent` and `race/baseline`: rounds of `RACE_TASKS` tasks calling one
/// fresh key at once through `idempotent`, then through `baseline`, in flat sampling of 20
/// samples; each variant's rounds are written to `<out>/race/<store>_race_<variant>.json`.
pub fn bench_races<I: Racer, B: Racer>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    store: &str,
    idempotent: &Arc<I>,
    baseline: &Arc<B>,
) {
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    bench_race(group, runtime, store, "idempotent", idempotent);
    bench_race(group, runtime, store, "baseline", baseline);
}

/// Benches `race/<variant>` through `racer` and writes its rounds.
fn bench_race<R: Racer>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    store: &str,
    variant: &str,
    racer: &Arc<R>,
) {
    let recorder = RaceRecorder::new(&format!("{store}/race/{variant}"));
    group.bench_function(format!("race/{variant}"), |b| {
        b.to_async(runtime).iter_custom(|iters| {
            race_rounds(&recorder, iters, |task, round, key| {
                let (racer, request) = (Arc::clone(racer), order(key.to_string()));
                async move {
                    racer.race(task, &request, &round).await.unwrap();
                }
            })
        })
    });
    recorder.write();
}

/// A realistic argument: an order request with five fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderRequest {
    pub order_id: String,
    pub customer_id: String,
    pub sku: String,
    pub quantity: u32,
    pub amount_cents: u64,
}

/// What the function returns, recorded and replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub order_id: String,
    pub charge_id: String,
    pub amount_cents: u64,
    pub status: String,
}

#[derive(Debug)]
pub enum ShopError {
    Idempotency(idempotent_core::Error),
    Other(String),
}

impl From<idempotent_core::Error> for ShopError {
    fn from(error: idempotent_core::Error) -> Self {
        ShopError::Idempotency(error)
    }
}

pub fn order(order_id: String) -> OrderRequest {
    OrderRequest {
        order_id,
        customer_id: "customer-4711".to_string(),
        sku: "SKU-CHAIR-OAK-42".to_string(),
        quantity: 2,
        amount_cents: 25_980,
    }
}

/// The body every variant runs: what a payment call would return.
pub fn receipt(request: &OrderRequest) -> Receipt {
    Receipt {
        order_id: request.order_id.clone(),
        charge_id: "ch_3PqLk2Jd8sX0aB1c".to_string(),
        amount_cents: request.amount_cents,
        status: "succeeded".to_string(),
    }
}

/// The hand-written fingerprint: SHA-256 over the arguments' JSON.
pub fn json_fingerprint(request: &OrderRequest) -> [u8; 32] {
    let json = serde_json::to_vec(request).expect("an order serializes");
    Sha256::digest(&json).into()
}

/// Order ids never used before in this process, so a first call is always a first call (the
/// run id keeps them apart from an earlier run's records in a durable store).
pub fn fresh_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static RUN: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    format!("{prefix}-{run:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The runtime every bench runs on: two workers, as many as the machine has cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

/// `cargo bench` passes `--bench`; `cargo test --benches` runs each bench once without it.
pub fn measuring() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// Where the race timings go: `$IDEMPOTENT_BENCH_OUT`, or `<target dir>/bench` (found from
/// this binary's path, `<target>/release/deps/<bench>`).
pub fn out_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IDEMPOTENT_BENCH_OUT") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the bench's own path");
    exe.ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("bench")
}

/// One round of the same-key race, as the tasks see it.
pub struct Round {
    /// How many times the body ran.
    pub executions: AtomicUsize,
    /// The task whose call ran the body.
    pub executor: AtomicUsize,
}

impl Round {
    pub fn new() -> Self {
        Round {
            executions: AtomicUsize::new(0),
            executor: AtomicUsize::new(usize::MAX),
        }
    }

    /// Called by the body: counts the execution, notes who ran it.
    pub fn executed_by(&self, task: usize) {
        self.executions.fetch_add(1, Ordering::SeqCst);
        self.executor.store(task, Ordering::SeqCst);
    }
}

/// The timings of every race round of one case.
pub struct RaceRecorder {
    case: String,
    rounds: Mutex<Vec<RoundResult>>,
}

#[derive(Clone, Copy)]
struct RoundResult {
    executions: usize,
    /// Last waiter returned − the executing call returned (its `complete` was applied), µs;
    /// negative when every waiter returned before the executing call did.
    lag_us: f64,
    /// The whole round: first task spawned → last task returned, µs.
    round_us: f64,
}

impl RaceRecorder {
    pub fn new(case: &str) -> Self {
        RaceRecorder {
            case: case.to_string(),
            rounds: Mutex::new(Vec::new()),
        }
    }

    /// Records a round from the instant each task returned; panics if the body did not run
    /// exactly once (that is a bug, not a timing).
    pub fn record(&self, round: &Round, started: Instant, returned: &[Instant]) {
        let executions = round.executions.load(Ordering::SeqCst);
        assert_eq!(
            executions, 1,
            "{}: the body ran {executions} times in one race round",
            self.case
        );
        let executor = round.executor.load(Ordering::SeqCst);
        let completed = returned[executor];
        let last = returned
            .iter()
            .enumerate()
            .filter(|(task, _)| *task != executor)
            .map(|(_, at)| *at)
            .max()
            .expect("the race has waiters");
        let lag_us = if last >= completed {
            (last - completed).as_secs_f64() * 1e6
        } else {
            -((completed - last).as_secs_f64() * 1e6)
        };
        let end = returned.iter().max().copied().unwrap_or(started);
        let round_us = (end - started).as_secs_f64() * 1e6;
        self.rounds.lock().unwrap().push(RoundResult {
            executions,
            lag_us,
            round_us,
        });
    }

    /// Writes `<out>/race/<case>.json` when measuring (not in `cargo test`'s single pass).
    pub fn write(&self) {
        let rounds = self.rounds.lock().unwrap();
        // `--profile-time` runs no rounds through `iter_custom`'s recorder: keep the last file.
        if !measuring() || rounds.is_empty() {
            return;
        }
        let dir = out_dir().join("race");
        std::fs::create_dir_all(&dir).expect("create the race output folder");
        let json = serde_json::json!({
            "case": self.case,
            "tasks": RACE_TASKS,
            "body_us": RACE_BODY.as_micros() as u64,
            "rounds": rounds.len(),
            "executions": rounds.iter().map(|r| r.executions).sum::<usize>(),
            "lag_us": rounds.iter().map(|r| r.lag_us).collect::<Vec<_>>(),
            "round_us": rounds.iter().map(|r| r.round_us).collect::<Vec<_>>(),
        });
        let path = dir.join(format!("{}.json", self.case.replace('/', "_")));
        std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap())
            .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    }
}

/// Runs one race round: `RACE_TASKS` tasks call `call(task, round)` at once with the same key;
/// returns when all have returned, having recorded the round.
pub async fn race_round<F, Fut>(recorder: &RaceRecorder, call: F)
where
    F: Fn(usize, std::sync::Arc<Round>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let round = std::sync::Arc::new(Round::new());
    let started = Instant::now();
    let tasks: Vec<_> = (0..RACE_TASKS)
        .map(|task| {
            let future = call(task, std::sync::Arc::clone(&round));
            tokio::spawn(async move {
                future.await;
                Instant::now()
            })
        })
        .collect();
    let mut returned = Vec::with_capacity(RACE_TASKS);
    for task in tasks {
        returned.push(task.await.expect("a race task panicked"));
    }
    recorder.record(&round, started, &returned);
}

/// The total time of `iters` race rounds, for `iter_custom`.
pub async fn race_rounds<F, Fut>(recorder: &RaceRecorder, iters: u64, call: F) -> Duration
where
    F: Fn(usize, std::sync::Arc<Round>, &str) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let key = fresh_id("race");
        let started = Instant::now();
        race_round(recorder, |task, round| call(task, round, &key)).await;
        total += started.elapsed();
    }
    total
}

/// Runs `tasks` concurrent tasks, each calling `op(task, i)` for `i in 0..iters`; returns the
/// wall time. One criterion iteration is then `tasks` operations, one per task.
pub async fn concurrent<O: Op>(tasks: usize, iters: u64, op: O) -> Duration {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let op = op.clone();
            let barrier = std::sync::Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                for i in 0..iters {
                    op.call(task, i).await;
                }
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    for handle in handles {
        handle.await.expect("a benchmark task panicked");
    }
    started.elapsed()
}

/// Benches `id`: `tasks` concurrent tasks (see [`concurrent`]), each running `op(task, i)`
/// once per iteration; for variants that are not a [`Caller`], such as the bare client's floor.
pub fn bench_ops<O: Op>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    id: &str,
    tasks: usize,
    op: O,
) {
    group.bench_function(id, |b| {
        b.to_async(runtime)
            .iter_custom(|iters| concurrent(tasks, iters, op.clone()))
    });
}

/// What a bench times, one call at a time: task `task`'s `i`-th call. A closure
/// `Fn(usize, u64) -> impl Future` is one (the bare clients' floors); [`calls`] and
/// [`hot_replays`] are the calls through a [`Caller`].
pub trait Op: Send + Sync + Clone + 'static {
    fn call(&self, task: usize, i: u64) -> impl Future<Output = ()> + Send + 'static;
}

impl<F, Fut> Op for F
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn call(&self, task: usize, i: u64) -> impl Future<Output = ()> + Send + 'static {
        self(task, i)
    }
}

/// The op of [`bench_calls`]: each task's calls through `caller`, replays of `request` or
/// first calls on fresh keys.
pub fn calls<C: Caller>(caller: &Arc<C>, call: Call, request: &Arc<OrderRequest>) -> Calls<C> {
    Calls {
        caller: Arc::clone(caller),
        call,
        request: Arc::clone(request),
    }
}

/// See [`calls`].
pub struct Calls<C> {
    caller: Arc<C>,
    call: Call,
    request: Arc<OrderRequest>,
}

impl<C> Clone for Calls<C> {
    fn clone(&self) -> Self {
        Self {
            caller: Arc::clone(&self.caller),
            call: self.call,
            request: Arc::clone(&self.request),
        }
    }
}

impl<C: Caller> Op for Calls<C> {
    fn call(&self, task: usize, _: u64) -> impl Future<Output = ()> + Send + 'static {
        let (caller, request, call) = (
            Arc::clone(&self.caller),
            Arc::clone(&self.request),
            self.call,
        );
        async move {
            let receipt = match call {
                Call::Replay => caller.replay(task, &request).await,
                Call::FirstCall => {
                    let request = order(fresh_id("first"));
                    caller.first_call(task, &request).await
                }
            };
            black_box(receipt.unwrap());
        }
    }
}

/// The op of [`bench_hot_replays`]: each task's `i`-th call a replay through `caller` of one
/// of `requests` (all recorded beforehand), chosen by [`hot_index`].
pub fn hot_replays<C: Caller>(
    caller: &Arc<C>,
    tasks: usize,
    requests: &Arc<Vec<OrderRequest>>,
) -> HotReplays<C> {
    HotReplays {
        caller: Arc::clone(caller),
        tasks,
        requests: Arc::clone(requests),
    }
}

/// See [`hot_replays`].
pub struct HotReplays<C> {
    caller: Arc<C>,
    tasks: usize,
    requests: Arc<Vec<OrderRequest>>,
}

impl<C> Clone for HotReplays<C> {
    fn clone(&self) -> Self {
        Self {
            caller: Arc::clone(&self.caller),
            tasks: self.tasks,
            requests: Arc::clone(&self.requests),
        }
    }
}

impl<C: Caller> Op for HotReplays<C> {
    fn call(&self, task: usize, i: u64) -> impl Future<Output = ()> + Send + 'static {
        let (caller, requests, tasks) = (
            Arc::clone(&self.caller),
            Arc::clone(&self.requests),
            self.tasks,
        );
        async move {
            let request = &requests[hot_index(task, tasks, i, requests.len())];
            black_box(caller.replay(task, request).await.unwrap());
        }
    }
}

/// One variant of a bench that times its variants in turns (`IDEMPOTENT_BENCH_INTERLEAVED`):
/// given a task and a number of calls, that task's calls in a round, as one boxed future. The
/// variants of a case differ in type, hence the box; one per task and round, not per call, so
/// that a variant's future costs it no allocation per call that criterion's unboxed loop
/// (`bench_ops`) does not (a call through `#[idempotent]` is a future of a few KB: boxed per
/// call, it would be timed with a large allocation the application does not make).
pub type TaskLoop =
    Arc<dyn Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// `op`'s calls `0..calls`, as a [`TaskLoop`].
pub fn task_loop<O: Op>(op: O) -> TaskLoop {
    Arc::new(move |task, calls| {
        let op = op.clone();
        Box::pin(async move {
            for i in 0..calls {
                op.call(task, i).await;
            }
        })
    })
}

/// Times `calls` calls by each of `tasks` concurrent tasks running `variant`: per call, as the
/// report gives it (the round's time divided by the number of tasks and calls).
pub async fn time_ops(tasks: usize, calls: u64, variant: &TaskLoop) -> Duration {
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (calls_of_task, barrier) = (variant(task, calls), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                calls_of_task.await;
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    for handle in handles {
        handle.await.expect("a benchmark task panicked");
    }
    started.elapsed() / u32::try_from(calls * tasks as u64).unwrap_or(u32::MAX)
}

/// CPU time used so far by every thread of this process (the bench's runtime and client, not
/// the server it talks to), from `/proc/self/task/*/schedstat`, to the nanosecond; `None`
/// where that is not readable (not Linux). Threads that ended before the call are not counted,
/// so only differences over spans in which no thread ends mean anything (the runtime's
/// workers live for the whole bench).
pub fn process_cpu() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// `IDEMPOTENT_BENCH_CASES`: the interleaved cases to run, a comma-separated list of names
/// (`replay-64,first_call-64`); all when unset.
pub fn selected(case: &str) -> bool {
    match std::env::var("IDEMPOTENT_BENCH_CASES") {
        Ok(cases) => cases.split(',').any(|wanted| wanted.trim() == case),
        Err(_) => true,
    }
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `IDEMPOTENT_BENCH_INTERLEAVED` (rounds) and `IDEMPOTENT_BENCH_CALLS` (calls per task and
/// round, `default_calls` when unset), when the first is set: the bench then times its
/// variants in turns instead of through criterion.
pub fn interleaving(default_calls: u64) -> Option<(usize, u64)> {
    let rounds = std::env::var("IDEMPOTENT_BENCH_INTERLEAVED")
        .ok()?
        .parse()
        .ok()?;
    let calls = std::env::var("IDEMPOTENT_BENCH_CALLS")
        .ok()
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(default_calls);
    Some((rounds, calls))
}

/// Which of a hot set of `len` keys task `task` (of `tasks`) uses in its `i`-th call: the tasks
/// start spread evenly over the set and walk it round robin, without a lock.
pub fn hot_index(task: usize, tasks: usize, i: u64, len: usize) -> usize {
    let start = task * len / tasks.max(1);
    ((start as u64 + i) % len as u64) as usize
}

/// Benches `id`: `tasks` concurrent tasks, each replaying through `caller` once per iteration
/// one of `requests` (all recorded beforehand), chosen by [`hot_index`].
pub fn bench_hot_replays<C: Caller>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    id: &str,
    tasks: usize,
    caller: &Arc<C>,
    requests: &Arc<Vec<OrderRequest>>,
) {
    bench_ops(
        group,
        runtime,
        id,
        tasks,
        hot_replays(caller, tasks, requests),
    );
}
