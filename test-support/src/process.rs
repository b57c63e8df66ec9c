//! What the two servers share: spawning, starting on a free port and waiting until ready, and
//! stopping within a bound (`Supervisor`), and the watchdog that cleans up after a test process
//! that died without dropping its servers.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The environment variable that names the folder in which each server gets its temporary folder
/// (default: `/dev/shm` when it is a tmpfs with at least 1 GiB free, else the system's temporary
/// folder).
pub const TMPDIR_ENV: &str = "IDEMPOTENT_TEST_TMPDIR";

/// A new temporary folder for one server, named `PREFIX-XXXXXX`: in [`TMPDIR_ENV`] if set, else
/// in `/dev/shm` where it is a tmpfs with at least 1 GiB free (on this machine's disk, `initdb`
/// alone takes about a second; in memory, a third of that), else in the system's temporary folder.
pub(crate) fn server_dir(prefix: &str) -> TempDir {
    let base = std::env::var_os(TMPDIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if free_bytes(shm).is_some_and(|free| free >= 1 << 30) {
                shm.to_owned()
            } else {
                std::env::temp_dir()
            }
        });
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir_in(&base)
        .unwrap_or_else(|error| {
            panic!(
                "cannot create a temporary folder in {}: {error}",
                base.display()
            )
        })
}

/// Bytes available to unprivileged users in the file system of `path`, if it is a writable folder.
#[allow(unsafe_code)] // A libc call; see its SAFETY comment.
fn free_bytes(path: &Path) -> Option<u64> {
    let metadata = fs::metadata(path).ok()?;
    if !metadata.is_dir() || metadata.permissions().readonly() {
        return None;
    }
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `statvfs` is plain data that statvfs(3) fills in from a NUL-terminated path.
    unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stats) != 0 {
            return None;
        }
        // u64 already on 64-bit Linux, not on every target.
        #[allow(clippy::useless_conversion)]
        Some(u64::from(stats.f_bavail).saturating_mul(u64::from(stats.f_frsize)))
    }
}

/// How often a server is polled for readiness or exit.
const POLL: Duration = Duration::from_millis(20);
/// How long a server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The watchdog's script. It reads its orders from stdin, a pipe whose only writer is the test
/// process (Rust opens its pipes close-on-exec, so no other child inherits the writer):
/// `pid N` names the server's process to clean up after, `pid` alone says there is none now,
/// `exit` ends the watchdog quietly (the server was dropped normally). End of input without
/// `exit` means the test process is gone, by any death including SIGKILL: the watchdog then
/// signals the server (`$2`), gives it 5 s, kills it, and removes its folder (`$1`).
///
/// It ignores the signals a terminal or a test runner sends to a whole process group, and lives
/// in its own process group anyway. The server's exit is checked in /proc rather than with
/// `kill -0`, because an orphaned server may stay a zombie where init does not reap.
const WATCHDOG_SCRIPT: &str = r#"
trap '' INT TERM HUP QUIT
dir=$1; sig=$2; pid=
alive() { [ -r "/proc/$1/stat" ] || return 1; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; case "$s" in Z*|X*|'') return 1;; esac; return 0; }
while IFS= read -r line; do
  case "$line" in
    exit) exit 0 ;;
    pid) pid= ;;
    "pid "*) pid=${line#pid } ;;
  esac
done
if [ -n "$pid" ] && alive "$pid"; then
  kill -s "$sig" "$pid" 2>/dev/null
  i=0
  while alive "$pid" && [ "$i" -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
  kill -s KILL "$pid" 2>/dev/null
  i=0
  while alive "$pid" && [ "$i" -lt 40 ]; do sleep 0.05; i=$((i + 1)); done
fi
rm -rf -- "$dir"
"#;

/// A `sh` process that kills a server and removes its folder if the test process dies without
/// dropping the server: the cleanup that statics (never dropped) and crashed tests otherwise miss.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
    orders: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts a watchdog for the server folder `dir`; `signal` (`TERM`, `QUIT`, ...) is what the
    /// server is first sent when the test process is gone.
    pub(crate) fn spawn(dir: &Path, signal: &str) -> Watchdog {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("idempotent-test-support-watchdog")
            .arg(dir)
            .arg(signal)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start `sh` for the server's watchdog: {error}"));
        let orders = child.stdin.take();
        Watchdog { child, orders }
    }

    /// Tells the watchdog which process to clean up after (`None`: none, the server is stopped).
    pub(crate) fn watch(&mut self, pid: Option<u32>) {
        match pid {
            Some(pid) => self.send(&format!("pid {pid}\n")),
            None => self.send("pid\n"),
        }
    }

    fn send(&mut self, line: &str) {
        if let Some(orders) = &mut self.orders {
            // A watchdog that is gone cannot be helped; the server is still stopped on drop.
            let _ = orders.write_all(line.as_bytes());
            let _ = orders.flush();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.send("exit\n");
        drop(self.orders.take());
        if wait_timeout(&mut self.child, Duration::from_secs(2)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => return None,
            // Not our child any more (already reaped): nothing to wait for.
            Err(_) => return Some(ExitStatus::default()),
        }
    }
}

/// Sends `signal` to one process.
#[allow(unsafe_code)] // A libc call; see its SAFETY comment.
pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; errors (ESRCH) are of no interest.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The effective user id of this process.
#[allow(unsafe_code)] // A libc call; see its SAFETY comment.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// `(parent pid, state)` of a process from /proc; `None` if it does not exist.
fn stat(pid: u32) -> Option<(u32, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((parent, state))
}

/// Whether a process exists and is not a zombie.
pub(crate) fn is_alive(pid: u32) -> bool {
    matches!(stat(pid), Some((_, state)) if state != 'Z' && state != 'X')
}

/// Whether a process exists and is stopped by a signal (SIGSTOP: state `T`).
pub(crate) fn is_stopped(pid: u32) -> bool {
    matches!(stat(pid), Some((_, 'T')))
}

/// Every living descendant of `pid` (children, their children, ...), read from /proc.
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok())
            else {
                continue;
            };
            if let Some((parent, state)) = stat(child)
                && state != 'Z'
                && state != 'X'
            {
                parents.push((child, parent));
            }
        }
    }
    let mut found = vec![pid];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(child, _)| *child),
        );
        index += 1;
    }
    found.remove(0);
    found
}

