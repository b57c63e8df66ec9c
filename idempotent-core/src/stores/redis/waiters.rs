//! Waiting for a key over pub/sub: one shared subscriber connection, one channel per key that
//! someone waits on, subscribed while at least one waiter needs it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::task::JoinHandle;

type Channels = Arc<Mutex<HashMap<String, Channel>>>;

struct Channel {
    notify: Arc<Notify>,
    waiters: usize,
    /// The server has confirmed the subscription on the current connection.
    subscribed: bool,
}

struct Subscriber {
    sink: PubSubSink,
    reader: JoinHandle<()>,
}

pub(super) struct Waiters {
    client: redis::Client,
    connect_timeout: Duration,
    // Held across subscribe and unsubscribe commands, so they reach the server in the order
    // the channel table was changed.
    subscriber: tokio::sync::Mutex<Option<Subscriber>>,
    channels: Channels,
}

/// A waiter's interest in one channel; woken by the next message on it.
pub(super) struct Subscription {
    notified: Option<OwnedNotified>,
    channel: String,
    waiters: Arc<Waiters>,
}

impl Subscription {
    pub(super) async fn notified(mut self) {
        if let Some(notified) = self.notified.take() {
            notified.await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let now_unused = {
            let mut channels = lock(&self.waiters.channels);
            match channels.get_mut(&self.channel) {
                Some(channel) => {
                    channel.waiters = channel.waiters.saturating_sub(1);
                    channel.waiters == 0
                }
                None => false,
            }
        };
        if now_unused && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (waiters, channel) = (Arc::clone(&self.waiters), std::mem::take(&mut self.channel));
            runtime.spawn(async move { waiters.unsubscribe_if_unused(channel).await });
        }
    }
}

fn lock(channels: &Channels) -> MutexGuard<'_, HashMap<String, Channel>> {
    // Every update under this lock is a single field write: a panic cannot leave it torn.
    channels
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Waiters {
    pub(super) fn new(client: redis::Client, connect_timeout: Duration) -> Self {
        Self {
            client,
            connect_timeout,
            subscriber: tokio::sync::Mutex::new(None),
            channels: Arc::default(),
        }
    }

    /// Registers interest in `channel` and makes sure the server will deliver it; `None` if
    /// pub/sub cannot be had right now (the caller polls instead).
    pub(super) async fn subscribe(self: &Arc<Self>, channel: String) -> Option<Subscription> {
        let mut subscriber = self.subscriber.lock().await;
        if subscriber.as_ref().is_none_or(|s| s.reader.is_finished()) {
            *subscriber = Some(self.connect().await?);
        }
        let (notified, needs_subscribe) = {
            let mut channels = lock(&self.channels);
            let entry = channels.entry(channel.clone()).or_insert_with(|| Channel {
                notify: Arc::default(),
                waiters: 0,
                subscribed: false,
            });
            entry.waiters += 1;
            (
                Arc::clone(&entry.notify).notified_owned(),
                !entry.subscribed,
            )
        };
        let subscription = Subscription {
            notified: Some(notified),
            channel,
            waiters: Arc::clone(self),
        };
        if needs_subscribe {
            let sink = &mut subscriber.as_mut()?.sink;
            let confirmed =
                tokio::time::timeout(self.connect_timeout, sink.subscribe(&subscription.channel))
                    .await;
            if !matches!(confirmed, Ok(Ok(()))) {
                // The connection is unusable: drop it, the next waiter makes a new one.
                *subscriber = None;
                return None;
            }
            if let Some(entry) = lock(&self.channels).get_mut(&subscription.channel) {
                entry.subscribed = true;
            }
        }
        Some(subscription)
    }

    async fn connect(&self) -> Option<Subscriber> {
        let pubsub = tokio::time::timeout(self.connect_timeout, self.client.get_async_pubsub())
            .await
            .ok()?
            .ok()?;
        // A new connection has no subscriptions yet.
        for channel in lock(&self.channels).values_mut() {
            channel.subscribed = false;
        }
        let (sink, stream) = pubsub.split();
        let reader = tokio::spawn(read(stream, Arc::clone(&self.channels)));
        Some(Subscriber { sink, reader })
    }

    async fn unsubscribe_if_unused(&self, channel: String) {
        let mut subscriber = self.subscriber.lock().await;
        let was_subscribed = {
            let mut channels = lock(&self.channels);
            match channels.get(&channel) {
                Some(entry) if entry.waiters == 0 => {
                    channels.remove(&channel).is_some_and(|e| e.subscribed)
                }
                _ => false,
            }
        };
        if was_subscribed && let Some(subscriber) = subscriber.as_mut() {
            let _ =
                tokio::time::timeout(self.connect_timeout, subscriber.sink.unsubscribe(&channel))
                    .await;
        }
    }
}

/// Wakes the waiters of each channel a message arrives on; when the connection ends, wakes
/// everyone, so they look at their keys again rather than wait out their leases.
async fn read(mut stream: PubSubStream, channels: Channels) {
    while let Some(message) = stream.next().await {
        if let Some(channel) = lock(&channels).get(message.get_channel_name()) {
            channel.notify.notify_waiters();
        }
    }
    for channel in lock(&channels).values_mut() {
        channel.subscribed = false;
        channel.notify.notify_waiters();
    }
}
