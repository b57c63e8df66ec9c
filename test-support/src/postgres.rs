//! [`PostgresServer`]: a real PostgreSQL 15 cluster for one test, or one test binary.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use tempfile::TempDir;

use crate::process::{Failure, Log, Supervisor, Watchdog, effective_uid, server_dir, tail};
use crate::tls::TlsFiles;

/// The environment variable that names the folder of PostgreSQL's binaries (`initdb`,
/// `postgres`, `pg_isready`, `psql`); default [`DEFAULT_PG_BINDIR`].
pub const PG_BINDIR_ENV: &str = "IDEMPOTENT_PG_BINDIR";

/// Where Debian's `postgresql-15` package puts the server's binaries.
pub const DEFAULT_PG_BINDIR: &str = "/usr/lib/postgresql/15/bin";

/// The user the server runs as and tests connect as (trust authentication: no password).
const USER: &str = "postgres";

/// How a [`PostgresServer`] is configured beyond the defaults.
///
/// The defaults: `fsync=off` (the tests do not need their data on disk past a process crash,
/// and a machine crash ends the test anyway), no other settings.
///
/// ```no_run
/// use idempotent_test_support::{PostgresOptions, PostgresServer};
///
/// let server = PostgresServer::start_with(PostgresOptions {
///     fsync: true,
///     settings: vec![("default_transaction_isolation".into(), "serializable".into())],
/// });
/// // With TLS: PostgresServer::start_tls().
/// # let _ = server;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostgresOptions {
    /// `fsync=on`: the server flushes the WAL to disk at each commit, as in production.
    pub fsync: bool,
    /// More server settings, `-c NAME=VALUE` each, given after the defaults (so they override
    /// them).
    pub settings: Vec<(String, String)>,
}

/// A PostgreSQL cluster for one test, or one test binary (see [`shared_postgres`]).
///
/// `initdb` runs in a new temporary folder (trust authentication, superuser `postgres`, locale
/// `C`, encoding UTF-8, `fsync=off` unless [`PostgresOptions::fsync`]; `synchronous_commit`
/// stays on), then the server starts on a
/// free port, listening on 127.0.0.1 only, with its Unix socket in that same folder. Dropping it
/// stops the server (a fast shutdown, killed after 10 s) and removes the folder. If the test
/// process dies without dropping it, a watchdog process stops the server and removes the folder.
///
/// PostgreSQL refuses to run as root: when the tests run as root, every PostgreSQL binary is run
/// as the `postgres` user and the folder is given to it.
///
/// `initdb` takes a while (a start takes about 0.4 s on a 2-core machine with the folder in
/// `/dev/shm`, over 1 s on its disk; see [`TMPDIR_ENV`](crate::TMPDIR_ENV)): where tests can
/// share a server, share one per test binary with [`shared_postgres`] and give each test its own
/// database with [`PostgresServer::create_unique_database`] (about 30 ms). Mind the
/// `max_connections` of 100 when many tests with connection pools share one server.
///
/// ```no_run
/// use idempotent_test_support::PostgresServer;
///
/// let server = PostgresServer::start();
/// assert_eq!(server.psql("select 1"), "1");
/// let url = server.create_database("orders"); // postgres://postgres@127.0.0.1:PORT/orders
/// # let _ = url;
/// ```
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    bindir: PathBuf,
    /// `(uid, gid)` of the `postgres` user when this process is root.
    run_as: Option<(u32, u32)>,
    log: Log,
    supervisor: Supervisor,
    options: PostgresOptions,
    /// With TLS ([`PostgresServer::start_tls`]): its files.
    tls: Option<TlsFiles>,
    // Last: removed after the server is stopped and the watchdog told.
    dir: TempDir,
}

impl PostgresServer {
    /// Creates a cluster with `initdb` and starts the server; returns once `pg_isready` says it
    /// accepts connections.
    ///
    /// # Panics
    /// If PostgreSQL's binaries are missing (see [`PG_BINDIR_ENV`]), `initdb` fails, or the server
    /// is not ready within 10 s: the message holds the log.
    pub fn start() -> PostgresServer {
        PostgresServer::start_with(PostgresOptions::default())
    }

