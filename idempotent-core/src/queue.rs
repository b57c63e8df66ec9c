//! Queue consumers: exactly-once effects from at-least-once delivery.
//!
//! Brokers deliver at least once. A consumer that dies before its acknowledgement has its
//! messages redelivered to another, and a producer that lost a publish acknowledgement
//! publishes again. A [`Consumer`] takes each delivery from a [`Source`] and:
//!
//! - keys it by the **producer's message id** (a field or header the producer set, the same in
//!   every copy of the message), never by the broker's delivery id, which differs between two
//!   publishes of one message;
//! - runs the handler **once per id**: a duplicate (a second publish, or a redelivery of a
//!   message already processed) is acknowledged without running it, and a copy that arrives
//!   while another consumer runs the handler waits for that one and is then acknowledged;
//! - **acknowledges only after the record is committed**: with a [`Store`](crate::Store), the
//!   record of the id; in the transactional inbox (feature `sqlx-postgres`,
//!   [`Consumer::run_in_transactions`]), the transaction that holds both the handler's writes
//!   and the record. A consumer that dies before that leaves the message to be redelivered.
//!   One case is acknowledged without a record: the handler returned `Ok` but the store
//!   refused the record even when it was sent again ([`Outcome::Unrecorded`], counted in
//!   [`Report::unrecorded`] and logged), since the work is done and a redelivery would only
//!   run it again (in the inbox the same answer means the transaction is aborted: it is rolled
//!   back and retried, never acknowledged);
//! - **never acknowledges a message whose handler failed**: it is given back to the broker
//!   ([`Source::retry`]), and on the last delivery allowed ([`Consumer::max_deliveries`]) put
//!   in the dead-letter destination with the error;
//! - **keeps** what it works on while the handler runs ([`Source::keep`], every third of the
//!   source's lease), so a slow handler is not taken over as if its consumer had died;
//! - on **graceful shutdown** stops taking deliveries, lets the handlers at work finish (for
//!   up to [`Consumer::drain_timeout`]), and releases the rest to the other consumers.
//!
//! What "exactly once" covers. Recording the id and the handler's effects are two writes, so
//! with a store a consumer that dies after the effect and before the record leaves a message
//! that runs again (as it would without the library, but now only in that window, never for a
//! published duplicate). In the transactional inbox both are one commit: an effect on the
//! database happens exactly once, and the acknowledgement follows the commit.
//!
//! The sources: [`channel`] (in-process, for tests and single-process pipelines), and behind
//! cargo features `redis_streams` (`redis-streams`: a consumer group, `XAUTOCLAIM`, a
//! dead-letter stream) and `nats` (`nats`: a JetStream pull consumer, `Nats-Msg-Id`).
//!
//! ```
//! use std::time::Duration;
//! use idempotent_core::queue::{self, Consumer, Message};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::queue::SourceError> {
//! let (publisher, source) = queue::channel(Duration::from_secs(30));
//! publisher.publish("order-1", r#"{"total":4200}"#);
//! publisher.publish("order-1", r#"{"total":4200}"#); // the producer retried
//! publisher.publish("order-2", r#"{"total":990}"#);
//!
//! let consumer = Consumer::new("orders::place", source.clone());
//! let handler = |message: Message| async move {
//!     println!("placing {}", message.id());
//!     Ok::<_, std::io::Error>(())
//! };
//! let report = consumer.run(handler, source.settled()).await?;
//! assert_eq!((report.processed, report.duplicates), (2, 1));
//! # Ok(()) }
//! ```
//!
//! # Kafka
//!
//! No Kafka client is built in; a [`Source`] over one is short, and maps as follows.
//!
//! - **The key** is a message id the producer sets in a header (`message-id`, say) and keeps
//!   across its own retries. When there is none, the record's `topic/partition/offset` is the
//!   only stable name, and it names one *copy*: it tells a redelivery of that copy apart, but
//!   not a second publish of the same message (the producer's retry), which lands at another
//!   offset.
//! - **Acknowledging** is committing the offset, and Kafka commits a position, not one
//!   message: [`Source::ack`] marks the offset done, and the source commits, per partition,
//!   the offset after the highest one below which every offset is done. A message whose
//!   handler failed holds its partition's commit back; [`Source::retry`] can re-deliver it
//!   from a retry topic (and the commit moves on) or by seeking back to it.
//! - **Leases** are the group's session and `max.poll.interval.ms`: a consumer that stops
//!   polling loses its partitions, and their uncommitted messages go to the next owner, which
//!   finds the ids already recorded and acknowledges them.
//! - **Dead letters** go to a dead-letter topic: [`Source::dead_letter`] produces the message
//!   there (with the reason in a header) and then marks its offset done.
//! - **Kafka's own exactly-once** (an idempotent producer and transactions with
//!   `read_committed` consumers) covers records written *to Kafka*: consume, produce and commit
//!   the offsets in one Kafka transaction. It does not cover a write to a database, an email,
//!   or a call to a payment API, which are outside the transaction; and the idempotent producer
//!   removes only the duplicates of its own retries within one producer session, not a message
//!   an application publishes twice. Those are what the consumer's record (and the
//!   transactional inbox, for a database) cover.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::engine::{Call, Idempotency, Outcome};
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::store::Bytes;

