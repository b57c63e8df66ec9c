//! The `idempotent` command against real stores: a SQLite file, a PostgreSQL server and a Redis
//! server started for the tests. Records are written through the library (some under a scope),
//! then read, counted, purged and forgotten through the binary; its output (text and `--json`,
//! sizes to the byte) and exit codes are checked, and so are the commands it sends: Redis is
//! walked with `SCAN` on a server without `KEYS`, PostgreSQL purged in batches of `--batch`.

use std::sync::Arc;
use std::time::Duration;

use assert_cmd::Command;
use idempotent_core::admin::Admin;
use idempotent_core::stores::postgres::PostgresStore;
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::stores::sqlite::SqliteStore;
use idempotent_core::{
    Call, CanonicalArguments, Claim, Error, Fingerprint, Idempotency, Options, StorageKey, Store,
};
use idempotent_test_support::{PostgresServer, RedisOptions, RedisServer};
use serde_json::Value;

const NAME: &str = "shop::checkout";
/// The tenancy scope of the scoped records.
const SCOPE: &str = "tenant-a";

/// A store to run the command against, and how the command reaches it.
struct Fixture {
    store: Arc<dyn Store>,
    /// `--store-url`.
    url: String,
    /// Redis deletes ended records by itself: nothing is left to purge.
    expires_by_itself: bool,
    /// What a completed record takes in the store beside its output, as `inspect` counts it
    /// (`RecordView::bytes`), given its fence: [`sql_beside_output`] or [`redis_beside_output`].
    beside_output: fn(u64) -> u64,
}

/// A row of the SQL stores beside its output: its key and fingerprint (32 bytes each) and its
/// fence (an 8-byte integer).
fn sql_beside_output(_fence: u64) -> u64 {
    32 + 32 + 8
}

/// A Redis record beside its output: its key (the default prefix `idempotent:` and the storage
/// key's 64 hex digits) and the value's head, `2c<fingerprint: 64 hex digits>|<fence>|`.
fn redis_beside_output(fence: u64) -> u64 {
    let key = "idempotent:".len() + 64;
    let head = 2 + 64 + 1 + fence.to_string().len() + 1;
    (key + head) as u64
}

fn idempotent(fixture: &Fixture) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idempotent"));
    command
        .env_remove("IDEMPOTENT_STORE_URL")
        .args(["--store-url", &fixture.url]);
    command
}

/// Runs the command with `args`, which must succeed, and reads its output as JSON.
fn run_json(fixture: &Fixture, args: &[&str]) -> Value {
    json_of(
        &idempotent(fixture)
            .args(args)
            .assert()
            .success()
            .get_output()
            .stdout,
    )
}

fn json_of(output: &[u8]) -> Value {
    serde_json::from_slice(output)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", String::from_utf8_lossy(output)))
}

/// The value [`record`] returns for `key` and `amount`.
fn receipt(key: &str, amount: u64) -> Value {
    serde_json::json!({ "receipt": key, "amount": amount })
}

/// The bytes a completed record holds for [`receipt`]: the library records an `Ok` value as
/// the compact JSON `{"ok":<value>}` (idempotent-core's `recorded.rs`), and these stores keep
/// those bytes as they are.
fn recorded_output(key: &str, amount: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "ok": receipt(key, amount) })).unwrap()
}

/// Records `key` through the library with the value `amount`, kept for `ttl`.
async fn record(fixture: &Fixture, key: &str, amount: u64, ttl: Duration) {
    record_in(fixture, None, key, amount, ttl).await;
}

/// [`record`] under `scope`, if given (the attribute's `scope = …`).
async fn record_in(fixture: &Fixture, scope: Option<&str>, key: &str, amount: u64, ttl: Duration) {
    let options = Options::new()
        .with_ttl(ttl)
        .with_lease(ttl.min(Duration::from_secs(30)));
    let engine = Idempotency::new(fixture.store.clone()).with_options(options);
    let mut call = Call::new(NAME, Fingerprint::of(&amount).unwrap()).key(key);
    if let Some(scope) = scope {
        call = call.scope(scope);
    }
    let outcome = engine
        .run(call, async { Ok::<_, Error>(receipt(key, amount)) })
        .await
        .unwrap();
    assert!(!outcome.is_replayed(), "{key} was fresh");
}

