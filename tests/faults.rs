//! What the stores survive, on real servers: a restart in the middle of a run, and connections
//! killed from the server's side under load. Every call returns its key's one recorded value
//! or a typed error; no key runs twice; no completed record is lost.
#![cfg(any(feature = "redis", feature = "postgres"))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_core::{Call, Error, Fingerprint, Idempotency, OnConflict, Options, Store};

/// Every execution of every key, and what each call got.
#[derive(Default)]
struct Ledger {
    executions: Mutex<HashMap<u32, Vec<String>>>,
    answers: Mutex<Vec<(u32, String)>>,
}

impl Ledger {
    fn executed(&self, key: u32, value: &str) {
        self.executions
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push(value.to_string());
    }

    fn answered(&self, key: u32, value: String) {
        self.answers.lock().unwrap().push((key, value));
    }

    /// No key ran twice, and every answer is its key's one execution's value.
    fn check(&self) {
        let executions = self.executions.lock().unwrap();
        let twice: Vec<_> = executions.iter().filter(|(_, v)| v.len() > 1).collect();
        assert!(twice.is_empty(), "keys executed more than once: {twice:?}");
        let answers = self.answers.lock().unwrap();
        for (key, value) in answers.iter() {
            assert_eq!(
                executions.get(key).and_then(|v| v.first()),
                Some(value),
                "key {key} answered with a value no execution produced"
            );
        }
    }
}

fn engine(store: Arc<dyn Store>) -> Idempotency {
    Idempotency::new(store).with_options(
        Options::new()
            // Long enough that a holder outlives a restart: its complete is tried again for
            // half a lease, and a lease that ran out would let another caller run the key.
            .lease(Duration::from_secs(5))
            .on_conflict(OnConflict::Wait {
                timeout: Duration::from_secs(2),
            }),
    )
}

/// One call of key `key`; its body records its execution in the ledger.
async fn call(
    engine: &Idempotency,
    ledger: &Arc<Ledger>,
    key: u32,
    caller: usize,
) -> Result<String, Error> {
    let name = format!("k{key}");
    let call = Call::new("faults::call", Fingerprint::of(&key).unwrap()).key(&name);
    let ledger_in_body = Arc::clone(ledger);
    let outcome = engine
        .run(call, async move {
            let value = format!("key {key} by caller {caller}");
            ledger_in_body.executed(key, &value);
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok::<_, Error>(value)
        })
        .await?;
    let value = outcome.into_value();
    ledger.answered(key, value.clone());
    Ok(value)
}

/// 64 tasks calling keys 0..keys until `stop`, each error checked to be a typed store-side
/// one; returns how many calls failed.
async fn load(engine: Idempotency, ledger: Arc<Ledger>, keys: u32, stop: Arc<AtomicBool>) -> usize {
    let tasks: Vec<_> = (0..64)
        .map(|caller| {
            let (engine, ledger, stop) = (engine.clone(), Arc::clone(&ledger), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut failures = 0;
                let mut key = caller as u32 % keys;
                while !stop.load(Ordering::SeqCst) {
                    match call(&engine, &ledger, key, caller).await {
                        Ok(_) => {}
                        Err(Error::Store(_) | Error::Conflict { .. }) => failures += 1,
                        Err(other) => panic!("key {key}: an unexpected error: {other}"),
                    }
                    key = (key + 7) % keys;
                    tokio::task::yield_now().await;
                }
                failures
            })
        })
        .collect();
    let mut failures = 0;
    for task in tasks {
        failures += task.await.expect("a caller panicked");
    }
    failures
}

/// Every key eventually completes, once, and the answers agree.
async fn settle(engine: &Idempotency, ledger: &Arc<Ledger>, keys: u32) {
    for key in 0..keys {
        let value = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match call(engine, ledger, key, usize::MAX).await {
                    Ok(value) => return value,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("the store serves calls again");
        assert!(value.starts_with(&format!("key {key} ")));
    }
    ledger.check();
}

/// Runs `fault` against a loaded store, then checks the ledger.
async fn under_load(store: Arc<dyn Store>, fault: impl AsyncFnOnce()) -> usize {
    let engine = engine(store);
    let ledger = Arc::new(Ledger::default());
    let keys = 200;
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(
        engine.clone(),
        Arc::clone(&ledger),
        keys,
        Arc::clone(&stop),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    fault().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let failures = running.await.unwrap();
    settle(&engine, &ledger, keys).await;
    failures
}

/// Records completed before a restart are all still there after it.
async fn survives_restart(store: Arc<dyn Store>, restart: impl AsyncFnOnce()) {
    let engine = engine(store);
    let ledger = Arc::new(Ledger::default());
    for key in 1000..1050 {
        call(&engine, &ledger, key, 0).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(
        engine.clone(),
        Arc::clone(&ledger),
        100,
        Arc::clone(&stop),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    restart().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let failures = running.await.unwrap();
    assert!(failures > 0, "the restart was felt by in-flight calls");
    settle(&engine, &ledger, 100).await;
    // Replayed, not run again: the ledger would show a second execution.
    for key in 1000..1050 {
        call(&engine, &ledger, key, 1).await.unwrap();
    }
    ledger.check();
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use idempotent_core::stores::redis::RedisStore;
    use idempotent_test_support::{RedisOptions, RedisServer};

    fn store(server: &RedisServer) -> Arc<dyn Store> {
        Arc::new(RedisStore::builder(server.url()).build().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_mid_run_loses_no_completed_record() {
        let mut server = RedisServer::start_with(RedisOptions {
            appendonly: true,
            ..RedisOptions::default()
        });
        let store = store(&server);
        survives_restart(store, async || {
            server.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart();
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
    async fn crash_and_restart(server: &mut RedisServer) {
        server.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart();
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
        let failures = under_load(store, async || {
            for _ in 0..10 {
                server.command(&["CLIENT", "KILL", "TYPE", "normal"]);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
        .await;
        assert!(failures > 0, "the kills were felt by some calls");
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
            server.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart();
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
            server.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.restart();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backends_terminated_under_load_run_no_key_twice() {
        let server = idempotent_test_support::shared_postgres();
        let url = server.create_unique_database("faults");
        let database = idempotent_test_support::database_of(&url).to_string();
        let store = store(&url).await;
        let failures = under_load(store, async || {
            for _ in 0..10 {
                server.psql(&format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = '{database}' AND pid <> pg_backend_pid()"
                ));
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
        .await;
        assert!(failures > 0, "the terminations were felt by some calls");
    }
}
