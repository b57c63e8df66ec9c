//! A Redis Streams consumer group as a queue [`Source`]: [`RedisStreamsSource`], its
//! [`RedisStreamsSourceBuilder`], the receipt [`StreamEntry`], and [`publish`] for producers.
//!
//! # How the stream maps onto the consumer
//!
//! - **The message id** is a field of the entry (`message-id` by default,
//!   [`RedisStreamsSourceBuilder::message_id_field`]) the producer sets and keeps when it
//!   publishes again; the body is another field (`payload`). The entry id (`1700000000000-0`) is
//!   the broker's id of one copy ([`Delivery::broker_id`]), never the key. An entry without the
//!   id field (or with one that is not UTF-8) is delivered with no message id, and the consumer
//!   dead-letters it (`no-message-id`).
//! - **The group** reads with `XREADGROUP GROUP <group> <consumer> COUNT n BLOCK ms STREAMS
//!   <stream> >`. A delivered entry sits in the group's pending entries list (the PEL), owned
//!   by this consumer, until `XACK` removes it; the consumer acknowledges only once the
//!   message's record is committed (or it was a duplicate).
//! - **The lease** is the PEL's idle time: an entry idle for [`RedisStreamsSource::lease`] is
//!   taken over by whichever consumer of the group runs `XAUTOCLAIM <stream> <group> <me>
//!   <lease-ms> <cursor>` next: that is how the deliveries of a consumer that died go to
//!   another. Every consumer runs it at the start of `receive`, at most every quarter of the
//!   lease (at once again while the scan has more to go). A handler at work keeps its entry
//!   with `XCLAIM ... 0 <id> JUSTID`, which sets its idle time back to zero, every third of
//!   the lease, so a slow handler is not taken over. Give every consumer of a group the same
//!   lease.
//! - **Delivery counts** are the PEL's: `XREADGROUP` delivers an entry the first time (count
//!   1), and each `XAUTOCLAIM` adds one. `XAUTOCLAIM` does not report them, so the source reads
//!   them with `XPENDING <stream> <group> <id> <id> 1 <me>` (one round trip for the page); an
//!   entry another consumer took meanwhile is left to it.
//! - **A failed handler**'s entry is not acknowledged: it is moved (`XCLAIM ... IDLE
//!   <lease - delay> JUSTID`, which does not count a delivery) to the consumer name
//!   [`PARKED_CONSUMER`] with an idle time that makes it claimable once the retry delay has
//!   passed, and the next `XAUTOCLAIM` of any consumer takes it, one delivery more.
//! - **The dead-letter stream** (`<stream>:dead-letter` by default) receives a message the
//!   consumer gives up: in one script, `XACK` of the entry, then `XADD <dead-letter> *` with the
//!   entry's fields plus `dead-letter-reason` (the [`DeadLetterReason::code`]),
//!   `dead-letter-detail` (its `Display`), `deliveries`, `source-stream` and `source-id`. If
//!   the entry was already acknowledged (another consumer settled it) nothing is added.
//! - **A graceful shutdown** finishes what it can and releases the rest: released entries
//!   (and retried ones) are moved to [`PARKED_CONSUMER`] with the idle time of a whole lease,
//!   so the next `XAUTOCLAIM` of any other consumer takes them at once. After
//!   [`Consumer::run`](super::Consumer::run) returns, nothing in the PEL is owned by the
//!   stopped consumer (`XPENDING <stream> <group> - + 100 <consumer>` is empty). A consumer
//!   that dies instead leaves its entries to be taken over after the lease.
//!
//! Changing an entry's owner, idle time or acknowledgement checks first that this consumer
//! still owns it (a script: `XPENDING` for the id and this consumer, then `XCLAIM`): an entry
//! another consumer took over after this one's lease ran out stays with that one. `XACK` needs
//! no check; it settles the entry for the whole group, whoever holds it.
//!
//! # Connections
//!
//! `XREADGROUP ... BLOCK` holds its connection until an entry comes or the block time ends, and
//! a multiplexed connection (a `ConnectionManager`) answers in order: every command sent on it
//! meanwhile (the acknowledgements!) would wait behind the read. So a source built from a URL
//! opens two connections: one for the blocking reads, one for everything else. A source built
//! on a `ConnectionManager` the application already has
//! ([`RedisStreamsSource::on_connection`]) does not block on it: it reads without `BLOCK` and
//! sleeps the poll interval when nothing came, unless a second connection is given for the
//! reads ([`RedisStreamsSourceBuilder::read_connection`]).
//!
//! # Consumer names
//!
//! Each consumer of a group needs its own name; by default the source makes a unique one
//! (`<host>-<pid>-<random>`). A name stays in the group (`XINFO CONSUMERS`) after its process
//! ends, with nothing pending after a graceful shutdown, so restarts with fresh names pile up
//! idle names until `XGROUP DELCONSUMER` removes them. A *stable* name per replica (a pod's
//! name, say) is reused by the restarted process instead, and tells an operator who holds
//! what. Two processes running at once must never share a name: each would take the other's
//! deliveries for its own when it keeps, retries or releases them.
//!
//! # Requirements
//!
//! Redis 6.2 or later (`XAUTOCLAIM`, `XPENDING ... IDLE`), 7.0 or later recommended (6.2's
//! `XAUTOCLAIM` leaves entries deleted from the stream pending). On Redis Cluster the stream and
//! the dead-letter stream must hash to one slot: give them one hash tag (`{orders}` and
//! `{orders}:dead-letter`, which the default dead-letter name does when the stream is `{orders}`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use idempotent_core::queue::Consumer;
//! use idempotent_core::queue::redis_streams::{self, RedisStreamsSource};
//! use idempotent_core::stores::redis::RedisStore;
//! use idempotent_core::{Idempotency, Options};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "redis://127.0.0.1:6379/";
//! let source = RedisStreamsSource::builder(url, "orders", "billing")
//!     .consumer("billing-0") // stable across restarts of this replica
//!     .lease(Duration::from_secs(30))
//!     .build()
//!     .await?;
//!
//! // A producer: the message id is the producer's, the same when it publishes again.
//! let client = redis::Client::open(url)?;
//! let mut connection = client.get_multiplexed_async_connection().await?;
//! redis_streams::publish(&mut connection, "orders", "order-7", br#"{"total":4200}"#).await?;
//!
//! let store = RedisStore::builder(url).build()?;
//! let consumer = Consumer::new("billing::charge", source)
//!     .with_engine(Idempotency::new(Arc::new(store)).with_options(Options::new()))
//!     .max_deliveries(5);
//! let report = consumer
//!     .run(
//!         |message| async move {
//!             println!("charging for {}", message.id());
//!             Ok::<_, std::io::Error>(())
//!         },
//!         tokio::time::sleep(Duration::from_secs(3600)), // or a signal
//!     )
//!     .await?;
//! println!("{report:?}");
//! # Ok(()) }
//! ```

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::time::Instant;

