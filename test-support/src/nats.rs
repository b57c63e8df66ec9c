//! [`NatsServer`]: a real `nats-server`, with JetStream, for one test.

use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{Failure, Log, Supervisor, Watchdog, server_dir};

/// The environment variable that names the `nats-server` binary (default: `nats-server` found
/// on `PATH`, else Debian's `/usr/sbin/nats-server`).
pub const NATS_SERVER_ENV: &str = "IDEMPOTENT_NATS_SERVER";

/// A `nats-server` with JetStream on, for one test: started on a free 127.0.0.1 port in its own
/// temporary folder (JetStream's file store included), stopped on drop, its folder removed.
///
/// It runs `nats-server -js -sd DIR/jetstream -a 127.0.0.1 -p PORT`: no monitoring port, no
/// cluster, no authentication. Each server is independent of every other one, so tests may run
/// in parallel. Drop never hangs: a graceful stop (SIGTERM) is given 10 s, then the server is
/// killed. If the test process dies without dropping the server, a watchdog process stops it and
/// removes its folder.
///
/// The methods panic with a clear message (and the server's log) when something fails: this is
/// a test helper.
///
/// ```no_run
/// use idempotent_test_support::NatsServer;
///
/// let server = NatsServer::start();
/// let url = server.url(); // "nats://127.0.0.1:PORT", for the client under test
/// # let _ = url;
/// ```
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    binary: PathBuf,
    log: Log,
    supervisor: Supervisor,
    // Last: removed after the watchdog is told the server is gone.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it is ready: its log says so and it accepts a
    /// connection whose `INFO` says JetStream is on.
    ///
    /// # Panics
    /// If `nats-server` is not installed (run `scripts/install-test-deps`, or set
    /// [`NATS_SERVER_ENV`]), or the server is not ready in 10 s, or exits: the message holds
    /// the server's log.
    pub fn start() -> NatsServer {
        let binary = nats_server_binary();
        let dir = server_dir("idempotent-nats");
        let log = Log::new(dir.path().join("nats.log"));
        let watchdog = Watchdog::spawn(dir.path(), "TERM");
        let mut server = NatsServer {
            port: 0,
            binary,
            log,
            supervisor: Supervisor::new("nats-server", watchdog),
            dir,
        };
        Supervisor::on_a_free_port("nats-server", |port| {
            server.port = port;
            server.launch()
        });
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The TCP port on 127.0.0.1; it stays the same across [`NatsServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's folder: JetStream's store (`jetstream/`) and `nats.log`.
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

    /// Stops the server gracefully (SIGTERM) and waits for it to exit; kills it if that takes
    /// over 10 s. Does nothing if it is not running.
    pub fn stop(&mut self) {
        self.supervisor.stop(|_| Some(libc::SIGTERM));
    }

    /// Kills the server (SIGKILL: a crash) and waits for it to exit. Does nothing if it is not
    /// running.
    pub fn kill(&mut self) {
        self.supervisor.kill();
    }

    /// Starts the server again, on the same port and with the same JetStream store (streams,
    /// consumers and messages survive), and waits until it is ready. A running server is
    /// stopped first.
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

    /// Starts the process on `self.port` and waits until it is ready.
    fn launch(&mut self) -> Result<(), Failure> {
        let mut command = Command::new(&self.binary);
        command
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.path().join("jetstream"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .current_dir(self.dir.path());
        let port = self.port;
        let log_path = self.log.path().to_owned();
        let result = self.supervisor.launch(
            &mut command,
            port,
            &mut self.log,
            "was not ready (no \"Server is ready\" in its log, or no JetStream in its INFO)",
            |pid| is_ready(&log_path, port, pid),
        );
        match result {
            // nats-server writes the error in lower case; the supervisor looks for it capitalised.
            Err(Failure::Other(message)) if message.contains("address already in use") => {
                Err(Failure::PortInUse { log: message })
            }
            other => other,
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the process `pid` logged that it is ready (its lines start with `[PID]`, which
/// tells it from another server that took the port first) and the port greets with an `INFO`
/// that has JetStream on.
fn is_ready(log: &Path, port: u16, pid: u32) -> bool {
    let ready_line = format!("[{pid}] ");
    let logged = std::fs::read_to_string(log).is_ok_and(|text| {
        text.lines()
            .any(|line| line.starts_with(&ready_line) && line.ends_with("Server is ready"))
    });
    logged && info(port).is_ok_and(|greeting| greeting.contains("\"jetstream\":true"))
}

/// The `INFO {...}` line the server sends on a new connection.
fn info(port: u16) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

/// The `nats-server` to run: [`NATS_SERVER_ENV`], or the one on `PATH`, or Debian's in
/// `/usr/sbin` (not on every user's `PATH`).
fn nats_server_binary() -> PathBuf {
    if let Some(binary) = std::env::var_os(NATS_SERVER_ENV) {
        return PathBuf::from(binary);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server is not installed (not found on PATH nor in /usr/sbin): run \
                 scripts/install-test-deps, or set {NATS_SERVER_ENV} to its path"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_jetstream_restarts_on_its_port_and_is_removed_on_drop() {
        let mut server = NatsServer::start();
        assert!(server.url().starts_with("nats://127.0.0.1:"));
        let greeting = info(server.port()).expect("the server greets a new connection");
        assert!(
            greeting.contains("\"jetstream\":true"),
            "no JetStream in {greeting}"
        );
        let first = server.pid().expect("it runs");
        server.kill();
        assert!(!server.is_running());
        assert!(
            info(server.port()).is_err(),
            "a killed server still answers"
        );
        server.restart();
        assert_ne!(server.pid(), Some(first));
        assert!(info(server.port()).is_ok_and(|greeting| greeting.contains("\"jetstream\":true")));
        assert!(server.log().contains("Server is ready"));
        let dir = server.dir().to_owned();
        drop(server);
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}
