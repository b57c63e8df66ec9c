//! What a consumer needs of a broker: [`Source`], [`Delivery`], [`SourceError`] and
//! [`DeadLetterReason`].

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::error::BoxError;
use crate::store::Bytes;

/// One delivery of a message, as a [`Source`] hands it to a [`Consumer`](super::Consumer).
///
/// `message_id` is the id the *producer* gave the message (a header or field it set), and it
/// is the idempotency key: a message published twice carries the same one. `broker_id` is the
/// broker's own name for this copy (a stream entry id, a stream sequence, an offset), which
/// differs between two publishes of one message; it is only logged and kept with a
/// dead-lettered message, never used as the key.
///
/// ```
/// use idempotent_core::queue::Delivery;
///
/// let delivery = Delivery::new((), "1700000000000-0", b"{\"order\":7}".to_vec())
///     .with_message_id("order-7")
///     .with_deliveries(2);
/// assert_eq!(delivery.message_id.as_deref(), Some("order-7"));
/// assert_eq!(delivery.deliveries, 2);
/// ```
#[derive(Debug, Clone)]
pub struct Delivery<R> {
    /// What the source needs to settle this delivery (ack it, retry it, dead-letter it).
    pub receipt: R,
    /// The producer's message id, the key; `None` when the message carries none (it is then
    /// dead-lettered, as nothing could tell its duplicates apart).
    pub message_id: Option<String>,
    /// The broker's id of this copy: for logs and the dead-letter record, never the key.
    pub broker_id: String,
    /// The message's body.
    pub payload: Bytes,
    /// How many times the broker has delivered this message, this delivery included (1 the
    /// first time).
    pub deliveries: u32,
}

impl<R> Delivery<R> {
    /// A first delivery, without a message id.
    ///
    /// ```
    /// # use idempotent_core::queue::Delivery;
    /// let delivery = Delivery::new(7u64, "7", "hello");
    /// assert_eq!(delivery.deliveries, 1);
    /// assert!(delivery.message_id.is_none());
    /// ```
    pub fn new(receipt: R, broker_id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            receipt,
            message_id: None,
            broker_id: broker_id.into(),
            payload: payload.into(),
            deliveries: 1,
        }
    }

    /// The producer's message id.
    ///
    /// ```
    /// # use idempotent_core::queue::Delivery;
    /// let delivery = Delivery::new((), "1-0", "x").with_message_id("msg-1");
    /// assert_eq!(delivery.message_id.as_deref(), Some("msg-1"));
    /// ```
    #[must_use]
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// How many times the message has been delivered, this delivery included (at least 1).
    ///
    /// ```
    /// # use idempotent_core::queue::Delivery;
    /// assert_eq!(Delivery::new((), "1-0", "x").with_deliveries(0).deliveries, 1);
    /// ```
    #[must_use]
    pub fn with_deliveries(mut self, deliveries: u32) -> Self {
        self.deliveries = deliveries.max(1);
        self
    }
}

/// Why a message went to the dead-letter destination instead of its handler.
///
/// ```
/// use idempotent_core::queue::DeadLetterReason;
///
/// let reason = DeadLetterReason::HandlerFailed { deliveries: 5, error: "card declined".into() };
/// assert_eq!(reason.code(), "handler-failed");
/// assert_eq!(reason.to_string(), "the handler failed on each of 5 deliveries; the last error: card declined");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The message carries no producer id, so its duplicates cannot be told apart.
    NoMessageId,
    /// The message was delivered more often than the consumer allows without being settled
    /// (its consumers died or lost it each time); the handler was not run again.
    TooManyDeliveries {
        /// The deliveries counted, this one included.
        deliveries: u32,
    },
    /// The handler failed on the last delivery the consumer allows.
    HandlerFailed {
        /// The deliveries counted, this one included.
        deliveries: u32,
        /// The handler's last error, as its `Display` wrote it.
        error: String,
    },
    /// The id was processed before with another payload: a producer reused an id.
    IdReused,
    /// The id is not a valid key (empty, or longer than
    /// [`MAX_KEY_BYTES`](crate::MAX_KEY_BYTES)).
    InvalidId {
        /// Why, as the key's check said.
        error: String,
    },
}

