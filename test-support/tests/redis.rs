//! `RedisServer` against a real `redis-server`.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use idempotent_test_support::{RedisOptions, RedisServer, shared_redis};

fn refuses_connections(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_err()
}

#[test]
fn starts_and_answers_ping() {
    let mut server = RedisServer::start();
    assert!(server.is_running());
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );
    assert_eq!(server.command(&["PING"]), "PONG");
    // Listens on 127.0.0.1 only.
    assert_eq!(
        server.command(&["CONFIG", "GET", "bind"]),
        "bind\n127.0.0.1"
    );
    // No RDB snapshots, no AOF by default.
    assert_eq!(server.command(&["CONFIG", "GET", "save"]), "save\n");
    assert_eq!(
        server.command(&["CONFIG", "GET", "appendonly"]),
        "appendonly\nno"
    );
}

#[test]
fn set_get_round_trip() {
    let server = RedisServer::start();
    assert_eq!(
        server.command(&["SET", "key", "a value with spaces\r\nand a newline"]),
        "OK"
    );
    assert_eq!(
        server.command(&["GET", "key"]),
        "a value with spaces\r\nand a newline"
    );
    assert_eq!(server.command(&["GET", "missing"]), "(nil)");
    assert_eq!(server.command(&["INCR", "counter"]), "1");
    assert_eq!(server.command(&["RPUSH", "list", "a", "b"]), "2");
    assert_eq!(server.command(&["LRANGE", "list", "0", "-1"]), "a\nb");
}

#[test]
fn error_replies_are_errors() {
    let server = RedisServer::start();
    server.command(&["SET", "key", "text"]);
    let error = server.try_command(&["INCR", "key"]).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::Other);
    assert!(
        error.to_string().starts_with("ERR value is not an integer"),
        "{error}"
    );
    let panic = std::panic::catch_unwind(|| server.command(&["LPUSH", "key", "x"])).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("WRONGTYPE"), "{message}");
}

#[test]
fn command_stats_counts_calls_since_reset() {
    let server = RedisServer::start();
    server.command(&["SET", "key", "value"]);
    server.command(&["GET", "key"]);
    server.reset_stats();
    for _ in 0..7 {
        server.command(&["GET", "key"]);
    }
    server.command(&["EXISTS", "key"]);
    let stats = server.command_stats();
    assert_eq!(stats.get("get"), Some(&7), "{stats:?}");
    assert_eq!(stats.get("exists"), Some(&1), "{stats:?}");
    assert_eq!(stats.get("set"), None, "{stats:?}");
    // Script calls are counted under their lowercase names too.
    server.command(&["EVAL", "return 1", "0"]);
    let sha = server.command(&["SCRIPT", "LOAD", "return 2"]);
    server.command(&["EVALSHA", &sha, "0"]);
    server.command(&["EVALSHA", &sha, "0"]);
    let stats = server.command_stats();
    assert_eq!(stats.get("eval"), Some(&1), "{stats:?}");
    assert_eq!(stats.get("evalsha"), Some(&2), "{stats:?}");
    assert_eq!(stats.get("script|load"), Some(&1), "{stats:?}");
}

#[test]
fn stop_then_the_port_refuses_connections() {
    let mut server = RedisServer::start();
    let port = server.port();
    server.stop();
    assert!(!server.is_running());
    assert!(refuses_connections(port));
    let error = server.try_command(&["PING"]).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    server.stop(); // idempotent
    server.kill(); // so is this, once stopped
}

#[test]
fn restart_uses_the_same_port_and_keeps_aof_data() {
    let mut server = RedisServer::start_with(RedisOptions {
        appendonly: true,
        ..Default::default()
    });
    let port = server.port();
    server.command(&["SET", "survives", "yes"]);
    server.stop();
    assert!(refuses_connections(port));
    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(server.command(&["GET", "survives"]), "yes");
    // A restart of a running server stops it first.
    server.command(&["SET", "again", "yes"]);
    server.restart();
    assert_eq!(server.command(&["GET", "again"]), "yes");
}

#[test]
fn without_aof_a_restart_loses_the_data() {
    let mut server = RedisServer::start();
    server.command(&["SET", "gone", "soon"]);
    server.restart();
    assert_eq!(server.command(&["GET", "gone"]), "(nil)");
}

#[test]
fn kill_crashes_the_server_and_aof_keeps_acknowledged_writes() {
    let mut server = RedisServer::start_with(RedisOptions {
        appendonly: true,
        ..Default::default()
    });
    let port = server.port();
    let pid = server.pid().unwrap();
    server.command(&["SET", "acknowledged", "yes"]);
    server.kill();
    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    assert!(refuses_connections(port));
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty(),
        "the killed redis-server is still there: {state}"
    );
    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.command(&["GET", "acknowledged"]), "yes");
}

#[test]
fn extra_args_are_passed_on() {
    let server = RedisServer::start_with(RedisOptions {
        appendonly: false,
        extra_args: vec![
            "--maxmemory".into(),
            "12mb".into(),
            "--databases".into(),
            "4".into(),
        ],
    });
    assert_eq!(
        server.command(&["CONFIG", "GET", "maxmemory"]),
        "maxmemory\n12582912"
    );
    assert_eq!(
        server.command(&["CONFIG", "GET", "databases"]),
        "databases\n4"
    );
}

#[test]
fn two_servers_are_independent() {
    let first = RedisServer::start();
    let second = RedisServer::start();
    assert_ne!(first.port(), second.port());
    assert_ne!(first.dir(), second.dir());
    first.command(&["SET", "where", "first"]);
    assert_eq!(second.command(&["GET", "where"]), "(nil)");
}

#[test]
fn drop_stops_the_server_and_removes_its_folder() {
    let server = RedisServer::start_with(RedisOptions {
        appendonly: true,
        ..Default::default()
    });
    let port = server.port();
    let dir = server.dir().to_owned();
    assert!(dir.join("redis.log").is_file());
    drop(server);
    assert!(refuses_connections(port));
    assert!(!dir.exists(), "{} is still there", dir.display());
}

#[test]
fn the_shared_server_is_one_server() {
    let server = shared_redis();
    assert!(std::ptr::eq(server, shared_redis()));
    server.command(&["SET", "the_shared_server_is_one_server", "1"]);
    assert_eq!(
        shared_redis().command(&["GET", "the_shared_server_is_one_server"]),
        "1"
    );
}

#[test]
fn stop_works_without_the_shutdown_command() {
    let mut server = RedisServer::start_with(RedisOptions {
        appendonly: true,
        extra_args: vec!["--rename-command".into(), "SHUTDOWN".into(), String::new()],
    });
    server.command(&["SET", "flushed", "on SIGTERM"]);
    assert!(server.try_command(&["SHUTDOWN"]).is_err());
    server.stop();
    assert!(!server.is_running());
    server.restart();
    assert_eq!(server.command(&["GET", "flushed"]), "on SIGTERM");
}

#[test]
fn a_server_that_cannot_start_panics_with_its_log() {
    let panic = std::panic::catch_unwind(|| {
        RedisServer::start_with(RedisOptions {
            appendonly: false,
            extra_args: vec!["--no-such-directive".into(), "yes".into()],
        })
    })
    .unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("exited"), "{message}");
    assert!(message.contains("no-such-directive"), "{message}");
}

#[test]
fn restart_reports_a_port_taken_meanwhile() {
    let mut server = RedisServer::start();
    server.stop();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", server.port())).unwrap();
    let panic =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.restart())).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("was taken while it was stopped"),
        "{message}"
    );
    assert!(!server.is_running());
}
