//! NATS JetStream as a queue source: [`JetStreamSource`] (a durable pull consumer) and
//! [`JetStreamPublisher`] (publishes with `Nats-Msg-Id`).
//!
//! Two layers of deduplication work together here.
//!
//! - **Publish-side**: a message published with a `Nats-Msg-Id` header is stored once per id
//!   within the stream's `duplicate_window` (two minutes by default): a producer that lost a
//!   publish acknowledgement and publishes again gets [`Published::duplicate`] back, and the
//!   stream holds one copy. [`JetStreamPublisher::publish`] sets the header.
//! - **Consumer-side**: the window is a bounded in-memory set on the server. A republish after
//!   it (a producer replaying an outbox an hour later), and every *redelivery* (a consumer that
//!   died before its ack, an ack lost on the way), reach the consumer as another delivery of an
//!   id. The [`Consumer`](super::Consumer) keys each delivery by the `Nats-Msg-Id` header (the
//!   producer's id, never the stream sequence) and runs its handler once per id, for as long
//!   as the store keeps the id recorded.
//!
//! How the consumer's settings map onto the JetStream consumer:
//!
//! | The consumer                       | JetStream                                                    |
//! |------------------------------------|--------------------------------------------------------------|
//! | [`Source::lease`]                  | the consumer's `AckWait` (default 30 s)                      |
//! | [`Source::keep`], every lease / 3  | `+WPI` (`AckKind::Progress`): AckWait starts over            |
//! | [`Source::ack`]                    | `+ACK`, double-acked: the server confirms it                 |
//! | [`Source::retry`] after a delay    | `-NAK {"delay": ...}`                                        |
//! | [`Source::release`] at shutdown    | `-NAK`: redelivered at once, to any consumer                 |
//! | [`Source::dead_letter`]            | a publish to the dead-letter subject, then `+TERM`           |
//! | [`Consumer::max_deliveries`](super::Consumer::max_deliveries) | `MaxDeliver` = -1 (unlimited)       |
//!
//! A released (NAKed) message is delivered again at the next pull, to any consumer of the
//! durable; until then nats-server still counts it in the consumer's `num_ack_pending`.
//!
//! `MaxDeliver` is left unlimited on purpose: a JetStream consumer that reaches it stops
//! delivering the message and tells no one but an advisory, so the message would be dropped
//! silently. The [`Consumer`](super::Consumer) counts the deliveries (the message's
//! `delivered` count) itself and dead-letters the message, with the reason and the handler's
//! last error, on its [`max_deliveries`](super::Consumer::max_deliveries)-th delivery.
//!
//! Dead letters are published to a subject (by default `<stream>.dead-letter`) that a stream
//! of their own must capture: create it yourself, or ask the builder to
//! ([`JetStreamSourceBuilder::create_dead_letter_stream`]). The source stream must not capture
//! that subject itself, or dead letters would be delivered again; the builder refuses it.
//!
//! ```no_run
//! use std::time::Duration;
//! use idempotent_core::queue::Consumer;
//! use idempotent_core::queue::nats::{JetStreamPublisher, JetStreamSource};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let jetstream = async_nats::jetstream::new(client);
//! jetstream
//!     .get_or_create_stream(async_nats::jetstream::stream::Config {
//!         name: "ORDERS".into(),
//!         subjects: vec!["orders.>".into()],
//!         duplicate_window: Duration::from_secs(120),
//!         ..Default::default()
//!     })
//!     .await?;
//!
//! // The producer: the order's id is the message id, the same on every retry.
//! let publisher = JetStreamPublisher::new(jetstream.clone());
//! let published = publisher.publish("orders.placed", "order-7", r#"{"total":4200}"#).await?;
//! assert!(!published.duplicate);
//!
//! // The consumer: a durable pull consumer "orders-worker", dead letters in ORDERS_DEAD.
//! let source = JetStreamSource::builder(jetstream, "ORDERS", "orders-worker")
//!     .lease(Duration::from_secs(30))
//!     .create_dead_letter_stream("ORDERS_DEAD")
//!     .build()
//!     .await?;
//! let consumer = Consumer::new("orders::place", source).max_deliveries(5);
//! consumer
//!     .run(
//!         |message| async move {
//!             println!("placing {}", message.id());
//!             Ok::<_, std::io::Error>(())
//!         },
//!         tokio::time::sleep(Duration::from_secs(3600)), // or a signal's future
//!     )
//!     .await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::{GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::{self, AckKind, Context};
use futures_util::StreamExt;