impl DeadLetterReason {
    /// A short stable code for the reason, kept with the dead-lettered message (for example
    /// in a `dead-letter-reason` field): `no-message-id`, `too-many-deliveries`,
    /// `handler-failed`, `id-reused`, `invalid-id`.
    ///
    /// ```
    /// # use idempotent_core::queue::DeadLetterReason;
    /// assert_eq!(DeadLetterReason::IdReused.code(), "id-reused");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoMessageId => "no-message-id",
            Self::TooManyDeliveries { .. } => "too-many-deliveries",
            Self::HandlerFailed { .. } => "handler-failed",
            Self::IdReused => "id-reused",
            Self::InvalidId { .. } => "invalid-id",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMessageId => f.write_str(
                "the message carries no producer message id, so its duplicates cannot be told apart",
            ),
            Self::TooManyDeliveries { deliveries } => write!(
                f,
                "delivered {deliveries} times without being settled (its consumers died or lost it each time)"
            ),
            Self::HandlerFailed { deliveries, error } => write!(
                f,
                "the handler failed on each of {deliveries} deliveries; the last error: {error}"
            ),
            Self::IdReused => f.write_str(
                "the message id was processed before with another payload: the producer reused an id",
            ),
            Self::InvalidId { error } => write!(f, "the message id is not a valid key: {error}"),
        }
    }
}

/// What kind of [`SourceError`] it is: whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceErrorKind {
    /// The broker could not be reached or did not answer: the consumer tries again.
    Unavailable,
    /// The broker refused what was asked of it (a missing stream, a wrong configuration): the
    /// consumer stops and returns the error.
    Refused,
}

/// A broker's failure, as a [`Source`] reports it.
///
/// ```
/// use idempotent_core::queue::{SourceError, SourceErrorKind};
///
/// let error = SourceError::unavailable("XREADGROUP on orders failed", std::io::Error::other("reset"));
/// assert_eq!(error.kind(), SourceErrorKind::Unavailable);
/// assert!(error.to_string().contains("XREADGROUP on orders failed"));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    kind: SourceErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl SourceError {
    /// The broker could not be reached or did not answer; worth trying again.
    ///
    /// ```
    /// # use idempotent_core::queue::SourceError;
    /// let error = SourceError::unavailable("the broker did not answer", std::io::Error::other("timed out"));
    /// assert!(error.is_retryable());
    /// ```
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            kind: SourceErrorKind::Unavailable,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The broker refused the request; trying again will not help.
    ///
    /// ```
    /// # use idempotent_core::queue::SourceError;
    /// let error = SourceError::refused("no stream named orders: create it first");
    /// assert!(!error.is_retryable());
    /// ```
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            kind: SourceErrorKind::Refused,
            message: message.into(),
            source: None,
        }
    }

    /// [`SourceError::refused`] with the error behind it.
    ///
    /// ```
    /// # use idempotent_core::queue::SourceError;
    /// let error = SourceError::refused_by("the group could not be created", std::io::Error::other("NOPERM"));
    /// assert!(std::error::Error::source(&error).is_some());
    /// ```
    pub fn refused_by(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            kind: SourceErrorKind::Refused,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// What kind of failure it is.
    ///
    /// ```
    /// # use idempotent_core::queue::{SourceError, SourceErrorKind};
    /// assert_eq!(SourceError::refused("no").kind(), SourceErrorKind::Refused);
    /// ```
    pub fn kind(&self) -> SourceErrorKind {
        self.kind
    }

    /// Whether trying again may succeed ([`SourceErrorKind::Unavailable`]).
    ///
    /// ```
    /// # use idempotent_core::queue::SourceError;
    /// assert!(!SourceError::refused("no").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        self.kind == SourceErrorKind::Unavailable
    }
}

