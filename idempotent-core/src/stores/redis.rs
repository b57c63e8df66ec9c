//! The Redis store: a fleet of application servers sharing one Redis, or a Redis Cluster
//! ([`RedisStore::cluster_builder`]).
//!
//! Each record is one Redis string. The claim is one native command, `SET <key> <claim> NX PX
//! <lease> GET` (Redis 7.0 takes `NX` with `GET`): it writes the claim if the key is absent and
//! answers what the key holds otherwise, so a replay and a first claim cost the server no
//! script. What that answer cannot settle alone (a key in progress, whose lease left is
//! needed; a released key's tombstone, whose fence the new one must pass; anything malformed)
//! goes to the claim script, which reads the key again. `complete`, `release` and `extend` are
//! Lua scripts run with `EVALSHA` (loaded again after a `NOSCRIPT`), fenced and atomic. Every
//! command touches one key, so a Redis Cluster routes each by its key. A replay is one round
//! trip; a first call two (claim, complete). On a server older than 7.0, which refuses `NX`
//! with `GET`, every claim runs as the script (Redis 6.0 at least: `SET .. KEEPTTL`).
//!
//! A key the store saw completed (its own completion, or a claim that found the record) is
//! read with a plain `GET` instead: a completed record does not change until it ends, and a
//! read costs the client and the server less than a claim. The store keeps a bounded table of
//! such keys; a `GET` that finds anything but a completed record (the key was forgotten,
//! expired, or claimed again since) goes on to the claim, with one round trip more.
//!
//! # Durability
//!
//! The guarantees hold as long as Redis keeps what it acknowledged. With the default
//! snapshotting, a Redis crash loses the last minutes of writes: completed records among them,
//! so their keys would run again. For payments, run Redis with `appendonly yes`: then a crash
//! of the Redis process loses nothing it acknowledged (it writes the file before it answers),
//! and `appendfsync` decides what a crash of the machine loses: about the last second with
//! `everysec`, nothing with `always`. Set `maxmemory-policy noeviction`: every record has a
//! ttl, so the `volatile-*` policies evict records too, and an evicted live record is a key
//! that can run again.
//! The store reads these settings when it is made and logs a WARN for each unsafe one, or
//! refuses the server ([`RedisStoreBuilder::require_durable_settings`]).
//!
//! Replication is asynchronous. A failover to a replica that had not received a claim lets
//! another caller claim the key and run the body a second time; one that had not received a
//! completion leaves the claim in progress, so the key runs again once its lease ends.
//! [`RedisStoreBuilder::wait_for_replicas`] narrows that window: a claim is kept only once
//! replicas have acknowledged it (else it is released and the call fails before its body
//! runs), and a completion too few acknowledged is logged. A failover behind the store's
//! address (a DNS name, a virtual IP, a proxy) is followed: a demoted server that answers
//! `READONLY` makes the store connect again and run the command on the new primary. On a
//! Redis Cluster the cluster client follows the cluster's own failovers; while a shard has no
//! primary (a few seconds), calls fail with [`StoreError::Unavailable`] without running their
//! bodies.
//!
//! # Time
//!
//! The key's `PX` is the record's life (the lease, then the ttl; a short tombstone after a
//! release), so leases and expiry are measured on the server's clock, never the application's,
//! and clock skew between application servers cannot break a lease. Leases and ttls are sent
//! in whole milliseconds, rounded up ([`held_millis`](crate::held_millis)); the lease left is
//! the key's `PTTL`, whole milliseconds rounded down, answered as at least 1 ms. A record
//! that is present is therefore live, and no operation reads a clock on the server.
//! Redis deletes expired records by itself: [`purge_expired`](Store::purge_expired) has
//! nothing to do.
//!
//! Fences come from the claiming process: its clock in microseconds, kept strictly increasing
//! within the process, or one more than the key's last fence while the key's tombstone is
//! there. A key's fences therefore grow past a release whatever the clocks read, and across
//! expiries as long as the application servers' clocks agree to within the record's life
//! (GUARANTEES.md, "Clocks").
//!
//! With `RedisStoreBuilder::local_cache` (feature `redis-cache`), completed records are also
//! kept in the process, each until its record's expiry as this store saw it (or sooner): a
//! replay of a hot key is then answered with no round trip.
//!
//! # Waiting
//!
//! Waiting uses pub/sub: waiters subscribe to a channel per key over one shared connection
//! (on a Redis Cluster, a shard channel with `SSUBSCRIBE`, on the record's shard), then look at
//! the record, and the look marks it; `complete` and `release` publish on the
//! channel when the record is marked, so no completion can slip between the look and the wait,
//! and a call nobody waits for publishes nothing. The wait also ends when the holder's lease
//! does. If the subscription cannot be made, a waiter falls back to sleeping for
//! [`poll_interval`](RedisStoreBuilder::poll_interval) (50 ms by default); when the subscriber
//! connection is lost, every waiter looks again at once.
//!
//! # Schema
//!
//! A record is the key `<prefix><storage key in hex>` ([`RedisStore::record_key`]; the prefix
//! is [`key_prefix`](RedisStoreBuilder::key_prefix), `idempotent:` by default), and its
//! waiters' channel is `<prefix>done:<storage key in hex>`. On a Redis Cluster the hex is a
//! hash tag, `<prefix>{<hex>}` and `<prefix>done:{<hex>}`, so both live on one shard (the
//! scripts then announce with `SPUBLISH`). The record is one string,
//! `2<state><fingerprint hex>|<fence>|<output>`: the format `2`; the state, `p` in progress,
//! `w` in progress with a waiter to notify, `c` completed or `r` released (a tombstone that
//! keeps the fence, with no fingerprint: `2r|<fence>|`); the fingerprint in 64 hex digits; the
//! fence in decimal; and, for `c` only, the output bytes. `redis/prelude.lua` reads it. A key
//! that holds anything else (another type, another format) is reported as
//! [`StoreError::Corrupt`] for its key, never taken for an absent record; an operator can
//! delete it (`DEL`) to make the key usable again.