use super::source::{DeadLetterReason, Delivery, Source, SourceError};
use crate::redact::redact_url;
use crate::store::Bytes;

/// The `Nats-Msg-Id` header: the producer's message id.
const MESSAGE_ID: &str = "Nats-Msg-Id";

/// The headers of a dead letter, besides the original ones (but NATS's own `Nats-*` headers,
/// which are orders to a stream, not data) and `Nats-Msg-Id`: the original id, or
/// `<stream>:<sequence>` for a message that had none, so that a dead letter published twice is
/// stored once.
pub mod dead_letter_headers {
    /// The reason's [`code`](crate::queue::DeadLetterReason::code): `handler-failed`, ...
    pub const REASON: &str = "Dead-Letter-Reason";
    /// The reason in words, with the handler's last error.
    pub const DETAIL: &str = "Dead-Letter-Detail";
    /// The message's deliveries, the last one included.
    pub const DELIVERIES: &str = "Deliveries";
    /// The stream it came from.
    pub const SOURCE_STREAM: &str = "Source-Stream";
    /// Its sequence in that stream.
    pub const SOURCE_SEQUENCE: &str = "Source-Sequence";
    /// The subject it was published to.
    pub const SOURCE_SUBJECT: &str = "Source-Subject";
}

/// Where the builder reaches NATS.
enum Target {
    Context(Context),
    Url(String),
}

/// A URL with its password masked: the builder's `Debug` may be logged.
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Context(context) => f.debug_tuple("Context").field(context).finish(),
            Self::Url(url) => f.debug_tuple("Url").field(&redact_url(url)).finish(),
        }
    }
}

/// Builds a [`JetStreamSource`]: [`JetStreamSource::builder`] or
/// [`JetStreamSource::builder_for_url`], then [`JetStreamSourceBuilder::build`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is awaited"]
pub struct JetStreamSourceBuilder {
    target: Target,
    stream: String,
    consumer: String,
    filter_subject: Option<String>,
    lease: Duration,
    poll_interval: Duration,
    dead_letter_subject: Option<String>,
    dead_letter_stream: Option<String>,
}

impl JetStreamSourceBuilder {
    /// AckWait of the consumer it creates: how long a delivery stays this consumer's without
    /// an ack or a keep (default 30 s). An existing consumer keeps its own AckWait, and that
    /// is the lease.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::nats::JetStreamSource;
    /// let builder = JetStreamSource::builder_for_url("nats://127.0.0.1:4222", "ORDERS", "worker")
    ///     .lease(Duration::from_secs(60));
    /// ```
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// How long a [`Source::receive`] waits for a message when none is ready (default 1 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::queue::nats::JetStreamSource;
    /// let builder = JetStreamSource::builder_for_url("nats://127.0.0.1:4222", "ORDERS", "worker")
    ///     .poll_interval(Duration::from_millis(200));
    /// ```
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Only the stream's messages on this subject (wildcards allowed) go to the consumer it
    /// creates (default: all of them).
    ///
    /// ```
    /// # use idempotent_core::queue::nats::JetStreamSource;
    /// let builder = JetStreamSource::builder_for_url("nats://127.0.0.1:4222", "ORDERS", "worker")
    ///     .filter_subject("orders.placed");
    /// ```
    pub fn filter_subject(mut self, subject: impl Into<String>) -> Self {
        self.filter_subject = Some(subject.into());
        self
    }