mod channel;
#[cfg(feature = "sqlx-postgres")]
mod inbox;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis-streams")]
pub mod redis_streams;
mod source;

pub use channel::{ChannelPublisher, ChannelSource, DeadLetter, channel};
pub use source::{DeadLetterReason, Delivery, Source, SourceError, SourceErrorKind};

/// A message as its handler sees it.
///
/// ```
/// use idempotent_core::queue::{Delivery, Message};
///
/// let message = Message::from_delivery(&Delivery::new((), "1-0", r#"{"sku":"pen"}"#).with_message_id("m-1"))
///     .expect("it has an id");
/// assert_eq!(message.id(), "m-1");
/// let body: serde_json::Value = message.json()?;
/// assert_eq!(body["sku"], "pen");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    id: String,
    broker_id: String,
    payload: Bytes,
    deliveries: u32,
}

impl Message {
    /// The message of a delivery, or `None` when it carries no message id.
    ///
    /// ```
    /// # use idempotent_core::queue::{Delivery, Message};
    /// assert!(Message::from_delivery(&Delivery::new((), "1-0", "x")).is_none());
    /// ```
    pub fn from_delivery<R>(delivery: &Delivery<R>) -> Option<Self> {
        Some(Self {
            id: delivery.message_id.clone()?,
            broker_id: delivery.broker_id.clone(),
            payload: delivery.payload.clone(),
            deliveries: delivery.deliveries,
        })
    }

    /// The producer's message id: the idempotency key.
    ///
    /// ```
    /// # use idempotent_core::queue::{Delivery, Message};
    /// # let message = Message::from_delivery(&Delivery::new((), "1-0", "x").with_message_id("m-1")).unwrap();
    /// assert_eq!(message.id(), "m-1");
    /// ```
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The broker's id of this copy (a stream entry id, a stream sequence): for logs only.
    ///
    /// ```
    /// # use idempotent_core::queue::{Delivery, Message};
    /// # let message = Message::from_delivery(&Delivery::new((), "1-0", "x").with_message_id("m-1")).unwrap();
    /// assert_eq!(message.broker_id(), "1-0");
    /// ```
    pub fn broker_id(&self) -> &str {
        &self.broker_id
    }

    /// The body.
    ///
    /// ```
    /// # use idempotent_core::queue::{Delivery, Message};
    /// # let message = Message::from_delivery(&Delivery::new((), "1-0", "x").with_message_id("m-1")).unwrap();
    /// assert_eq!(message.payload(), b"x");
    /// ```
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The body decoded from JSON.
    ///
    /// ```
    /// # use idempotent_core::queue::{Delivery, Message};
    /// # let message = Message::from_delivery(&Delivery::new((), "1-0", "[1,2]").with_message_id("m-1")).unwrap();
    /// let numbers: Vec<u32> = message.json()?;
    /// assert_eq!(numbers, [1, 2]);
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// How many times the broker has delivered it, this delivery included.
    ///
    /// ```
    /// # use idempotent_core::queue::{Delivery, Message};
    /// # let message = Message::from_delivery(&Delivery::new((), "1-0", "x").with_message_id("m-1").with_deliveries(3)).unwrap();
    /// assert_eq!(message.deliveries(), 3);
    /// ```
    pub fn deliveries(&self) -> u32 {
        self.deliveries
    }

