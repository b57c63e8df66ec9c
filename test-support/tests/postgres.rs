//! `PostgresServer` against a real PostgreSQL 15.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use idempotent_test_support::{DEFAULT_PG_BINDIR, PG_BINDIR_ENV, PostgresServer, shared_postgres};

fn refuses_connections(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_err()
}

/// `psql` with a connection string, over TCP, as this process' user: what a client under test
/// does with the URL.
fn psql_over_tcp(connection: &str, sql: &str) -> String {
    let bindir = std::env::var_os(PG_BINDIR_ENV)
        .map_or_else(|| PathBuf::from(DEFAULT_PG_BINDIR), PathBuf::from);
    let output = Command::new(bindir.join("psql"))
        .args(["-X", "-A", "-t", "-c", sql, connection])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .trim_end()
        .to_owned()
}

#[test]
fn starts_and_answers_sql() {
    let server = PostgresServer::start();
    assert_eq!(server.psql("select 1"), "1");
    assert_eq!(server.psql("select 1, 'a'; select 2, 'b'"), "1|a\n2|b");
    assert_eq!(server.psql("show server_version_num").get(..2), Some("15"));
    assert_eq!(server.psql("show listen_addresses"), "127.0.0.1");
    assert_eq!(server.psql("show fsync"), "off");
    assert_eq!(server.psql("show synchronous_commit"), "on");
    assert_eq!(server.psql("show max_connections"), "100");
    assert_eq!(
        server.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", server.port())
    );
    assert_eq!(
        server.config_string(),
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            server.port()
        )
    );
    assert_eq!(
        psql_over_tcp(&server.url(), "select current_user"),
        "postgres"
    );
    assert_eq!(
        psql_over_tcp(&server.config_string(), "select current_database()"),
        "postgres"
    );
}

#[test]
fn psql_failures_panic_with_the_error() {
    let server = PostgresServer::start();
    let panic =
        std::panic::catch_unwind(|| server.psql("select * from no_such_table")).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains(r#"relation "no_such_table" does not exist"#),
        "{message}"
    );
}

#[test]
fn create_database_gives_an_isolated_database() {
    let server = PostgresServer::start();
    let url = server.create_database("orders");
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/orders", server.port())
    );
    assert_eq!(psql_over_tcp(&url, "select current_database()"), "orders");
    server.psql_in("orders", "create table t (a int); insert into t values (7)");
    assert_eq!(server.psql_in("orders", "select a from t"), "7");
    assert_eq!(
        server.psql("select count(*) from pg_tables where tablename = 't'"),
        "0"
    );

    let first = server.create_unique_database("unique");
    let second = server.create_unique_database("unique");
    assert_ne!(first, second);
    let name = first.rsplit('/').next().unwrap();
    assert_eq!(psql_over_tcp(&first, "select current_database()"), name);
}

#[test]
fn stop_and_restart_keep_the_rows() {
    let mut server = PostgresServer::start();
    let port = server.port();
    server.psql("create table kept (id int primary key, note text)");
    server.psql("insert into kept select n, 'row ' || n from generate_series(1, 100) n");
    server.stop();
    assert!(!server.is_running());
    assert!(refuses_connections(port));
    server.stop(); // idempotent
    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(
        server.psql("select count(*), max(note) from kept"),
        "100|row 99"
    );
    // A restart of a running server stops it first.
    server.psql("insert into kept values (101, 'after')");
    server.restart();
    assert_eq!(server.psql("select note from kept where id = 101"), "after");
}

#[test]
fn kill_crashes_the_server_and_restart_recovers() {
    let mut server = PostgresServer::start();
    let port = server.port();
    server.psql("create table committed (id int)");
    server.psql("insert into committed select generate_series(1, 10)");
    let postmaster = server.pid().unwrap();
    server.kill();
    assert!(!server.is_running());
    assert!(refuses_connections(port));
    let state = std::fs::read_to_string(format!("/proc/{postmaster}/stat")).unwrap_or_default();
    assert!(
        state.is_empty(),
        "the killed postmaster is still there: {state}"
    );
    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.psql("select count(*) from committed"), "10");
    assert!(
        server.log().contains("database system was interrupted"),
        "{}",
        server.log()
    );
}

#[test]
fn drop_stops_the_server_and_removes_its_folder() {
    let server = PostgresServer::start();
    let port = server.port();
    let dir = server.dir().to_owned();
    assert!(dir.join("data/PG_VERSION").is_file());
    drop(server);
    assert!(refuses_connections(port));
    assert!(!dir.exists(), "{} is still there", dir.display());
}

#[test]
fn two_servers_are_independent() {
    let first = PostgresServer::start();
    let second = PostgresServer::start();
    assert_ne!(first.port(), second.port());
    first.psql("create table only_in_first (a int)");
    assert_eq!(
        second.psql("select count(*) from pg_tables where tablename = 'only_in_first'"),
        "0"
    );
}

#[test]
fn the_shared_server_is_one_server() {
    let server = shared_postgres();
    assert!(std::ptr::eq(server, shared_postgres()));
    let url = server.create_unique_database("shared");
    assert!(url.starts_with(&format!(
        "postgres://postgres@127.0.0.1:{}/shared_",
        server.port()
    )));
}

#[test]
fn kill_then_drop_leaves_no_shared_memory() {
    let mut server = PostgresServer::start();
    let lock = std::fs::read_to_string(server.dir().join("data/postmaster.pid")).unwrap();
    let shmid = lock
        .lines()
        .nth(6)
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap()
        .to_owned();
    let segment_exists = || {
        std::fs::read_to_string("/proc/sysvipc/shm")
            .unwrap()
            .lines()
            .skip(1)
            .any(|line| line.split_whitespace().nth(1) == Some(shmid.as_str()))
    };
    assert!(segment_exists(), "no System V segment {shmid}");
    server.kill();
    assert!(
        segment_exists(),
        "a killed postmaster leaves its segment behind"
    );
    drop(server);
    assert!(!segment_exists(), "segment {shmid} is left after the drop");
}

#[test]
fn restart_reports_a_port_taken_meanwhile() {
    let mut server = PostgresServer::start();
    server.stop();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", server.port())).unwrap();
    let panic =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.restart())).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("was taken while it was stopped"),
        "{message}"
    );
    assert!(message.contains("Address already in use"), "{message}");
    assert!(!server.is_running());
}