    /// The subject dead letters are published to (default `<stream>.dead-letter`).
    ///
    /// ```
    /// # use idempotent_core::queue::nats::JetStreamSource;
    /// let builder = JetStreamSource::builder_for_url("nats://127.0.0.1:4222", "ORDERS", "worker")
    ///     .dead_letter_subject("dead.orders");
    /// ```
    pub fn dead_letter_subject(mut self, subject: impl Into<String>) -> Self {
        self.dead_letter_subject = Some(subject.into());
        self
    }

    /// Creates a stream named `name` on the dead-letter subject when the build finds none of
    /// that name (otherwise a stream of yours must capture the subject).
    ///
    /// ```
    /// # use idempotent_core::queue::nats::JetStreamSource;
    /// let builder = JetStreamSource::builder_for_url("nats://127.0.0.1:4222", "ORDERS", "worker")
    ///     .create_dead_letter_stream("ORDERS_DEAD");
    /// ```
    pub fn create_dead_letter_stream(mut self, name: impl Into<String>) -> Self {
        self.dead_letter_stream = Some(name.into());
        self
    }

    /// Connects (for a URL), finds the stream, creates the dead-letter stream if asked, and
    /// finds or creates the durable pull consumer (`AckPolicy::Explicit`, AckWait = the
    /// lease, `MaxDeliver` = -1, the filter subject if any).
    ///
    /// # Errors
    /// A [`SourceError`] saying what to do: the server cannot be reached (unavailable), there
    /// is no such stream ("create the stream first"), the consumer exists with another ack
    /// policy, the source stream captures the dead-letter subject (refused).
    pub async fn build(self) -> Result<JetStreamSource, SourceError> {
        let context = match self.target {
            Target::Context(context) => context,
            Target::Url(url) => {
                let client = async_nats::connect(url.as_str()).await.map_err(|error| {
                    SourceError::unavailable(
                        format!(
                            "could not connect to NATS at {}: is nats-server running there?",
                            redact_url(&url)
                        ),
                        error,
                    )
                })?;
                jetstream::new(client)
            }
        };
        let stream_name = self.stream;
        let stream = context
            .get_stream(&stream_name)
            .await
            .map_err(|error| stream_error(&stream_name, error))?;
        let dead_letter_subject = self
            .dead_letter_subject
            .unwrap_or_else(|| format!("{stream_name}.dead-letter"));
        let captured_by_source = stream
            .cached_info()
            .config
            .subjects
            .iter()
            .find(|pattern| subject_matches(pattern, &dead_letter_subject));
        if let Some(pattern) = captured_by_source {
            return Err(SourceError::refused(format!(
                "the stream {stream_name} captures the dead-letter subject {dead_letter_subject} \
                 itself (its subject {pattern}), so dead letters would be delivered again: choose \
                 a dead-letter subject outside its subjects (dead_letter_subject)"
            )));
        }
        if let Some(name) = &self.dead_letter_stream {
            let config = jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![dead_letter_subject.clone()],
                ..Default::default()
            };
            context
                .get_or_create_stream(config)
                .await
                .map_err(|error| {
                    SourceError::refused_by(
                        format!(
                            "could not find or create the dead-letter stream {name} on \
                             {dead_letter_subject}: create it yourself, or check that no other \
                             stream captures that subject"
                        ),
                        error,
                    )
                })?;
        }
        let config = pull::Config {
            durable_name: Some(self.consumer.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.lease,
            max_deliver: -1,
            filter_subject: self.filter_subject.unwrap_or_default(),
            ..Default::default()
        };
        let consumer: PullConsumer = stream
            .get_or_create_consumer(&self.consumer, config)
            .await
            .map_err(|error| {
                SourceError::refused_by(
                    format!(
                        "could not find or create the durable pull consumer {} on the stream \
                         {stream_name}: check its name (letters, digits, - and _), or that an \
                         existing consumer of that name is a pull consumer",
                        self.consumer
                    ),
                    error,
                )
            })?;
        let info = consumer.cached_info();
        if info.config.ack_policy != AckPolicy::Explicit {
            return Err(SourceError::refused(format!(
                "the consumer {} on {stream_name} exists with ack policy {:?}; the source needs \
                 AckPolicy::Explicit (each message acknowledged on its own): delete it or name \
                 another consumer",
                self.consumer, info.config.ack_policy
            )));
        }
        if info.config.max_deliver > 0 {
            tracing::warn!(target: "idempotent::queue", stream = %stream_name, consumer = %self.consumer, max_deliver = info.config.max_deliver, "the consumer's MaxDeliver drops a message silently once reached; set it to -1 and let the queue consumer's max_deliveries dead-letter it");
        }
        let lease = info.config.ack_wait;
        Ok(JetStreamSource {
            context,
            consumer,
            stream: stream_name,
            lease,
            poll_interval: self.poll_interval,
            dead_letter_subject,
        })
    }
}