/// Holds `key` in progress (a claim with an hour's lease, as a running body holds it).
async fn hold(fixture: &Fixture, key: &str) {
    let storage = StorageKey::derive(NAME, None, key.as_bytes()).unwrap();
    let arguments = CanonicalArguments::from(Fingerprint::from_bytes([7; 32]));
    let claim = fixture
        .store
        .claim(&storage, &arguments, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired { .. }), "{key} was free");
}

async fn exercise(fixture: Fixture) {
    for n in 0..3u64 {
        record(
            &fixture,
            &format!("order-{n}"),
            100 + n,
            Duration::from_secs(3600),
        )
        .await;
    }
    hold(&fixture, "order-held").await;

    // inspect, as text and as JSON.
    let text = idempotent(&fixture)
        .args(["inspect", "--name", NAME, "--key", "order-1"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("state:       completed"), "{text}");
    assert!(text.contains("expires in "), "{text}");
    assert!(
        text.contains("\"amount\": 101"),
        "the output, pretty-printed: {text}"
    );
    let json = run_json(
        &fixture,
        &["--json", "inspect", "--name", NAME, "--key", "order-1"],
    );
    assert_eq!(json["state"], "completed");
    assert_eq!(json["expired"], false);
    assert!(json["fence"].as_u64().unwrap() > 0, "{json}");
    let left = json["left_ms"].as_u64().unwrap();
    assert!(
        left > 3_500_000 && left <= 3_600_000,
        "an hour's ttl: {json}"
    );
    assert_eq!(json["output"]["ok"]["amount"], 101, "{json}");
    assert_eq!(
        json["storage_key"],
        StorageKey::derive(NAME, None, b"order-1").unwrap().to_hex()
    );
    // The sizes, exactly: the output as recorded, and the record with its key, fingerprint
    // and fence as this store lays them out; the text prints the same numbers.
    let output_bytes = recorded_output("order-1", 101).len() as u64;
    let bytes = output_bytes + (fixture.beside_output)(json["fence"].as_u64().unwrap());
    assert_eq!(json["output_bytes"], output_bytes, "{json}");
    assert_eq!(json["bytes"], bytes, "{json}");
    assert!(
        text.contains(&format!("\noutput:      {output_bytes} bytes\n")),
        "{output_bytes} bytes of output: {text}"
    );
    assert!(
        text.contains(&format!("\nsize:        {bytes} bytes\n")),
        "{bytes} bytes in all: {text}"
    );

    let held = run_json(
        &fixture,
        &["--json", "inspect", "--name", NAME, "--key", "order-held"],
    );
    assert_eq!(held["state"], "in_progress");
    assert_eq!(held["output"], Value::Null);
    assert!(held["left_ms"].as_u64().unwrap() > 3_500_000, "{held}");

    // A key that was never recorded, and one under another scope, are not found: exit 3.
    idempotent(&fixture)
        .args(["inspect", "--name", NAME, "--key", "order-9"])
        .assert()
        .code(3)
        .stderr_has("no record for key \"order-9\"");
    idempotent(&fixture)
        .args([
            "inspect", "--name", NAME, "--scope", SCOPE, "--key", "order-1",
        ])
        .assert()
        .code(3);

    // stats.
    let stats = run_json(&fixture, &["stats", "--json"]);
    assert_eq!(stats["completed"], 3, "{stats}");
    assert_eq!(stats["in_progress"], 1, "{stats}");
    assert_eq!(stats["expired"], 0, "{stats}");
    assert_eq!(stats["records"], 4, "{stats}");
    assert!(stats["bytes"].as_u64().unwrap() > 3 * 64, "{stats}");
    assert!(
        stats["nearest_end_ms"].as_u64().unwrap() > 3_500_000,
        "{stats}"
    );
    // The oldest: the first record claimed, order-0, with its own fence.
    let first = run_json(
        &fixture,
        &["--json", "inspect", "--name", NAME, "--key", "order-0"],
    );
    let order_0 = StorageKey::derive(NAME, None, b"order-0").unwrap().to_hex();
    assert_eq!(stats["oldest"]["storage_key"], order_0, "{stats}");
    assert_eq!(stats["oldest"]["fence"], first["fence"], "{stats}");
    assert_eq!(stats["oldest"]["state"], "completed", "{stats}");
    assert!(
        stats["oldest"]["left_ms"].as_u64().unwrap() > 3_500_000,
        "{stats}"
    );
    let text = idempotent(&fixture)
        .arg("stats")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains(&format!(
            "\noldest:      {} (fence {}, completed, ends in ",
            &order_0[..16],
            first["fence"]
        )),
        "{text}"
    );

    // purge-expired: two records that end at once.
    for n in 0..2u64 {
        record(
            &fixture,
            &format!("short-{n}"),
            n,
            Duration::from_millis(50),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dry = idempotent(&fixture)
        .args(["purge-expired", "--dry-run", "--json"])
        .assert()
        .success();
    assert_no_audit(&dry, "a dry run");
    let dry = json_of(&dry.get_output().stdout);
    let expected = if fixture.expires_by_itself { 0 } else { 2 };
    assert_eq!(dry["expired"], expected, "{dry}");
    let still = run_json(&fixture, &["--json", "stats"]);
    assert_eq!(
        still["expired"], expected,
        "a dry run deletes nothing: {still}"
    );
    // One record per batch: the loop must go round until none is left.
    let purge = idempotent(&fixture)
        .args(["purge-expired", "--batch", "1", "--json"])
        .assert()
        .success();
    if fixture.expires_by_itself {
        assert_no_audit(&purge, "Redis purges nothing");
    } else {
        // The audit trail's `purged` event, once, with the count.
        let events = audit_events(&purge);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            events[0].contains("outcome=\"purged\"") && events[0].contains("count=2"),
            "{events:?}"
        );
    }
    let purged = json_of(&purge.get_output().stdout);
    assert_eq!(purged["purged"], expected, "{purged}");
    assert_eq!(
        purged["batches"], expected,
        "one batch per record: {purged}"
    );
    let after = run_json(&fixture, &["--json", "stats"]);
    assert_eq!(after["expired"], 0, "{after}");
    assert_eq!(after["completed"], 3, "live records are kept: {after}");

    // forget: refused at the prompt, then confirmed, then with --yes.
    let refused = idempotent(&fixture)
        .args(["forget", "--name", NAME, "--key", "order-0"])
        .write_stdin("n\n")
        .assert()
        .code(4)
        .stderr_has("not confirmed");
    assert_no_audit(&refused, "nothing was forgotten");
    idempotent(&fixture)
        .args(["inspect", "--name", NAME, "--key", "order-0"])
        .assert()
        .success();
    let forgot = idempotent(&fixture)
        .args(["forget", "--name", NAME, "--key", "order-0"])
        .write_stdin("y\n")
        .assert()
        .success()
        .stdout_has("forgot the completed record");
    // The audit trail's `forgotten` event: the function, the key's first 16 hex digits.
    let events = audit_events(&forgot);
    assert_eq!(events.len(), 1, "{events:?}");
    for field in [
        "outcome=\"forgotten\"".to_string(),
        format!("function=\"{NAME}\""),
        format!("key={}", &order_0[..16]),
        "fence=-".to_string(),
    ] {
        assert!(events[0].contains(&field), "{field}: {events:?}");
    }
    idempotent(&fixture)
        .args(["inspect", "--name", NAME, "--key", "order-0"])
        .assert()
        .code(3);
    let forgotten = run_json(
        &fixture,
        &[
            "forget",
            "--yes",
            "--json",
            "--name",
            NAME,
            "--key",
            "order-held",
        ],
    );
    assert_eq!(forgotten["state"], "in_progress");
    idempotent(&fixture)
        .args(["forget", "--yes", "--name", NAME, "--key", "order-0"])
        .assert()
        .code(3);

    // The forgotten key runs its body again; the others still replay.
    let engine = Idempotency::new(fixture.store.clone());
    let again = engine
        .run(
            Call::new(NAME, Fingerprint::of(&100u64).unwrap()).key("order-0"),
            async { Ok::<_, Error>(serde_json::json!({ "receipt": "again" })) },
        )
        .await
        .unwrap();
    assert!(!again.is_replayed(), "a forgotten key runs again");
    let replay = engine
        .run(
            Call::new(NAME, Fingerprint::of(&102u64).unwrap()).key("order-2"),
            async { Ok::<_, Error>(serde_json::json!({ "receipt": "twice" })) },
        )
        .await
        .unwrap();
    assert!(replay.is_replayed());

    // A scoped record: found with its scope only, and forgotten with it. The same key is
    // recorded in the scope with another value, so the scoped record is told from the other.
    record_in(
        &fixture,
        Some(SCOPE),
        "order-1",
        701,
        Duration::from_secs(3600),
    )
    .await;
    let scoped = [
        "inspect", "--name", NAME, "--scope", SCOPE, "--key", "order-1",
    ];
    let text = idempotent(&fixture)
        .args(scoped)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains(&format!("key \"order-1\" scope \"{SCOPE}\"\n")),
        "{text}"
    );
    assert!(text.contains("state:       completed"), "{text}");
    assert!(
        text.contains("\"amount\": 701"),
        "the scoped output: {text}"
    );
    let json = run_json(&fixture, &[&["--json"][..], &scoped].concat());
    assert_eq!(json["scope"], SCOPE, "{json}");
    assert_eq!(
        json["storage_key"],
        StorageKey::derive(NAME, Some(SCOPE.as_bytes()), b"order-1")
            .unwrap()
            .to_hex()
    );
    assert_eq!(json["output"]["ok"]["amount"], 701, "{json}");
    assert_eq!(
        json["output_bytes"],
        recorded_output("order-1", 701).len() as u64,
        "{json}"
    );
    // Without the scope, the unscoped record of the key; another scope finds nothing.
    let unscoped = run_json(
        &fixture,
        &["--json", "inspect", "--name", NAME, "--key", "order-1"],
    );
    assert_eq!(unscoped["output"]["ok"]["amount"], 101, "{unscoped}");
    idempotent(&fixture)
        .args([
            "inspect", "--name", NAME, "--scope", SCOPE, "--key", "order-7",
        ])
        .assert()
        .code(3);
    record_in(
        &fixture,
        Some(SCOPE),
        "order-7",
        707,
        Duration::from_secs(3600),
    )
    .await;
    idempotent(&fixture)
        .args(["inspect", "--name", NAME, "--key", "order-7"])
        .assert()
        .code(3)
        .stderr_has("no record for key \"order-7\"");
    idempotent(&fixture)
        .args([
            "inspect", "--name", NAME, "--scope", "tenant-b", "--key", "order-7",
        ])
        .assert()
        .code(3);
    // forget --scope deletes the scoped record and leaves the unscoped one.
    let forgotten = run_json(
        &fixture,
        &[
            "forget", "--yes", "--json", "--name", NAME, "--scope", SCOPE, "--key", "order-1",
        ],
    );
    assert_eq!(
        forgotten["storage_key"],
        StorageKey::derive(NAME, Some(SCOPE.as_bytes()), b"order-1")
            .unwrap()
            .to_hex()
    );
    idempotent(&fixture).args(scoped).assert().code(3);
    let unscoped = run_json(
        &fixture,
        &["--json", "inspect", "--name", NAME, "--key", "order-1"],
    );
    assert_eq!(unscoped["output"]["ok"]["amount"], 101, "kept: {unscoped}");
    idempotent(&fixture)
        .args([
            "forget", "--yes", "--name", NAME, "--scope", SCOPE, "--key", "order-7",
        ])
        .assert()
        .success()
        .stdout_has("forgot the completed record");
    idempotent(&fixture)
        .args([
            "inspect", "--name", NAME, "--scope", SCOPE, "--key", "order-7",
        ])
        .assert()
        .code(3);
}

