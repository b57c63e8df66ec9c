//! Configuring a [`RedisStore`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;

use super::RedisStore;
use super::connection::Connection;
use super::scripts::Scripts;
use super::subscriptions::Subscriptions;
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
    pub(super) key_prefix: String,
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
    pub(super) poll_interval: Duration,
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
