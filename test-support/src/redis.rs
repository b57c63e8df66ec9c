//! [`RedisServer`]: a real `redis-server` for one test.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{Failure, Log, Supervisor, Watchdog, is_stopped, server_dir, signal};
use crate::resp::{Address, Connection};
use crate::tls::TlsFiles;

/// The environment variable that names the `redis-server` binary (default: `redis-server`
/// found on `PATH`).
pub const REDIS_SERVER_ENV: &str = "IDEMPOTENT_REDIS_SERVER";

/// How a [`RedisServer`] is configured beyond the defaults.
///
/// The defaults: no RDB snapshots (`--save ""`), `--appendonly no`, listening on 127.0.0.1 only,
/// everything (data, AOF, log) in the server's own temporary folder.
///
/// ```no_run
/// use idempotent_test_support::{RedisOptions, RedisServer};
///
/// let server = RedisServer::start_with(RedisOptions {
///     appendonly: true,
///     extra_args: vec!["--maxmemory".into(), "64mb".into()],
/// });
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisOptions {
    /// `--appendonly yes`: writes survive [`RedisServer::stop`] (and, for the writes that were
    /// acknowledged, [`RedisServer::kill`]) followed by [`RedisServer::restart`].
    pub appendonly: bool,
    /// More command-line arguments for `redis-server`, each its own element, added after the
    /// defaults (so they override them): `["--maxmemory", "64mb"]`.
    pub extra_args: Vec<String>,
}

