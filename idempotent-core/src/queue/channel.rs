//! An in-process broker: [`channel`], its [`ChannelPublisher`] and [`ChannelSource`].

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::source::{DeadLetterReason, Delivery, Source, SourceError};
use crate::store::Bytes;

/// An in-process broker with a broker's delivery rules, for tests, examples and pipelines
/// inside one process: returns a publisher and a source sharing one queue.
///
/// A delivery is leased to its consumer for `lease`; one not acknowledged by then (its
/// consumer stopped, or failed to keep it) is delivered again, its delivery count one
/// higher, as is one given back by [`Source::retry`] (after the delay) or
/// [`Source::release`] (at once). Dead-lettered messages are kept, with their reasons, in
/// [`ChannelSource::dead_letters`]. Clones of the source share the queue, as the consumers of
/// one group share a stream.
///
/// ```
/// use std::time::Duration;
/// use idempotent_core::queue::{self, Source};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::queue::SourceError> {
/// let (publisher, source) = queue::channel(Duration::from_secs(30));
/// publisher.publish("m-1", "hello");
/// let deliveries = source.receive(10).await?;
/// assert_eq!(deliveries[0].message_id.as_deref(), Some("m-1"));
/// source.ack(&deliveries[0]).await?;
/// assert!(source.is_settled());
/// # Ok(()) }
/// ```
pub fn channel(lease: Duration) -> (ChannelPublisher, ChannelSource) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        published: Notify::new(),
        settled: Notify::new(),
        lease,
    });
    (
        ChannelPublisher {
            shared: Arc::clone(&shared),
        },
        ChannelSource { shared },
    )
}

/// How long [`ChannelSource::receive`] waits when nothing is ready.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    published: Notify,
    settled: Notify,
    lease: Duration,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is never left half-changed by a panic (no code that can panic runs under
        // the lock), so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug, Clone)]
struct Entry {
    message_id: Option<String>,
    payload: Bytes,
    /// Deliveries so far.
    deliveries: u32,
}

#[derive(Debug, Default)]
struct State {
    next_sequence: u64,
    ready: VecDeque<(u64, Entry)>,
    /// Delivered and not settled, by sequence: the entry, and when it is delivered again.
    leased: BTreeMap<u64, (Entry, Instant)>,
    dead: Vec<DeadLetter>,
}

impl State {
    /// Moves every lease that ran out back to the ready queue.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .leased
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in expired {
            if let Some((entry, _)) = self.leased.remove(&sequence) {
                self.ready.push_back((sequence, entry));
            }
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.leased.values().map(|(_, until)| *until).min()
    }
}

/// A message the consumer gave up on, kept by [`ChannelSource`].
///
/// ```
/// use std::time::Duration;
/// use idempotent_core::queue::{self, DeadLetterReason, Source};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::queue::SourceError> {
/// let (publisher, source) = queue::channel(Duration::from_secs(30));
/// publisher.publish_without_id("no id");
/// let deliveries = source.receive(1).await?;
/// source.dead_letter(&deliveries[0], &DeadLetterReason::NoMessageId).await?;
/// let dead = source.dead_letters();
/// assert_eq!(dead[0].reason, DeadLetterReason::NoMessageId);
/// assert_eq!(&dead[0].payload[..], b"no id");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The producer's message id, if it had one.
    pub message_id: Option<String>,
    /// The body.
    pub payload: Bytes,
    /// Its deliveries, the last one included.
    pub deliveries: u32,
    /// Why it was given up.
    pub reason: DeadLetterReason,
}

/// Publishes into a [`channel`].
///
/// ```
/// use std::time::Duration;
/// let (publisher, _source) = idempotent_core::queue::channel(Duration::from_secs(30));
/// publisher.publish("order-7", r#"{"total":4200}"#);
/// ```
#[derive(Debug, Clone)]
pub struct ChannelPublisher {
    shared: Arc<Shared>,
}

impl ChannelPublisher {
    /// Publishes a message under the producer's id `message_id` (publishing it again with the
    /// same id is what a producer's retry does).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # let (publisher, source) = idempotent_core::queue::channel(Duration::from_secs(30));
    /// publisher.publish("order-7", "a");
    /// publisher.publish("order-7", "a");
    /// assert_eq!(source.ready(), 2, "the broker keeps both copies");
    /// ```
    pub fn publish(&self, message_id: impl Into<String>, payload: impl Into<Bytes>) {
        self.push(Some(message_id.into()), payload.into());
    }

    /// Publishes a message without an id (a consumer dead-letters it).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # let (publisher, source) = idempotent_core::queue::channel(Duration::from_secs(30));
    /// publisher.publish_without_id("a");
    /// assert_eq!(source.ready(), 1);
    /// ```
    pub fn publish_without_id(&self, payload: impl Into<Bytes>) {
        self.push(None, payload.into());
    }

    fn push(&self, message_id: Option<String>, payload: Bytes) {
        let mut state = self.shared.state();
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        state.ready.push_back((
            sequence,
            Entry {
                message_id,
                payload,
                deliveries: 0,
            },
        ));
        drop(state);
        self.shared.published.notify_waiters();
    }
}

/// The consuming side of a [`channel`]: a [`Source`] whose receipts are sequence numbers.
#[derive(Debug, Clone)]
pub struct ChannelSource {
    shared: Arc<Shared>,
}