/// A broker as a [`Consumer`](super::Consumer) sees it: deliveries in, settlements out.
///
/// The consumer calls [`Source::ack`] only once a message's record (or its business
/// transaction) is committed, [`Source::retry`] when its handler failed,
/// [`Source::dead_letter`] when it gives a message up, [`Source::keep`] every third of
/// [`Source::lease`] while a handler runs, and [`Source::release`] for what it stops working
/// on at shutdown. Implementations in this crate: [`channel`](super::channel) (in-process),
/// and behind cargo features `queue::redis_streams` and `queue::nats`; the crate docs of
/// [`queue`](super) show how a Kafka consumer maps onto it.
///
/// Every method may be called from several tasks at once.
///
/// ```
/// use std::time::Duration;
/// use idempotent_core::queue::{DeadLetterReason, Delivery, Source, SourceError};
///
/// /// A source that has nothing, for the shape of an implementation.
/// struct Empty;
///
/// impl Source for Empty {
///     type Receipt = u64;
///     async fn receive(&self, _max: usize) -> Result<Vec<Delivery<u64>>, SourceError> {
///         tokio::time::sleep(Duration::from_millis(10)).await;
///         Ok(Vec::new())
///     }
///     async fn ack(&self, _delivery: &Delivery<u64>) -> Result<(), SourceError> { Ok(()) }
///     async fn retry(&self, _delivery: &Delivery<u64>, _delay: Duration) -> Result<(), SourceError> { Ok(()) }
///     async fn dead_letter(&self, _delivery: &Delivery<u64>, _reason: &DeadLetterReason) -> Result<(), SourceError> { Ok(()) }
///     fn lease(&self) -> Duration { Duration::from_secs(30) }
/// }
/// ```
pub trait Source: Send + Sync {
    /// What the source needs to settle one delivery.
    type Receipt: Send + Sync;

    /// Waits a short while (the source's poll interval) for up to `max` deliveries; an empty
    /// list when none came. Redeliveries (of messages whose consumer died, or whose handler
    /// failed) come through here too, with their delivery counts.
    ///
    /// The consumer does not cancel a call once started (it waits for it even at shutdown,
    /// and releases what it returns then), so a source need not make it cancel-safe.
    fn receive(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Delivery<Self::Receipt>>, SourceError>> + Send;

    /// The message is settled: its record (or transaction) is committed; never deliver it
    /// again.
    fn ack(
        &self,
        delivery: &Delivery<Self::Receipt>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// The handler failed: deliver the message again, after `delay` if the broker can wait
    /// (a broker that redelivers on its own schedule may ignore it).
    fn retry(
        &self,
        delivery: &Delivery<Self::Receipt>,
        delay: Duration,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Puts the message in the dead-letter destination, with the reason, and acknowledges it,
    /// as one step where the broker allows it.
    fn dead_letter(
        &self,
        delivery: &Delivery<Self::Receipt>,
        reason: &DeadLetterReason,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// How long the broker leaves a delivery to its consumer before giving it to another
    /// (Redis Streams: the idle time past which `XAUTOCLAIM` takes it; JetStream: AckWait).
    fn lease(&self) -> Duration;

    /// The handler is still at work: keep the delivery this consumer's for another
    /// [`Source::lease`]. The default does nothing.
    fn keep(
        &self,
        delivery: &Delivery<Self::Receipt>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send {
        let _ = delivery;
        async { Ok(()) }
    }

    /// The consumer stops without settling the message (shutdown): let another consumer take
    /// it now rather than after the lease. The default does nothing (the lease runs out).
    fn release(
        &self,
        delivery: &Delivery<Self::Receipt>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send {
        let _ = delivery;
        async { Ok(()) }
    }
}
