//! The in-memory store against a hand-written equivalent: SHA-256 over the arguments' JSON, a
//! `Mutex<HashMap>` lookup and a serde_json decode.
//!
//! Cases (group `memory`): `replay` (the key is recorded), `first_call` (a fresh key each
//! iteration: claim, run, complete), `race` (64 tasks call one fresh key at once; the body
//! runs once and the others wait for its result). Each as `idempotent` (the `#[idempotent]`
//! attribute over a `MemoryStore`) and `baseline` (hand-written).

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use idempotent_core::MemoryStore;
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

criterion_group!(benches, memory);
criterion_main!(benches);