/// A NATS JetStream durable pull consumer as a [`Source`]: see the [module docs](self).
///
/// The message id is the `Nats-Msg-Id` header, `broker_id` the stream sequence, and
/// `deliveries` the message's `delivered` count. Clones share the consumer (as several
/// processes sharing the durable name do); so do two sources built with one name.
///
/// ```no_run
/// use idempotent_core::queue::nats::JetStreamSource;
///
/// # #[tokio::main] async fn main() -> Result<(), idempotent_core::queue::SourceError> {
/// let source = JetStreamSource::builder_for_url("nats://127.0.0.1:4222", "ORDERS", "worker")
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct JetStreamSource {
    context: Context,
    consumer: PullConsumer,
    stream: String,
    lease: Duration,
    poll_interval: Duration,
    dead_letter_subject: String,
}

/// What a [`JetStreamSource`] settles a delivery with: the JetStream message.
#[derive(Debug, Clone)]
pub struct JetStreamReceipt {
    message: jetstream::Message,
    stream_sequence: u64,
}

impl JetStreamReceipt {
    /// The message as JetStream delivered it (subject, headers, reply subject).
    pub fn message(&self) -> &jetstream::Message {
        &self.message
    }

    /// The message's sequence in its stream.
    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }
}

impl JetStreamSource {
    /// The default lease (AckWait) of a consumer the builder creates.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// How long a receive waits for a message, by default.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