use super::source::{DeadLetterReason, Delivery, Source, SourceError};
use crate::redact::redact_url;
use crate::store::Bytes;

/// The consumer name retried and released entries are moved to: a name no process reads as,
/// whose entries the next `XAUTOCLAIM` of any consumer takes once they are idle for a lease.
/// It shows in `XINFO CONSUMERS` with the entries waiting to be taken again.
pub const PARKED_CONSUMER: &str = "idempotent:parked";

/// The default field of the producer's message id.
pub const DEFAULT_MESSAGE_ID_FIELD: &str = "message-id";
/// The default field of the body.
pub const DEFAULT_PAYLOAD_FIELD: &str = "payload";

const DEFAULT_LEASE: Duration = Duration::from_secs(30);
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Moves entry ARGV[3] of group ARGV[1] to consumer ARGV[4] with idle time ARGV[5] (ms), if
/// consumer ARGV[2] still owns it; 1 if it did, 0 if not. `JUSTID` counts no delivery.
const MOVE_IF_OWNED: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[4], 0, ARGV[3], 'IDLE', ARGV[5], 'JUSTID')
return 1
";

/// Acknowledges entry ARGV[2] of group ARGV[1] on stream KEYS[1] and, if it was pending, adds
/// the field/value pairs ARGV[3..] to the dead-letter stream KEYS[2]: the new entry's id, or
/// nil if the entry was settled already.
const DEAD_LETTER: &str = r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return false
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
";

/// One stream entry as delivered: the receipt of a [`RedisStreamsSource`] delivery.
///
/// ```
/// use idempotent_core::queue::redis_streams::StreamEntry;
///
/// let entry = StreamEntry::new("1-0", vec![(b"message-id".to_vec(), b"m-1".to_vec())]);
/// assert_eq!(entry.id(), "1-0");
/// assert_eq!(entry.field("message-id"), Some(&b"m-1"[..]));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl StreamEntry {
    /// An entry with its id and its fields, in order.
    ///
    /// ```
    /// # use idempotent_core::queue::redis_streams::StreamEntry;
    /// assert!(StreamEntry::new("1-0", Vec::new()).fields().is_empty());
    /// ```
    pub fn new(id: impl Into<String>, fields: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self {
            id: id.into(),
            fields,
        }
    }

    /// The entry id (`<ms>-<seq>`).
    ///
    /// ```
    /// # use idempotent_core::queue::redis_streams::StreamEntry;
    /// assert_eq!(StreamEntry::new("7-1", Vec::new()).id(), "7-1");
    /// ```
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The fields and values, in the order the producer wrote them.
    ///
    /// ```
    /// # use idempotent_core::queue::redis_streams::StreamEntry;
    /// let entry = StreamEntry::new("1-0", vec![(b"a".to_vec(), b"1".to_vec())]);
    /// assert_eq!(entry.fields()[0].0, b"a");
    /// ```
    pub fn fields(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.fields
    }

    /// The value of the first field named `name`.
    ///
    /// ```
    /// # use idempotent_core::queue::redis_streams::StreamEntry;
    /// assert_eq!(StreamEntry::new("1-0", Vec::new()).field("payload"), None);
    /// ```
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(field, _)| field == name.as_bytes())
            .map(|(_, value)| value.as_slice())
    }
}

/// Where the source's connection for commands comes from.
#[derive(Clone)]
enum Connect {
    Url(String),
    Manager(ConnectionManager),
}