    /// The call this message is processed under: `name` as the function's name, the id as the
    /// key, the payload as the fingerprint (so an id reused with another payload is told
    /// apart from a duplicate).
    pub(crate) fn call(&self, name: &'static str) -> Call<'_> {
        Call::new(name, payload_fingerprint(&self.payload)).key(self.id.as_str())
    }
}

/// The payload's fingerprint: SHA-256 of its bytes, as the HTTP layer fingerprints a body.
fn payload_fingerprint(payload: &[u8]) -> Fingerprint {
    Fingerprint::from_bytes(Sha256::digest(payload).into())
}

/// What a consumer has done so far, counted by message delivery.
///
/// `received` is every delivery taken; each ends in exactly one of `processed`,
/// `duplicates`, `retried`, `dead_lettered` or `released`, or is still at work.
///
/// ```
/// use idempotent_core::queue::Report;
///
/// let report = Report { received: 3, processed: 2, duplicates: 1, ..Report::default() };
/// assert_eq!(report.settled(), 3);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Deliveries taken from the source.
    pub received: u64,
    /// Deliveries whose handler ran now and whose record was committed (acknowledged).
    pub processed: u64,
    /// Of `processed`, those whose handler ran but whose record could not be written (the
    /// store failed, or the claim was lost while the handler ran); acknowledged all the same,
    /// since the handler's work is done, and logged as a warning.
    pub unrecorded: u64,
    /// Deliveries of an id already processed: acknowledged without running the handler.
    pub duplicates: u64,
    /// Deliveries given back to the broker to be delivered again: the handler failed, or the
    /// store or another consumer's claim kept this one from deciding.
    pub retried: u64,
    /// Deliveries put in the dead-letter destination (and acknowledged).
    pub dead_lettered: u64,
    /// Deliveries given back unsettled at shutdown.
    pub released: u64,
    /// Acknowledgements or other settlements the broker failed to take; the message will be
    /// delivered again, and then found recorded.
    pub settle_failures: u64,
}

impl Report {
    /// Deliveries settled one way or another (all but those still at work).
    ///
    /// ```
    /// # use idempotent_core::queue::Report;
    /// assert_eq!(Report { received: 1, retried: 1, ..Report::default() }.settled(), 1);
    /// ```
    pub fn settled(&self) -> u64 {
        self.processed + self.duplicates + self.retried + self.dead_lettered + self.released
    }
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    processed: AtomicU64,
    unrecorded: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    released: AtomicU64,
    settle_failures: AtomicU64,
}