    /// A builder over an existing JetStream context, for the durable pull consumer `consumer`
    /// of the stream `stream`.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use idempotent_core::queue::nats::JetStreamSource;
    /// let jetstream = async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await?);
    /// let source = JetStreamSource::builder(jetstream, "ORDERS", "worker").build().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(
        context: Context,
        stream: impl Into<String>,
        consumer: impl Into<String>,
    ) -> JetStreamSourceBuilder {
        Self::builder_with(Target::Context(context), stream.into(), consumer.into())
    }

    /// A builder that connects to `url` (`nats://host:port`) when built.
    ///
    /// ```
    /// use idempotent_core::queue::nats::JetStreamSource;
    /// let builder = JetStreamSource::builder_for_url("nats://127.0.0.1:4222", "ORDERS", "worker");
    /// ```
    pub fn builder_for_url(
        url: impl Into<String>,
        stream: impl Into<String>,
        consumer: impl Into<String>,
    ) -> JetStreamSourceBuilder {
        Self::builder_with(Target::Url(url.into()), stream.into(), consumer.into())
    }

    fn builder_with(target: Target, stream: String, consumer: String) -> JetStreamSourceBuilder {
        JetStreamSourceBuilder {
            target,
            stream,
            consumer,
            filter_subject: None,
            lease: Self::DEFAULT_LEASE,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            dead_letter_subject: None,
            dead_letter_stream: None,
        }
    }

    /// The JetStream context it works through.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The stream it consumes.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The durable consumer's name.
    pub fn consumer_name(&self) -> &str {
        self.consumer
            .cached_info()
            .config
            .durable_name
            .as_deref()
            .unwrap_or(&self.consumer.cached_info().name)
    }

    /// The subject dead letters are published to.
    pub fn dead_letter_subject(&self) -> &str {
        &self.dead_letter_subject
    }

    /// The consumer's state on the server now: `num_ack_pending` (delivered, not settled),
    /// `num_pending` (not delivered yet), `num_redelivered`.
    ///
    /// # Errors
    /// When the server cannot be asked (unavailable) or the consumer is gone (refused).
    pub async fn consumer_info(&self) -> Result<jetstream::consumer::Info, SourceError> {
        self.consumer.get_info().await.map_err(|error| {
            SourceError::unavailable(
                format!(
                    "could not read the consumer {} of the stream {}",
                    self.consumer_name(),
                    self.stream
                ),
                error,
            )
        })
    }

    fn delivery(
        &self,
        message: jetstream::Message,
    ) -> Result<Delivery<JetStreamReceipt>, SourceError> {
        let info = message.info().map_err(|error| {
            SourceError::unavailable(
                format!(
                    "a message from the stream {} has no JetStream reply subject to read its \
                     delivery from",
                    self.stream
                ),
                error,
            )
        })?;
        let stream_sequence = info.stream_sequence;
        let delivered = u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX);
        let message_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(MESSAGE_ID))
            .map(|value| value.as_str().to_owned());
        let payload = Bytes::copy_from_slice(&message.payload);
        let mut delivery = Delivery::new(
            JetStreamReceipt {
                message,
                stream_sequence,
            },
            stream_sequence.to_string(),
            payload,
        )
        .with_deliveries(delivered);
        delivery.message_id = message_id;
        Ok(delivery)
    }

    /// Sends `kind` for the delivery and waits for the server to confirm it.
    async fn settle(
        &self,
        delivery: &Delivery<JetStreamReceipt>,
        kind: AckKind,
        what: &str,
    ) -> Result<(), SourceError> {
        delivery
            .receipt
            .message
            .double_ack_with(kind)
            .await
            .map_err(|error| {
                SourceError::unavailable(
                    format!(
                        "{what} of the message {} of the stream {} was not confirmed by the server",
                        delivery.receipt.stream_sequence, self.stream
                    ),
                    error,
                )
            })
    }

    async fn fetch(
        &self,
        max: usize,
        wait: bool,
    ) -> Result<Vec<Delivery<JetStreamReceipt>>, SourceError> {
        let unavailable = |error: async_nats::Error| {
            SourceError::unavailable(
                format!(
                    "pulling from the consumer {} of the stream {} failed",
                    self.consumer_name(),
                    self.stream
                ),
                error,
            )
        };
        let mut batch = if wait {
            self.consumer
                .batch()
                .max_messages(max)
                .expires(self.poll_interval)
                .messages()
                .await
                .map_err(|error| unavailable(error.into()))?
        } else {
            self.consumer
                .fetch()
                .max_messages(max)
                .messages()
                .await
                .map_err(|error| unavailable(error.into()))?
        };
        let mut deliveries = Vec::new();
        while let Some(message) = batch.next().await {
            deliveries.push(self.delivery(message.map_err(unavailable)?)?);
        }
        Ok(deliveries)
    }
}

impl Source for JetStreamSource {
    type Receipt = JetStreamReceipt;

    /// What is ready now (up to `max`), or else the first message to come within the poll
    /// interval: a pull request for many would wait for all of them, or the whole interval.
    async fn receive(&self, max: usize) -> Result<Vec<Delivery<JetStreamReceipt>>, SourceError> {
        let max = max.max(1);
        let ready = self.fetch(max, false).await?;
        if !ready.is_empty() {
            return Ok(ready);
        }
        self.fetch(1, true).await
    }