/// Configures a [`RedisStreamsSource`]; [`RedisStreamsSourceBuilder::build`] connects and
/// creates the group.
///
/// ```no_run
/// use std::time::Duration;
/// use idempotent_core::queue::redis_streams::RedisStreamsSource;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::queue::SourceError> {
/// let source = RedisStreamsSource::builder("redis://127.0.0.1:6379/", "orders", "billing")
///     .consumer("billing-0")
///     .message_id_field("id")
///     .payload_field("body")
///     .dead_letter_stream("orders:failed")
///     .lease(Duration::from_secs(60))
///     .poll_interval(Duration::from_millis(500))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStreamsSourceBuilder {
    connect: Connect,
    reader: Option<ConnectionManager>,
    stream: String,
    group: String,
    consumer: Option<String>,
    message_id_field: String,
    payload_field: String,
    dead_letter_stream: Option<String>,
    lease: Duration,
    poll_interval: Duration,
}

/// The URL's password is masked: `redis://user:***@host`.
impl fmt::Debug for RedisStreamsSourceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let connection = match &self.connect {
            Connect::Url(url) => redact_url(url),
            Connect::Manager(_) => "a ConnectionManager".to_owned(),
        };
        f.debug_struct("RedisStreamsSourceBuilder")
            .field("connection", &connection)
            .field("read_connection", &self.reader.is_some())
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("message_id_field", &self.message_id_field)
            .field("payload_field", &self.payload_field)
            .field("dead_letter_stream", &self.dead_letter_stream)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

impl RedisStreamsSourceBuilder {
    fn new(connect: Connect, stream: String, group: String) -> Self {
        Self {
            connect,
            reader: None,
            stream,
            group,
            consumer: None,
            message_id_field: DEFAULT_MESSAGE_ID_FIELD.to_owned(),
            payload_field: DEFAULT_PAYLOAD_FIELD.to_owned(),
            dead_letter_stream: None,
            lease: DEFAULT_LEASE,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// This consumer's name in the group (default: a unique `<host>-<pid>-<random>`). A stable
    /// name per replica is better across restarts; two processes at once must not share one
    /// (see the [module docs](self), "Consumer names").
    ///
    /// ```
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// let builder = RedisStreamsSource::builder("redis://127.0.0.1/", "orders", "billing").consumer("billing-0");
    /// ```
    #[must_use]
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// The field that holds the producer's message id (default `message-id`).
    ///
    /// ```
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// let builder = RedisStreamsSource::builder("redis://127.0.0.1/", "orders", "billing").message_id_field("id");
    /// ```
    #[must_use]
    pub fn message_id_field(mut self, field: impl Into<String>) -> Self {
        self.message_id_field = field.into();
        self
    }

    /// The field that holds the body (default `payload`); an entry without it has an empty
    /// body.
    ///
    /// ```
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// let builder = RedisStreamsSource::builder("redis://127.0.0.1/", "orders", "billing").payload_field("body");
    /// ```
    #[must_use]
    pub fn payload_field(mut self, field: impl Into<String>) -> Self {
        self.payload_field = field.into();
        self
    }

    /// The stream dead-lettered messages are added to (default `<stream>:dead-letter`).
    ///
    /// ```
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// let builder = RedisStreamsSource::builder("redis://127.0.0.1/", "orders", "billing")
    ///     .dead_letter_stream("orders:failed");
    /// ```
    #[must_use]
    pub fn dead_letter_stream(mut self, stream: impl Into<String>) -> Self {
        self.dead_letter_stream = Some(stream.into());
        self
    }

    /// How long an entry may sit idle in the PEL before another consumer's `XAUTOCLAIM` takes
    /// it (default 30 s; at least 1 ms). Every consumer of a group should use the same. A
    /// consumer's handler at work keeps its entries every third of it.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// let builder = RedisStreamsSource::builder("redis://127.0.0.1/", "orders", "billing")
    ///     .lease(Duration::from_secs(60));
    /// ```
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// How long one `receive` waits for new entries (default 1 s): the `BLOCK` time of
    /// `XREADGROUP`, or the sleep after an empty read without a connection of its own for
    /// reads. It is held to a quarter of the lease, so that `XAUTOCLAIM` runs as often as the
    /// lease needs; it is also about how long a shutdown waits for the read in progress.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// let builder = RedisStreamsSource::builder("redis://127.0.0.1/", "orders", "billing")
    ///     .poll_interval(Duration::from_millis(200));
    /// ```
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// A `ConnectionManager` used only for the blocking reads (see the [module docs](self),
    /// "Connections"), in place of the one a source from a URL opens. Without it, a source on
    /// an application's `ConnectionManager` reads without blocking and sleeps the poll
    /// interval after an empty read. Give it a response timeout longer than the poll interval.
    ///
    /// ```no_run
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> redis::RedisResult<()> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let shared = client.get_connection_manager().await?;
    /// let reads = client.get_connection_manager().await?;
    /// let builder = RedisStreamsSource::on_connection(shared, "orders", "billing").read_connection(reads);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn read_connection(mut self, reads: ConnectionManager) -> Self {
        self.reader = Some(reads);
        self
    }

    /// Connects, checks the stream and creates the group if missing (`XGROUP CREATE <stream>
    /// <group> 0 MKSTREAM`: a new group reads the stream from its start).
    ///
    /// Errors: [`SourceError::refused`] for what trying again cannot cure (a malformed URL,
    /// `rediss://` without the feature `redis-tls`, a key that is not a stream, a user without
    /// the permission, a server older than 6.2, empty names), and
    /// [`SourceError::unavailable`] when the server cannot be reached. Messages never show the
    /// URL's password.
    pub async fn build(self) -> Result<RedisStreamsSource, SourceError> {
        self.check()?;
        let (commands, reader) = match &self.connect {
            Connect::Url(url) => {
                let client = client(url)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1);
                let reader_config = config
                    .clone()
                    .set_response_timeout(Some(self.block() + RESPONSE_TIMEOUT));
                let connect = |config: ConnectionManagerConfig| {
                    let client = client.clone();
                    async move {
                        ConnectionManager::new_with_config(client, config)
                            .await
                            .map_err(|error| {
                                connect_failed(&format!("connecting to {}", redact_url(url)), error)
                            })
                    }
                };
                let commands = connect(config).await?;
                let reader = match &self.reader {
                    Some(reader) => reader.clone(),
                    None => connect(reader_config).await?,
                };
                (commands, Some(reader))
            }
            Connect::Manager(commands) => (commands.clone(), self.reader.clone()),
        };
        let consumer = self.consumer.clone().unwrap_or_else(unique_consumer_name);
        let dead_letter_stream = self
            .dead_letter_stream
            .clone()
            .unwrap_or_else(|| format!("{}:dead-letter", self.stream));
        let inner = Inner {
            commands,
            reader,
            block: self.block(),
            poll_interval: self.poll_interval.max(Duration::from_millis(1)),
            stream: self.stream,
            group: self.group,
            consumer,
            message_id_field: self.message_id_field,
            payload_field: self.payload_field,
            dead_letter_stream,
            lease: self.lease,
            scan: Mutex::new(Scan {
                cursor: "0-0".to_owned(),
                next: Instant::now(),
            }),
            move_if_owned: redis::Script::new(MOVE_IF_OWNED),
            dead_letter: redis::Script::new(DEAD_LETTER),
        };
        inner.create_group().await?;
        Ok(RedisStreamsSource {
            inner: Arc::new(inner),
        })
    }

