//! What the stores survive, on real servers: a restart in the middle of a run, and connections
//! killed from the server's side under load. Every call returns its key's one recorded value
//! or a typed error; no key runs twice; no completed record is lost.
//!
//! The load calls a fresh key each time, so bodies run and `complete`s are sent all through a
//! fault: each test checks that some bodies were running when it struck, that some `complete`s
//! met it and were sent again until one was applied, and that every key that ran replays its
//! one value afterwards.
#![cfg(any(feature = "redis", feature = "postgres"))]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idempotent_core::conformance::{Forwarding, Hooks};
use idempotent_core::{
    BoxFuture, Bytes, Call, Error, Fence, FencedWrite, Fingerprint, Idempotency, OnConflict,
    Options, Outcome, StorageKey, Store, StoreError,
};

/// How long each body runs: long enough that, with 64 callers, dozens of bodies are running at
/// any moment of a fault.
const BODY: Duration = Duration::from_millis(20);

/// Long enough that a holder outlives a restart, with room to spare on a loaded machine: its
/// `complete` is tried again for half a lease, and a lease that ran out would let another
/// caller run the key. No passing run waits on it.
const LEASE: Duration = Duration::from_secs(10);

/// When a fault struck: from just before it was set off until it was over.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    /// The window of a fault set off at `start` and over now.
    fn since(start: Instant) -> Window {
        Window {
            start,
            end: Instant::now(),
        }
    }
}

/// One run of a body.
#[derive(Debug, Clone)]
struct Execution {
    value: String,
    started: Instant,
    ended: Instant,
}

/// One `complete` the engine sent, and what it met.
#[derive(Debug, Clone)]
struct Complete {
    answered: Instant,
    result: Result<FencedWrite, String>,
}

impl Complete {
    fn unavailable(&self) -> bool {
        matches!(&self.result, Err(error) if error.starts_with("Unavailable"))
    }
}

/// Every execution of every key, what each call got, and every `complete` sent.
#[derive(Debug, Default)]
struct Ledger {
    /// How many bodies are running now.
    running: AtomicUsize,
    executions: Mutex<HashMap<u64, Vec<Execution>>>,
    answers: Mutex<Vec<(u64, String)>>,
    completes: Mutex<HashMap<StorageKey, Vec<Complete>>>,
}

