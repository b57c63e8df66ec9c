//! [`TcpProxy`]: a TCP forwarder on 127.0.0.1 that a test can redirect, or turn into a black
//! hole, to show a client what a failover or a dead network looks like.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What a [`TcpProxy`] does with the bytes it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Bytes go both ways: the client talks to the target.
    Forward,
    /// Nothing goes anywhere, as when the target's host stops answering without closing
    /// anything (a network partition, a host that froze): new connections are accepted and
    /// never answered, and the bytes of the open ones are held, to flow again, in order, when
    /// the mode is back to `Forward` (as TCP delivers them once a partition heals).
    BlackHole,
    /// Requests reach the target, which carries them out, but its answers are lost, and so is
    /// the connection a lost answer was on: it carries nothing more either way (as when the
    /// path back died). The client's commands take effect; the client never hears so.
    DropReplies,
}

impl ProxyMode {
    fn from_u8(value: u8) -> ProxyMode {
        match value {
            1 => ProxyMode::BlackHole,
            2 => ProxyMode::DropReplies,
            _ => ProxyMode::Forward,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            ProxyMode::Forward => 0,
            ProxyMode::BlackHole => 1,
            ProxyMode::DropReplies => 2,
        }
    }
}

#[derive(Debug)]
struct Shared {
    target: AtomicU16,
    mode: AtomicU8,
    stopping: AtomicBool,
    /// Both ends of every connection, to close them when the proxy is dropped.
    streams: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        ProxyMode::from_u8(self.mode.load(Ordering::SeqCst))
    }
}

/// A TCP forwarder on a free 127.0.0.1 port to another 127.0.0.1 port, for one test.
///
/// Each connection it accepts is joined to a new connection to the current target; where new
/// connections go can be changed ([`TcpProxy::redirect`]: a failover behind a fixed address, as a
/// DNS name, a virtual IP or a proxy gives it), and so can what happens to the bytes
/// ([`TcpProxy::set_mode`]). Dropping the proxy closes its listener and every connection.
///
/// ```no_run
/// use idempotent_test_support::{ProxyMode, RedisServer, TcpProxy};
///
/// let (a, b) = (RedisServer::start(), RedisServer::start());
/// let proxy = TcpProxy::start(a.port());
/// let url = proxy.redis_url(); // for the client under test: reaches `a`
/// proxy.redirect(b.port()); // new connections reach `b`; open ones still reach `a`
/// proxy.set_mode(ProxyMode::BlackHole); // nobody answers anything any more
/// # let _ = url;
/// ```
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts forwarding a free 127.0.0.1 port to `127.0.0.1:target`.
    ///
    /// # Panics
    /// If no port can be bound.
    pub fn start(target: u16) -> TcpProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a port for the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let shared = Arc::new(Shared {
            target: AtomicU16::new(target),
            mode: AtomicU8::new(ProxyMode::Forward.to_u8()),
            stopping: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || accept(listener, shared))
        };
        TcpProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The port the proxy listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/` for the proxy's port.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// New connections go to `127.0.0.1:target`; the open ones keep their target.
    pub fn redirect(&self, target: u16) {
        self.shared.target.store(target, Ordering::SeqCst);
    }

    /// What happens to the bytes from now on, on new and open connections alike.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.shared.mode.store(mode.to_u8(), Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees `stopping`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let streams = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for stream in streams.iter() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let _ = client.set_nodelay(true);
        let remember = |stream: &TcpStream| {
            if let Ok(clone) = stream.try_clone() {
                shared
                    .streams
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(clone);
            }
        };
        remember(&client);
        if shared.mode() == ProxyMode::BlackHole {
            // Accepted, never answered: read and drop whatever comes, until closed.
            let shared = Arc::clone(&shared);
            let lost = Arc::new(AtomicBool::new(true));
            thread::spawn(move || pump(client, None, &shared, &lost, false));
            continue;
        }
        let target = shared.target.load(Ordering::SeqCst);
        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = server.set_nodelay(true);
        remember(&server);
        let (Ok(client_in), Ok(server_in)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let lost = Arc::new(AtomicBool::new(false));
        let (up, up_lost) = (Arc::clone(&shared), Arc::clone(&lost));
        thread::spawn(move || pump(client_in, Some(server), &up, &up_lost, false));
        let down = Arc::clone(&shared);
        thread::spawn(move || pump(server_in, Some(client), &down, &lost, true));
    }
}

/// Copies `from` to `to` as the mode allows, until either end closes; then closes both. `lost`
/// is shared by the two directions of one connection: once bytes were dropped, the connection
/// carries nothing more.
fn pump(
    mut from: TcpStream,
    mut to: Option<TcpStream>,
    shared: &Shared,
    lost: &AtomicBool,
    replies: bool,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buffer = [0u8; 16 * 1024];
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        if shared.mode() == ProxyMode::BlackHole && !lost.load(Ordering::SeqCst) {
            // Held, not read: the bytes wait in the sockets' buffers.
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        let read = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        let passes = !lost.load(Ordering::SeqCst)
            && match shared.mode() {
                ProxyMode::Forward => true,
                ProxyMode::BlackHole => false,
                ProxyMode::DropReplies => !replies,
            };
        if !passes {
            lost.store(true, Ordering::SeqCst);
        }
        if passes
            && let Some(to) = to.as_mut()
            && to.write_all(&buffer[..read]).is_err()
        {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    if let Some(to) = to {
        let _ = to.shutdown(Shutdown::Both);
    }
}
