//! The in-memory store against a hand-written equivalent: SHA-256 over the arguments' JSON, a
//! `Mutex<HashMap>` lookup and a serde_json decode.
//!
//! Cases (group `memory`): `replay` (the key is recorded), `first_call` (a fresh key each
//! iteration: claim, run, complete), `race` (64 tasks call one fresh key at once; the body
//! runs once and the others wait for its result). Each as `idempotent` (the `#[idempotent]`
//! attribute over a `MemoryStore`) and `baseline` (hand-written).
//!
//! Group `memory/turnover` measures the store alone, claim by claim, at the default capacity
//! (a million records). One iteration claims (and completes) a million new keys: on a new
//! store, from empty to full (`fresh`), or on a store full of records that have all just
//! expired (`expired`: the store turns its whole capacity over; the records of one iteration
//! expire before the next). Criterion gives the time of an iteration; each claim is timed,
//! and the mean, the tail and the worst claim are printed and written to
//! `<out>/turnover/<case>.json` (see `common::out_dir`).

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use idempotent_core::stores::memory::DEFAULT_CAPACITY;
use idempotent_core::{
    BoxFuture, Bytes, CanonicalArguments, Claim, Fingerprint, ManualClock, MemoryStore, StorageKey,
    Store, StoreError,
};
use tokio::sync::Notify;

use common::{OrderRequest, Receipt, Round, ShopError};

/// First calls run on a new store every this many iterations, so a long run never fills
/// one (the default capacity is a million records); making and dropping it is not timed.
const CHUNK: u64 = 1 << 16;

type Shop = common::Shop<MemoryStore>;

fn new_shop() -> Shop {
    Shop {
        store: Arc::new(MemoryStore::new()),
    }
}

/// The hand-written equivalent: what one would write without the library.
#[derive(Default)]
struct HandWritten {
    records: Mutex<HashMap<String, Slot>>,
}

enum Slot {
    Running(Arc<Notify>),
    Done {
        fingerprint: [u8; 32],
        output: Vec<u8>,
    },
}

impl common::Racer for HandWritten {
    fn race(
        &self,
        task: usize,
        request: &OrderRequest,
        round: &Round,
    ) -> impl Future<Output = Result<Receipt, ShopError>> + Send {
        self.race_order(request, task, round)
    }
}

impl HandWritten {
    async fn place_order(&self, request: &OrderRequest) -> Result<Receipt, ShopError> {
        self.run(request, || async { common::receipt(request) })
            .await
    }

    async fn race_order(
        &self,
        request: &OrderRequest,
        task: usize,
        round: &Round,
    ) -> Result<Receipt, ShopError> {
        self.run(request, || async {
            round.executed_by(task);
            tokio::time::sleep(common::RACE_BODY).await;
            common::receipt(request)
        })
        .await
    }

    async fn run<F, Fut>(&self, request: &OrderRequest, body: F) -> Result<Receipt, ShopError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Receipt>,
    {
        let fingerprint = common::json_fingerprint(request);
        loop {
            let notified = {
                let mut records = self.records.lock().unwrap();
                match records.get(&request.order_id) {
                    Some(Slot::Done {
                        fingerprint: recorded,
                        output,
                    }) => {
                        if *recorded != fingerprint {
                            return Err(ShopError::Other("key reused".into()));
                        }
                        return serde_json::from_slice(output)
                            .map_err(|error| ShopError::Other(error.to_string()));
                    }
                    Some(Slot::Running(notify)) => Arc::clone(notify).notified_owned(),
                    None => {
                        records.insert(
                            request.order_id.clone(),
                            Slot::Running(Arc::new(Notify::new())),
                        );
                        break;
                    }
                }
            };
            notified.await;
        }
        let receipt = body().await;
        let output = serde_json::to_vec(&receipt).expect("a receipt serializes");
        let previous = self.records.lock().unwrap().insert(
            request.order_id.clone(),
            Slot::Done {
                fingerprint,
                output,
            },
        );
        if let Some(Slot::Running(notify)) = previous {
            notify.notify_waiters();
        }
        Ok(receipt)
    }
}

