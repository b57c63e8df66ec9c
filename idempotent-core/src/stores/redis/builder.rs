//! Configuring a [`RedisStore`].

use std::fmt;
#[cfg(feature = "redis-tls")]
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};

use super::RedisStore;
use super::cache;
use super::connection::{Cluster, Commands, Connection};
use super::error::from_redis;
use super::hints::CompletedKeys;
use super::scripts::Scripts;
use super::settings::{self, Check, Node};
use super::subscriptions::{Source, Subscriptions};
use crate::error::StoreError;
use crate::redact::RedactedUrl;

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
    pub(super) url: String,
    /// For a Redis Cluster: the nodes' URLs (`url` is then the first of them).
    pub(super) cluster_urls: Option<Vec<String>>,
    pub(super) key_prefix: String,
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
    pub(super) poll_interval: Duration,
    /// `WAIT <replicas> <timeout>` after each claim that acquires and each completion.
    pub(super) wait_for_replicas: Option<(u32, Duration)>,
    /// Claims by the script only, as on a server older than Redis 7.0.
    pub(super) claims_by_script: bool,
    /// The CA file for `rediss://` URLs, in place of the webpki roots.
    pub(super) root_certificate_file: Option<PathBuf>,
    /// The local cache of completed records, if asked for.
    pub(super) local_cache: Option<cache::Settings>,
    /// Whether [`RedisStoreBuilder::connect`] refuses a server that may lose records.
    pub(super) require_durable_settings: bool,
}