impl Counters {
    fn report(&self) -> Report {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Report {
            received: read(&self.received),
            processed: read(&self.processed),
            unrecorded: read(&self.unrecorded),
            duplicates: read(&self.duplicates),
            retried: read(&self.retried),
            dead_lettered: read(&self.dead_lettered),
            released: read(&self.released),
            settle_failures: read(&self.settle_failures),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// How one delivery's processing ended, before it is settled with the broker.
#[derive(Debug)]
enum Verdict {
    /// The engine answered: the handler ran (and was recorded or not) or was replayed.
    Done(Outcome<()>),
    /// The handler returned an error, as its `Display` wrote it.
    HandlerFailed(String),
    /// The delivery is past the consumer's limit and the id is not recorded.
    Exceeded,
    /// The engine refused or could not decide (store down, key reused, conflict).
    Engine(Error),
}

/// The error type the engine runs a handler with.
#[derive(Debug)]
enum Failure {
    Handler(String),
    Exceeded,
    Engine(Error),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self::Engine(error)
    }
}

impl From<Result<Outcome<()>, Failure>> for Verdict {
    fn from(result: Result<Outcome<()>, Failure>) -> Self {
        match result {
            Ok(outcome) => Self::Done(outcome),
            Err(Failure::Handler(error)) => Self::HandlerFailed(error),
            Err(Failure::Exceeded) => Self::Exceeded,
            Err(Failure::Engine(error)) => Self::Engine(error),
        }
    }
}

/// A queue consumer: runs a handler once per message id and settles each delivery with its
/// [`Source`] only as the module docs say.
///
/// Several consumers (tasks, processes or machines) share the work by sharing the source's
/// consumer group or durable consumer and one store; the store decides which of two copies of
/// a message runs the handler.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idempotent_core::{Idempotency, MemoryStore, Options};
/// use idempotent_core::queue::{self, Consumer, Message};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::queue::SourceError> {
/// let (publisher, source) = queue::channel(Duration::from_secs(30));
/// publisher.publish("email-1", "welcome ada");
///
/// let engine = Idempotency::new(Arc::new(MemoryStore::new()))
///     .with_options(Options::new().with_lease(Duration::from_secs(10)));
/// let consumer = Consumer::new("mailer::send", source.clone())
///     .with_engine(engine)
///     .max_deliveries(3)
///     .concurrency(8);
/// let report = consumer
///     .run(|message: Message| async move { Ok::<_, std::io::Error>(()) }, source.settled())
///     .await?;
/// assert_eq!(report.processed, 1);
/// # Ok(()) }
/// ```
pub struct Consumer<S> {
    name: &'static str,
    source: S,
    engine: Idempotency,
    max_deliveries: u32,
    concurrency: usize,
    retry_delay: Duration,
    drain_timeout: Duration,
    counters: Arc<Counters>,
}

impl<S> fmt::Debug for Consumer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("max_deliveries", &self.max_deliveries)
            .field("concurrency", &self.concurrency)
            .field("retry_delay", &self.retry_delay)
            .field("drain_timeout", &self.drain_timeout)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Consumer<S> {
    /// Deliveries a message may have before it is dead-lettered, by default.
    pub const DEFAULT_MAX_DELIVERIES: u32 = 5;
    /// Handlers at work at once, by default.
    pub const DEFAULT_CONCURRENCY: usize = 16;
    /// How long a failed message waits before it is delivered again, by default.
    pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);
    /// How long a shutdown waits for the handlers at work, by default.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

    /// A consumer of `source` whose records are named `name` (as a function's name names its
    /// records: two consumers with one name share their ids), on the
    /// [default store](crate::default_store) with the default [`Options`](crate::Options).
    ///
    /// ```
    /// # use std::time::Duration;
    /// use idempotent_core::queue::{self, Consumer};
    /// let (_publisher, source) = queue::channel(Duration::from_secs(30));
    /// let consumer = Consumer::new("orders::place", source);
    /// ```
    pub fn new(name: &'static str, source: S) -> Self {
        Self {
            name,
            source,
            engine: Idempotency::with_default_store(),
            max_deliveries: Self::DEFAULT_MAX_DELIVERIES,
            concurrency: Self::DEFAULT_CONCURRENCY,
            retry_delay: Self::DEFAULT_RETRY_DELAY,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
            counters: Arc::default(),
        }
    }

    /// Records in `engine`'s store, with its options: the lease a handler holds its id under,
    /// how long a copy waits for another consumer's handler of the same id
    /// ([`OnConflict`](crate::OnConflict)), and how long an id stays recorded (its ttl: keep
    /// it longer than the broker may redeliver or a producer may republish).
    ///
    /// ```
    /// # use std::{sync::Arc, time::Duration};
    /// use idempotent_core::{Idempotency, MemoryStore};
    /// use idempotent_core::queue::{self, Consumer};
    /// let (_publisher, source) = queue::channel(Duration::from_secs(30));
    /// let consumer = Consumer::new("orders::place", source)
    ///     .with_engine(Idempotency::new(Arc::new(MemoryStore::new())));
    /// ```
    #[must_use]
    pub fn with_engine(mut self, engine: Idempotency) -> Self {
        self.engine = engine;
        self
    }

    /// Deliveries a message may have (at least 1): a message whose handler fails on this
    /// many deliveries, or that is delivered more often than this without being settled (its
    /// consumers died with it), is dead-lettered. Every delivery counts, whatever ended it.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::{self, Consumer};
    /// # let (_publisher, source) = queue::channel(Duration::from_secs(30));
    /// let consumer = Consumer::new("orders::place", source).max_deliveries(10);
    /// ```
    #[must_use]
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries.max(1);
        self
    }

