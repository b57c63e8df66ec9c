//! What the child processes do.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use idempotent_core::{
    Call, Error, Fingerprint, Idempotency, OnConflict, Options, StorageKey, Store, idempotent,
};

use crate::ledger;
use crate::stores::{self, Kind};

/// The name (namespace) of the function under test.
pub const NAME: &str = "fleet.execute";
/// The key the crash test's holder dies holding.
pub const CRASH_KEY: &str = "crash";
const CRASH_LEASE: Duration = Duration::from_secs(2);

pub fn storage_key(key: &str) -> StorageKey {
    StorageKey::derive(NAME, None, key.as_bytes()).expect("a valid key")
}

static STORE: OnceLock<Arc<dyn Store>> = OnceLock::new();
static DIR: OnceLock<String> = OnceLock::new();

fn store() -> &'static Arc<dyn Store> {
    STORE.get().expect("the child's store is set first")
}

/// Small, seeded, per task: random delays without a dependency.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

static NONCE: AtomicU64 = AtomicU64::new(0);

/// The function under test: its body appends to the ledger, so every execution is counted
/// outside the store.
#[idempotent(key = key, name = "fleet.execute", store = store(), lease = "5s", skip(caller, delay_ms))]
async fn execute(key: u32, caller: String, delay_ms: u64) -> Result<String, Error> {
    let value = format!("{caller}/{}", NONCE.fetch_add(1, Ordering::Relaxed));
    let dir = Path::new(DIR.get().expect("the child's folder is set first"));
    ledger::append(&ledger::executions(dir), &format!("exec {key} {value}"));
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    Ok(value)
}

pub fn main() {
    let role = std::env::var("FLEET_ROLE").expect("run by a fleet test");
    let kind = Kind::from_name(&std::env::var("FLEET_STORE").unwrap());
    let url = std::env::var("FLEET_URL").unwrap();
    let dir = std::env::var("FLEET_DIR").unwrap();
    let id: usize = std::env::var("FLEET_ID").unwrap().parse().unwrap();
    DIR.set(dir.clone()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _ = STORE.set(stores::connect(kind, &url).await);
        match role.as_str() {
            "caller" => call_every_key(id, Path::new(&dir)).await,
            "crash" => hold_and_hang(Path::new(&dir)).await,
            other => panic!("unknown role {other}"),
        }
    });
}

/// 32 tasks, each calling every key in its own random order, some twice, with random delays,
/// retrying what a busy store or server refuses.
async fn call_every_key(process: usize, dir: &Path) {
    let tasks: Vec<_> = (0..crate::TASKS)
        .map(|task| {
            let results = ledger::results(dir, process);
            tokio::spawn(async move {
                let mut random =
                    Random(0x9E37_79B9_7F4A_7C15 ^ ((process * 1000 + task) as u64 + 1));
                let mut keys: Vec<u32> = (0..crate::KEYS).collect();
                for i in (1..keys.len()).rev() {
                    keys.swap(i, random.below(i as u64 + 1) as usize);
                }
                let mut lines = String::new();
                for key in keys {
                    let calls = 1 + random.below(2);
                    for _ in 0..calls {
                        let caller = format!("p{process}t{task}");
                        let value = loop {
                            match execute(key, caller.clone(), random.below(5)).await {
                                Ok(value) => break value,
                                Err(Error::Conflict { .. } | Error::Store(_)) => {
                                    tokio::time::sleep(Duration::from_millis(random.below(20)))
                                        .await;
                                }
                                Err(other) => panic!("key {key}: {other}"),
                            }
                        };
                        lines.push_str(&format!("got {key} {value}\n"));
                    }
                }
                ledger::append(&results, lines.trim_end());
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a caller task panicked");
    }
}

/// Claims the crash key and hangs in the body until killed.
async fn hold_and_hang(dir: &Path) {
    let engine =
        Idempotency::new(Arc::clone(store())).with_options(Options::new().with_lease(CRASH_LEASE));
    let started = dir.join("started");
    let call = Call::new(NAME, Fingerprint::of(&0u32).unwrap()).key(CRASH_KEY);
    let _ = engine
        .run(call, async {
            ledger::append(&started, "body running");
            std::future::pending::<Result<String, Error>>().await
        })
        .await;
}

/// After the holder died: others find the key in progress until its lease ends, then exactly
/// one of them executes, under a larger fence, and all get its value.
pub async fn take_over_after_crash(kind: Kind, url: &str, dir: &Path, old_fence: u64) {
    let store = stores::connect(kind, url).await;
    let runs = Arc::new(AtomicU64::new(0));
    let call = Call::new(NAME, Fingerprint::of(&0u32).unwrap()).key(CRASH_KEY);

    let rejecting = Idempotency::new(Arc::clone(&store)).with_options(
        Options::new()
            .with_lease(CRASH_LEASE)
            .with_on_conflict(OnConflict::Reject),
    );
    let early = rejecting
        .run(call, async { Ok::<_, Error>("too early".to_string()) })
        .await;
    assert!(
        matches!(early, Err(Error::Conflict { .. })),
        "the dead holder's lease still runs: {early:?}"
    );

    let waiting = Idempotency::new(Arc::clone(&store)).with_options(
        Options::new()
            .with_lease(CRASH_LEASE)
            .with_on_conflict(OnConflict::Wait {
                timeout: Duration::from_secs(30),
            }),
    );
    let callers: Vec<_> = (0..8)
        .map(|i| {
            let (waiting, runs) = (waiting.clone(), Arc::clone(&runs));
            tokio::spawn(async move {
                waiting
                    .run(call, async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Error>(format!("taken over by caller {i}"))
                    })
                    .await
                    .map(idempotent_core::Outcome::into_value)
            })
        })
        .collect();
    let mut values = Vec::new();
    for caller in callers {
        values.push(caller.await.unwrap().expect("every caller gets the result"));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "exactly one caller executed"
    );
    values.dedup();
    assert_eq!(
        values.len(),
        1,
        "all got the one execution's value: {values:?}"
    );
    let new_fence = stores::current_fence(kind, url, CRASH_KEY).await;
    assert!(
        new_fence > old_fence,
        "fence {new_fence} after the crash, {old_fence} before"
    );
    let _ = dir;
}