/// A server process that is our child: spawned in its own process group (so a terminal's Ctrl-C
/// reaches only the test process, and the watchdog cleans up), stopped within a bound.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    /// Spawns `command` with stdin closed and stdout and stderr appended to `log`.
    pub(crate) fn spawn(command: &mut Command, log: &Path) -> ServerProcess {
        let output = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|error| panic!("cannot open the log file {}: {error}", log.display()));
        let errors = output
            .try_clone()
            .unwrap_or_else(|error| panic!("cannot duplicate the log file handle: {error}"));
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {:?}: {error}", command.get_program()));
        ServerProcess { child }
    }

    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (it is then reaped).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(status) => status,
            Err(_) => Some(ExitStatus::default()),
        }
    }

    /// Sends `graceful` (if any: the caller may have asked for the stop already) and waits up to
    /// `timeout` for the exit; after that, kills the process and its descendants. (A server that
    /// exits gracefully has ended its own children.)
    pub(crate) fn stop(mut self, graceful: Option<libc::c_int>, timeout: Duration) {
        if self.exited().is_some() {
            return;
        }
        if let Some(graceful) = graceful {
            signal(self.id(), graceful);
        }
        if wait_timeout(&mut self.child, timeout).is_none() {
            self.kill();
        }
    }

    /// SIGKILL for the process and every descendant; returns once they are all gone.
    pub(crate) fn kill(mut self) {
        let descendants = descendants(self.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_all(&descendants);
    }
}

