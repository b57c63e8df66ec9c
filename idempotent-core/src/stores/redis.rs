//! The Redis store: a fleet of application servers sharing one Redis (or Redis Cluster).
//!
//! Each record is one Redis string, and each operation one Lua script run with `EVALSHA`
//! (loaded again after a `NOSCRIPT`), touching only that key: every script is atomic, and
//! Redis Cluster routes it by its single key. The key's `PX` is the record's life (the lease,
//! then the ttl), so leases and expiry are measured on the server's clock, never the
//! application's, and clock skew between application servers cannot break a lease. A replay
//! is one round trip; a first call two (claim, complete). The record layout is described in
//! `redis/prelude.lua`; the scripts use `SET .. KEEPTTL`, which Redis added in 6.0.
//!
//! Waiting uses pub/sub: waiters subscribe to a channel per key over one shared connection,
//! then look at the record, and the look marks it; `complete` and `release` publish on the
//! channel when the record is marked, so no completion can slip between the look and the wait,
//! and a call nobody waits for publishes nothing. If the subscription cannot be made, a waiter
//! falls back to sleeping for a short poll interval.

mod scripts;
mod subscriptions;

use std::fmt::{self, Write as _};

use crate::redact::RedactedUrl;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::hex::hex32;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};
// A lease or ttl as `PX` takes it.
use crate::stores::millis::held_u64 as millis;
use crate::stores::wait::wait_turn;
use scripts::Scripts;
use subscriptions::Subscriptions;

/// How long a released record is kept as a tombstone carrying its fence.
const TOMBSTONE: Duration = Duration::from_secs(1);

/// Configures a [`RedisStore`].
///
/// ```no_run
/// use std::time::Duration;
/// use idempotent_core::stores::redis::RedisStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::StoreError> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .key_prefix("shop:idem:")
///     .connect_timeout(Duration::from_millis(500))
///     .response_timeout(Duration::from_secs(1))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    key_prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    poll_interval: Duration,
}

