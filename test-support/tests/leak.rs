//! The shared servers live in statics, which are never dropped: their watchdogs must stop them and
//! remove their folders when the test process ends, whether it exits or is killed. These tests run
//! this very test binary again as a child that starts the shared servers, then check that nothing
//! of them is left once the child is gone.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use idempotent_test_support::{RedisServer, shared_postgres, shared_redis};

/// Set in the child: what it does once its servers run (`exit` or `wait`).
const MODE: &str = "IDEMPOTENT_TEST_SUPPORT_LEAK_CHILD";

/// One server the child started, as it reported it.
#[derive(Debug)]
struct Started {
    what: String,
    port: u16,
    pid: u32,
    dir: PathBuf,
}

/// The child's side: starts the shared servers and a server it forgets (never dropped either),
/// reports them on stdout, then returns (the process exits without dropping statics) or waits to
/// be killed.
#[test]
#[ignore = "run by the other tests of this file, in a child process"]
fn leak_child() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let forgotten = RedisServer::start();
    for (what, port, pid, dir) in [
        (
            "shared_postgres",
            shared_postgres().port(),
            shared_postgres().pid(),
            shared_postgres().dir(),
        ),
        (
            "shared_redis",
            shared_redis().port(),
            shared_redis().pid(),
            shared_redis().dir(),
        ),
        (
            "forgotten_redis",
            forgotten.port(),
            forgotten.pid(),
            forgotten.dir(),
        ),
    ] {
        println!("STARTED {what} {port} {} {}", pid.unwrap(), dir.display());
    }
    println!("READY");
    std::mem::forget(forgotten);
    if mode == "wait" {
        thread::sleep(Duration::from_secs(120));
    }
}

fn spawn_child(mode: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "leak_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MODE, mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Kills the child if a test fails before it is done with it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the child's reports up to `READY`, then goes on reading (and ignoring) the rest of its
/// output in a thread, so that the child never writes to a closed pipe; the receiver hears when
/// that output ends.
fn read_reports(child: &mut Child) -> (Vec<Started>, mpsc::Receiver<()>) {
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut started = Vec::new();
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 {
        let line = std::mem::take(&mut line);
        let line = line.trim_end();
        if line.ends_with("READY") {
            let (ended, end) = mpsc::channel();
            thread::spawn(move || {
                let _ = std::io::copy(&mut stdout, &mut std::io::sink());
                let _ = ended.send(());
            });
            return (started, end);
        }
        // libtest may have printed `test leak_child ... ` on the same line.
        if let Some(report) = line.split_once("STARTED ").map(|(_, report)| report) {
            let fields: Vec<&str> = report.splitn(4, ' ').collect();
            started.push(Started {
                what: fields[0].to_owned(),
                port: fields[1].parse().unwrap(),
                pid: fields[2].parse().unwrap(),
                dir: PathBuf::from(fields[3]),
            });
        }
    }
    panic!("the child ended before it reported its servers: {started:?}");
}

fn accepts_connections(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
}

/// Alive and not a zombie (where init does not reap, killed orphans stay zombies).
fn is_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat.rfind(')') {
        Some(end) => !matches!(
            stat[end + 1..].trim_start().chars().next(),
            Some('Z' | 'X') | None
        ),
        None => false,
    }
}

/// Waits up to 10 s until nothing is left of each server: its port refuses connections, its
/// process is gone, its folder is removed.
fn assert_cleaned_up(started: &[Started]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for server in started {
        while (accepts_connections(server.port) || is_alive(server.pid) || server.dir.exists())
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !accepts_connections(server.port),
            "{}: its port still accepts connections: {server:?}",
            server.what
        );
        assert!(
            !is_alive(server.pid),
            "{}: its process is still alive: {server:?}",
            server.what
        );
        assert!(
            !server.dir.exists(),
            "{}: its folder is still there: {server:?}",
            server.what
        );
    }
}

#[test]
fn servers_are_cleaned_up_when_their_process_exits() {
    let mut child = KillOnDrop(spawn_child("exit"));
    let (started, output_end) = read_reports(&mut child.0);
    assert_eq!(started.len(), 3, "{started:?}");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "the child failed: {status}");
    // No server or watchdog inherited the child's stdout: it ends with the child.
    output_end
        .recv_timeout(Duration::from_secs(5))
        .expect("the child's stdout stayed open after it exited");
    assert_cleaned_up(&started);
}

#[test]
fn servers_are_cleaned_up_when_their_process_is_killed() {
    let mut child = KillOnDrop(spawn_child("wait"));
    let (started, _) = read_reports(&mut child.0);
    assert_eq!(started.len(), 3, "{started:?}");
    for server in &started {
        assert!(
            accepts_connections(server.port),
            "{server:?}: not running before the kill"
        );
        assert!(
            is_alive(server.pid),
            "{server:?}: not running before the kill"
        );
        assert!(server.dir.exists(), "{server:?}: no folder before the kill");
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert_cleaned_up(&started);
}