/// SIGKILL for each process, then waits (at most 5 s) until none is alive.
fn kill_all(pids: &[u32]) {
    for &pid in pids {
        if is_alive(pid) {
            signal(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&pid| is_alive(pid)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
}

/// A log file that is read from where the last read ended, so that each start of a server sees
/// its own lines only.
#[derive(Debug)]
pub(crate) struct Log {
    path: PathBuf,
    offset: u64,
}

impl Log {
    pub(crate) fn new(path: PathBuf) -> Log {
        Log { path, offset: 0 }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Marks everything in the file so far as read.
    pub(crate) fn skip_to_end(&mut self) {
        self.offset = fs::metadata(&self.path)
            .map(|metadata| metadata.len())
            .unwrap_or(0);
    }

    /// What was written since the last [`Log::skip_to_end`].
    pub(crate) fn unread(&self) -> String {
        let mut text = Vec::new();
        if let Ok(mut file) = fs::File::open(&self.path)
            && file.seek(SeekFrom::Start(self.offset)).is_ok()
        {
            let _ = file.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// The whole file.
    pub(crate) fn all(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.path).unwrap_or_default()).into_owned()
    }
}

/// The last `lines` lines of `text`, for panic messages.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How many times a start is tried on a new port when the port was taken meanwhile.
const PORT_TRIES: usize = 5;

/// Why a start failed.
pub(crate) enum Failure {
    /// Another process took the port (its log says so): worth trying another.
    PortInUse { log: String },
    /// Anything else, with the message to panic with.
    Other(String),
}

/// The process of a server a test owns, and the watchdog that cleans up after it: how
/// [`crate::RedisServer`] and [`crate::PostgresServer`] start (and wait for), stop, kill and
/// watch their server. `name` is the server's name in messages.
#[derive(Debug)]
pub(crate) struct Supervisor {
    name: &'static str,
    watchdog: Watchdog,
    process: Option<ServerProcess>,
}

impl Supervisor {
    pub(crate) fn new(name: &'static str, watchdog: Watchdog) -> Supervisor {
        Supervisor {
            name,
            watchdog,
            process: None,
        }
    }

    /// The server's process id while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ServerProcess::id)
    }

    /// Spawns `command` (its output appended to `log`), for a server on `port`, and waits until
    /// `ready` (given the process id) says it is ready. `not_ready` ends the message when it is
    /// not ready in time ("did not answer PING").
    pub(crate) fn launch(
        &mut self,
        command: &mut Command,
        port: u16,
        log: &mut Log,
        not_ready: &str,
        mut ready: impl FnMut(u32) -> bool,
    ) -> Result<(), Failure> {
        let name = self.name;
        log.skip_to_end();
        let mut process = ServerProcess::spawn(command, log.path());
        self.watchdog.watch(Some(process.id()));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = process.exited() {
                self.watchdog.watch(None);
                let log = log.unread();
                if log.contains("Address already in use") {
                    return Err(Failure::PortInUse { log });
                }
                return Err(Failure::Other(format!(
                    "{name} on port {port} exited ({status}) before it was ready; its log:\n{}",
                    tail(&log, 40)
                )));
            }
            if ready(process.id()) {
                self.process = Some(process);
                return Ok(());
            }
            if Instant::now() >= deadline {
                process.kill();
                self.watchdog.watch(None);
                return Err(Failure::Other(format!(
                    "{name} on port {port} {not_ready} within {READY_TIMEOUT:?}; its log:\n{}",
                    tail(&log.unread(), 40)
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// Stops the server, if it runs: `graceful` (given the running process) sends what asks it
    /// to stop, and answers the signal to send as well (if any); after [`STOP_TIMEOUT`] it is
    /// killed.
    pub(crate) fn stop(
        &mut self,
        graceful: impl FnOnce(&mut ServerProcess) -> Option<libc::c_int>,
    ) {
        if let Some(mut process) = self.process.take() {
            let signal = graceful(&mut process);
            process.stop(signal, STOP_TIMEOUT);
            self.watchdog.watch(None);
        }
    }

    /// SIGKILL for the server and its processes, if it runs; returns once they are gone.
    pub(crate) fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
            self.watchdog.watch(None);
        }
    }

    /// Whether the server is running (it may have exited by itself, or been stopped).
    pub(crate) fn is_running(&mut self) -> bool {
        let exited = match &mut self.process {
            Some(process) => process.exited().is_some(),
            None => return false,
        };
        if exited {
            self.process = None;
            self.watchdog.watch(None);
        }
        !exited
    }

    /// Runs `launch` on a free port, and on another while the port was taken meanwhile.
    ///
    /// # Panics
    /// If the start fails otherwise, or the port was taken [`PORT_TRIES`] times in a row.
    pub(crate) fn on_a_free_port(name: &str, mut launch: impl FnMut(u16) -> Result<(), Failure>) {
        let mut last_log = String::new();
        for _ in 0..PORT_TRIES {
            match launch(crate::ports::free_port()) {
                Ok(()) => return,
                Err(Failure::PortInUse { log }) => last_log = log,
                Err(Failure::Other(message)) => panic!("{message}"),
            }
        }
        panic!(
            "{name} found its port taken {PORT_TRIES} times in a row; last log:\n{}",
            tail(&last_log, 40)
        )
    }

    /// Panics with why a restart on the same `port` failed, if it did.
    pub(crate) fn restarted(&self, port: u16, result: Result<(), Failure>) {
        match result {
            Ok(()) => {}
            Err(Failure::PortInUse { log }) => panic!(
                "{} could not restart: port {port} was taken while it was stopped\n{}",
                self.name,
                tail(&log, 40)
            ),
            Err(Failure::Other(message)) => panic!("{message}"),
        }
    }
}