    /// [`PostgresServer::start`] with `options`.
    ///
    /// # Panics
    /// As [`PostgresServer::start`], and if a setting is refused (the message holds the log).
    pub fn start_with(options: PostgresOptions) -> PostgresServer {
        PostgresServer::start_inner(options, false)
    }

    /// [`PostgresServer::start`] with TLS on (`ssl=on`), with a certificate for `localhost`
    /// and `127.0.0.1` signed by a CA made for this server ([`PostgresServer::tls`]). Clients
    /// may still connect in plain text (the server's `host` rules take both), so a test can
    /// tell the two apart (`pg_stat_ssl`).
    ///
    /// ```no_run
    /// let server = idempotent_test_support::PostgresServer::start_tls();
    /// let ca = server.tls().unwrap().ca_file();
    /// let url = format!("{}?sslmode=verify-full&sslrootcert={}", server.url(), ca.display());
    /// # let _ = url;
    /// ```
    ///
    /// # Panics
    /// As [`PostgresServer::start`].
    pub fn start_tls() -> PostgresServer {
        PostgresServer::start_inner(PostgresOptions::default(), true)
    }

    fn start_inner(options: PostgresOptions, tls: bool) -> PostgresServer {
        let bindir = std::env::var_os(PG_BINDIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BINDIR));
        for program in ["initdb", "postgres", "pg_isready", "psql"] {
            assert!(
                bindir.join(program).is_file(),
                "PostgreSQL is not installed: {} is missing; run scripts/install-test-deps, or set \
                 {PG_BINDIR_ENV} to the folder of PostgreSQL's binaries",
                bindir.join(program).display()
            );
        }
        let run_as = if effective_uid() == 0 {
            Some(postgres_user())
        } else {
            None
        };
        let dir = server_dir("idempotent-postgres");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap_or_else(|error| {
                panic!(
                    "cannot give {} to the postgres user: {error}",
                    dir.path().display()
                )
            });
        }
        let log = Log::new(dir.path().join("postgres.log"));
        let watchdog = Watchdog::spawn(dir.path(), "QUIT");
        let tls = tls.then(|| {
            let files = TlsFiles::generate(dir.path());
            if let Some((uid, gid)) = run_as {
                files.chown(uid, gid);
            }
            files
        });
        let mut server = PostgresServer {
            port: 0,
            bindir,
            run_as,
            log,
            supervisor: Supervisor::new("postgres", watchdog),
            options,
            tls,
            dir,
        };
        server.initdb();
        Supervisor::on_a_free_port("postgres", |port| {
            server.port = port;
            server.launch()
        });
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the default database, for a connection
    /// string parser (tokio-postgres, sqlx, ...).
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// `host=127.0.0.1 port=PORT user=postgres dbname=postgres`: the same as
    /// [`PostgresServer::url`], as key-value pairs.
    pub fn config_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname=postgres",
            self.port
        )
    }

    /// The TCP port on 127.0.0.1; it stays the same across [`PostgresServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS files of a server started with [`PostgresServer::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The server's folder: the Unix socket, `postgres.log`, `initdb.log` and the cluster in
    /// `data/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's whole log so far (every start of it), for a failing test's message.
    pub fn log(&self) -> String {
        self.log.all()
    }

    /// The postmaster's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.supervisor.pid()
    }

    /// Creates the database `name` (`CREATE DATABASE`, via `psql`) and returns its URL, so that
    /// tests can isolate themselves within one server.
    ///
    /// # Panics
    /// If the database exists already, or cannot be created.
    pub fn create_database(&self, name: &str) -> String {
        assert!(!name.is_empty(), "a database needs a name");
        self.psql(&format!("CREATE DATABASE {}", quote_identifier(name)));
        self.url_of(name)
    }

    /// Creates a database with a name no other call in this process has used
    /// (`PREFIX_PID_N`), and returns its URL: for tests sharing [`shared_postgres`].
    ///
    /// ```no_run
    /// let url = idempotent_test_support::shared_postgres().create_unique_database("store");
    /// # let _ = url;
    /// ```
    pub fn create_unique_database(&self, prefix: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.create_database(&format!("{prefix}_{}_{n}", std::process::id()))
    }

    /// Runs `sql` (one or more statements) with `psql -X -A -t -q` in the database `postgres`,
    /// stopping at the first error; returns what it printed without the final newline: one line
    /// per row, columns separated by `|`.
    ///
    /// ```no_run
    /// # let server = idempotent_test_support::PostgresServer::start();
    /// server.psql("create table t (a int, b text); insert into t values (1, 'x'), (2, 'y')");
    /// assert_eq!(server.psql("select a, b from t order by a"), "1|x\n2|y");
    /// ```
    ///
    /// # Panics
    /// If an SQL statement fails (the message holds psql's errors), or the server is down.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// [`PostgresServer::psql`] in the database `database`.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let mut child = self
            .command("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .args(self.connection_args(database))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start psql: {error}"));
        let mut stdin = child.stdin.take().expect("psql's stdin is piped");
        let output = thread::scope(|scope| {
            scope.spawn(move || {
                // psql stops reading at an error; the rest is of no interest.
                let _ = stdin.write_all(sql.as_bytes());
            });
            child.wait_with_output()
        })
        .unwrap_or_else(|error| panic!("cannot run psql: {error}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "psql failed ({}) in database {database:?} on port {}:\n{}\nSQL:\n{sql}",
            output.status,
            self.port,
            String::from_utf8_lossy(&output.stderr).trim_end(),
        );
        stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned()
    }

    /// Stops the server with a fast shutdown (SIGINT: connections are closed, a checkpoint
    /// written), waits for it to exit, and kills it if that takes over 10 s. Does nothing if it
    /// is not running. The folder stays, for [`PostgresServer::restart`].
    pub fn stop(&mut self) {
        self.supervisor.stop(|_| Some(libc::SIGINT));
    }

    /// Kills the postmaster and every process of the server (SIGKILL: a crash) and waits until
    /// they are gone. Does nothing if it is not running. [`PostgresServer::restart`] then
    /// recovers from the WAL, as after a real crash.
    pub fn kill(&mut self) {
        self.supervisor.kill();
    }

    /// Starts the server again, on the same port with the same data, and waits until it accepts
    /// connections. A running server is stopped first.
    ///
    /// # Panics
    /// If the server does not become ready, for instance because another process took its port
    /// while it was stopped.
    pub fn restart(&mut self) {
        self.stop();
        let result = self.launch();
        self.supervisor.restarted(self.port, result);
    }

    /// Whether the postmaster is running (it may have exited by itself, or been stopped).
    pub fn is_running(&mut self) -> bool {
        self.supervisor.is_running()
    }

    fn url_of(&self, database: &str) -> String {
        format!(
            "postgres://{USER}@127.0.0.1:{}/{}",
            self.port,
            percent_encode(database)
        )
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `-h SOCKET_DIR -p PORT -U postgres -d DATABASE`: the Unix socket in the server's own
    /// folder cannot lead to another test's server.
    fn connection_args(&self, database: &str) -> Vec<String> {
        vec![
            "-h".into(),
            self.dir.path().display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            USER.into(),
            "-d".into(),
            database.into(),
        ]
    }

    /// A command for one of PostgreSQL's binaries, run as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bindir.join(program));
        command
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("LC_ALL", "C")
            .env_remove("PGOPTIONS")
            .env_remove("PGSERVICE")
            .env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn initdb(&self) {
        let log_path = self.dir.path().join("initdb.log");
        let log = fs::File::create(&log_path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", log_path.display()));
        let errors = log
            .try_clone()
            .unwrap_or_else(|error| panic!("cannot duplicate a file handle: {error}"));
        let status = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "--auth=trust",
                "--no-sync",
                "-U",
                USER,
                "--encoding=UTF8",
                "--locale=C",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(errors)
            .status()
            .unwrap_or_else(|error| panic!("cannot start initdb: {error}"));
        assert!(
            status.success(),
            "initdb failed ({status}) in {}:\n{}",
            self.dir.path().display(),
            tail(&fs::read_to_string(&log_path).unwrap_or_default(), 40)
        );
    }

    /// Starts the postmaster on `self.port` and waits until it accepts connections.
    fn launch(&mut self) -> Result<(), Failure> {
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                if self.options.fsync {
                    "fsync=on"
                } else {
                    "fsync=off"
                },
            ])
            .args(["-c", "max_connections=100"])
            // Lets tests count the statements a store runs (`CREATE EXTENSION pg_stat_statements`).
            .args(["-c", "shared_preload_libraries=pg_stat_statements"]);
        if let Some(tls) = &self.tls {
            command
                .args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!(
                    "ssl_cert_file={}",
                    tls.certificate_file().display()
                ))
                .arg("-c")
                .arg(format!("ssl_key_file={}", tls.key_file().display()));
        }
        for (name, value) in &self.options.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        let mut probe = self.readiness_probe();
        let port = self.port;
        self.supervisor
            .launch(&mut command, port, &mut self.log, "was not ready", |_| {
                probe.status().is_ok_and(|status| status.success())
            })
    }

    /// `pg_isready` for this server: it succeeds once the server accepts connections.
    fn readiness_probe(&self) -> Command {
        let mut probe = self.command("pg_isready");
        probe
            .arg("-q")
            .args(self.connection_args("postgres"))
            .args(["-t", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        probe
    }

    /// After a kill, the server's System V shared memory segment (a few bytes; its id is in the
    /// lock file `postmaster.pid`) is left behind until the next start in the same folder:
    /// removes it when no process is attached any more, so that killed servers leak nothing.
    #[allow(unsafe_code)] // A libc call; see its SAFETY comment.
    fn remove_stale_shared_memory(&self) {
        let Ok(lock) = fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return;
        };
        let Some(shmid) = lock
            .lines()
            .nth(6)
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|id| id.parse::<libc::c_int>().ok())
        else {
            return;
        };
        // SAFETY: `shmid_ds` is plain data that IPC_STAT fills in; the calls touch nothing else.
        unsafe {
            let mut status: libc::shmid_ds = std::mem::zeroed();
            if libc::shmctl(shmid, libc::IPC_STAT, &mut status) == 0 && status.shm_nattch == 0 {
                libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }
}

/// The database named by a URL that [`PostgresServer::create_database`] (or
/// [`PostgresServer::create_unique_database`]) returned, for [`PostgresServer::psql_in`].
///
/// ```
/// assert_eq!(idempotent_test_support::database_of("postgres://u@127.0.0.1:5432/orders"), "orders");
/// ```
pub fn database_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        self.remove_stale_shared_memory();
    }
}