    async fn ack(&self, delivery: &Delivery<JetStreamReceipt>) -> Result<(), SourceError> {
        self.settle(delivery, AckKind::Ack, "the acknowledgement")
            .await
    }

    async fn retry(
        &self,
        delivery: &Delivery<JetStreamReceipt>,
        delay: Duration,
    ) -> Result<(), SourceError> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.settle(
            delivery,
            AckKind::Nak(delay),
            "the negative acknowledgement",
        )
        .await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery<JetStreamReceipt>,
        reason: &DeadLetterReason,
    ) -> Result<(), SourceError> {
        let original = &delivery.receipt.message;
        let mut headers = HeaderMap::new();
        if let Some(original_headers) = &original.headers {
            for (name, values) in original_headers.iter() {
                // NATS's own headers are orders to the stream (expectations that would fail
                // this publish, a rollup, a ttl); the id is set below.
                let name_text: &str = name.as_ref();
                if name_text
                    .get(..5)
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"))
                {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        let sequence = delivery.receipt.stream_sequence;
        // The original id, so that a dead letter published twice (its Term lost) is stored once;
        // a message without one is named by its place in the stream.
        let id = delivery
            .message_id
            .clone()
            .unwrap_or_else(|| format!("{}:{sequence}", self.stream));
        headers.insert(MESSAGE_ID, id.as_str());
        headers.insert(dead_letter_headers::REASON, reason.code());
        headers.insert(
            dead_letter_headers::DETAIL,
            one_line(&reason.to_string()).as_str(),
        );
        headers.insert(
            dead_letter_headers::DELIVERIES,
            delivery.deliveries.to_string().as_str(),
        );
        headers.insert(dead_letter_headers::SOURCE_STREAM, self.stream.as_str());
        headers.insert(
            dead_letter_headers::SOURCE_SEQUENCE,
            sequence.to_string().as_str(),
        );
        headers.insert(
            dead_letter_headers::SOURCE_SUBJECT,
            original.subject.as_str(),
        );
        let subject = self.dead_letter_subject.clone();
        let payload = original.payload.clone();
        let refused = |error: &dyn std::fmt::Display| {
            SourceError::refused(format!(
                "could not publish the dead letter of the message {sequence} of the stream {} to \
                 {subject}: {error}; create a stream that captures {subject} \
                 (or build the source with create_dead_letter_stream)",
                self.stream
            ))
        };
        let ack = self
            .context
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|error| refused(&error))?;
        ack.await.map_err(|error| match error.kind() {
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => SourceError::unavailable(
                format!(
                    "the dead letter of the message {sequence} of the stream {} was not \
                     acknowledged by the stream of {subject}",
                    self.stream
                ),
                error,
            ),
            _ => refused(&error),
        })?;
        self.settle(
            delivery,
            AckKind::Term,
            "the termination (after its dead letter)",
        )
        .await
    }

    fn lease(&self) -> Duration {
        self.lease
    }

    async fn keep(&self, delivery: &Delivery<JetStreamReceipt>) -> Result<(), SourceError> {
        self.settle(delivery, AckKind::Progress, "the progress report (+WPI)")
            .await
    }

    async fn release(&self, delivery: &Delivery<JetStreamReceipt>) -> Result<(), SourceError> {
        self.settle(delivery, AckKind::Nak(None), "the release (-NAK)")
            .await
    }
}

/// What a publish did, as the stream acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence in the stream (for a duplicate, the sequence of the copy stored before).
    pub sequence: u64,
    /// The stream had a message with this id within its duplicate window, and stored nothing.
    pub duplicate: bool,
}