    fn check(&self) -> Result<(), SourceError> {
        let named = [
            ("stream", &self.stream),
            ("group", &self.group),
            ("message id field", &self.message_id_field),
            ("payload field", &self.payload_field),
        ];
        for (what, name) in named {
            if name.is_empty() {
                return Err(SourceError::refused(format!(
                    "the {what} name is empty: give the Redis Streams source a non-empty one"
                )));
            }
        }
        if self.consumer.as_deref() == Some("") {
            return Err(SourceError::refused(
                "the consumer name is empty: give a non-empty one, or leave it unset for a unique one",
            ));
        }
        if self.consumer.as_deref() == Some(PARKED_CONSUMER) {
            return Err(SourceError::refused(format!(
                "the consumer name {PARKED_CONSUMER:?} is where retried and released entries wait: choose another"
            )));
        }
        if self.message_id_field == self.payload_field {
            return Err(SourceError::refused(format!(
                "the message id and the payload are both read from the field {:?}: give them different fields",
                self.message_id_field
            )));
        }
        if self.dead_letter_stream.as_deref() == Some(self.stream.as_str()) {
            return Err(SourceError::refused(format!(
                "the dead-letter stream is the stream {:?} itself: give it another name",
                self.stream
            )));
        }
        Ok(())
    }

    /// The `BLOCK` time: the poll interval, held to a quarter of the lease, at least 1 ms
    /// (`BLOCK 0` would wait for ever).
    fn block(&self) -> Duration {
        self.poll_interval
            .min(self.lease / 4)
            .max(Duration::from_millis(1))
    }
}

/// The client for `url`: with TLS for `rediss://` (feature `redis-tls`).
fn client(url: &str) -> Result<redis::Client, SourceError> {
    let invalid = |error: RedisError| {
        // Not the driver's error, which may quote the URL: only the masked URL and the kind.
        SourceError::refused(format!(
            "invalid Redis URL {:?} ({:?}): write redis://[user:password@]host[:port][/db] (rediss:// for TLS), with URL-special characters in the password percent-encoded",
            redact_url(url),
            error.kind()
        ))
    };
    if !url.starts_with("rediss://") {
        return redis::Client::open(url).map_err(invalid);
    }
    #[cfg(not(feature = "redis-tls"))]
    {
        Err(SourceError::refused(format!(
            "the URL {:?} asks for TLS (rediss://), which this build cannot make: enable the feature redis-tls of idempotent-core",
            redact_url(url)
        )))
    }
    #[cfg(feature = "redis-tls")]
    {
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: None,
        };
        redis::Client::build_with_tls(url, certificates).map_err(invalid)
    }
}

/// `<host>-<pid>-<random>`: unique among the consumers of a group.
fn unique_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "consumer".to_owned());
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos()),
    );
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        hasher.finish() & 0xffff_ffff
    )
}