    /// Handlers at work at once (at least 1); the consumer asks the source for no more
    /// deliveries than it has room for.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::{self, Consumer};
    /// # let (_publisher, source) = queue::channel(Duration::from_secs(30));
    /// let consumer = Consumer::new("orders::place", source).concurrency(64);
    /// ```
    #[must_use]
    pub fn concurrency(mut self, handlers: usize) -> Self {
        self.concurrency = handlers.max(1);
        self
    }

    /// How long a message whose handler failed waits before it is delivered again, where the
    /// source can wait ([`Source::retry`]).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::{self, Consumer};
    /// # let (_publisher, source) = queue::channel(Duration::from_secs(30));
    /// let consumer = Consumer::new("orders::place", source).retry_delay(Duration::from_secs(5));
    /// ```
    #[must_use]
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// How long a shutdown waits for the handlers at work before it stops them (each one's
    /// claim is released, as for a cancelled call, and its delivery released to the source).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::{self, Consumer};
    /// # let (_publisher, source) = queue::channel(Duration::from_secs(30));
    /// let consumer = Consumer::new("orders::place", source).drain_timeout(Duration::from_secs(5));
    /// ```
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The source.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::{self, Consumer, Source};
    /// # let (_publisher, source) = queue::channel(Duration::from_secs(30));
    /// let consumer = Consumer::new("orders::place", source);
    /// assert_eq!(consumer.source().lease(), Duration::from_secs(30));
    /// ```
    pub fn source(&self) -> &S {
        &self.source
    }

    /// What the consumer has done so far (also while [`Consumer::run`] runs, from another
    /// task).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::{self, Consumer};
    /// # let (_publisher, source) = queue::channel(Duration::from_secs(30));
    /// let consumer = Consumer::new("orders::place", source);
    /// assert_eq!(consumer.report().received, 0);
    /// ```
    pub fn report(&self) -> Report {
        self.counters.report()
    }