/// A `redis-server` for one test: started on a free 127.0.0.1 port in its own temporary folder,
/// stopped on drop, its folder removed.
///
/// Each server is independent of every other one, in this process or another, so tests may run
/// in parallel. Drop never hangs: a graceful stop is given 10 s, then the server is killed. If the
/// test process dies without dropping the server (a static, a SIGKILL), a watchdog process stops
/// the server and removes its folder.
///
/// The methods panic with a clear message (and the server's log) when something fails: this is a
/// test helper.
///
/// ```no_run
/// use idempotent_test_support::RedisServer;
///
/// let server = RedisServer::start();
/// let url = server.url(); // "redis://127.0.0.1:PORT/", for the client under test
/// assert_eq!(server.command(&["PING"]), "PONG");
/// # let _ = url;
/// ```
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    options: RedisOptions,
    binary: PathBuf,
    log: Log,
    supervisor: Supervisor,
    /// With TLS ([`RedisServer::start_tls`]): its files; the TCP port then speaks TLS only.
    tls: Option<TlsFiles>,
    /// Whether the process was stopped with SIGSTOP by [`RedisServer::pause`].
    paused: bool,
    // Last: removed after the watchdog is told the server is gone.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server with the default [`RedisOptions`] and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default())
    }

    /// Starts a server with `options` and waits until it answers `PING`.
    ///
    /// # Panics
    /// If `redis-server` cannot be found (see [`REDIS_SERVER_ENV`]), or does not become ready
    /// within 10 s, or exits: the message holds the server's log.
    pub fn start_with(options: RedisOptions) -> RedisServer {
        RedisServer::start_inner(options, false)
    }

    /// Starts a server whose TCP port speaks TLS only (`--tls-port`, `--port 0`), with a
    /// certificate for `localhost` and `127.0.0.1` signed by a CA made for it
    /// ([`RedisServer::tls`]); clients are not asked for certificates. [`RedisServer::url`]
    /// is then `rediss://127.0.0.1:PORT/`. The helpers ([`RedisServer::command`], the
    /// readiness probe, the stop) talk to it over a Unix socket in its folder.
    ///
    /// ```no_run
    /// let server = idempotent_test_support::RedisServer::start_tls();
    /// let ca = server.tls().unwrap().ca_file(); // for the client's roots
    /// assert!(server.url().starts_with("rediss://"));
    /// # let _ = ca;
    /// ```
    ///
    /// # Panics
    /// As [`RedisServer::start`], and if `redis-server` was built without TLS (the message
    /// holds its log).
    pub fn start_tls() -> RedisServer {
        RedisServer::start_inner(RedisOptions::default(), true)
    }

    fn start_inner(options: RedisOptions, tls: bool) -> RedisServer {
        let binary = redis_server_binary();
        let dir = server_dir("idempotent-redis");
        // Also where the process' own output goes: errors in the arguments are printed there.
        let log = Log::new(dir.path().join("redis.log"));
        let watchdog = Watchdog::spawn(dir.path(), "TERM");
        let tls = tls.then(|| TlsFiles::generate(dir.path()));
        let mut server = RedisServer {
            port: 0,
            options,
            binary,
            log,
            supervisor: Supervisor::new("redis-server", watchdog),
            tls,
            paused: false,
            dir,
        };
        Supervisor::on_a_free_port("redis-server", |port| {
            server.port = port;
            server.launch()
        });
        server
    }

    /// `redis://127.0.0.1:PORT/`, or `rediss://127.0.0.1:PORT/` for a server started with
    /// [`RedisServer::start_tls`].
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// The TLS files of a server started with [`RedisServer::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Where the helpers reach the server: its TCP port, or with TLS its Unix socket.
    fn address(&self) -> Address {
        address(self.port, self.tls.is_some(), self.dir.path())
    }

    /// The TCP port on 127.0.0.1; it stays the same across [`RedisServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's folder: its working directory (`--dir`), with the AOF and `redis.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's whole log so far (every start of it), for a failing test's message.
    pub fn log(&self) -> String {
        self.log.all()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.supervisor.pid()
    }

    /// Stops the server gracefully and waits for it to exit; kills it if that takes over 10 s.
    /// Does nothing if it is not running.
    ///
    /// A graceful stop is `SHUTDOWN` (or SIGTERM where the command fails, as when it is renamed):
    /// the AOF, if on, is flushed to disk, and an RDB snapshot is written only if `extra_args`
    /// configured save points.
    pub fn stop(&mut self) {
        // A paused process would answer nothing until it is killed.
        self.resume();
        let address = self.address();
        self.supervisor.stop(|process| {
            if process.exited().is_some() {
                return Some(libc::SIGTERM);
            }
            // The process runs, so the port is still its own. A SHUTDOWN that works answers
            // nothing: the server closes the connection as it exits (faster than SIGTERM, which
            // Redis handles at its next cron tick, up to 100 ms later).
            let shutdown = Connection::open(&address, Duration::from_secs(2))
                .map(|mut connection| connection.call(&["SHUTDOWN"]));
            if matches!(shutdown, Ok(Err(_))) {
                None
            } else {
                Some(libc::SIGTERM)
            }
        });
    }

    /// Kills the server (SIGKILL: a crash) and waits for it to exit. Does nothing if it is not
    /// running.
    pub fn kill(&mut self) {
        // SIGKILL ends a stopped process as well.
        self.supervisor.kill();
        self.paused = false;
    }

    /// Pauses the server's process (SIGSTOP), as when its host freezes: it keeps its port and
    /// its connections but answers nothing, and the kernel still accepts bytes for it until its
    /// socket buffers are full. Returns once the process is stopped. Does nothing if it is
    /// paused already.
    ///
    /// A paused server cannot be reached by [`RedisServer::command`] (it fails after 10 s), and
    /// it is resumed by [`RedisServer::resume`], [`RedisServer::stop`], [`RedisServer::restart`]
    /// and drop; [`RedisServer::kill`] kills it as it is.
    ///
    /// ```no_run
    /// let mut server = idempotent_test_support::RedisServer::start();
    /// server.pause();
    /// assert!(server.try_command(&["PING"]).is_err());
    /// server.resume();
    /// assert_eq!(server.command(&["PING"]), "PONG");
    /// ```
    ///
    /// # Panics
    /// If the server is not running, or its process is not stopped within 30 s.
    pub fn pause(&mut self) {
        if self.paused {
            return;
        }
        let Some(pid) = self.supervisor.pid() else {
            panic!(
                "cannot pause the redis-server of port {}: it is not running (start or restart it first)",
                self.port
            )
        };
        signal(pid, libc::SIGSTOP);
        self.paused = true;
        wait_for_process_state(pid, true);
    }

    /// Resumes a server paused by [`RedisServer::pause`] (SIGCONT) and returns once its process
    /// runs again. Does nothing if it is not paused.
    ///
    /// # Panics
    /// If the process does not run again within 30 s.
    pub fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.paused = false;
        if let Some(pid) = self.supervisor.pid() {
            signal(pid, libc::SIGCONT);
            wait_for_process_state(pid, false);
        }
    }

    /// Whether the server is paused by [`RedisServer::pause`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Starts the server again, on the same port and in the same folder (with
    /// `appendonly: true`, its data survives), and waits until it answers `PING`. A running server
    /// is stopped first.
    ///
    /// # Panics
    /// If the server does not become ready, for instance because another process took its port
    /// while it was stopped.
    pub fn restart(&mut self) {
        self.stop();
        let result = self.launch();
        self.supervisor.restarted(self.port, result);
    }

    /// Whether the server process is running (it may have exited by itself, or been stopped).
    pub fn is_running(&mut self) -> bool {
        self.supervisor.is_running()
    }

    /// Runs one command on a new connection and returns the reply as text.
    ///
    /// Strings are returned as they are, integers in decimal, nil as `(nil)`, and the elements of
    /// an array one per line.
    ///
    /// ```no_run
    /// # let server = idempotent_test_support::RedisServer::start();
    /// assert_eq!(server.command(&["SET", "k", "v"]), "OK");
    /// assert_eq!(server.command(&["GET", "k"]), "v");
    /// assert_eq!(server.command(&["GET", "missing"]), "(nil)");
    /// assert_eq!(server.command(&["INCR", "n"]), "1");
    /// ```
    ///
    /// # Panics
    /// If the server cannot be reached, or the reply is an error: see
    /// [`RedisServer::try_command`] to inspect those.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|error| {
            panic!(
                "Redis command {args:?} on 127.0.0.1:{} failed: {error}",
                self.port
            )
        })
    }

    /// Like [`RedisServer::command`], but returns failures: an I/O error when the server cannot
    /// be reached (`ConnectionRefused` once it is stopped), an error of kind `Other` carrying the
    /// message of an error reply (`WRONGTYPE ...`).
    pub fn try_command(&self, args: &[&str]) -> io::Result<String> {
        let reply = Connection::open(&self.address(), Duration::from_secs(10))?.call(args)?;
        reply.into_text().map_err(io::Error::other)
    }

    /// `INFO commandstats`, parsed: lowercase command name (`get`, `evalsha`, `config|resetstat`
    /// for a subcommand) → number of calls since the start or the last
    /// [`RedisServer::reset_stats`]. Commands never called are absent.
    ///
    /// The `INFO` of this very call is counted only from the next call on; so is the
    /// `CONFIG RESETSTAT` of [`RedisServer::reset_stats`]: filter by the commands of interest.
    ///
    /// ```no_run
    /// # let server = idempotent_test_support::RedisServer::start();
    /// server.reset_stats();
    /// server.command(&["GET", "k"]);
    /// assert_eq!(server.command_stats().get("get"), Some(&1));
    /// ```
    pub fn command_stats(&self) -> BTreeMap<String, u64> {
        parse_command_stats(&self.command(&["INFO", "commandstats"]))
    }

    /// `CONFIG RESETSTAT`: zeroes the counts of [`RedisServer::command_stats`].
    pub fn reset_stats(&self) {
        let reply = self.command(&["CONFIG", "RESETSTAT"]);
        assert_eq!(reply, "OK", "CONFIG RESETSTAT answered {reply:?}");
    }

    fn arguments(&self) -> Vec<OsString> {
        let dir = self.dir.path();
        let port = self.port.to_string();
        // With TLS the port speaks TLS only: no plain-text port.
        let plain_port = if self.tls.is_some() { "0" } else { &port };
        let mut args: Vec<OsString> = [
            "--port",
            plain_port,
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            if self.options.appendonly { "yes" } else { "no" },
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        args.extend(["--dir".into(), dir.as_os_str().to_owned()]);
        args.extend(["--logfile".into(), self.log.path().as_os_str().to_owned()]);
        if let Some(tls) = &self.tls {
            args.extend([
                "--tls-port".into(),
                port.as_str().into(),
                "--tls-cert-file".into(),
                tls.certificate_file().as_os_str().to_owned(),
                "--tls-key-file".into(),
                tls.key_file().as_os_str().to_owned(),
                "--tls-ca-cert-file".into(),
                tls.ca_file().as_os_str().to_owned(),
                "--tls-auth-clients".into(),
                "no".into(),
                "--unixsocket".into(),
                socket_path(dir).into_os_string(),
                "--unixsocketperm".into(),
                "700".into(),
            ]);
        }
        args.extend(self.options.extra_args.iter().map(OsString::from));
        args
    }

    /// Starts the process on `self.port` and waits until it is ready.
    fn launch(&mut self) -> Result<(), Failure> {
        let mut command = Command::new(&self.binary);
        command.args(self.arguments()).current_dir(self.dir.path());
        let port = self.port;
        let address = self.address();
        self.supervisor.launch(
            &mut command,
            port,
            &mut self.log,
            "did not answer PING",
            |pid| answers_as(&address, pid),
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the process `pid` is stopped (`stopped`) or runs again (not `stopped`).
///
/// # Panics
/// If that takes over 30 s.
fn wait_for_process_state(pid: u32, stopped: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while is_stopped(pid) != stopped {
        if Instant::now() >= deadline {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            panic!(
                "redis-server (pid {pid}) is {} 30 s after a {}; /proc says: {state}",
                if stopped {
                    "still running"
                } else {
                    "still stopped"
                },
                if stopped { "SIGSTOP" } else { "SIGCONT" },
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The Unix socket of a server with TLS, in its folder.
fn socket_path(dir: &Path) -> PathBuf {
    dir.join("redis.sock")
}

fn address(port: u16, tls: bool, dir: &Path) -> Address {
    if tls {
        Address::Unix(socket_path(dir))
    } else {
        Address::Tcp(port)
    }
}

/// Whether the server at `address` answers `PING` and is the process `pid` (not another
/// test's server that took the port first).
fn answers_as(address: &Address, pid: u32) -> bool {
    let probe = || -> io::Result<bool> {
        let mut connection = Connection::open(address, Duration::from_millis(500))?;
        if connection.call(&["PING"])?.into_text().as_deref() != Ok("PONG") {
            return Ok(false);
        }
        let info = connection
            .call(&["INFO", "server"])?
            .into_text()
            .unwrap_or_default();
        Ok(info
            .lines()
            .any(|line| line.trim() == format!("process_id:{pid}")))
    };
    probe().unwrap_or(false)
}

fn parse_command_stats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?;
            Some((name.to_lowercase(), calls.parse().ok()?))
        })
        .collect()
}

/// The `redis-server` to run: [`REDIS_SERVER_ENV`], or the one on `PATH`.
pub(crate) fn redis_server_binary() -> PathBuf {
    if let Some(binary) = std::env::var_os(REDIS_SERVER_ENV) {
        return PathBuf::from(binary);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not installed (not found on PATH): run scripts/install-test-deps, \
                 or set {REDIS_SERVER_ENV} to its path"
            )
        })
}

/// One [`RedisServer`] for the whole test binary, started on first use.
///
/// Tests that only need *a* Redis can share this one instead of starting their own; they then
/// must not rely on an empty database or on global state (use unique keys, never `FLUSHALL`,
/// never [`RedisServer::reset_stats`]). It cannot be stopped or restarted (`&'static`, not
/// `&mut`): tests that do that start their own server.
///
/// The server is never dropped (statics are not), so its cleanup is left to its watchdog, which
/// stops it and removes its folder as soon as the test process exits, however it exits.
///
/// ```no_run
/// let url = idempotent_test_support::shared_redis().url();
/// ```
pub fn shared_redis() -> &'static RedisServer {
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    SHARED.get_or_init(RedisServer::start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_command_stats() {
        let info = "# Commandstats\r\n\
            cmdstat_get:calls=3,usec=10,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_config|resetstat:calls=1,usec=5,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_EVALSHA:calls=12,usec=5,usec_per_call=5.00\r\n";
        let stats = parse_command_stats(info);
        assert_eq!(stats.len(), 3);
        assert_eq!(stats["get"], 3);
        assert_eq!(stats["config|resetstat"], 1);
        assert_eq!(stats["evalsha"], 12);
    }
}