mod admin;
mod builder;
mod cache;
mod connection;
mod error;
mod hints;
mod record;
mod scripts;
mod settings;
mod subscriptions;

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{ErrorKind, ServerErrorKind, Value};

use crate::error::StoreError;
use crate::fingerprint::CanonicalArguments;
use crate::hex::hex32;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};
// A lease or ttl as `PX` takes it.
use crate::stores::millis::held_u64 as millis;
use crate::stores::wait::wait_turn;
use connection::Commands;
use error::from_redis;
use record::{Found, Reply};
use scripts::Scripts;
use subscriptions::Subscriptions;

pub use builder::RedisStoreBuilder;

/// How long a released record is kept as a tombstone carrying its fence.
const TOMBSTONE: Duration = Duration::from_secs(1);

/// A [`Store`] in Redis, for a fleet of application servers.
///
/// # Persistence
///
/// The guarantees hold as long as Redis keeps what it acknowledged: for payments, run Redis
/// with `appendonly yes` and `maxmemory-policy noeviction`. The [module docs](self#durability)
/// say what each setting, and a failover, can lose.
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
/// With the feature `redis-tls` (rustls, the ring provider), a `rediss://` URL connects with
/// TLS, the command connection and the pub/sub one alike. The server's certificate is
/// verified against the webpki roots (Mozilla's), or the CA certificates of
/// [`RedisStoreBuilder::root_certificate_file`], and must name the URL's host.
/// `rediss://host:port/#insecure` (the `redis` crate's form) encrypts without verifying the
/// certificate: it keeps out eavesdroppers, not an attacker who can answer in the server's
/// place. Without the feature, a `rediss://` URL is refused by `build`.
///
/// ```no_run
/// use idempotent_core::stores::redis::RedisStore;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::StoreError> {
/// let store = RedisStore::builder("rediss://cache.internal:6380/")
///     .root_certificate_file("/etc/ssl/cache-ca.pem")
///     .build()?;
/// # Ok(()) }
/// ```
///
/// A plain store:
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
    commands: Arc<Commands>,
    /// Whether the store speaks to a Redis Cluster: its keys then carry a hash tag.
    cluster: bool,
    /// The longest one operation may take: the connect timeout plus the response timeout.
    deadline: Duration,
    scripts: Arc<Scripts>,
    subscriptions: Arc<Subscriptions>,
    key_prefix: String,
    poll_interval: Duration,
    /// [`RedisStoreBuilder::wait_for_replicas`].
    wait_for_replicas: Option<(u32, Duration)>,
    /// Whether the server takes `SET NX GET` (Redis 7.0); cleared at its first refusal.
    native_claim: Arc<AtomicBool>,
    /// The completed records kept in the process (`RedisStoreBuilder::local_cache`).
    cache: Option<Arc<cache::LocalCache>>,
    /// The keys this store saw completed, whose replays are a plain `GET` (`hints.rs`).
    completed: Arc<hints::CompletedKeys>,
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
            cluster_urls: None,
            key_prefix: "idempotent:".to_string(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
            wait_for_replicas: None,
            claims_by_script: false,
            root_certificate_file: None,
            local_cache: None,
            require_durable_settings: false,
        }
    }

    /// A builder for a Redis Cluster (Redis 7.0 or later), given the URLs of some of its nodes
    /// (`redis://host:port`; one that answers is enough, the others are tried in turn): the
    /// store reads the slot map from them and sends each command to the primary of its key's
    /// slot, following `MOVED`, `ASK` and failovers.
    ///
    /// Each record key carries its storage key as a hash tag (`idempotent:{<hex>}`), so the
    /// record and the shard channel its waiters listen on (`SSUBSCRIBE`; `SPUBLISH` from the
    /// scripts) live on one shard. TLS to a cluster is not supported yet: a `rediss://` URL is
    /// refused by `build`.
    ///
    /// ```no_run
    /// use idempotent_core::stores::redis::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::StoreError> {
    /// let store = RedisStore::cluster_builder([
    ///     "redis://10.0.0.1:6379/",
    ///     "redis://10.0.0.2:6379/",
    ///     "redis://10.0.0.3:6379/",
    /// ])
    /// .build()?;
    /// # Ok(()) }
    /// ```
    pub fn cluster_builder<I>(urls: I) -> RedisStoreBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let urls: Vec<String> = urls.into_iter().map(Into::into).collect();
        let mut builder = RedisStore::builder(urls.first().cloned().unwrap_or_default());
        builder.cluster_urls = Some(urls);
        builder
    }

    /// The Redis key of a record: the prefix and the storage key in hex; on a Redis Cluster
    /// the hex is in braces, a hash tag, so that the record and its waiters' channel live on
    /// one shard (`idempotent:{<hex>}`).
    ///
    /// ```no_run
    /// # use idempotent_core::{StorageKey, stores::redis::RedisStore};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = RedisStore::builder("redis://127.0.0.1/").build().unwrap();
    /// let key = StorageKey::derive("shop::checkout", None, b"order-1").unwrap();
    /// assert_eq!(store.record_key(&key), format!("idempotent:{key}"));
    ///
    /// let cluster = RedisStore::cluster_builder(["redis://127.0.0.1:7000/"]).build().unwrap();
    /// assert_eq!(cluster.record_key(&key), format!("idempotent:{{{key}}}"));
    /// # }
    /// ```
    pub fn record_key(&self, key: &StorageKey) -> String {
        let mut record_key = String::with_capacity(self.key_prefix.len() + 66);
        let _ = if self.cluster {
            write!(record_key, "{}{{{key}}}", self.key_prefix)
        } else {
            write!(record_key, "{}{key}", self.key_prefix)
        };
        record_key
    }

    /// [`record_key`](Self::record_key) as a command argument, written straight into the
    /// command's buffer (no `String` of its own): every call's command carries it.
    fn record_key_arg<'a>(&'a self, key: &'a StorageKey) -> RecordKey<'a> {
        RecordKey {
            prefix: &self.key_prefix,
            key,
            cluster: self.cluster,
        }
    }

    /// The pub/sub channel on which `complete` and `release` of `key` are announced (the
    /// scripts derive the same name from the record key: `redis/prelude.lua`, `channel`). On
    /// a Redis Cluster it is a shard channel (`SSUBSCRIBE`, `SPUBLISH`) with the record's hash
    /// tag, so it lives on the record's shard.
    fn channel(&self, key: &StorageKey) -> String {
        let mut channel = String::with_capacity(self.key_prefix.len() + 7 + 64);
        let _ = if self.cluster {
            write!(channel, "{}done:{{{key}}}", self.key_prefix)
        } else {
            write!(channel, "{}done:{key}", self.key_prefix)
        };
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
            .arg(self.record_key_arg(key));
        args(&mut command);
        let value = self
            .send(&command, Some(script))
            .await
            .map_err(|error| from_redis("a script call failed", error))?;
        Reply::parse(value, key)
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

    /// The claim as one native command, `SET <record> 2p<fingerprint>|<fence>| NX PX <lease>
    /// GET` (Redis 7.0 accepts `NX` with `GET`): it writes the claim if the key is absent and
    /// answers what the key held otherwise, so an absent key and a replay cost the server no
    /// script. What it cannot answer alone (a key in progress, which needs its `PTTL`; a
    /// tombstone, whose fence the new one must pass; anything malformed) goes to the claim
    /// script, which reads the key again.
    async fn claim_natively(
        &self,
        key: &StorageKey,
        fingerprint: &[u8; 64],
        fence: u64,
        lease: Duration,
    ) -> Result<Native, StoreError> {
        let mut command = redis::Cmd::with_capacity(7, 160 + self.key_prefix.len());
        command
            .arg("SET")
            .arg(self.record_key_arg(key))
            .arg(ClaimRecord { fingerprint, fence })
            .arg("NX")
            .arg("PX")
            .arg(millis(lease))
            .arg("GET");
        let (answer, life) = self.send_claim(&command, key).await;
        match answer {
            Ok(Value::Nil) => Ok(Native::Answered(Claim::Acquired {
                fence: Fence::new(fence),
            })),
            Ok(Value::BulkString(stored)) => Ok(match record::completed(stored, fingerprint) {
                Some(Found::Completed(output)) => {
                    self.completed.insert(key);
                    self.replayed(key, fingerprint, &output, life);
                    Native::Answered(Claim::Completed { output })
                }
                Some(Found::Mismatch) => {
                    self.completed.insert(key);
                    Native::Answered(Claim::Mismatch)
                }
                None => Native::AskScript,
            }),
            Ok(_) => Err(StoreError::Backend {
                message: format!(
                    "SET NX GET answered something other than a record or nil for key {key}"
                ),
                source: None,
            }),
            // Another type under the key: the script reports it as corrupt.
            Err(error) if error.code() == Some("WRONGTYPE") => Ok(Native::AskScript),
            // A server older than 7.0 refuses NX with GET: claim by script from now on.
            Err(error) if refuses_nx_with_get(&error) => {
                tracing::info!(
                    error = %error,
                    "the Redis server refused SET NX GET (it needs Redis 7.0): claims run as a script"
                );
                self.native_claim.store(false, Ordering::Relaxed);
                Ok(Native::AskScript)
            }
            Err(error) => Err(from_redis("a claim failed", error)),
        }
    }

    /// The answer of a key this store saw completed, read with a plain `GET` (see `hints.rs`):
    /// a completed record is answered as the native claim would answer it; anything else
    /// (nothing, a claim in progress, a tombstone, another type) is `None`, for the claim to
    /// answer, and the key is no longer taken for completed. A failure to reach the server is
    /// the call's error, as the claim's would be.
    async fn replay_by_get(
        &self,
        key: &StorageKey,
        fingerprint: &[u8; 64],
    ) -> Result<Option<Claim>, StoreError> {
        let mut command = redis::Cmd::with_capacity(2, 80 + self.key_prefix.len());
        command.arg("GET").arg(self.record_key_arg(key));
        match self.send(&command, None).await {
            Ok(Value::BulkString(stored)) => match record::completed(stored, fingerprint) {
                Some(Found::Completed(output)) => return Ok(Some(Claim::Completed { output })),
                Some(Found::Mismatch) => return Ok(Some(Claim::Mismatch)),
                None => {}
            },
            Ok(_) => {}
            // The server's refusal (another type under the key, say): the claim reports it.
            Err(error) if error.code().is_some() => {}
            Err(error) => return Err(from_redis("a replay failed", error)),
        }
        self.completed.remove(key);
        Ok(None)
    }

    /// The claim as the claim script (`redis/claim.lua`), taking `fence` if it acquires
    /// (or one more than a tombstone's fence).
    async fn claim_by_script(
        &self,
        key: &StorageKey,
        fingerprint: &[u8; 64],
        fence: u64,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let args = |command: &mut redis::Cmd| {
            command.arg(&fingerprint[..]).arg(millis(lease)).arg(fence);
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
    }

    /// [`RedisStoreBuilder::wait_for_replicas`] after a claim of `key` that acquired `fence`:
    /// a claim fewer replicas acknowledged is released, and the call fails without its body.
    async fn replicate_claim(
        &self,
        key: &StorageKey,
        fence: Fence,
        replicas: u32,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let acknowledged = match self
            .replicas_acknowledging(&self.record_key(key), replicas, timeout)
            .await
        {
            Ok(acknowledged) => acknowledged,
            Err(error) => {
                let _ = self.release(key, fence).await;
                return Err(from_redis(
                    "could not learn whether replicas received a claim (WAIT); it was released",
                    error,
                ));
            }
        };
        if acknowledged >= replicas {
            return Ok(());
        }
        let released = self.release(key, fence).await;
        Err(StoreError::Unavailable {
            message: format!(
                "a claim reached {acknowledged} of the {replicas} replicas asked for within {timeout:?} (RedisStoreBuilder::wait_for_replicas), so a failover could lose it; {}: the body did not run, and the call may be retried",
                match released {
                    Ok(_) => "it was released",
                    Err(_) =>
                        "releasing it failed too, so the key is held until the claim's lease ends",
                }
            ),
            source: None,
        })
    }

    /// [`RedisStoreBuilder::wait_for_replicas`] after a completion or a lease renewal of
    /// `key`: the write stands either way; too few acknowledgements are logged.
    async fn replicate_write(
        &self,
        key: &StorageKey,
        write: Replicated,
        replicas: u32,
        timeout: Duration,
    ) {
        let acknowledged = self
            .replicas_acknowledging(&self.record_key(key), replicas, timeout)
            .await;
        let key = crate::telemetry::short_key(key);
        let (what, risk) = match write {
            Replicated::Completion => (
                "completion",
                "it is recorded on the primary, but a failover now could lose it and let the key run again",
            ),
            Replicated::Renewal => (
                "lease renewal",
                "a failover now could end the lease early and let another call take the key over while this body runs",
            ),
        };
        match acknowledged {
            Ok(acknowledged) if acknowledged >= replicas => {}
            Ok(acknowledged) => tracing::warn!(
                key = %key,
                acknowledged,
                replicas,
                ?timeout,
                "a {what} reached fewer replicas than asked for (RedisStoreBuilder::wait_for_replicas): {risk}"
            ),
            Err(error) => tracing::warn!(
                key = %key,
                error = %error,
                "could not learn whether replicas received a {what} (WAIT): {risk}"
            ),
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

/// Whether `error` is a server's refusal of `SET .. NX .. GET`: Redis before 7.0 answers
/// `ERR syntax error`.
fn refuses_nx_with_get(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && error
            .detail()
            .is_some_and(|detail| detail.contains("syntax error"))
}

/// A write that [`RedisStore::replicate_write`] waits for replicas to receive.
#[derive(Clone, Copy)]
enum Replicated {
    Completion,
    Renewal,
}

/// What the native claim made of a key.
enum Native {
    Answered(Claim),
    /// The claim script must answer.
    AskScript,
}

/// A record key as one command argument (see [`RedisStore::record_key_arg`]).
#[derive(Clone, Copy)]
struct RecordKey<'a> {
    prefix: &'a str,
    key: &'a StorageKey,
    cluster: bool,
}

impl redis::ToRedisArgs for RecordKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let hex = hex32(self.key.as_bytes());
        let mut arg = out.writer_for_next_arg();
        // Writes to the command's buffer, which cannot fail.
        let _ = if self.cluster {
            arg.write_all(self.prefix.as_bytes())
                .and_then(|()| arg.write_all(b"{"))
                .and_then(|()| arg.write_all(&hex))
                .and_then(|()| arg.write_all(b"}"))
        } else {
            arg.write_all(self.prefix.as_bytes())
                .and_then(|()| arg.write_all(&hex))
        };
    }
}

/// The native claim's record, `2p<fingerprint>|<fence>|` (`prelude.lua`), as one command
/// argument written straight into the command's buffer.
struct ClaimRecord<'a> {
    fingerprint: &'a [u8; 64],
    fence: u64,
}