/// Where the `XAUTOCLAIM` scan is, and when it runs next.
#[derive(Debug)]
struct Scan {
    cursor: String,
    next: Instant,
}

struct Inner {
    /// Every command but the blocking reads.
    commands: ConnectionManager,
    /// The blocking reads, when the source has a connection for them.
    reader: Option<ConnectionManager>,
    block: Duration,
    poll_interval: Duration,
    stream: String,
    group: String,
    consumer: String,
    message_id_field: String,
    payload_field: String,
    dead_letter_stream: String,
    lease: Duration,
    scan: Mutex<Scan>,
    move_if_owned: redis::Script,
    dead_letter: redis::Script,
}

/// A Redis Streams consumer group as a [`Source`]; see the [module docs](self). Clones share
/// the connections and the consumer name (one consumer of the group); build another source
/// for another consumer.
///
/// ```no_run
/// use idempotent_core::queue::Source;
/// use idempotent_core::queue::redis_streams::RedisStreamsSource;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::queue::SourceError> {
/// let source = RedisStreamsSource::builder("redis://127.0.0.1:6379/", "orders", "billing").build().await?;
/// for delivery in source.receive(10).await? {
///     println!("{:?} ({} deliveries)", delivery.message_id, delivery.deliveries);
///     source.ack(&delivery).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStreamsSource {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStreamsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("RedisStreamsSource")
            .field("stream", &inner.stream)
            .field("group", &inner.group)
            .field("consumer", &inner.consumer)
            .field("dead_letter_stream", &inner.dead_letter_stream)
            .field("lease", &inner.lease)
            .field("block", &inner.block)
            .field("blocking_reads", &inner.reader.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStreamsSource {
    /// A builder for the consumer group `group` of `stream` on the server at `url`
    /// (`redis://host:port/db`, or `rediss://` with the feature `redis-tls`).
    ///
    /// ```
    /// use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// let builder = RedisStreamsSource::builder("redis://127.0.0.1:6379/", "orders", "billing");
    /// ```
    pub fn builder(
        url: impl Into<String>,
        stream: impl Into<String>,
        group: impl Into<String>,
    ) -> RedisStreamsSourceBuilder {
        RedisStreamsSourceBuilder::new(Connect::Url(url.into()), stream.into(), group.into())
    }

    /// A builder on a `ConnectionManager` the application already has; reads on it do not
    /// block (see [`RedisStreamsSourceBuilder::read_connection`]).
    ///
    /// ```no_run
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let connection = client.get_connection_manager().await?;
    /// let source = RedisStreamsSource::on_connection(connection, "orders", "billing").build().await?;
    /// # Ok(()) }
    /// ```
    pub fn on_connection(
        connection: ConnectionManager,
        stream: impl Into<String>,
        group: impl Into<String>,
    ) -> RedisStreamsSourceBuilder {
        RedisStreamsSourceBuilder::new(Connect::Manager(connection), stream.into(), group.into())
    }

    /// The stream read.
    ///
    /// ```no_run
    /// # use idempotent_core::queue::redis_streams::RedisStreamsSource;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::queue::SourceError> {
    /// let source = RedisStreamsSource::builder("redis://127.0.0.1/", "orders", "billing")
    ///     .consumer("billing-0")
    ///     .build()
    ///     .await?;
    /// assert_eq!(source.stream(), "orders");
    /// assert_eq!(source.group(), "billing");
    /// assert_eq!(source.consumer(), "billing-0");
    /// assert_eq!(source.dead_letter_stream(), "orders:dead-letter");
    /// # Ok(()) }
    /// ```
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// The consumer group. (see [`RedisStreamsSource::stream`] for an example)
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// This consumer's name in the group. (see [`RedisStreamsSource::stream`] for an example)
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// The stream dead-lettered messages go to. (see [`RedisStreamsSource::stream`] for an example)
    pub fn dead_letter_stream(&self) -> &str {
        &self.inner.dead_letter_stream
    }
}

/// Publishes a message for a [`RedisStreamsSource`] with the default fields: `XADD <stream> *
/// message-id <message_id> payload <payload>`; returns the new entry's id. Publishing again
/// with the same `message_id` (a producer's retry) adds a second entry, which the consumer
/// recognizes as a duplicate. With other field names, run `XADD` yourself.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let mut connection = client.get_multiplexed_async_connection().await?;
/// let entry_id = idempotent_core::queue::redis_streams::publish(&mut connection, "orders", "order-7", "{}").await?;
/// println!("published as {entry_id}");
/// # Ok(()) }
/// ```
pub async fn publish<C>(
    connection: &mut C,
    stream: &str,
    message_id: &str,
    payload: impl AsRef<[u8]>,
) -> Result<String, SourceError>
where
    C: redis::aio::ConnectionLike + Send,
{
    redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg(DEFAULT_MESSAGE_ID_FIELD)
        .arg(message_id)
        .arg(DEFAULT_PAYLOAD_FIELD)
        .arg(payload.as_ref())
        .query_async(connection)
        .await
        .map_err(|error| failed(&format!("XADD to {stream:?}"), stream, "", error))
}

impl Inner {
    fn scan(&self) -> MutexGuard<'_, Scan> {
        // Nothing that can panic runs under the lock.
        self.scan
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lease_ms(&self) -> u64 {
        millis(self.lease).max(1)
    }

    fn failed(&self, doing: &str, error: RedisError) -> SourceError {
        failed(
            &format!("{doing} on stream {:?}", self.stream),
            &self.stream,
            &self.group,
            error,
        )
    }

    async fn create_group(&self) -> Result<(), SourceError> {
        let created: Result<Value, RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.commands.clone())
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            Err(error) => Err(self.failed(
                &format!("creating the consumer group {:?}", self.group),
                error,
            )),
        }
    }

    /// Takes over the entries idle for a lease, if the scan is due, with their delivery
    /// counts.
    async fn take_over(&self, max: usize) -> Result<Vec<Delivery<StreamEntry>>, SourceError> {
        let cursor = {
            let scan = self.scan();
            if Instant::now() < scan.next {
                return Ok(Vec::new());
            }
            scan.cursor.clone()
        };
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.lease_ms())
            .arg(&cursor)
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed("XAUTOCLAIM", error))?;
        let (next_cursor, claimed, deleted) = parse_autoclaim(reply).ok_or_else(|| {
            SourceError::refused(format!(
                "XAUTOCLAIM on stream {:?} answered in an unexpected form: is the server Redis 6.2 or later?",
                self.stream
            ))
        })?;
        {
            let mut scan = self.scan();
            // A scan that has more to go goes on at the next call; a finished one starts over
            // after a quarter of the lease.
            scan.next = if next_cursor == "0-0" {
                Instant::now() + (self.lease / 4).max(Duration::from_millis(1))
            } else {
                Instant::now()
            };
            scan.cursor = next_cursor;
        }
        if claimed.is_empty() && deleted.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip: the delivery count of each entry taken (if still this consumer's),
        // and the acknowledgement of entries deleted from the stream (Redis 7 drops them from
        // the PEL itself; XACK is then a no-op).
        let mut pipe = redis::pipe();
        for entry in &claimed {
            pipe.cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1)
                .arg(&self.consumer);
        }
        if !deleted.is_empty() {
            pipe.cmd("XACK")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&deleted)
                .ignore();
        }
        let pending: Vec<Value> = pipe
            .query_async(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed("XPENDING of the entries taken over", error))?;
        let mut deliveries = Vec::with_capacity(claimed.len());
        for (entry, pending) in claimed.into_iter().zip(pending) {
            // Empty: another consumer took it over since (a lease shorter than a round trip).
            if let Some(count) = pending_count(&pending) {
                deliveries.push(self.delivery(entry, count));
            }
        }
        Ok(deliveries)
    }

    /// New entries: `XREADGROUP ... >`, blocking only on the connection for reads.
    async fn read_new(
        &self,
        count: usize,
        wait: bool,
    ) -> Result<Vec<Delivery<StreamEntry>>, SourceError> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        let blocking = wait && self.reader.is_some();
        if blocking {
            command.arg("BLOCK").arg(millis(self.block).max(1));
        }
        command.arg("STREAMS").arg(&self.stream).arg(">");
        let mut connection = match (&self.reader, blocking) {
            (Some(reader), true) => reader.clone(),
            _ => self.commands.clone(),
        };
        let reply: Value = command
            .query_async(&mut connection)
            .await
            .map_err(|error| self.failed("XREADGROUP", error))?;
        let entries = parse_read(reply).ok_or_else(|| {
            SourceError::refused(format!(
                "XREADGROUP on stream {:?} answered in an unexpected form",
                self.stream
            ))
        })?;
        if entries.is_empty() && wait && !blocking {
            tokio::time::sleep(self.poll_interval.min(self.block)).await;
        }
        Ok(entries
            .into_iter()
            .map(|entry| self.delivery(entry, 1))
            .collect())
    }

    fn delivery(&self, entry: StreamEntry, deliveries: u32) -> Delivery<StreamEntry> {
        let message_id = entry
            .field(&self.message_id_field)
            .and_then(|id| std::str::from_utf8(id).ok())
            .map(str::to_owned);
        let payload = entry
            .field(&self.payload_field)
            .map(Bytes::copy_from_slice)
            .unwrap_or_default();
        let broker_id = entry.id.clone();
        let mut delivery = Delivery::new(entry, broker_id, payload).with_deliveries(deliveries);
        delivery.message_id = message_id;
        delivery
    }

    /// Moves `entry` to `owner` with `idle_ms` of idle time, if this consumer still owns it.
    async fn move_if_owned(
        &self,
        doing: &str,
        entry: &StreamEntry,
        owner: &str,
        idle_ms: u64,
    ) -> Result<(), SourceError> {
        let _moved: i64 = self
            .move_if_owned
            .key(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(&entry.id)
            .arg(owner)
            .arg(idle_ms)
            .invoke_async(&mut self.commands.clone())
            .await
            .map_err(|error| self.failed(doing, error))?;
        // Not moved: the entry is settled, or another consumer took it over after this one's
        // lease ran out; either way it is no longer this consumer's to move.
        Ok(())
    }
}