/// The URL's password is masked: `redis://user:***@host`.
impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &RedactedUrl(&self.url))
            .field(
                "cluster_urls",
                &self
                    .cluster_urls
                    .as_ref()
                    .map(|urls| urls.iter().map(|url| RedactedUrl(url)).collect::<Vec<_>>()),
            )
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("wait_for_replicas", &self.wait_for_replicas)
            .field("root_certificate_file", &self.root_certificate_file)
            .field("local_cache", &self.local_cache)
            .field("require_durable_settings", &self.require_durable_settings)
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

    /// After each claim that acquires a key, each completion and each lease renewal, waits
    /// until `replicas` replicas of the key's primary have acknowledged it (Redis `WAIT`), for
    /// at most `timeout`; off by default.
    ///
    /// Redis replicates asynchronously: a failover to a replica that had not yet received a
    /// claim lets another caller claim the key and run the body a second time, and one that
    /// had not received a completion lets the next retry run it again. With this option:
    ///
    /// - a claim that fewer than `replicas` acknowledged within `timeout` is released at once
    ///   and the call fails with [`StoreError::Unavailable`] without running the body (the
    ///   caller may retry);
    /// - a completion that fewer acknowledged stands (the body ran; its output is recorded
    ///   on the primary) and is logged as a WARN, since a failover now could lose it;
    /// - so does a lease renewal (the lease is renewed on the primary; a failover now could
    ///   end it early, and let another caller take the key over while the body runs).
    ///
    /// It narrows the window in which a failover loses a claim or a record to what Redis
    /// itself cannot promise: `WAIT` does not make Redis strongly consistent (a failover may
    /// still promote a replica that missed the write, e.g. one that lagged when the
    /// acknowledging one failed too). It costs a round trip after each claim, completion and
    /// renewal, and the time replicas take to acknowledge. `timeout` must be shorter than the
    /// [response timeout](Self::response_timeout), which bounds every command and the `WAIT`
    /// with it; `build` refuses it otherwise.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idempotent_core::stores::redis::RedisStore;
    ///
    /// let builder = RedisStore::cluster_builder(["redis://10.0.0.1:6379/"])
    ///     .wait_for_replicas(1, Duration::from_millis(100));
    /// ```
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_for_replicas = Some((replicas, timeout));
        self
    }

    /// Every claim runs as the claim script, as it does on a server older than Redis 7.0 (which
    /// refuses `SET .. NX .. GET`; the store finds that out by itself). For testing that path
    /// on a newer server.
    #[doc(hidden)]
    pub fn claims_by_script_only(mut self) -> Self {
        self.claims_by_script = true;
        self
    }

    /// For a `rediss://` URL: the CA certificates (a PEM file) the server's certificate is
    /// verified against, in place of the webpki roots (Mozilla's). The certificate must also
    /// name the URL's host.
    ///
    /// ```
    /// use idempotent_core::stores::redis::RedisStore;
    ///
    /// let builder = RedisStore::builder("rediss://cache.internal:6380/")
    ///     .root_certificate_file("/etc/ssl/cache-ca.pem");
    /// ```
    #[cfg(feature = "redis-tls")]
    pub fn root_certificate_file(mut self, path: impl AsRef<Path>) -> Self {
        self.root_certificate_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// Keeps completed records in the process (feature `redis-cache`; off by default), so that
    /// replays of hot keys cost no round trip: a claim whose key has a live entry is answered
    /// from it, `Completed` with the recorded output when the call's fingerprint is the
    /// record's and `Mismatch` (`Error::KeyReused`) when it is not, as the record itself
    /// would answer.
    ///
    /// - `max_bytes` bounds the cache's weight: each entry weighs its output's length plus
    ///   256 bytes (its key, fingerprint and the cache's bookkeeping). Past it, the entries
    ///   least likely to be used again are evicted (moka's TinyLFU). The bound is kept within
    ///   a short while of each insert, not on every instant.
    /// - `max_age` bounds how long an entry is kept after it is made.
    ///
    /// Entries are made from what this store sees of a record: its own `complete`, kept until
    /// (the time before it was sent) + the ttl; or a claim that finds the record completed,
    /// which then also asks for the record's `PTTL` in the same round trip (a pipeline) and
    /// keeps it until (the time before it was sent) + that. An entry therefore never outlives
    /// its record's expiry (both clocks running at the same rate), and
    /// [`purge_expired`](crate::Store::purge_expired) still has nothing to do. A claim that
    /// finds the record in another way (the claim script, on a server older than Redis 7.0 or
    /// after a tombstone) makes no entry.
    ///
    /// What it trades:
    ///
    /// - **Staleness after a forget.** [`remove`](crate::Store::remove) (`forget`) through
    ///   this store deletes its entry, but the caches of other processes (other stores) do not
    ///   hear of it: they go on replaying the forgotten record until their entry ends, at most
    ///   `max_age` later (or at the record's expiry, if sooner). Choose `max_age` as the
    ///   longest such a replay may go on; with no forgets in the application, it can be long.
    /// - **Memory**, up to `max_bytes` (and a small table of the claims this store holds,
    ///   remembered for the entry their completion makes).
    /// - A claim that does not hit the cache sends `PTTL` beside its `SET NX GET`: one round
    ///   trip still, one more command for the server.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use idempotent_core::stores::redis::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::StoreError> {
    /// // Up to 64 MiB of records; a record forgotten elsewhere is replayed here for 5 s at most.
    /// let store = RedisStore::builder("redis://127.0.0.1:6379/")
    ///     .local_cache(64 << 20, Duration::from_secs(5))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "redis-cache")]
    pub fn local_cache(mut self, max_bytes: u64, max_age: Duration) -> Self {
        self.local_cache = Some(cache::Settings { max_bytes, max_age });
        self
    }

    /// The client for the URL: with TLS for `rediss://` (feature `redis-tls`).
    fn client(&self) -> Result<redis::Client, StoreError> {
        let invalid = |error: redis::RedisError| StoreError::Backend {
            // Neither the URL nor the driver's error, which may quote it: only the URL
            // with its password masked, and the kind of mistake.
            message: format!(
                "invalid Redis URL {:?} ({:?}): write redis://[user:password@]host[:port][/db] (rediss:// for TLS), with URL-special characters in the password percent-encoded",
                RedactedUrl(&self.url),
                error.kind()
            ),
            source: None,
        };
        let tls = self.url.starts_with("rediss://");
        if !tls {
            if self.root_certificate_file.is_some() {
                return Err(StoreError::Backend {
                    message: format!(
                        "a CA file is set for {:?}, which does not use TLS: write rediss:// to connect with TLS",
                        RedactedUrl(&self.url)
                    ),
                    source: None,
                });
            }
            return redis::Client::open(self.url.as_str()).map_err(invalid);
        }
        #[cfg(not(feature = "redis-tls"))]
        {
            Err(StoreError::Backend {
                message: format!(
                    "the URL {:?} asks for TLS (rediss://), which this build cannot make: enable the feature redis-tls of idempotent-core",
                    RedactedUrl(&self.url)
                ),
                source: None,
            })
        }
        #[cfg(feature = "redis-tls")]
        {
            let root_cert = match &self.root_certificate_file {
                Some(path) => Some(read_roots(path)?),
                None => None,
            };
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert,
            };
            redis::Client::build_with_tls(self.url.as_str(), certificates).map_err(invalid)
        }
    }

    /// The client for a Redis Cluster's nodes.
    fn cluster_client(&self, urls: &[String]) -> Result<ClusterClient, StoreError> {
        if urls.is_empty() {
            return Err(StoreError::Backend {
                message: "a Redis Cluster store needs the URL of at least one node (RedisStore::cluster_builder)".to_string(),
                source: None,
            });
        }
        if let Some(url) = urls.iter().find(|url| url.starts_with("rediss://")) {
            return Err(StoreError::Backend {
                message: format!(
                    "the Redis Cluster node URL {:?} asks for TLS, which the cluster store does not make yet: reach the cluster over redis:// (a private network, or a TLS tunnel)",
                    RedactedUrl(url)
                ),
                source: None,
            });
        }
        if self.root_certificate_file.is_some() {
            return Err(StoreError::Backend {
                message: "a CA file is set for a Redis Cluster store, which does not use TLS"
                    .to_string(),
                source: None,
            });
        }
        ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.response_timeout)
            .build()
            .map_err(|error| StoreError::Backend {
                message: format!(
                    "invalid Redis Cluster node URLs {:?} ({:?}): write redis://[user:password@]host[:port] for each node, all with the same user and password",
                    urls.iter().map(|url| RedactedUrl(url)).collect::<Vec<_>>(),
                    error.kind()
                ),
                source: None,
            })
    }

    /// Refuse a Redis that may lose records (default `false`: such a server is logged at WARN
    /// level, and the store runs on it).
    ///
    /// The store reads each server's `maxmemory-policy`, `appendonly` and `save` when it is
    /// made, on every node the builder was given for a Redis Cluster. A record Redis drops
    /// before its time is a key whose body runs again, so these settings are unsafe:
    ///
    /// - any `maxmemory-policy` but `noeviction`: every record has a TTL, so the `volatile-*`
    ///   policies evict records too. A policy counts even while `maxmemory` is 0 (no limit),
    ///   since a limit can be set at run time;
    /// - `appendonly no`: with `save ""` a restart loses every record; with snapshots, a crash
    ///   loses the records written since the last one.
    ///
    /// Without this option each unsafe setting is one `tracing` WARN (target
    /// `idempotent_core::stores::redis`, fields `node`, `setting`, `value` and `fix`). With it,
    /// [`connect`](Self::connect) fails with [`StoreError::Backend`] naming each unsafe
    /// setting, its value and its fix, and [`build`](Self::build), which does not connect and
    /// so cannot read them, fails at once, saying to use `connect`.
    ///
    /// The settings are read with `CONFIG GET`, or from `INFO` where `CONFIG` is renamed away
    /// or forbidden (as on many managed services; `INFO` shows the policy and whether the
    /// append-only file is on, which is all that decides). A server whose settings cannot be
    /// read at all (neither command allowed, or, on a cluster, a node that does not answer)
    /// is refused with this option, since it was asked for a server seen to keep every record;
    /// without it, that is logged at INFO level and the store runs.
    ///
    /// ```no_run
    /// use idempotent_core::stores::redis::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::StoreError> {
    /// // Fails, naming the setting and its fix, unless Redis runs with
    /// // maxmemory-policy noeviction and appendonly yes.
    /// let store = RedisStore::builder("redis://127.0.0.1:6379/")
    ///     .require_durable_settings(true)
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn require_durable_settings(mut self, require: bool) -> Self {
        self.require_durable_settings = require;
        self
    }

    /// The store. It connects on first use and reconnects by itself after an outage, so this
    /// succeeds while the server is down; only a malformed URL fails. Must be called within a
    /// Tokio runtime.
    ///
    /// The server's eviction and persistence settings are checked once in the background (a
    /// task spawned on the runtime, logging to the `tracing` subscriber current here): each
    /// unsafe one is logged at WARN level (see
    /// [`require_durable_settings`](Self::require_durable_settings)). With
    /// `require_durable_settings(true)` this fails: use [`connect`](Self::connect), which reads
    /// the settings before it answers.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        if self.require_durable_settings {
            return Err(StoreError::Backend {
                message: "require_durable_settings(true) is set, and build() does not connect, so it cannot read the server's settings: make the store with RedisStoreBuilder::connect().await".to_string(),
                source: None,
            });
        }
        let (store, check) = self.assemble()?;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                use tracing::instrument::WithSubscriber as _;
                runtime.spawn(
                    async move {
                        for report in check.run().await {
                            report.log();
                        }
                    }
                    .with_current_subscriber(),
                );
            }
            Err(_) => tracing::info!(
                target: "idempotent_core::stores::redis",
                "the Redis store was built outside a Tokio runtime: its eviction and persistence settings are not checked"
            ),
        }
        Ok(store)
    }

    /// The store, connected: it connects (within the connect timeout plus the response
    /// timeout), reads the eviction and persistence settings of the server (of every node the
    /// builder was given, for a Redis Cluster), and answers the store. An unsafe setting is
    /// logged at WARN level, or, with
    /// [`require_durable_settings(true)`](Self::require_durable_settings), refused with
    /// [`StoreError::Backend`].
    ///
    /// Fails with [`StoreError::Unavailable`] if the server cannot be reached, and as
    /// [`build`](Self::build) for a malformed URL. Settings that cannot be read fail it only
    /// with `require_durable_settings(true)`; otherwise they are logged at INFO level.
    ///
    /// ```no_run
    /// use idempotent_core::stores::redis::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::StoreError> {
    /// let store = RedisStore::builder("redis://127.0.0.1:6379/").connect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let require = self.require_durable_settings;
        let (store, check) = self.assemble()?;
        store
            .send(&redis::cmd("PING"), None)
            .await
            .map_err(|error| from_redis("could not connect to Redis", error))?;
        let reports = check.run().await;
        if require {
            settings::refusal(&reports)?;
        }
        for report in &reports {
            report.log();
        }
        Ok(store)
    }

    /// The store, not yet connected, and the check of its nodes' settings.
    fn assemble(self) -> Result<(RedisStore, Check), StoreError> {
        if let Some((replicas, timeout)) = self.wait_for_replicas
            && (timeout >= self.response_timeout || timeout.is_zero() || replicas == 0)
        {
            return Err(StoreError::Backend {
                message: format!(
                    "wait_for_replicas({replicas}, {timeout:?}) needs at least one replica and a timeout above zero and below the response timeout ({:?}): shorten the timeout or lengthen the response timeout",
                    self.response_timeout
                ),
                source: None,
            });
        }
        let (commands, subscriptions, nodes) = match &self.cluster_urls {
            Some(urls) => {
                let client = self.cluster_client(urls)?;
                let nodes = urls
                    .iter()
                    .map(|url| {
                        let client = redis::Client::open(url.as_str())
                            .map_err(|error| format!("invalid node URL ({:?})", error.kind()));
                        Node::new(url, client)
                    })
                    .collect();
                (
                    Commands::Cluster(Cluster::new(
                        client,
                        self.connect_timeout + self.response_timeout,
                    )),
                    Subscriptions::new(
                        Source::Cluster(urls.clone(), self.response_timeout),
                        self.connect_timeout,
                    ),
                    nodes,
                )
            }
            None => {
                let client = self.client()?;
                // One connection attempt per call, no backoff: a call fails within the connect
                // timeout plus the response timeout, and the caller's retry policy, not ours,
                // decides how long to keep trying.
                let connection =
                    Connection::new(client.clone(), self.connect_timeout, self.response_timeout);
                (
                    Commands::Single(connection),
                    Subscriptions::new(
                        Source::Single(Box::new(client.clone())),
                        self.connect_timeout,
                    ),
                    vec![Node::new(&self.url, Ok(client))],
                )
            }
        };
        let check = Check {
            nodes,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
        };
        let store = RedisStore {
            commands: Arc::new(commands),
            cluster: self.cluster_urls.is_some(),
            deadline: self.connect_timeout + self.response_timeout,
            scripts: Arc::new(Scripts::new()),
            subscriptions: Arc::new(subscriptions),
            key_prefix: self.key_prefix,
            poll_interval: self.poll_interval,
            wait_for_replicas: self.wait_for_replicas,
            native_claim: Arc::new(AtomicBool::new(!self.claims_by_script)),
            cache: cache::build(self.local_cache),
            completed: Arc::new(CompletedKeys::new()),
        };
        Ok((store, check))
    }
}