impl Ledger {
    /// Returns once at least `bodies` bodies are running: the moment to strike.
    async fn bodies_running(&self, bodies: usize) {
        // A bound for liveness only: 64 callers of 20 ms bodies get there in milliseconds.
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.running.load(Ordering::SeqCst) < bodies {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the load runs bodies");
    }

    fn executed(&self, key: u64, execution: Execution) {
        self.executions
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push(execution);
    }

    fn answered(&self, key: u64, value: String) {
        self.answers.lock().unwrap().push((key, value));
    }

    fn completed(&self, key: &StorageKey, complete: Complete) {
        self.completes
            .lock()
            .unwrap()
            .entry(*key)
            .or_default()
            .push(complete);
    }

    fn executed_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self.executions.lock().unwrap().keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// No key ran twice, and every answer is its key's one execution's value.
    fn check(&self) {
        let executions = self.executions.lock().unwrap();
        let twice: Vec<_> = executions.iter().filter(|(_, v)| v.len() > 1).collect();
        assert!(twice.is_empty(), "keys executed more than once: {twice:?}");
        let answers = self.answers.lock().unwrap();
        for (key, value) in answers.iter() {
            assert_eq!(
                executions
                    .get(key)
                    .and_then(|v| v.first())
                    .map(|e| &e.value),
                Some(value),
                "key {key} answered with a value no execution produced"
            );
        }
    }

    /// The fault landed where bodies run and complete: some bodies were running when it
    /// struck, and each of them was recorded; some `complete`s
    /// failed on the fault (none before it), and every key whose `complete` failed had a later
    /// one that was applied (or fenced, when the failed one had been applied after all and
    /// only its answer was lost). Returns the keys that were running when the fault struck.
    fn check_fault_landed(&self, faults: &[Window]) -> Vec<u64> {
        let first = faults.first().expect("a fault struck").start;
        // Each key whose body was running when a fault struck, with the end of that fault.
        let running: Vec<(u64, Instant)> = {
            let executions = self.executions.lock().unwrap();
            let mut running: Vec<(u64, Instant)> = executions
                .iter()
                .filter_map(|(key, runs)| {
                    let run = runs.first()?;
                    let fault = faults
                        .iter()
                        .find(|fault| run.started < fault.start && run.ended > fault.start)?;
                    Some((*key, fault.end))
                })
                .collect();
            running.sort_unstable();
            running
        };
        assert!(
            !running.is_empty(),
            "no body was running when the fault struck"
        );
        let completes = self.completes.lock().unwrap();
        let mut recorded_after = 0;
        for (key, fault_ended) in &running {
            let attempts = completes
                .get(&storage_key(*key))
                .cloned()
                .unwrap_or_default();
            let recorded = attempts.iter().rfind(|attempt| attempt.result.is_ok());
            let recorded = recorded.unwrap_or_else(|| {
                panic!("key {key} was running when the fault struck and was never recorded: {attempts:?}")
            });
            // Through the fault: recorded after it was over, or by a `complete` sent again
            // after one that failed on it (the window's end is taken when the restart call
            // returns, which a retried `complete` can beat on a loaded machine).
            let failed_first = attempts
                .iter()
                .position(Complete::unavailable)
                .is_some_and(|failed| attempts[failed + 1..].iter().any(|a| a.result.is_ok()));
            if recorded.answered > *fault_ended || failed_first {
                recorded_after += 1;
            }
        }
        // Not required to be more than 0: on a loaded machine the bodies running at the
        // fault's start may all finish before the server is actually gone. That `complete`s
        // met the fault, and were sent again, is required below.
        let mut failed = 0;
        for (key, attempts) in completes.iter() {
            let Some(last_failure) = attempts.iter().rposition(Complete::unavailable) else {
                continue;
            };
            failed += 1;
            for attempt in attempts.iter().filter(|attempt| attempt.unavailable()) {
                assert!(
                    attempt.answered >= first,
                    "key {key:?}: a complete failed before the fault: {attempts:?}"
                );
            }
            assert!(
                attempts[last_failure + 1..]
                    .iter()
                    .any(|attempt| attempt.result.is_ok()),
                "key {key:?}: a complete that met the fault was not sent again until it was \
                 applied: {attempts:?}"
            );
        }
        assert!(failed > 0, "no complete met the fault");
        eprintln!(
            "{} keys ran; {} were running when the fault struck, {recorded_after} of them \
             recorded through it; the complete of {failed} keys met it",
            self.executions.lock().unwrap().len(),
            running.len()
        );
        running.into_iter().map(|(key, _)| key).collect()
    }

    /// The keys that were running when the fault struck ran once, and every call of them,
    /// the one that ran the body and those that replayed it, got that run's value.
    fn check_running(&self, running: &[u64]) {
        let executions = self.executions.lock().unwrap();
        let answers = self.answers.lock().unwrap();
        for key in running {
            let runs = &executions[key];
            assert_eq!(runs.len(), 1, "key {key} ran {} times", runs.len());
            let answered: Vec<&String> = answers
                .iter()
                .filter(|(answered, _)| answered == key)
                .map(|(_, value)| value)
                .collect();
            assert!(
                answered.len() >= 2,
                "key {key}: its running call and the replay after the run both answered: \
                 {answered:?}"
            );
            assert!(
                answered.iter().all(|value| **value == runs[0].value),
                "key {key}: answers {answered:?}, one run {:?}",
                runs[0].value
            );
        }
    }
}

/// The storage key of load key `key`.
fn storage_key(key: u64) -> StorageKey {
    Call::new("faults::call", Fingerprint::of(&key).unwrap())
        .key(&format!("k{key}"))
        .storage_key()
        .unwrap()
}

/// Hooks that note every `complete` sent through them, and what it met, in the ledger.
#[derive(Debug)]
struct Witness {
    ledger: Arc<Ledger>,
}

impl Hooks for Witness {
    fn complete<'a>(
        &'a self,
        inner: &'a dyn Store,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let write = inner.complete(key, fence, output, ttl).await;
            let answered = Instant::now();
            let result = match &write {
                Ok(write) => Ok(*write),
                Err(error) => Err(format!("{error:?}")),
            };
            self.ledger.completed(key, Complete { answered, result });
            write
        })
    }
}