impl Source for RedisStreamsSource {
    type Receipt = StreamEntry;

    async fn receive(&self, max: usize) -> Result<Vec<Delivery<StreamEntry>>, SourceError> {
        let inner = &self.inner;
        let max = max.max(1);
        let mut deliveries = inner.take_over(max).await?;
        let room = max - deliveries.len();
        if room > 0 {
            match inner.read_new(room, deliveries.is_empty()).await {
                Ok(new) => deliveries.extend(new),
                // What was taken over is this consumer's now: hand it on, and let the next
                // call meet the error again.
                Err(error) if !deliveries.is_empty() => {
                    tracing::warn!(target: "idempotent::queue", stream = %inner.stream, %error, "reading new entries failed");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(deliveries)
    }

    async fn ack(&self, delivery: &Delivery<StreamEntry>) -> Result<(), SourceError> {
        let inner = &self.inner;
        // 0 means the entry was settled already (a copy processed by another consumer that
        // took it over): settled all the same.
        let _acknowledged: i64 = redis::cmd("XACK")
            .arg(&inner.stream)
            .arg(&inner.group)
            .arg(&delivery.receipt.id)
            .query_async(&mut inner.commands.clone())
            .await
            .map_err(|error| inner.failed("XACK", error))?;
        Ok(())
    }

    async fn retry(
        &self,
        delivery: &Delivery<StreamEntry>,
        delay: Duration,
    ) -> Result<(), SourceError> {
        let inner = &self.inner;
        let idle = inner.lease_ms().saturating_sub(millis(delay));
        inner
            .move_if_owned(
                "giving back an entry (XCLAIM)",
                &delivery.receipt,
                PARKED_CONSUMER,
                idle,
            )
            .await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery<StreamEntry>,
        reason: &DeadLetterReason,
    ) -> Result<(), SourceError> {
        let inner = &self.inner;
        let entry = &delivery.receipt;
        let mut invocation = inner.dead_letter.key(&inner.stream);
        invocation
            .key(&inner.dead_letter_stream)
            .arg(&inner.group)
            .arg(&entry.id);
        for (field, value) in &entry.fields {
            invocation.arg(field).arg(value);
        }
        invocation
            .arg("dead-letter-reason")
            .arg(reason.code())
            .arg("dead-letter-detail")
            .arg(reason.to_string())
            .arg("deliveries")
            .arg(delivery.deliveries)
            .arg("source-stream")
            .arg(&inner.stream)
            .arg("source-id")
            .arg(&entry.id);
        let _added: Option<String> = invocation
            .invoke_async(&mut inner.commands.clone())
            .await
            .map_err(|error| {
                inner.failed(
                    &format!(
                        "dead-lettering into {:?} (XACK, XADD)",
                        inner.dead_letter_stream
                    ),
                    error,
                )
            })?;
        Ok(())
    }

    fn lease(&self) -> Duration {
        self.inner.lease
    }

    async fn keep(&self, delivery: &Delivery<StreamEntry>) -> Result<(), SourceError> {
        let inner = &self.inner;
        inner
            .move_if_owned(
                "keeping an entry (XCLAIM)",
                &delivery.receipt,
                &inner.consumer,
                0,
            )
            .await
    }

    async fn release(&self, delivery: &Delivery<StreamEntry>) -> Result<(), SourceError> {
        let inner = &self.inner;
        inner
            .move_if_owned(
                "releasing an entry (XCLAIM)",
                &delivery.receipt,
                PARKED_CONSUMER,
                inner.lease_ms(),
            )
            .await
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A failed connection at build time: always worth trying again later.
fn connect_failed(doing: &str, error: RedisError) -> SourceError {
    if error.kind() == ErrorKind::AuthenticationFailed {
        return SourceError::refused_by(
            format!(
                "{doing}: the server refused the credentials; check the user and password in the URL"
            ),
            error,
        );
    }
    SourceError::unavailable(
        format!("{doing}: {error}; check that the server is up and the URL names it"),
        error,
    )
}

/// `error` as a source error: refused for what trying again cannot cure (a missing group, a
/// key that is not a stream, a permission, an unknown command), unavailable otherwise.
fn failed(doing: &str, stream: &str, group: &str, error: RedisError) -> SourceError {
    let hint = match (error.code(), error.kind()) {
        (Some("NOGROUP"), _) => Some(format!(
            "the consumer group {group:?} does not exist (the stream or the group was deleted): build the source again to create it, or run XGROUP CREATE {stream} {group} 0 MKSTREAM"
        )),
        (Some("WRONGTYPE"), _) => Some(format!(
            "the key {stream:?} holds something other than a stream: name another key"
        )),
        (Some("NOPERM"), _) | (_, ErrorKind::Server(ServerErrorKind::NoPerm)) => Some(
            "the Redis user may not run this command on this key: grant it the stream commands (ACL SETUSER <user> +@stream +evalsha +eval +xautoclaim ~<stream>*)".to_owned(),
        ),
        (Some("CROSSSLOT"), _) | (_, ErrorKind::Server(ServerErrorKind::CrossSlot)) => Some(
            "the stream and the dead-letter stream hash to different cluster slots: give both one hash tag ({orders} and {orders}:dead-letter)".to_owned(),
        ),
        (_, ErrorKind::AuthenticationFailed) => Some(
            "the server refused the credentials: check the user and password in the URL".to_owned(),
        ),
        _ if error.to_string().contains("unknown command") => Some(
            "the server does not know the command: Redis 6.2 or later is needed (7.0 or later recommended)".to_owned(),
        ),
        _ => None,
    };
    match hint {
        Some(hint) => SourceError::refused_by(format!("{doing}: {hint}"), error),
        None => SourceError::unavailable(format!("{doing} failed: {error}"), error),
    }
}

/// The bytes of a string reply.
fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    bytes(value).and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
}

/// An entry `[id, [field, value, ...]]`; `Ok(None)` for a nil entry (deleted from the stream,
/// as Redis 6.2's `XAUTOCLAIM` reports them).
fn parse_entry(value: Value) -> Option<Option<StreamEntry>> {
    let Value::Array(mut parts) = value else {
        return matches!(value, Value::Nil).then_some(None);
    };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id = text(&parts.pop()?)?;
    let fields = match fields {
        Value::Nil => return Some(None),
        Value::Array(flat) => {
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let (Some(field), Some(value)) = (flat.next(), flat.next()) {
                pairs.push((bytes(&field)?.to_vec(), bytes(&value)?.to_vec()));
            }
            pairs
        }
        Value::Map(map) => map
            .into_iter()
            .map(|(field, value)| Some((bytes(&field)?.to_vec(), bytes(&value)?.to_vec())))
            .collect::<Option<Vec<_>>>()?,
        _ => return None,
    };
    Some(Some(StreamEntry { id, fields }))
}

fn parse_entries(value: Value) -> Option<Vec<StreamEntry>> {
    let Value::Array(entries) = value else {
        return None;
    };
    let mut parsed = Vec::with_capacity(entries.len());
    for entry in entries {
        if let Some(entry) = parse_entry(entry)? {
            parsed.push(entry);
        }
    }
    Some(parsed)
}

/// `XREADGROUP`'s reply for one stream: nil (nothing came), `[[stream, entries]]` (RESP2) or
/// `{stream: entries}` (RESP3).
fn parse_read(value: Value) -> Option<Vec<StreamEntry>> {
    match value {
        Value::Nil => Some(Vec::new()),
        Value::Array(streams) => {
            let mut entries = Vec::new();
            for stream in streams {
                let Value::Array(mut pair) = stream else {
                    return None;
                };
                if pair.len() != 2 {
                    return None;
                }
                entries.extend(parse_entries(pair.pop()?)?);
            }
            Some(entries)
        }
        Value::Map(streams) => {
            let mut entries = Vec::new();
            for (_, stream_entries) in streams {
                entries.extend(parse_entries(stream_entries)?);
            }
            Some(entries)
        }
        _ => None,
    }
}

/// `XAUTOCLAIM`'s reply: the next cursor, the entries taken, the ids deleted from the stream
/// (Redis 7; none on 6.2).
fn parse_autoclaim(value: Value) -> Option<(String, Vec<StreamEntry>, Vec<String>)> {
    let Value::Array(parts) = value else {
        return None;
    };
    let mut parts = parts.into_iter();
    let cursor = text(&parts.next()?)?;
    let claimed = parse_entries(parts.next()?)?;
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.iter().map(text).collect::<Option<Vec<_>>>()?,
        _ => Vec::new(),
    };
    Some((cursor, claimed, deleted))
}

/// The delivery count in `XPENDING <stream> <group> <id> <id> 1 <consumer>`'s reply
/// (`[[id, consumer, idle, count]]`), or `None` when the entry is not the consumer's.
fn pending_count(value: &Value) -> Option<u32> {
    let Value::Array(rows) = value else {
        return None;
    };
    let Value::Array(row) = rows.first()? else {
        return None;
    };
    match row.get(3)? {
        Value::Int(count) => Some(u32::try_from(*count).unwrap_or(u32::MAX)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn read_replies_parse_in_both_protocols() {
        let entry = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![
                bulk("message-id"),
                bulk("m-1"),
                bulk("payload"),
                bulk("x"),
            ]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![entry.clone()]),
        ])]);
        let resp3 = Value::Map(vec![(bulk("orders"), Value::Array(vec![entry]))]);
        for reply in [resp2, resp3] {
            let entries = parse_read(reply).expect("parses");
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].id(), "1-0");
            assert_eq!(entries[0].field("payload"), Some(&b"x"[..]));
        }
        assert_eq!(parse_read(Value::Nil), Some(Vec::new()));
        assert_eq!(parse_read(Value::Int(3)), None);
    }

    #[test]
    fn autoclaim_replies_skip_deleted_entries() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![bulk("2-0")]),
        ]);
        let (cursor, claimed, deleted) = parse_autoclaim(reply).expect("parses");
        assert_eq!(cursor, "0-0");
        assert!(claimed.is_empty());
        assert_eq!(deleted, ["2-0"]);
    }

    #[test]
    fn pending_counts_read_the_fourth_column() {
        let row = Value::Array(vec![bulk("1-0"), bulk("c"), Value::Int(5), Value::Int(3)]);
        assert_eq!(pending_count(&Value::Array(vec![row])), Some(3));
        assert_eq!(pending_count(&Value::Array(Vec::new())), None);
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_consumer_name(), unique_consumer_name());
    }
}