/// The PEM file of CA certificates at `path`, checked to hold at least one.
#[cfg(feature = "redis-tls")]
fn read_roots(path: &Path) -> Result<Vec<u8>, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let shown = path.display();
    let pem = std::fs::read(path).map_err(|error| StoreError::Backend {
        message: format!(
            "could not read the CA file {shown} (rediss://): {error}; name a readable PEM file of CA certificates"
        ),
        source: None,
    })?;
    let mut certificates = CertificateDer::pem_slice_iter(&pem);
    match certificates.next() {
        Some(Ok(_)) if certificates.all(|certificate| certificate.is_ok()) => Ok(pem),
        Some(_) => Err(StoreError::Backend {
            message: format!("the CA file {shown} (rediss://) holds a malformed PEM section"),
            source: None,
        }),
        None => Err(StoreError::Backend {
            message: format!(
                "the CA file {shown} (rediss://) holds no certificate: it must hold the PEM (-----BEGIN CERTIFICATE-----) of the CA that signed the server's certificate"
            ),
            source: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use crate::error::StoreError;
    use crate::stores::redis::RedisStore;

    #[cfg(not(feature = "redis-tls"))]
    #[test]
    fn without_the_feature_a_rediss_url_is_refused_at_build() {
        let Err(StoreError::Backend { message, .. }) =
            RedisStore::builder("rediss://user:sekret@127.0.0.1:6380/").build()
        else {
            panic!("a rediss:// URL must be refused without the feature");
        };
        assert!(
            message.contains("enable the feature redis-tls"),
            "{message}"
        );
        assert!(!message.contains("sekret"), "{message}");
    }

    #[test]
    fn an_invalid_url_is_refused_without_quoting_the_password() {
        let Err(StoreError::Backend { message, .. }) =
            RedisStore::builder("redis://user:sekret@[::1/").build()
        else {
            panic!("an invalid URL must be refused");
        };
        assert!(message.contains("invalid Redis URL"), "{message}");
        assert!(!message.contains("sekret"), "{message}");
    }
}