impl ChannelSource {
    /// Messages waiting to be delivered (again), those whose lease ran out included.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # let (publisher, source) = idempotent_core::queue::channel(Duration::from_secs(30));
    /// assert_eq!(source.ready(), 0);
    /// ```
    pub fn ready(&self) -> usize {
        let mut state = self.shared.state();
        state.expire(Instant::now());
        state.ready.len()
    }

    /// Messages delivered, not settled, and still within their lease.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # let (publisher, source) = idempotent_core::queue::channel(Duration::from_secs(30));
    /// assert_eq!(source.in_flight(), 0);
    /// ```
    pub fn in_flight(&self) -> usize {
        let mut state = self.shared.state();
        state.expire(Instant::now());
        state.leased.len()
    }

    /// Whether every message published is settled: acknowledged or dead-lettered.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # let (publisher, source) = idempotent_core::queue::channel(Duration::from_secs(30));
    /// assert!(source.is_settled());
    /// publisher.publish("m-1", "x");
    /// assert!(!source.is_settled());
    /// ```
    pub fn is_settled(&self) -> bool {
        let state = self.shared.state();
        state.ready.is_empty() && state.leased.is_empty()
    }

    /// Completes once every message published is settled: a shutdown signal for a consumer
    /// that should stop when the queue is drained (tests, examples, batch jobs).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let (publisher, source) = idempotent_core::queue::channel(Duration::from_secs(30));
    /// source.settled().await; // nothing was published
    /// # }
    /// ```
    pub fn settled(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        async move {
            loop {
                let notified = shared.settled.notified();
                {
                    let state = shared.state();
                    if state.ready.is_empty() && state.leased.is_empty() {
                        return;
                    }
                }
                // A settlement may come while the lock is released and before this waits; the
                // interval bounds how late that is seen.
                let _ = tokio::time::timeout(POLL_INTERVAL, notified).await;
            }
        }
    }

    /// The messages dead-lettered so far, in the order they were.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # let (publisher, source) = idempotent_core::queue::channel(Duration::from_secs(30));
    /// assert!(source.dead_letters().is_empty());
    /// ```
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.shared.state().dead.clone()
    }

    /// Takes the lease of `receipt` off the leased messages, if it is still leased.
    fn settle(&self, receipt: u64) -> Option<Entry> {
        let entry = self
            .shared
            .state()
            .leased
            .remove(&receipt)
            .map(|(entry, _)| entry);
        self.shared.settled.notify_waiters();
        entry
    }

    /// Sets when the leased `receipt` is delivered again.
    fn redeliver_at(&self, receipt: u64, at: Instant) {
        if let Some((_, until)) = self.shared.state().leased.get_mut(&receipt) {
            *until = at;
        }
        self.shared.published.notify_waiters();
    }
}

impl Source for ChannelSource {
    type Receipt = u64;

    async fn receive(&self, max: usize) -> Result<Vec<Delivery<u64>>, SourceError> {
        let deadline = Instant::now() + POLL_INTERVAL;
        loop {
            let published = self.shared.published.notified();
            let wake = {
                let now = Instant::now();
                let mut state = self.shared.state();
                state.expire(now);
                let take = max.min(state.ready.len());
                if take > 0 {
                    let until = now + self.shared.lease;
                    let mut deliveries = Vec::with_capacity(take);
                    for _ in 0..take {
                        let Some((sequence, mut entry)) = state.ready.pop_front() else {
                            break;
                        };
                        entry.deliveries += 1;
                        let mut delivery =
                            Delivery::new(sequence, sequence.to_string(), entry.payload.clone())
                                .with_deliveries(entry.deliveries);
                        delivery.message_id = entry.message_id.clone();
                        state.leased.insert(sequence, (entry, until));
                        deliveries.push(delivery);
                    }
                    return Ok(deliveries);
                }
                state
                    .next_expiry()
                    .map_or(deadline, |expiry| expiry.min(deadline))
            };
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            let _ = tokio::time::timeout_at(wake.max(Instant::now()), published).await;
        }
    }

    async fn ack(&self, delivery: &Delivery<u64>) -> Result<(), SourceError> {
        self.settle(delivery.receipt);
        Ok(())
    }

    async fn retry(&self, delivery: &Delivery<u64>, delay: Duration) -> Result<(), SourceError> {
        self.redeliver_at(delivery.receipt, Instant::now() + delay);
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery<u64>,
        reason: &DeadLetterReason,
    ) -> Result<(), SourceError> {
        if let Some(entry) = self.settle(delivery.receipt) {
            self.shared.state().dead.push(DeadLetter {
                message_id: entry.message_id,
                payload: entry.payload,
                deliveries: entry.deliveries,
                reason: reason.clone(),
            });
        }
        Ok(())
    }

    fn lease(&self) -> Duration {
        self.shared.lease
    }

    async fn keep(&self, delivery: &Delivery<u64>) -> Result<(), SourceError> {
        if let Some((_, until)) = self.shared.state().leased.get_mut(&delivery.receipt) {
            *until = Instant::now() + self.shared.lease;
        }
        Ok(())
    }

    async fn release(&self, delivery: &Delivery<u64>) -> Result<(), SourceError> {
        self.redeliver_at(delivery.receipt, Instant::now());
        Ok(())
    }
}