/// The URL's password is masked: `redis://user:***@host`.
impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &RedactedUrl(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

impl RedisStoreBuilder {
    /// Prefix of every Redis key and channel the store uses (default `"idempotent:"`): keeps
    /// records apart from other data, and lets several applications share a server.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How long connecting may take before a call fails with a store error (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one command may take before a call fails with a store error (default 1 s).
    ///
    /// One store operation takes at most the connect timeout plus the response timeout (one
    /// connection attempt, no backoff, and a deadline around the whole operation): with the
    /// defaults, a call against a server that is down or black-holed fails within 2 s. A
    /// command that timed out may still have been carried out; see [`RedisStore`], "Timeouts".
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How often a waiter looks again when pub/sub is unavailable (default 50 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The store. It connects on first use and reconnects by itself after an outage, so this
    /// succeeds while the server is down; only a malformed URL fails. Must be called within a
    /// Tokio runtime.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let client =
            redis::Client::open(self.url.as_str()).map_err(|error| StoreError::Backend {
                // Neither the URL nor the driver's error, which may quote it: only the URL
                // with its password masked, and the kind of mistake.
                message: format!(
                    "invalid Redis URL {:?} ({:?}): write redis://[user:password@]host[:port][/db], with URL-special characters in the password percent-encoded",
                    RedactedUrl(&self.url),
                    error.kind()
                ),
                source: None,
            })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            // One connection attempt per call, no backoff: a call fails within the connect
            // timeout plus the response timeout, and the caller's retry policy, not ours,
            // decides how long to keep trying.
            .set_number_of_retries(0);
        let connection = Connection::new(client.clone(), config)?;
        Ok(RedisStore {
            connection: Arc::new(connection),
            deadline: self.connect_timeout + self.response_timeout,
            scripts: Arc::new(Scripts::new()),
            subscriptions: Arc::new(Subscriptions::new(client, self.connect_timeout)),
            key_prefix: self.key_prefix,
            poll_interval: self.poll_interval,
        })
    }
}

/// A [`Store`] in Redis, for a fleet of application servers.
///
/// # Persistence
///
/// The guarantees hold as long as Redis keeps what it acknowledged. With the default
/// snapshotting, a Redis crash loses the last minutes of writes: completed records among them,
/// so their keys would run again. For payments, run Redis with `appendonly yes`: then a crash
/// of the Redis process loses nothing it acknowledged (it writes the file before it answers),
/// and `appendfsync` decides what a crash of the machine loses: about the last second with
/// `everysec`, nothing with `always`. With
/// replication, a failover to a replica that had not received a claim can let a key run twice;
/// `WAIT 1 0` after each write is not used by this store. A failover behind the store's address
/// (a DNS name, a virtual IP, a proxy) is followed: a demoted server that answers `READONLY`
/// makes the store connect again and run the command on the new primary. Set
/// `maxmemory-policy noeviction` (or a `volatile-*` policy on a dedicated instance): an evicted
/// live record is a key that can run again.
///
/// # Timeouts
///
/// A command whose answer does not come within the response timeout fails with
/// [`StoreError::Unavailable`], and the connection is replaced (a host that stopped answering
/// may never answer on it again). The server may still have carried the command out; what that
/// leaves behind:
///
/// - a claim: the key is held until the claim's lease ends. The body did not run (its caller
///   got the error); callers in between see the key in progress, and the first claim after the
///   lease acquires it.
/// - a `complete`: the record stands. The engine tries `complete` again; that is fenced, and
///   the caller gets its value as `Outcome::Unrecorded`; later calls replay.
/// - a `release`: the key is free. An `extend`: the lease is longer.
///
/// # TLS
///
/// Use a `rediss://` URL with the `redis` crate's `tls-rustls` or `tls-native-tls` feature
/// enabled in your own `Cargo.toml` (features are additive).
///
/// ```no_run
/// use std::sync::Arc;
/// use idempotent_core::{set_default_store, stores::redis::RedisStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379/").build()?;
/// set_default_store(Arc::new(store))?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: Arc<Connection>,
    /// The longest one operation may take: the connect timeout plus the response timeout.
    deadline: Duration,
    scripts: Arc<Scripts>,
    subscriptions: Arc<Subscriptions>,
    key_prefix: String,
    poll_interval: Duration,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A builder for the server at `url` (`redis://host:port/db`, or `rediss://` for TLS).
    ///
    /// ```
    /// let builder = idempotent_core::stores::redis::RedisStore::builder("redis://127.0.0.1/");
    /// ```
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            key_prefix: "idempotent:".to_string(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
        }
    }

    /// The Redis key of a record: the prefix and the storage key in hex.
    ///
    /// ```no_run
    /// # use idempotent_core::{StorageKey, stores::redis::RedisStore};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = RedisStore::builder("redis://127.0.0.1/").build().unwrap();
    /// let key = StorageKey::derive("shop::checkout", None, b"order-1").unwrap();
    /// assert_eq!(store.record_key(&key), format!("idempotent:{key}"));
    /// # }
    /// ```
    pub fn record_key(&self, key: &StorageKey) -> String {
        let mut record_key = String::with_capacity(self.key_prefix.len() + 64);
        let _ = write!(record_key, "{}{key}", self.key_prefix);
        record_key
    }

    /// The pub/sub channel on which `complete` and `release` of `key` are announced (the
    /// scripts derive the same name from the record key: `redis/prelude.lua`, `channel`).
    fn channel(&self, key: &StorageKey) -> String {
        let mut channel = String::with_capacity(self.key_prefix.len() + 5 + 64);
        let _ = write!(channel, "{}done:{key}", self.key_prefix);
        channel
    }

    /// Runs `script` on `key`'s record with the arguments `args` adds.
    ///
    /// The `EVALSHA` is built here rather than through `redis::ScriptInvocation`, which copies
    /// every argument twice; a replay is one script call, so its client cost is the store's.
    async fn invoke(
        &self,
        script: &redis::Script,
        key: &StorageKey,
        args: impl FnOnce(&mut redis::Cmd),
    ) -> Result<Reply, StoreError> {
        // Sized for the usual arguments (sha, key, fingerprint or fence, milliseconds), so
        // building the command does not grow its buffer; an output grows it once.
        let mut command = redis::Cmd::with_capacity(8, 192 + self.key_prefix.len());
        command
            .arg("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(self.record_key(key));
        args(&mut command);
        let value = self
            .send(&command, Some(script))
            .await
            .map_err(|error| from_redis("a script call failed", error))?;
        Reply::parse(value, key)
    }

    /// Sends `command` (running `script` if the command is its `EVALSHA`) within the store's
    /// deadline, the connect timeout plus the response timeout.
    ///
    /// The common path needs no timer of its own: it makes at most one connection attempt and
    /// sends one command, each bounded by its timeout. A server that has lost its script cache
    /// (a restart, a failover, `SCRIPT FLUSH`) answers `NOSCRIPT`: the script is loaded and run
    /// again. A server that answers `READONLY` was demoted to a replica (a failover) but keeps
    /// its clients' connections: the command is sent once more on a new connection, which
    /// reaches whatever server the address leads to now; nothing was written by the first
    /// attempt (a script stops at its first write, and an error there aborts it). These second
    /// tries run within what is left of the deadline. A response timeout drops the connection,
    /// so that the next call connects afresh rather than queue behind a host that may never
    /// answer again.
    async fn send(
        &self,
        command: &redis::Cmd,
        script: Option<&redis::Script>,
    ) -> Result<Value, RedisError> {
        let started = Instant::now();
        let (mut generation, mut manager) = self.connection.current();
        let mut error = match command.query_async::<Value>(&mut manager).await {
            Err(error) => error,
            answer => return answer,
        };
        let again = async {
            let (mut loaded, mut replaced) = (false, false);
            loop {
                if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                    && !loaded
                    && let Some(script) = script
                {
                    loaded = true;
                    if let Err(load) = script.load_async(&mut manager).await {
                        error = load;
                        continue;
                    }
                } else if is_demoted(&error) && !replaced {
                    replaced = true;
                    // The server now reached may lack the scripts.
                    loaded = false;
                    (generation, manager) = self.connection.replace(generation);
                } else {
                    if error.is_timeout() {
                        self.connection.replace(generation);
                    }
                    return Err(error);
                }
                match command.query_async::<Value>(&mut manager).await {
                    Err(next) => error = next,
                    answer => return answer,
                }
            }
        };
        let left = self.deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, again).await {
            Ok(result) => result,
            Err(_) => {
                // A connection that took all of the deadline is as good as black-holed.
                self.connection.replace(generation);
                Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {:?} (the connect timeout plus the response timeout)",
                        self.deadline
                    ),
                )))
            }
        }
    }

    async fn fenced_write(
        &self,
        script: &redis::Script,
        key: &StorageKey,
        args: impl FnOnce(&mut redis::Cmd),
    ) -> Result<FencedWrite, StoreError> {
        match self.invoke(script, key, args).await? {
            Reply::Int(1) => Ok(FencedWrite::Applied),
            Reply::Int(0) => Ok(FencedWrite::Fenced),
            other => Err(other.unexpected(key)),
        }
    }

    /// How long `key`'s lease still runs, if it is in progress.
    async fn lease_left(&self, key: &StorageKey) -> Result<Option<Duration>, StoreError> {
        match self.invoke(&self.scripts.in_progress, key, |_| {}).await? {
            Reply::InProgress(left) => Ok(Some(left)),
            Reply::NotInProgress => Ok(None),
            other => Err(other.unexpected(key)),
        }
    }
}