fn engine(store: Arc<dyn Store>, ledger: &Arc<Ledger>) -> Idempotency {
    let witness = Forwarding::new(
        store,
        Witness {
            ledger: Arc::clone(ledger),
        },
    );
    Idempotency::new(Arc::new(witness)).with_options(
        Options::new()
            .with_lease(LEASE)
            .with_on_conflict(OnConflict::Wait {
                timeout: Duration::from_secs(2),
            }),
    )
}

/// One call of key `key`; its body records its execution in the ledger.
async fn call(
    engine: &Idempotency,
    ledger: &Arc<Ledger>,
    key: u64,
    caller: usize,
) -> Result<Outcome<String>, Error> {
    let name = format!("k{key}");
    let call = Call::new("faults::call", Fingerprint::of(&key).unwrap()).key(&name);
    let ledger_in_body = Arc::clone(ledger);
    let outcome = engine
        .run(call, async move {
            let started = Instant::now();
            ledger_in_body.running.fetch_add(1, Ordering::SeqCst);
            let value = format!("key {key} by caller {caller}");
            tokio::time::sleep(BODY).await;
            ledger_in_body.running.fetch_sub(1, Ordering::SeqCst);
            ledger_in_body.executed(
                key,
                Execution {
                    value: value.clone(),
                    started,
                    ended: Instant::now(),
                },
            );
            Ok::<_, Error>(value)
        })
        .await?;
    ledger.answered(key, outcome.value().clone());
    Ok(outcome)
}