impl redis::ToRedisArgs for ClaimRecord<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        // The fence's decimal digits, written by hand: `write!` goes through the formatting
        // machinery, a noticeable share of a replay's client time.
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = self.fence;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        let mut arg = out.writer_for_next_arg();
        // Writes to the command's buffer, which cannot fail.
        let _ = arg
            .write_all(b"2p")
            .and_then(|()| arg.write_all(self.fingerprint))
            .and_then(|()| arg.write_all(b"|"))
            .and_then(|()| arg.write_all(&digits[at..]))
            .and_then(|()| arg.write_all(b"|"));
    }
}

/// The fence for this process's next claim: its clock in microseconds, or one more than the
/// last fence it handed out if the clock has not moved past that (or stepped back). Unique
/// within the process, and growing; across processes, a key's fences grow as long as their
/// clocks agree to within a record's life. Below 2^53 (until the year 2255), so the scripts'
/// Lua numbers hold it exactly.
fn next_fence() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        });
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let fingerprint = hex32(arguments.fingerprint().as_bytes());
            if let Some(claim) = self.cached_claim(key, &fingerprint) {
                return Ok(claim);
            }
            // A key seen completed is read rather than claimed (with the local cache on, the
            // cache keeps what it read, and its claim pipeline reads the record's life too).
            if self.cache.is_none()
                && self.completed.contains(key)
                && let Some(claim) = self.replay_by_get(key, &fingerprint).await?
            {
                return Ok(claim);
            }
            let fence = next_fence();
            let mut claim = None;
            if self.native_claim.load(Ordering::Relaxed) {
                match self.claim_natively(key, &fingerprint, fence, lease).await? {
                    Native::Answered(answer) => claim = Some(answer),
                    Native::AskScript => {}
                }
            }
            let claim = match claim {
                Some(claim) => claim,
                // Boxed, as every path but the native claim's: the future a claim is boxed
                // in stays small enough for the allocator's per-thread cache.
                None => Box::pin(self.claim_by_script(key, &fingerprint, fence, lease)).await?,
            };
            if let (Claim::Acquired { fence }, Some((replicas, timeout))) =
                (&claim, self.wait_for_replicas)
            {
                Box::pin(self.replicate_claim(key, *fence, replicas, timeout)).await?;
            }
            Ok(self.claimed(key, &fingerprint, claim))
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
            let sent = self.before_complete();
            let args = |command: &mut redis::Cmd| {
                command.arg(fence.get()).arg(&output[..]).arg(millis(ttl));
            };
            let write = self.fenced_write(&self.scripts.complete, key, args).await?;
            if write == FencedWrite::Applied {
                if let Some((replicas, timeout)) = self.wait_for_replicas {
                    Box::pin(self.replicate_write(key, Replicated::Completion, replicas, timeout))
                        .await;
                }
                self.completed.insert(key);
            }
            self.completed(key, fence, &output, ttl, sent, write);
            Ok(write)
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
            let write = self.fenced_write(&self.scripts.extend, key, args).await?;
            if write == FencedWrite::Applied
                && let Some((replicas, timeout)) = self.wait_for_replicas
            {
                Box::pin(self.replicate_write(key, Replicated::Renewal, replicas, timeout)).await;
            }
            Ok(write)
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

    /// Deletes the record (`DEL`), and its entry in this store's local cache
    /// (`RedisStoreBuilder::local_cache`, feature `redis-cache`). Other processes' caches are
    /// not told: they may replay the deleted record until their entry ends, at most their
    /// `max_age` after it was made (or at the record's expiry, if sooner).
    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut command = redis::cmd("DEL");
            command.arg(self.record_key(key));
            let deleted = self
                .send(&command, None)
                .await
                .map_err(|error| from_redis("could not delete a record", error));
            // Also when the delete failed: it may have been carried out.
            self.forgotten(key);
            self.completed.remove(key);
            let deleted = deleted?;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{ClaimRecord, RecordKey, RedisStore, refuses_nx_with_get};
    use crate::fingerprint::{CanonicalArguments, Fingerprint};
    use crate::key::StorageKey;
    use crate::store::Store;

    /// The arguments `args` writes, each as its bytes.
    fn written(args: impl redis::ToRedisArgs) -> Vec<Vec<u8>> {
        args.to_redis_args()
    }

    /// Every claim's future is boxed (the `Store` trait returns a `BoxFuture`), so its size is
    /// an allocation per call. The rare paths (connecting, retries, the claim script, `WAIT`,
    /// the cache's pipeline) are boxed apart to keep it small: inline, they made it 2992 bytes.
    #[test]
    fn a_claims_future_leaves_the_rare_paths_out() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        // Built lazily: nothing connects, and the future is never polled.
        let store = RedisStore::builder("redis://127.0.0.1:1/").build().unwrap();
        let key = StorageKey::derive("redis::future", None, b"k").unwrap();
        let arguments = CanonicalArguments::from(Fingerprint::from_bytes([1; 32]));
        let claim = store.claim(&key, &arguments, Duration::from_secs(1));
        let size = std::mem::size_of_val(&*claim);
        assert!(size <= 2048, "a claim's future is {size} bytes");
    }

    #[test]
    fn a_claim_record_is_the_state_the_fingerprint_and_the_fence() {
        let fingerprint = [b'a'; 64];
        for (fence, text) in [
            (0, "0"),
            (7, "7"),
            (10, "10"),
            (1_733_000_000_123_456, "1733000000123456"),
            (u64::MAX, "18446744073709551615"),
        ] {
            let expected = [b"2p".as_slice(), &fingerprint, b"|", text.as_bytes(), b"|"].concat();
            assert_eq!(
                written(ClaimRecord {
                    fingerprint: &fingerprint,
                    fence
                }),
                vec![expected]
            );
        }
    }

    #[test]
    fn a_record_key_is_the_prefix_and_the_key_in_hex_tagged_on_a_cluster() {
        let key = StorageKey::derive("redis::record_key", None, b"k").unwrap();
        let single = RecordKey {
            prefix: "app:",
            key: &key,
            cluster: false,
        };
        let cluster = RecordKey {
            cluster: true,
            ..single
        };
        assert_eq!(written(single), vec![format!("app:{key}").into_bytes()]);
        assert_eq!(
            written(cluster),
            vec![format!("app:{{{key}}}").into_bytes()]
        );
    }

    fn server_error(reply: &[u8]) -> redis::RedisError {
        match redis::parse_redis_value(reply) {
            Ok(value) => value.extract_error().expect_err("an error reply"),
            Err(error) => error,
        }
    }

    #[test]
    fn only_a_syntax_error_means_the_server_refuses_nx_with_get() {
        // Redis 6.2's answer to SET k v NX PX 1 GET.
        assert!(refuses_nx_with_get(&server_error(b"-ERR syntax error\r\n")));
        for other in [
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n".as_slice(),
            b"-ERR invalid expire time in 'set' command\r\n",
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
            b"-READONLY You can't write against a read only replica.\r\n",
        ] {
            assert!(
                !refuses_nx_with_get(&server_error(other)),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
