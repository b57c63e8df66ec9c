//! Real servers for the tests of the stores: a [`RedisServer`] and a [`PostgresServer`] that a
//! test starts itself (and a [`NatsServer`] with JetStream, for the NATS queue source), on a
//! free 127.0.0.1 port in its own temporary folder, and that are stopped and removed when
//! dropped; and a [`RedisCluster`] of three primaries and three replicas made of such servers,
//! whose primaries a test can kill to see a failover. Nothing is mocked, and nothing but the
//! server binaries is needed: `scripts/install-test-deps` installs `redis-server` (with
//! `redis-cli`), PostgreSQL 15 and `nats-server` where they are missing.
//!
//! The API is synchronous (std only): call it from plain `#[test]`s and from `#[tokio::test]`s
//! alike (starting a server blocks the calling thread for a moment, which a test can afford).
//!
//! Every server is independent, so tests may run in parallel, in one process or several. Where
//! tests can share a server, [`shared_redis`] and [`shared_postgres`] start one per test binary on
//! first use. Servers are cleaned up even when their test process dies without dropping them
//! (statics are never dropped, a process may be killed): each server has a small watchdog
//! process that stops it and removes its folder once the test process is gone.
//!
//! ```no_run
//! use idempotent_test_support::{PostgresServer, RedisOptions, RedisServer};
//!
//! // A Redis whose data survives a restart, for a test of what a store does across one.
//! let mut redis = RedisServer::start_with(RedisOptions { appendonly: true, ..Default::default() });
//! redis.command(&["SET", "k", "v"]);
//! redis.restart();
//! assert_eq!(redis.command(&["GET", "k"]), "v");
//!
//! // A PostgreSQL database of one's own in the binary's shared server.
//! let url = idempotent_test_support::shared_postgres().create_unique_database("test");
//! # let _ = url;
//! ```
//!
//! This crate is for tests only, and not published.

#![warn(missing_docs)]

mod nats;
mod ports;
mod postgres;
mod process;
mod proxy;
mod redis;
mod redis_cluster;
mod resp;
mod tls;

pub use nats::{NATS_SERVER_ENV, NatsServer};
pub use ports::free_port;
pub use postgres::{
    DEFAULT_PG_BINDIR, PG_BINDIR_ENV, PostgresOptions, PostgresServer, database_of, shared_postgres,
};
pub use process::TMPDIR_ENV;
pub use proxy::{ProxyMode, TcpProxy};
pub use redis::{REDIS_SERVER_ENV, RedisOptions, RedisServer, shared_redis};
pub use redis_cluster::RedisCluster;
pub use tls::TlsFiles;