/// Whether `error` says the server the connection reaches is not a primary: demoted to a
/// replica by a failover (`READONLY`), or a replica cut off from its primary (`MASTERDOWN`).
/// A new connection to the same address may reach the new primary.
fn is_demoted(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    )
}

/// Whether `error` is a passing state of the deployment, not of the request: a demoted server,
/// or one loading its data after a restart (`LOADING`).
fn is_passing(error: &RedisError) -> bool {
    is_demoted(error) || error.kind() == ErrorKind::Server(ServerErrorKind::BusyLoading)
}

/// The connection commands go over: a `ConnectionManager`, which reconnects by itself when the
/// connection breaks, replaced by a new one when the server it reaches answers but can no
/// longer serve (see `RedisStore::send`). The generation tells a replacement asked for by many
/// calls that met the same failure apart from a later one: one new connection per failure.
struct Connection {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: RwLock<(u64, ConnectionManager)>,
}

impl Connection {
    fn new(client: redis::Client, config: ConnectionManagerConfig) -> Result<Self, StoreError> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|error| unavailable("could not set up the Redis connection", error))?;
        Ok(Self {
            client,
            config,
            current: RwLock::new((0, manager)),
        })
    }

    fn current(&self) -> (u64, ConnectionManager) {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (current.0, current.1.clone())
    }

    /// A new connection in place of generation `seen`, unless that was replaced already; the
    /// current one either way. The old one closes once its last command has its answer.
    fn replace(&self, seen: u64) -> (u64, ConnectionManager) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.0 == seen
            && let Ok(manager) =
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
        {
            *current = (seen + 1, manager);
        }
        (current.0, current.1.clone())
    }
}

/// A script's answer. The common answers are scalars (see `redis/claim.lua`): what an
/// integer means depends on the script.
enum Reply {
    /// A claim's new fence; a fenced write's 1 (applied) or 0 (fenced).
    Int(i64),
    InProgress(Duration),
    Completed(Vec<u8>),
    Mismatch,
    NotInProgress,
}