/// The time of `iters` first calls, each with a fresh order, `CHUNK` at a time on a new shop.
async fn first_calls<S, F>(iters: u64, new_shop: impl Fn() -> S, call: F) -> Duration
where
    F: AsyncFn(&S, &OrderRequest) -> Result<Receipt, ShopError>,
{
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(CHUNK);
        let shop = new_shop();
        let orders: Vec<_> = (0..n)
            .map(|_| common::order(common::fresh_id("first")))
            .collect();
        let started = Instant::now();
        for request in &orders {
            black_box(call(&shop, black_box(request)).await.expect("a first call"));
        }
        total += started.elapsed();
        done += n;
    }
    total
}

fn memory(c: &mut Criterion) {
    let runtime = common::runtime();
    let mut group = c.benchmark_group("memory");

    let shop = new_shop();
    let hand = HandWritten::default();
    let request = common::order("order-1001".to_string());
    runtime.block_on(async {
        shop.place_order(&request).await.unwrap();
        hand.place_order(&request).await.unwrap();
    });
    group.bench_function("replay/idempotent", |b| {
        b.to_async(&runtime)
            .iter(|| async { shop.place_order(black_box(&request)).await.unwrap() })
    });
    group.bench_function("replay/baseline", |b| {
        b.to_async(&runtime)
            .iter(|| async { hand.place_order(black_box(&request)).await.unwrap() })
    });

    group.bench_function("first_call/idempotent", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            first_calls(iters, new_shop, async |shop: &Shop, request| {
                shop.place_order(request).await
            })
        })
    });
    group.bench_function("first_call/baseline", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            first_calls(
                iters,
                HandWritten::default,
                async |shop: &HandWritten, request| shop.place_order(request).await,
            )
        })
    });

    common::bench_races(
        &mut group,
        &runtime,
        "memory",
        &Arc::new(new_shop()),
        &Arc::new(HandWritten::default()),
    );
    group.finish();
}

/// The ttl of the turnover's records; the clock jumps past it to expire them all.
const TURNOVER_TTL: Duration = Duration::from_secs(60);
const TURNOVER_LEASE: Duration = Duration::from_secs(10);

/// A store for the turnover cases, on a clock of its own.
struct Turnover {
    store: MemoryStore,
    clock: ManualClock,
    /// Whether each iteration has the previous one's records expire (`expired`), or starts
    /// on a new store (`fresh`).
    expire: bool,
    next_key: u64,
    /// Each timed claim, in nanoseconds, in order.
    claims_ns: Vec<u64>,
}

/// How many claims after a turnover's slowest one are averaged, to show whether the store
/// stays slow after it (as it did while the tables held a purge's deleted slots).
const AFTER_WORST: usize = 2_000;

impl Turnover {
    fn new(expire: bool) -> Self {
        let clock = ManualClock::new();
        let store = turnover_store(&clock);
        let mut turnover = Turnover {
            store,
            clock,
            expire,
            next_key: 0,
            claims_ns: Vec::new(),
        };
        if expire {
            // Fill the store (not timed); the first iteration finds it full of expired records.
            for _ in 0..turnover.store.capacity() {
                turnover.claim_and_complete().expect("the store has room");
            }
        }
        turnover
    }

    /// A key no earlier claim used: a counter spread over all 32 bytes.
    fn key(&mut self) -> StorageKey {
        self.next_key += 1;
        let mut bytes = [0u8; 32];
        let mut x = self.next_key;
        for chunk in bytes.chunks_mut(8) {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        StorageKey::from_bytes(bytes)
    }

    /// Claims a new key and completes it; the claim's time.
    fn claim_and_complete(&mut self) -> Result<Duration, StoreError> {
        let key = self.key();
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let started = Instant::now();
        let claim =
            now(self
                .store
                .claim(&key, &CanonicalArguments::from(fingerprint), TURNOVER_LEASE))?;
        let took = started.elapsed();
        let Claim::Acquired { fence } = claim else {
            panic!("a new key was not acquired: {claim:?}");
        };
        let output = Bytes::from_static(b"{\"ok\":{\"charge_id\":\"ch_3PqLk2Jd8sX0aB1c\"}}");
        now(self.store.complete(&key, fence, output, TURNOVER_TTL))?;
        Ok(took)
    }

    /// `iters` turnovers of the store's capacity; the total time of their claims.
    fn run(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            if self.expire {
                self.clock.advance(TURNOVER_TTL);
            } else {
                // Made, and the full one dropped, outside the timing.
                self.store = turnover_store(&self.clock);
            }
            for _ in 0..self.store.capacity() {
                let took = self.claim_and_complete().expect("a claim of a new key");
                self.claims_ns.push(took.as_nanos() as u64);
                total += took;
            }
        }
        total
    }