/// `(uid, gid)` of the `postgres` user, from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == USER {
                Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
            } else {
                None
            }
        })
        .unwrap_or_else(|| {
            panic!(
                "the tests run as root, which PostgreSQL refuses, and there is no `postgres` user \
                 to run it as: install postgresql-15 (scripts/install-test-deps)"
            )
        })
}

/// `name` as an SQL identifier, quoted.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` for a URL's path: everything but unreserved characters percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// One [`PostgresServer`] for the whole test binary, started on first use: pays `initdb` once.
///
/// Tests sharing it give themselves a database each with
/// [`PostgresServer::create_unique_database`]. It cannot be stopped or restarted (`&'static`,
/// not `&mut`): tests that do that start their own server.
///
/// The server is never dropped (statics are not), so its cleanup is left to its watchdog, which
/// stops it (immediate shutdown) and removes its folder as soon as the test process exits,
/// however it exits. Under `cargo nextest`, which runs each test in its own process, every test
/// gets its own "shared" server.
///
/// ```no_run
/// use idempotent_test_support::shared_postgres;
///
/// let url = shared_postgres().create_unique_database("store");
/// # let _ = url;
/// ```
pub fn shared_postgres() -> &'static PostgresServer {
    static SHARED: OnceLock<PostgresServer> = OnceLock::new();
    SHARED.get_or_init(PostgresServer::start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_encodes_names() {
        assert_eq!(quote_identifier(r#"a"b"#), r#""a""b""#);
        assert_eq!(percent_encode("orders_1"), "orders_1");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
