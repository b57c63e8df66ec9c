//! Exactly once across processes: OS processes calling one `#[idempotent]` function against a
//! real shared store, with a ledger kept outside the store under test; and crash recovery
//! after a holder is killed with SIGKILL mid-body.
//!
//! The parent tests start the server and re-run this test binary as child processes
//! (`fleet_child`, ignored in normal runs), which do the calling.

mod child;
mod ledger;
mod stores;
#[path = "../support/mod.rs"]
mod support;

#[cfg(feature = "redis")]
mod redis {
    use super::*;

    #[test]
    fn four_processes_execute_each_key_exactly_once() {
        let server = idempotent_test_support::RedisServer::start();
        exactly_once_across_processes(stores::Kind::Redis, &server.url());
    }

    #[test]
    fn a_holder_killed_mid_body_is_taken_over_once_after_its_lease() {
        let server = idempotent_test_support::RedisServer::start();
        crash_recovery(stores::Kind::Redis, &server.url());
    }
}

#[cfg(feature = "redis")]
mod redis_cluster {
    use super::*;

    #[test]
    fn four_processes_execute_each_key_exactly_once() {
        let cluster = idempotent_test_support::RedisCluster::start();
        exactly_once_across_processes(stores::Kind::RedisCluster, &cluster.urls().join(","));
    }

    #[test]
    fn a_holder_killed_mid_body_is_taken_over_once_after_its_lease() {
        let cluster = idempotent_test_support::RedisCluster::start();
        crash_recovery(stores::Kind::RedisCluster, &cluster.urls().join(","));
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    fn database() -> String {
        idempotent_test_support::shared_postgres().create_unique_database("fleet")
    }

    #[test]
    fn four_processes_execute_each_key_exactly_once() {
        exactly_once_across_processes(stores::Kind::Postgres, &database());
    }

    #[test]
    fn a_holder_killed_mid_body_is_taken_over_once_after_its_lease() {
        crash_recovery(stores::Kind::Postgres, &database());
    }
}

#[cfg(feature = "sqlx-postgres")]
mod sqlx_postgres {
    use super::*;

    fn database() -> String {
        idempotent_test_support::shared_postgres().create_unique_database("fleet_sqlx")
    }

    #[test]
    fn four_processes_execute_each_key_exactly_once() {
        exactly_once_across_processes(stores::Kind::SqlxPostgres, &database());
    }

    #[test]
    fn a_holder_killed_mid_body_is_taken_over_once_after_its_lease() {
        crash_recovery(stores::Kind::SqlxPostgres, &database());
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;

    /// The "url" of a SQLite store is its database file, in a folder of its own.
    fn database() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("idempotent.sqlite3");
        let path = path.to_str().expect("a UTF-8 path").to_string();
        (dir, path)
    }

    #[test]
    fn four_processes_execute_each_key_exactly_once() {
        let (_dir, path) = database();
        exactly_once_across_processes(stores::Kind::Sqlite, &path);
    }

    #[test]
    fn a_holder_killed_mid_body_is_taken_over_once_after_its_lease() {
        let (_dir, path) = database();
        crash_recovery(stores::Kind::Sqlite, &path);
    }
}

#[cfg(feature = "sqlx-sqlite")]
mod sqlx_sqlite {
    use super::*;

    /// The "url" of a SQLite store is its database file, in a folder of its own.
    fn database() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("idempotent.sqlite3");
        let path = path.to_str().expect("a UTF-8 path").to_string();
        (dir, path)
    }

    #[test]
    fn four_processes_execute_each_key_exactly_once() {
        let (_dir, path) = database();
        exactly_once_across_processes(stores::Kind::SqlxSqlite, &path);
    }

    #[test]
    fn a_holder_killed_mid_body_is_taken_over_once_after_its_lease() {
        let (_dir, path) = database();
        crash_recovery(stores::Kind::SqlxSqlite, &path);
    }
}

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Processes, tasks per process and keys of the exactly-once test.
pub const PROCESSES: usize = 4;
pub const TASKS: usize = 32;
pub const KEYS: u32 = 200;

/// A child process that is killed when dropped: a failing assertion in the parent must not
/// leave a child running (it would hold the test runner's output open, and its claim).
struct ChildProcess(Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn_child(role: &str, kind: stores::Kind, url: &str, dir: &Path, id: usize) -> ChildProcess {
    let child = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([
            "--exact",
            "fleet_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FLEET_ROLE", role)
        .env("FLEET_STORE", kind.name())
        .env("FLEET_URL", url)
        .env("FLEET_DIR", dir)
        .env("FLEET_ID", id.to_string())
        // The children's own test-runner output would read as more tests of this run.
        .stdout(std::fs::File::create(dir.join(format!("{role}-{id}.out"))).expect("a log file"))
        .spawn()
        .expect("spawn a child process");
    ChildProcess(child)
}

fn wait_for(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("a child process ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exactly_once_across_processes(kind: stores::Kind, url: &str) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut children: Vec<ChildProcess> = (0..PROCESSES)
        .map(|id| spawn_child("caller", kind, url, dir.path(), id))
        .collect();
    for child in &mut children {
        let status = wait_for(&mut child.0, Duration::from_secs(300));
        assert!(status.success(), "a caller process failed: {status}");
    }
    let ledger = ledger::Ledger::read(dir.path());
    ledger.assert_exactly_once(KEYS, PROCESSES * TASKS);
}

fn crash_recovery(kind: stores::Kind, url: &str) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut holder = spawn_child("crash", kind, url, dir.path(), 0);
    let started = dir.path().join("started");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(
            Instant::now() < deadline,
            "the holder never started its body"
        );
        assert!(
            holder.0.try_wait().unwrap().is_none(),
            "the holder exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let old_fence = runtime.block_on(stores::current_fence(kind, url, child::CRASH_KEY));
    holder.0.kill().expect("SIGKILL the holder");
    holder.0.wait().unwrap();
    runtime.block_on(child::take_over_after_crash(
        kind,
        url,
        dir.path(),
        old_fence,
    ));
}

/// Entry point of the child processes; does nothing unless started by a parent test.
#[test]
#[ignore = "entry point of the child processes the fleet tests spawn"]
fn fleet_child() {
    child::main();
}