/// Publishes messages with the producer's id in `Nats-Msg-Id`, for publish-side
/// deduplication.
///
/// ```no_run
/// use idempotent_core::queue::nats::JetStreamPublisher;
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let jetstream = async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await?);
/// let publisher = JetStreamPublisher::new(jetstream);
/// let first = publisher.publish("orders.placed", "order-7", "{}").await?;
/// let again = publisher.publish("orders.placed", "order-7", "{}").await?; // a retry
/// assert!(again.duplicate && again.sequence == first.sequence);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct JetStreamPublisher {
    context: Context,
}

impl JetStreamPublisher {
    /// A publisher through `context`.
    pub fn new(context: Context) -> Self {
        Self { context }
    }

    /// Publishes `payload` to `subject` with `message_id` in `Nats-Msg-Id`, and waits for the
    /// stream's acknowledgement.
    ///
    /// # Errors
    /// No stream captures the subject ("create the stream first": refused); the server did
    /// not acknowledge in time (unavailable: publish again with the same id, which is what
    /// the id is for).
    pub async fn publish(
        &self,
        subject: impl Into<String>,
        message_id: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Published, SourceError> {
        publish(&self.context, subject, message_id, payload).await
    }
}

/// [`JetStreamPublisher::publish`] through `context`.
///
/// # Errors
/// As [`JetStreamPublisher::publish`].
pub async fn publish(
    context: &Context,
    subject: impl Into<String>,
    message_id: &str,
    payload: impl Into<Bytes>,
) -> Result<Published, SourceError> {
    let subject = subject.into();
    let mut headers = HeaderMap::new();
    headers.insert(MESSAGE_ID, message_id);
    let failed = |error: jetstream::context::PublishError| match error.kind() {
        PublishErrorKind::StreamNotFound => SourceError::refused_by(
            format!("no stream captures the subject {subject}: create the stream first"),
            error,
        ),
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => SourceError::unavailable(
            format!(
                "publishing {message_id} to {subject} was not acknowledged: publish it again \
                 with the same id"
            ),
            error,
        ),
        _ => SourceError::refused_by(
            format!("publishing {message_id} to {subject} was refused"),
            error,
        ),
    };
    let ack = context
        .publish_with_headers(subject.clone(), headers, payload.into())
        .await
        .map_err(failed)?
        .await
        .map_err(failed)?;
    Ok(Published {
        stream: ack.stream,
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    })
}

fn stream_error(stream: &str, error: jetstream::context::GetStreamError) -> SourceError {
    match error.kind() {
        GetStreamErrorKind::JetStream(inner)
            if inner.error_code() == ErrorCode::STREAM_NOT_FOUND =>
        {
            SourceError::refused_by(
                format!(
                    "there is no JetStream stream named {stream}: create the stream first \
                     (jetstream::Context::create_stream, or `nats stream add`)"
                ),
                error,
            )
        }
        GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => {
            SourceError::refused_by(
                format!(
                    "{stream:?} is not a valid stream name (no spaces, dots, * or >): name the \
                     stream the source should consume"
                ),
                error,
            )
        }
        _ => SourceError::unavailable(
            format!(
                "could not look up the stream {stream}: is the server reachable, and JetStream \
                 enabled on it (nats-server -js)?"
            ),
            error,
        ),
    }
}

/// A header value on one line (NATS headers cannot hold line breaks).
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// Whether the subject `pattern` (with `*` for one token and `>` for the rest) matches
/// `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (token, Some(actual)) if token == actual => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_as_nats_matches_them() {
        assert!(subject_matches("orders.>", "orders.dead-letter"));
        assert!(subject_matches("orders.*", "orders.dead-letter"));
        assert!(subject_matches("ORDERS.dead-letter", "ORDERS.dead-letter"));
        assert!(subject_matches(">", "a.b"));
        assert!(!subject_matches("orders.*", "orders.a.b"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(!subject_matches("orders", "orders.dead-letter"));
        assert!(!subject_matches("orders.placed", "ORDERS.dead-letter"));
    }

    #[test]
    fn details_are_kept_on_one_line() {
        assert_eq!(one_line("a\r\nb\nc"), "a  b c");
    }
}