    /// Prints the worst claim and the tail, and writes them to `<out>/turnover/<case>.json`.
    fn report(&mut self, case: &str) {
        let mut ns = std::mem::take(&mut self.claims_ns);
        if !common::measuring() || ns.is_empty() {
            return;
        }
        // Per turnover: its slowest claim, and the mean of the claims after it.
        let mut worst_us = Vec::new();
        let mut after_worst_us = Vec::new();
        for turnover in ns.chunks(DEFAULT_CAPACITY) {
            let (at, &worst) = turnover
                .iter()
                .enumerate()
                .max_by_key(|(_, ns)| **ns)
                .expect("a turnover has claims");
            worst_us.push(worst as f64 / 1e3);
            let after = &turnover[at + 1..(at + 1 + AFTER_WORST).min(turnover.len())];
            if !after.is_empty() {
                after_worst_us.push(after.iter().sum::<u64>() as f64 / after.len() as f64 / 1e3);
            }
        }
        let median = |values: &mut Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let (worst_median, after_median) = (median(&mut worst_us), median(&mut after_worst_us));
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize];
        let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
        let us = |n: u64| n as f64 / 1e3;
        let over_1ms = ns.iter().filter(|&&n| n > 1_000_000).count();
        eprintln!(
            "{case}: {} claims ({} turnovers of {} records): mean {:.2} µs, p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, p99.99 {:.2} µs, worst {:.2} µs; {over_1ms} over 1 ms",
            ns.len(),
            ns.len() / DEFAULT_CAPACITY,
            DEFAULT_CAPACITY,
            mean / 1e3,
            us(at(0.5)),
            us(at(0.99)),
            us(at(0.999)),
            us(at(0.9999)),
            us(*ns.last().unwrap()),
        );
        eprintln!(
            "{case}: per turnover, the slowest claim: median {worst_median:.2} µs (each: {worst_us:.0?}); the mean of the {AFTER_WORST} claims after it: median {after_median:.2} µs"
        );
        let json = serde_json::json!({
            "case": case,
            "capacity": DEFAULT_CAPACITY,
            "claims": ns.len(),
            "mean_us": mean / 1e3,
            "p50_us": us(at(0.5)),
            "p99_us": us(at(0.99)),
            "p999_us": us(at(0.999)),
            "p9999_us": us(at(0.9999)),
            "worst_us": us(*ns.last().unwrap()),
            "over_1ms": over_1ms,
            "turnover_worst_us": worst_us,
            "turnover_worst_median_us": worst_median,
            "after_worst_mean_median_us": after_median,
        });
        let dir = common::out_dir().join("turnover");
        std::fs::create_dir_all(&dir).expect("create the turnover output folder");
        let path = dir.join(format!("{}.json", case.replace('/', "_")));
        std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap())
            .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    }
}

/// A store of the default capacity; of 10,000 records under `cargo test --benches`, which
/// runs each bench once only to see that it works.
fn turnover_store(clock: &ManualClock) -> MemoryStore {
    let capacity = if common::measuring() {
        DEFAULT_CAPACITY
    } else {
        10_000
    };
    MemoryStore::builder()
        .capacity(capacity)
        .clock(clock.clone())
        .build()
}

/// The value of a store future that is ready at once, as the memory store's are.
fn now<T>(mut future: BoxFuture<'_, T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("a memory store future was not ready at once"),
    }
}

fn turnover(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory/turnover");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Elements(DEFAULT_CAPACITY as u64));
    for (case, expire) in [("fresh", false), ("expired", true)] {
        // Made only if the case runs (a filter may leave it out).
        let mut turnover = None;
        group.bench_function(case, |b| {
            b.iter_custom(|iters| {
                turnover
                    .get_or_insert_with(|| Turnover::new(expire))
                    .run(iters)
            })
        });
        if let Some(mut turnover) = turnover {
            turnover.report(&format!("memory/turnover/{case}"));
        }
    }
    group.finish();
}

criterion_group!(benches, memory, turnover);
criterion_main!(benches);