/// 64 callers until `stop`, each calling keys nobody called before (`first_key` and up), so
/// that bodies run and complete all through the run. A call may only fail with a store error
/// (a claim that met the fault).
async fn load(engine: Idempotency, ledger: Arc<Ledger>, first_key: u64, stop: Arc<AtomicBool>) {
    let callers: Vec<_> = (0..64)
        .map(|caller| {
            let (engine, ledger, stop) = (engine.clone(), Arc::clone(&ledger), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut key = first_key + caller as u64;
                while !stop.load(Ordering::SeqCst) {
                    match call(&engine, &ledger, key, caller).await {
                        Ok(_) => {}
                        // Not a busy loop while the server is down.
                        Err(Error::Store(_)) => tokio::time::sleep(BODY / 4).await,
                        Err(other) => panic!("key {key}: an unexpected error: {other}"),
                    }
                    key += 64;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("a caller panicked");
    }
}

/// Once every caller has returned, every key that ran replays its one value at once: its
/// result was recorded, and nothing runs it again. Then the ledger is checked.
async fn settle(engine: &Idempotency, ledger: &Arc<Ledger>) {
    let keys = ledger.executed_keys();
    let replayers: Vec<_> = keys
        .chunks(keys.len().div_ceil(16).max(1))
        .map(|chunk| {
            let (engine, ledger, chunk) = (engine.clone(), Arc::clone(ledger), chunk.to_vec());
            tokio::spawn(async move {
                for key in chunk {
                    replays(&engine, &ledger, key).await;
                }
            })
        })
        .collect();
    for replayer in replayers {
        replayer.await.expect("a replay went wrong");
    }
    ledger.check();
}

async fn replays(engine: &Idempotency, ledger: &Arc<Ledger>, key: u64) {
    // A bound for liveness only: the store may still be coming back from the fault.
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match call(engine, ledger, key, usize::MAX).await {
                Ok(outcome) => return outcome,
                Err(Error::Store(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(other) => panic!(
                    "key {key} ran, its caller returned, yet it cannot be replayed (its result \
                     was not recorded): {other}"
                ),
            }
        }
    })
    .await
    .expect("the store serves calls again");
    assert!(
        outcome.is_replayed(),
        "key {key} ran again: its recorded result was lost ({outcome:?})"
    );
}

/// Runs `fault` against a loaded store, checks that it landed on running bodies and their
/// `complete`s, and that every key ran at most once and replays its value.
async fn under_load(store: Arc<dyn Store>, fault: impl AsyncFnOnce() -> Vec<Window>) {
    let ledger = Arc::new(Ledger::default());
    let engine = engine(store, &ledger);
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(
        engine.clone(),
        Arc::clone(&ledger),
        0,
        Arc::clone(&stop),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    ledger.bodies_running(4).await;
    let faults = fault().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    running.await.unwrap();
    let running = ledger.check_fault_landed(&faults);
    settle(&engine, &ledger).await;
    ledger.check_running(&running);
}

/// Records completed before a restart are all still there after it, and so are those of the
/// calls whose bodies were running when the server went away.
async fn survives_restart(store: Arc<dyn Store>, restart: impl AsyncFnOnce() -> Window) {
    let ledger = Arc::new(Ledger::default());
    let engine = engine(store, &ledger);
    for key in 0..50 {
        call(&engine, &ledger, key, 0).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(
        engine.clone(),
        Arc::clone(&ledger),
        1000,
        Arc::clone(&stop),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    ledger.bodies_running(4).await;
    let fault = restart().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    running.await.unwrap();
    let running = ledger.check_fault_landed(&[fault]);
    // Replayed, not run again: keys 0..50 among them.
    settle(&engine, &ledger).await;
    ledger.check_running(&running);
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use idempotent_test_support::{RedisOptions, RedisServer};

    fn store(server: &RedisServer) -> Arc<dyn Store> {
        crate::support::redis_store(&server.url())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_mid_run_loses_no_completed_record() {
        let mut server = RedisServer::start_with(RedisOptions {
            appendonly: true,
            ..RedisOptions::default()
        });
        let store = store(&server);
        survives_restart(store, async || {
            let start = Instant::now();
            server.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart();
            Window::since(start)
        })
        .await;
    }

    /// A server with its append-only file synced to disk as `appendfsync` says.
    fn aof_server(appendfsync: &str) -> RedisServer {
        RedisServer::start_with(RedisOptions {
            appendonly: true,
            extra_args: vec!["--appendfsync".into(), appendfsync.into()],
        })
    }

    /// SIGKILL mid-run, not `SHUTDOWN` (which flushes the append-only file): a crash.
    async fn crash_and_restart(server: &mut RedisServer) -> Window {
        let start = Instant::now();
        server.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart();
        Window::since(start)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_mid_run_loses_no_completed_record_with_appendfsync_always() {
        let mut server = aof_server("always");
        let store = store(&server);
        survives_restart(store, async || crash_and_restart(&mut server).await).await;
    }

    /// `everysec` defers the fsync, not the write: Redis writes the append-only file before it
    /// answers, so what it acknowledged is in the operating system's cache, which a crash of
    /// the process does not lose (a crash of the machine does: up to about a second).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_mid_run_loses_no_completed_record_with_appendfsync_everysec() {
        let mut server = aof_server("everysec");
        let store = store(&server);
        survives_restart(store, async || crash_and_restart(&mut server).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_killed_under_load_run_no_key_twice() {
        let server = RedisServer::start();
        let store = store(&server);
        under_load(store, async || {
            let mut kills = Vec::new();
            for _ in 0..10 {
                let start = Instant::now();
                server.command(&["CLIENT", "KILL", "TYPE", "normal"]);
                kills.push(Window::since(start));
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            kills
        })
        .await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idempotent_core::stores::postgres::PostgresStore;
    use idempotent_test_support::{PostgresOptions, PostgresServer};

    async fn store(url: &str) -> Arc<dyn Store> {
        Arc::new(
            PostgresStore::builder(url)
                .max_connections(8)
                .timeout(Duration::from_secs(1))
                .build()
                .await
                .unwrap(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_mid_run_loses_no_completed_record() {
        let mut server = PostgresServer::start();
        let store = store(&server.url()).await;
        survives_restart(store, async || {
            let start = Instant::now();
            server.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart();
            Window::since(start)
        })
        .await;
    }

    /// A crash, not a shutdown: every process of the server is killed (SIGKILL) mid-run, with
    /// `fsync=on` as in production, and the restart recovers from the WAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_mid_run_loses_no_completed_record() {
        let mut server = PostgresServer::start_with(PostgresOptions {
            fsync: true,
            ..PostgresOptions::default()
        });
        let store = store(&server.url()).await;
        survives_restart(store, async || {
            let start = Instant::now();
            server.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart();
            Window::since(start)
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backends_terminated_under_load_run_no_key_twice() {
        let server = idempotent_test_support::shared_postgres();
        let url = server.create_unique_database("faults");
        let database = idempotent_test_support::database_of(&url).to_string();
        let store = store(&url).await;
        under_load(store, async || {
            let mut terminations = Vec::new();
            for _ in 0..10 {
                let start = Instant::now();
                server.psql(&format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = '{database}' AND pid <> pg_backend_pid()"
                ));
                terminations.push(Window::since(start));
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            terminations
        })
        .await;
    }
}