impl Reply {
    fn parse(value: Value, key: &StorageKey) -> Result<Self, StoreError> {
        let malformed = |what: &str| StoreError::Backend {
            message: format!("unexpected reply from a store script for key {key}: {what}"),
            source: None,
        };
        let items = match value {
            Value::Array(items) => items,
            // The claim answers a replay with the bare output: no array and tag to build on
            // the server or to allocate on the client, for the most common answer.
            Value::BulkString(output) => return Ok(Reply::Completed(output)),
            Value::Int(number) => return Ok(Reply::Int(number)),
            _ => return Err(malformed("neither an array, an output nor a number")),
        };
        let mut items = items.into_iter();
        let tag = match items.next() {
            Some(Value::BulkString(tag)) => tag,
            _ => return Err(malformed("no tag")),
        };
        let arg = items.next();
        Ok(match (tag.as_slice(), arg) {
            (b"p", Some(Value::Int(left))) => {
                // `PTTL` rounds down: a lease with less than a millisecond left is still live.
                Reply::InProgress(crate::stores::millis::left(left))
            }
            (b"m", _) => Reply::Mismatch,
            (b"n", _) => Reply::NotInProgress,
            (b"x", Some(Value::BulkString(problem))) => {
                return Err(StoreError::Corrupt {
                    key: key.to_hex(),
                    message: String::from_utf8_lossy(&problem).into_owned(),
                });
            }
            _ => return Err(malformed("unknown tag")),
        })
    }

    fn unexpected(self, key: &StorageKey) -> StoreError {
        StoreError::Backend {
            message: format!("a store script answered out of turn for key {key}"),
            source: None,
        }
    }
}

fn unavailable(message: &str, error: RedisError) -> StoreError {
    StoreError::Unavailable {
        message: format!("{message}: {error}"),
        source: Some(Box::new(error)),
    }
}

fn from_redis(message: &str, error: RedisError) -> StoreError {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || is_passing(&error)
    {
        unavailable(message, error)
    } else {
        StoreError::Backend {
            message: format!("{message}: {error}"),
            source: Some(Box::new(error)),
        }
    }
}

impl Store for RedisStore {
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        fingerprint: &'a Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let fingerprint = hex32(fingerprint.as_bytes());
            let args = |command: &mut redis::Cmd| {
                command.arg(&fingerprint[..]).arg(millis(lease));
            };
            match self.invoke(&self.scripts.claim, key, args).await? {
                Reply::Int(fence) => match u64::try_from(fence) {
                    Ok(fence) if fence > 0 => Ok(Claim::Acquired {
                        fence: Fence::new(fence),
                    }),
                    _ => Err(Reply::Int(fence).unexpected(key)),
                },
                Reply::InProgress(retry_after) => Ok(Claim::InProgress { retry_after }),
                Reply::Completed(output) => Ok(Claim::Completed {
                    output: output.into(),
                }),
                Reply::Mismatch => Ok(Claim::Mismatch),
                other => Err(other.unexpected(key)),
            }
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let args = |command: &mut redis::Cmd| {
                command.arg(fence.get()).arg(&output[..]).arg(millis(ttl));
            };
            self.fenced_write(&self.scripts.complete, key, args).await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let args = |command: &mut redis::Cmd| {
                command.arg(fence.get()).arg(millis(TOMBSTONE));
            };
            self.fenced_write(&self.scripts.release, key, args).await
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let args = |command: &mut redis::Cmd| {
                command.arg(fence.get()).arg(millis(lease));
            };
            self.fenced_write(&self.scripts.extend, key, args).await
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Subscribe first, then look: a completion after the look is then always heard.
        let subscription = async {
            let subscription = self.subscriptions.subscribe(self.channel(key)).await?;
            Some(subscription.notified())
        };
        Box::pin(wait_turn(
            subscription,
            self.lease_left(key),
            max,
            self.poll_interval,
        ))
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut command = redis::cmd("DEL");
            command.arg(self.record_key(key));
            let deleted = self
                .send(&command, None)
                .await
                .map_err(|error| from_redis("could not delete a record", error))?;
            let deleted = match deleted {
                Value::Int(deleted) => deleted,
                _ => {
                    return Err(StoreError::Backend {
                        message: "DEL answered something other than a number".to_string(),
                        source: None,
                    });
                }
            };
            Ok(deleted > 0)
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        // Redis expires records by itself (PEXPIRE): nothing is left to purge.
        Box::pin(std::future::ready(Ok(0)))
    }
}