/// Checks of what the command printed.
trait Printed: Sized {
    fn stderr_has(self, text: &str) -> Self;
    fn stdout_has(self, text: &str) -> Self;
}

/// The audit trail's events the command printed on its standard error.
fn audit_events(assert: &assert_cmd::assert::Assert) -> Vec<String> {
    String::from_utf8_lossy(&assert.get_output().stderr)
        .lines()
        .filter(|line| line.contains("idempotent::audit"))
        .map(str::to_owned)
        .collect()
}

fn assert_no_audit(assert: &assert_cmd::assert::Assert, why: &str) {
    let events = audit_events(assert);
    assert!(events.is_empty(), "{why}: {events:?}");
}

impl Printed for assert_cmd::assert::Assert {
    fn stderr_has(self, text: &str) -> Self {
        let stderr = String::from_utf8_lossy(&self.get_output().stderr).into_owned();
        assert!(stderr.contains(text), "stderr lacks {text:?}: {stderr}");
        self
    }

    fn stdout_has(self, text: &str) -> Self {
        let stdout = String::from_utf8_lossy(&self.get_output().stdout).into_owned();
        assert!(stdout.contains(text), "stdout lacks {text:?}: {stdout}");
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("idempotency.sqlite3");
    let store = SqliteStore::open(&path).unwrap();
    exercise(Fixture {
        store: Arc::new(store),
        url: format!("sqlite://{}", path.display()),
        expires_by_itself: false,
        beside_output: sql_beside_output,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let server = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap();
    let url = server.create_database("cli");
    let store = PostgresStore::builder(url.clone()).build().await.unwrap();
    exercise(Fixture {
        store: Arc::new(store),
        url,
        expires_by_itself: false,
        beside_output: sql_beside_output,
    })
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let store = RedisStore::builder(server.url()).build().unwrap();
    exercise(Fixture {
        store: Arc::new(store),
        url: server.url(),
        expires_by_itself: true,
        beside_output: redis_beside_output,
    })
    .await;
    drop(server);
}

/// `stats` walks a Redis server's keys with `SCAN`; neither it nor `purge-expired` (which on
/// Redis sends nothing: the server deletes ended records itself) ever sends `KEYS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stats_and_purge_walk_the_keys_with_scan_never_keys() {
    // KEYS is renamed away: a command that sent it would fail with "unknown command".
    let server = tokio::task::spawn_blocking(|| {
        RedisServer::start_with(RedisOptions {
            extra_args: vec!["--rename-command".into(), "KEYS".into(), String::new()],
            ..RedisOptions::default()
        })
    })
    .await
    .unwrap();
    assert!(
        server
            .try_command(&["KEYS", "*"])
            .unwrap_err()
            .to_string()
            .contains("unknown command"),
        "KEYS is gone"
    );
    let store = RedisStore::builder(server.url()).build().unwrap();
    let fixture = Fixture {
        store: Arc::new(store),
        url: server.url(),
        expires_by_itself: true,
        beside_output: redis_beside_output,
    };
    for n in 0..3u64 {
        record(
            &fixture,
            &format!("order-{n}"),
            n,
            Duration::from_secs(3600),
        )
        .await;
    }
    hold(&fixture, "order-held").await;
    server.reset_stats();

    let stats = run_json(&fixture, &["--json", "stats"]);
    assert_eq!(stats["completed"], 3, "{stats}");
    assert_eq!(stats["in_progress"], 1, "{stats}");
    idempotent(&fixture)
        .arg("stats")
        .assert()
        .success()
        .stdout_has("completed:   3");
    let dry = run_json(&fixture, &["--json", "purge-expired", "--dry-run"]);
    assert_eq!(dry["expired"], 0, "{dry}");
    let purged = run_json(&fixture, &["--json", "purge-expired"]);
    assert_eq!(purged["purged"], 0, "{purged}");

    let commands = server.command_stats();
    assert_eq!(
        commands.get("keys"),
        None,
        "KEYS was never sent: {commands:?}"
    );
    assert!(
        commands.get("scan").is_some_and(|&calls| calls >= 2),
        "each stats walked the keys with SCAN: {commands:?}"
    );
    drop(server);
}

/// On PostgreSQL one batch of the purge deletes at most its limit: through the library
/// (`Admin::purge_expired_batch`) and through `purge-expired --batch`, which counts its batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_purges_in_batches_of_at_most_batch_records() {
    let server = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap();
    let url = server.create_database("batches");
    let store = Arc::new(PostgresStore::builder(url.clone()).build().await.unwrap());
    let fixture = Fixture {
        store: store.clone(),
        url,
        expires_by_itself: false,
        beside_output: sql_beside_output,
    };
    record(&fixture, "live", 1, Duration::from_secs(3600)).await;
    let expire = |from: u64, count: u64| {
        let fixture = &fixture;
        async move {
            for n in from..from + count {
                record(fixture, &format!("short-{n}"), n, Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // The library: one batch deletes at most its limit, and leaves the rest.
    expire(0, 5).await;
    assert_eq!(store.stats().await.unwrap().expired, 5);
    assert_eq!(store.purge_expired_batch(2).await.unwrap(), 2);
    assert_eq!(store.stats().await.unwrap().expired, 3, "3 are left");

    // The command: 5 expired records in batches of 2 are 3 batches (2, 2, 1).
    expire(5, 2).await;
    let purged = run_json(&fixture, &["--json", "purge-expired", "--batch", "2"]);
    assert_eq!(purged["purged"], 5, "{purged}");
    assert_eq!(purged["batches"], 3, "{purged}");
    let after = store.stats().await.unwrap();
    assert_eq!((after.expired, after.completed), (0, 1), "{after:?}");

    // As text: 3 expired records in batches of 2 are 2 batches.
    expire(7, 3).await;
    idempotent(&fixture)
        .args(["purge-expired", "--batch", "2"])
        .assert()
        .success()
        .stdout_has("purged 3 expired records in 2 batches of at most 2\n");
    drop(server);
}

#[test]
fn a_command_line_or_url_that_cannot_work_exits_2_and_says_what_to_give() {
    let run = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_idempotent"));
        command.env_remove("IDEMPOTENT_STORE_URL").args(args);
        command.assert()
    };
    run(&["stats"])
        .code(2)
        .stderr_has("pass --store-url or set IDEMPOTENT_STORE_URL");
    run(&["--store-url", "mysql://db/shop", "stats"])
        .code(2)
        .stderr_has("unknown store URL");
    run(&["--store-url", "sqlite:///nowhere/at/all.sqlite3", "stats"])
        .code(2)
        .stderr_has("no SQLite database at /nowhere/at/all.sqlite3");
    run(&[
        "--store-url",
        "redis://127.0.0.1:1/",
        "inspect",
        "--name",
        NAME,
        "--key",
        "",
    ])
    .code(2)
    .stderr_has("the key cannot be derived");
    run(&[
        "--store-url",
        "redis://127.0.0.1:1/",
        "purge-expired",
        "--batch",
        "0",
    ])
    .code(2);
}

#[test]
fn an_unreachable_store_exits_1_without_its_password() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idempotent"));
    command
        .env(
            "IDEMPOTENT_STORE_URL",
            "postgres://shop:s3cret@127.0.0.1:1/shop?connect_timeout=1",
        )
        .arg("stats");
    let output = command.assert().code(1).get_output().stderr.clone();
    let stderr = String::from_utf8_lossy(&output);
    assert!(stderr.contains("could not open the store"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_idempotent"));
    command.args(["--store-url", "redis://127.0.0.1:1/", "stats"]);
    command.assert().code(1);
}

/// On a terminal, `purge-expired` draws its progress bar on standard error (and clears it when
/// done); off one, as in the other tests, it draws nothing. The terminal is a pseudo-terminal
/// made by `script` (util-linux).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_expired_draws_its_progress_bar_on_a_terminal() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("idempotency.sqlite3");
    let fixture = Fixture {
        store: Arc::new(SqliteStore::open(&path).unwrap()),
        url: format!("sqlite://{}", path.display()),
        expires_by_itself: false,
        beside_output: sql_beside_output,
    };
    for n in 0..3u64 {
        record(
            &fixture,
            &format!("short-{n}"),
            n,
            Duration::from_millis(50),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let command = format!(
        "'{}' --store-url '{}' purge-expired --batch 1",
        env!("CARGO_BIN_EXE_idempotent"),
        fixture.url
    );
    let output = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_remove("IDEMPOTENT_STORE_URL")
        .output()
        .expect("`script` (util-linux) runs the command on a pseudo-terminal");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains("expired records purged"),
        "the bar, drawn on the terminal: {printed:?}"
    );
    assert!(
        printed.contains("purged 3 expired records in 3 batches"),
        "{printed:?}"
    );
}
