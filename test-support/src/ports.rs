//! Free TCP ports on 127.0.0.1.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

/// Ports this process has already handed out: never handed out twice, so that two servers
/// started at the same moment by two tests of one process cannot race for one port.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding `127.0.0.1:0` and dropping the listener, so another process may
/// still take it before the caller binds it: servers started by this crate retry with a new port
/// when that happens. Within one process a port is never returned twice.
///
/// Also useful on its own, for an address where nothing listens:
///
/// ```
/// let port = idempotent_test_support::free_port();
/// assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
/// ```
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|error| panic!("cannot bind 127.0.0.1:0 to find a free port: {error}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|error| panic!("cannot read the address of a bound listener: {error}"))
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 after 1000 tries")
}
