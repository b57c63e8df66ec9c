//! The cost of `EncryptedStore` (and `KeyedStore`) over the same store without them, timed in
//! turns in one run: replays and first calls through `#[idempotent]`, on the memory store (one
//! caller) and on Redis (one caller, and 64 tasks over one connection).
//!
//! `cargo bench --all-features --bench encryption` prints the table (30 rounds of 2,000 calls
//! per task on memory, 400 on Redis; the median time per call and the median of the per-round
//! ratios to the plain store). Without `--bench` (as `cargo test --all-targets` runs it) it
//! does a few rounds of a few calls, to check that it still works.

mod common;

use std::sync::Arc;

use idempotent_core::MemoryStore;
use idempotent_core::encryption::{EncryptedStore, KeyRing, KeyedStore};
use idempotent_core::stores::redis::RedisStore;

use common::{Call, Shop};

use common::TaskLoop as Op;

fn ring() -> KeyRing {
    KeyRing::new("bench", [7; 32]).expect("a valid key ring")
}

/// The plain, sealed, and sealed-and-keyed variants of one store; `make(variant)` gives each
/// its own records (on Redis, its own key prefix).
fn variants<S, F>(
    make: F,
    call: Call,
    request: &Arc<common::OrderRequest>,
) -> Vec<(&'static str, Op)>
where
    S: idempotent_core::Store + 'static,
    F: Fn(&str) -> S,
{
    let plain = Arc::new(Shop {
        store: Arc::new(make("plain")),
    });
    let sealed = Arc::new(Shop {
        store: Arc::new(EncryptedStore::new(make("encrypted"), ring())),
    });
    let keyed = Arc::new(Shop {
        store: Arc::new(EncryptedStore::new(
            KeyedStore::new(make("keyed"), [9; 32]),
            ring(),
        )),
    });
    vec![
        (
            "plain",
            common::task_loop(common::calls(&plain, call, request)),
        ),
        (
            "encrypted",
            common::task_loop(common::calls(&sealed, call, request)),
        ),
        (
            "encrypted_keyed",
            common::task_loop(common::calls(&keyed, call, request)),
        ),
    ]
}

/// Times `variants` in turns and prints a row per variant.
fn time_in_turns(
    runtime: &tokio::runtime::Runtime,
    case: &str,
    tasks: usize,
    rounds: usize,
    calls: u64,
    variants: &[(&'static str, Op)],
) {
    let n = variants.len();
    let time = |variant: usize, calls: u64| {
        runtime.block_on(common::time_ops(tasks, calls, &variants[variant].1))
    };
    for variant in 0..n {
        time(variant, calls.min(50));
    }
    let mut times = vec![Vec::new(); n];
    let mut ratios = vec![Vec::new(); n];
    for round in 0..rounds {
        let mut this = vec![0.0; n];
        for turn in 0..n {
            let variant = (round + turn) % n;
            this[variant] = time(variant, calls).as_nanos() as f64;
            times[variant].push(this[variant]);
        }
        for variant in 0..n {
            ratios[variant].push(this[variant] / this[0]);
        }
    }
    for variant in 0..n {
        println!(
            "| {case} | {} | {:.2} µs | {:.2}x |",
            variants[variant].0,
            common::median(&mut times[variant]) / 1000.0,
            common::median(&mut ratios[variant]),
        );
    }
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let (rounds, memory_calls, redis_calls) = if full { (30, 2_000, 400) } else { (2, 20, 5) };
    let runtime = common::runtime();
    let request = Arc::new(common::order("order-1001".to_string()));
    println!("| case | variant | median per call | time vs plain |");
    println!("|---|---|---:|---:|");
    for (case, call) in [("replay", Call::Replay), ("first_call", Call::FirstCall)] {
        let variants = variants(|_| MemoryStore::new(), call, &request);
        if let Call::Replay = call {
            runtime.block_on(async {
                for (_, op) in &variants {
                    op(0, 0).await;
                }
            });
        }
        time_in_turns(
            &runtime,
            &format!("memory/{case}-1"),
            1,
            rounds,
            memory_calls,
            &variants,
        );
    }
    let server = idempotent_test_support::RedisServer::start();
    let redis = |variant: &str| {
        let _entered = runtime.enter();
        RedisStore::builder(server.url())
            .key_prefix(format!("{variant}:"))
            .build()
            .expect("a valid Redis URL")
    };
    for tasks in [1, 64] {
        for (case, call) in [("replay", Call::Replay), ("first_call", Call::FirstCall)] {
            let variants = variants(redis, call, &request);
            if let Call::Replay = call {
                runtime.block_on(async {
                    for (_, op) in &variants {
                        op(0, 0).await;
                    }
                });
            }
            time_in_turns(
                &runtime,
                &format!("redis/{case}-{tasks}"),
                tasks,
                rounds,
                redis_calls,
                &variants,
            );
        }
    }
    drop(runtime);
    drop(server);
}