    /// Consumes until `shutdown` completes, running `handler` once per message id under a
    /// claim in the engine's store; then stops taking deliveries, lets the handlers at work
    /// finish (for up to [`Consumer::drain_timeout`]) and returns the report.
    ///
    /// A handler's `Err` gives the message back to the broker (its `Display` is logged, and
    /// kept with the message if it is dead-lettered). An error of the source that trying
    /// again may cure is logged and retried with backoff; one that it cannot (a missing
    /// stream) ends the run after the handlers at work finish, and is returned.
    ///
    /// See the [module docs](self) for an example.
    pub async fn run<H, Fut, E>(
        &self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Report, SourceError>
    where
        H: Fn(Message) -> Fut + Sync,
        Fut: Future<Output = Result<(), E>> + Send,
        E: fmt::Display,
    {
        let process = |message: Message, exceeded: bool| {
            let handler = &handler;
            async move {
                let call = message.call(self.name);
                let body = async {
                    if exceeded {
                        return Err(Failure::Exceeded);
                    }
                    handler(message.clone())
                        .await
                        .map_err(|error| Failure::Handler(error.to_string()))
                };
                Verdict::from(self.engine.run(call, body).await)
            }
        };
        self.consume(process, shutdown).await
    }

    /// The loop every `run` shares: receive within the room left, settle each delivery as its
    /// processing ends, stop on `shutdown`.
    async fn consume<P, Fut>(
        &self,
        process: P,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Report, SourceError>
    where
        P: Fn(Message, bool) -> Fut,
        Fut: Future<Output = Verdict>,
    {
        let mut shutdown = pin!(shutdown);
        let (stop_handlers, handlers_stopped) = watch::channel(false);
        let mut at_work = FuturesUnordered::new();
        let mut receiving = None;
        let mut stopping = false;
        let mut failure = None;
        let mut backoff = RECEIVE_BACKOFF_MIN;
        let drain = tokio::time::sleep(Duration::MAX);
        let mut drain = pin!(drain);
        let mut draining = false;
        let mut handlers_told_to_stop = false;
        // After a failed receive, when the next one may start: the loop keeps polling the
        // handlers at work meanwhile (their keeps and settlements).
        let mut receive_after: Option<tokio::time::Instant> = None;

        loop {
            if !stopping
                && receiving.is_none()
                && receive_after.is_none()
                && at_work.len() < self.concurrency
            {
                let room = self.concurrency - at_work.len();
                receiving = Some(Box::pin(self.source.receive(room)));
            }
            if stopping && receiving.is_none() && at_work.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                }
                () = &mut drain, if draining => {
                    // The handlers still at work are stopped: each releases its claim and its
                    // delivery.
                    let _ = stop_handlers.send(true);
                    handlers_told_to_stop = true;
                    draining = false;
                }
                Some(()) = at_work.next(), if !at_work.is_empty() => {}
                () = tokio::time::sleep_until(receive_after.unwrap_or_else(tokio::time::Instant::now)), if receive_after.is_some() => {
                    receive_after = None;
                }
                received = async { receiving.as_mut().expect("guarded").await }, if receiving.is_some() => {
                    receiving = None;
                    match received {
                        Ok(deliveries) => {
                            backoff = RECEIVE_BACKOFF_MIN;
                            for delivery in deliveries {
                                bump(&self.counters.received);
                                if stopping {
                                    self.release(&delivery).await;
                                } else {
                                    at_work.push(self.settle(delivery, &process, handlers_stopped.clone()));
                                }
                            }
                        }
                        Err(error) if error.is_retryable() => {
                            tracing::warn!(target: "idempotent::queue", consumer = self.name, %error, "receiving failed; trying again");
                            receive_after = Some(tokio::time::Instant::now() + backoff);
                            backoff = (backoff * 2).min(RECEIVE_BACKOFF_MAX);
                        }
                        Err(error) => {
                            tracing::error!(target: "idempotent::queue", consumer = self.name, %error, "the source refused; stopping");
                            failure = Some(error);
                            stopping = true;
                        }
                    }
                }
            }
            if stopping && !draining && !handlers_told_to_stop && !at_work.is_empty() {
                drain
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.drain_timeout);
                draining = true;
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(self.report()),
        }
    }

    /// One delivery, from its processing to its settlement with the source.
    async fn settle<P, Fut>(
        &self,
        delivery: Delivery<S::Receipt>,
        process: &P,
        mut stopped: watch::Receiver<bool>,
    ) where
        P: Fn(Message, bool) -> Fut,
        Fut: Future<Output = Verdict>,
    {
        let Some(message) = Message::from_delivery(&delivery) else {
            self.dead_letter(&delivery, DeadLetterReason::NoMessageId)
                .await;
            return;
        };
        let exceeded = delivery.deliveries > self.max_deliveries;
        // The processing is dropped at the end of this block, before a stopped delivery is
        // released: its claim is released first (the handler had not returned) or its record
        // finished on a task of its own (it had).
        let verdict = {
            let mut processing = pin!(process(message, exceeded));
            let keep_every = (self.source.lease() / 3).max(Duration::from_millis(1));
            let mut keep =
                tokio::time::interval_at(tokio::time::Instant::now() + keep_every, keep_every);
            keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    verdict = &mut processing => break Some(verdict),
                    () = async { drop(stopped.wait_for(|stopped| *stopped).await) } => break None,
                    _ = keep.tick() => {
                        if let Err(error) = self.source.keep(&delivery).await {
                            tracing::warn!(target: "idempotent::queue", consumer = self.name, broker_id = %delivery.broker_id, %error, "could not keep the delivery while its handler runs");
                        }
                    }
                }
            }
        };
        let Some(verdict) = verdict else {
            // Shutdown ran out of time.
            self.release(&delivery).await;
            return;
        };
        match verdict {
            Verdict::Done(outcome) => {
                match outcome {
                    Outcome::Executed(()) => bump(&self.counters.processed),
                    Outcome::Unrecorded(()) => {
                        bump(&self.counters.processed);
                        bump(&self.counters.unrecorded);
                    }
                    Outcome::Replayed(()) => bump(&self.counters.duplicates),
                }
                if let Err(error) = self.source.ack(&delivery).await {
                    bump(&self.counters.settle_failures);
                    tracing::warn!(target: "idempotent::queue", consumer = self.name, broker_id = %delivery.broker_id, %error, "the acknowledgement failed; the message will come again and be found recorded");
                }
            }
            Verdict::HandlerFailed(error) => {
                if delivery.deliveries >= self.max_deliveries {
                    let deliveries = delivery.deliveries;
                    self.dead_letter(
                        &delivery,
                        DeadLetterReason::HandlerFailed { deliveries, error },
                    )
                    .await;
                } else {
                    tracing::warn!(target: "idempotent::queue", consumer = self.name, broker_id = %delivery.broker_id, deliveries = delivery.deliveries, %error, "the handler failed; the message will be delivered again");
                    self.retry(&delivery).await;
                }
            }
            Verdict::Exceeded => {
                let deliveries = delivery.deliveries;
                self.dead_letter(
                    &delivery,
                    DeadLetterReason::TooManyDeliveries { deliveries },
                )
                .await;
            }
            Verdict::Engine(Error::KeyReused) => {
                self.dead_letter(&delivery, DeadLetterReason::IdReused)
                    .await;
            }
            Verdict::Engine(Error::InvalidKey(error)) => {
                let error = error.to_string();
                self.dead_letter(&delivery, DeadLetterReason::InvalidId { error })
                    .await;
            }
            Verdict::Engine(error) => {
                tracing::warn!(target: "idempotent::queue", consumer = self.name, broker_id = %delivery.broker_id, %error, "could not decide whether the message was processed; it will be delivered again");
                self.retry(&delivery).await;
            }
        }
    }

    async fn retry(&self, delivery: &Delivery<S::Receipt>) {
        bump(&self.counters.retried);
        if let Err(error) = self.source.retry(delivery, self.retry_delay).await {
            bump(&self.counters.settle_failures);
            tracing::warn!(target: "idempotent::queue", consumer = self.name, broker_id = %delivery.broker_id, %error, "could not give the message back; it will come again after its lease");
        }
    }

    async fn release(&self, delivery: &Delivery<S::Receipt>) {
        bump(&self.counters.released);
        if let Err(error) = self.source.release(delivery).await {
            bump(&self.counters.settle_failures);
            tracing::warn!(target: "idempotent::queue", consumer = self.name, broker_id = %delivery.broker_id, %error, "could not release the message; it will come again after its lease");
        }
    }

    async fn dead_letter(&self, delivery: &Delivery<S::Receipt>, reason: DeadLetterReason) {
        tracing::warn!(target: "idempotent::queue", consumer = self.name, broker_id = %delivery.broker_id, reason = reason.code(), detail = %reason, "dead-lettering the message");
        match self.source.dead_letter(delivery, &reason).await {
            Ok(()) => bump(&self.counters.dead_lettered),
            Err(error) => {
                bump(&self.counters.retried);
                bump(&self.counters.settle_failures);
                tracing::warn!(target: "idempotent::queue", consumer = self.name, broker_id = %delivery.broker_id, %error, "could not dead-letter the message; it will come again");
            }
        }
    }
}

const RECEIVE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RECEIVE_BACKOFF_MAX: Duration = Duration::from_secs(5);
