//! Waiting for a key over pub/sub: one shared subscriber connection, one channel per key that
//! someone waits on, subscribed while at least one waiter needs it. On a Redis Cluster the
//! channels are shard channels (`SSUBSCRIBE`), and the subscriber is a cluster connection that
//! sends each subscription to the shard of its channel's hash tag (the record's shard), and
//! subscribes again by itself when a shard moves or fails over.
//!
//! Nothing is left behind: a channel counts as subscribed from before its `SUBSCRIBE` is sent,
//! so a waiter cancelled at any point is unsubscribed with the last waiter of its channel; each
//! connection has a generation, and a subscription is only ever counted on the connection it
//! was made on; a replaced connection is closed (its reader ended), which ends its
//! subscriptions on the server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

type Channels = Arc<Mutex<HashMap<String, Channel>>>;

struct Channel {
    notify: Arc<Notify>,
    waiters: usize,
    /// The connection (its generation) on which a `SUBSCRIBE` for this channel was sent,
    /// confirmed or not: counted from before it is sent, so that a waiter cancelled while it
    /// awaits the confirmation still leaves a channel that is unsubscribed when unused.
    subscribed_on: Option<u64>,
}

/// Where subscriptions are sent.
enum Sink {
    PubSub(PubSubSink),
    /// A cluster connection speaking RESP3, whose pushes (the shard channels' messages) come
    /// to the reader.
    Cluster(ClusterConnection),
}

impl Sink {
    async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Sink::PubSub(sink) => sink.subscribe(channel).await,
            Sink::Cluster(connection) => connection.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Sink::PubSub(sink) => sink.unsubscribe(channel).await,
            Sink::Cluster(connection) => connection.sunsubscribe(channel).await,
        }
    }
}

/// What the subscriber connects to.
pub(super) enum Source {
    Single(Box<redis::Client>),
    /// A Redis Cluster: its nodes' URLs, and the response timeout.
    Cluster(Vec<String>, Duration),
}

struct Subscriber {
    sink: Sink,
    reader: JoinHandle<()>,
    generation: u64,
    channels: Channels,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        // The reader owns the connection's stream, and with it the connection: ending it closes
        // the connection, and with it every subscription made on it.
        self.reader.abort();
        // Its waiters will hear nothing more on it: wake them to look at their keys again (and
        // subscribe on a new connection), as the reader does when a connection ends by itself.
        for channel in lock(&self.channels).values_mut() {
            if channel.subscribed_on == Some(self.generation) {
                channel.subscribed_on = None;
                channel.notify.notify_waiters();
            }
        }
    }
}

struct Connection {
    current: Option<Subscriber>,
    generations: u64,
}

/// The store's pub/sub subscriber connection and the channels waiters are interested in.
pub(super) struct Subscriptions {
    source: Source,
    connect_timeout: Duration,
    // Held across subscribe and unsubscribe commands, so they reach the server in the order
    // the channel table was changed.
    connection: tokio::sync::Mutex<Connection>,
    channels: Channels,
}

/// A waiter's interest in one channel; woken by the next message on it.
pub(super) struct Subscription {
    notified: Option<OwnedNotified>,
    channel: String,
    subscriptions: Arc<Subscriptions>,
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
            let mut channels = lock(&self.subscriptions.channels);
            match channels.get_mut(&self.channel) {
                Some(channel) => {
                    channel.waiters = channel.waiters.saturating_sub(1);
                    channel.waiters == 0
                }
                None => false,
            }
        };
        if now_unused && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (subscriptions, channel) = (
                Arc::clone(&self.subscriptions),
                std::mem::take(&mut self.channel),
            );
            runtime.spawn(async move { subscriptions.unsubscribe_if_unused(channel).await });
        }
    }
}

fn lock(channels: &Channels) -> MutexGuard<'_, HashMap<String, Channel>> {
    // Every update under this lock is a single field write: a panic cannot leave it torn.
    channels
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Subscriptions {
    pub(super) fn new(source: Source, connect_timeout: Duration) -> Self {
        Self {
            source,
            connect_timeout,
            connection: tokio::sync::Mutex::new(Connection {
                current: None,
                generations: 0,
            }),
            channels: Arc::default(),
        }
    }

    /// Registers interest in `channel` and makes sure the server will deliver it; `None` if
    /// pub/sub cannot be had right now (the caller polls instead).
    ///
    /// Cancellation-safe: the interest is registered (and the `Subscription` that undoes it
    /// exists) before anything is sent, so a waiter dropped at any await leaves no channel
    /// subscribed once the others waiting on it are gone.
    pub(super) async fn subscribe(self: &Arc<Self>, channel: String) -> Option<Subscription> {
        let mut connection = self.connection.lock().await;
        if connection
            .current
            .as_ref()
            .is_none_or(|s| s.reader.is_finished())
        {
            // Dropping the old subscriber (if any) closes its connection.
            connection.current = None;
            connection.generations += 1;
            let generation = connection.generations;
            connection.current = Some(self.connect(generation).await?);
        }
        let subscriber = connection.current.as_mut()?;
        let generation = subscriber.generation;
        let (notified, needs_subscribe) = {
            let mut channels = lock(&self.channels);
            let entry = channels.entry(channel.clone()).or_insert_with(|| Channel {
                notify: Arc::default(),
                waiters: 0,
                subscribed_on: None,
            });
            entry.waiters += 1;
            let needs_subscribe = entry.subscribed_on != Some(generation);
            if needs_subscribe {
                entry.subscribed_on = Some(generation);
            }
            (Arc::clone(&entry.notify).notified_owned(), needs_subscribe)
        };
        let subscription = Subscription {
            notified: Some(notified),
            channel,
            subscriptions: Arc::clone(self),
        };
        if needs_subscribe {
            let confirmed = tokio::time::timeout(
                self.connect_timeout,
                subscriber.sink.subscribe(&subscription.channel),
            )
            .await;
            if !matches!(confirmed, Ok(Ok(()))) {
                // The connection is unusable: close it, the next waiter makes a new one.
                connection.current = None;
                return None;
            }
        }
        Some(subscription)
    }

    async fn connect(&self, generation: u64) -> Option<Subscriber> {
        let (sink, reader) = match &self.source {
            Source::Single(client) => {
                let pubsub = tokio::time::timeout(self.connect_timeout, client.get_async_pubsub())
                    .await
                    .ok()?
                    .ok()?;
                let (sink, stream) = pubsub.split();
                let reader = tokio::spawn(read(stream, Arc::clone(&self.channels), generation));
                (Sink::PubSub(sink), reader)
            }
            Source::Cluster(urls, response_timeout) => {
                let (pushes, received) = tokio::sync::mpsc::unbounded_channel();
                let client = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(*response_timeout)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .build()
                    .ok()?;
                let connection =
                    tokio::time::timeout(self.connect_timeout, client.get_async_connection())
                        .await
                        .ok()?
                        .ok()?;
                let reader = tokio::spawn(read_pushes(
                    received,
                    Arc::clone(&self.channels),
                    generation,
                ));
                (Sink::Cluster(connection), reader)
            }
        };
        Some(Subscriber {
            sink,
            reader,
            generation,
            channels: Arc::clone(&self.channels),
        })
    }

    async fn unsubscribe_if_unused(&self, channel: String) {
        let mut connection = self.connection.lock().await;
        let subscribed_on = {
            let mut channels = lock(&self.channels);
            match channels.get(&channel) {
                Some(entry) if entry.waiters == 0 => {
                    channels.remove(&channel).and_then(|e| e.subscribed_on)
                }
                _ => None,
            }
        };
        // A subscription made on an earlier connection went with that connection.
        if let Some(subscriber) = connection.current.as_mut()
            && subscribed_on == Some(subscriber.generation)
        {
            let unsubscribed =
                tokio::time::timeout(self.connect_timeout, subscriber.sink.unsubscribe(&channel))
                    .await;
            if !matches!(unsubscribed, Ok(Ok(()))) {
                // Unknown whether the server still delivers it: close the connection, which
                // ends every subscription made on it.
                connection.current = None;
            }
        }
    }
}

/// Wakes the waiters of each channel a message arrives on; when the connection ends, wakes
/// everyone, so they look at their keys again rather than wait out their leases. Only the
/// channels subscribed on this reader's own connection (`generation`) are marked unsubscribed:
/// a later connection's are not this one's to mark.
async fn read(mut stream: PubSubStream, channels: Channels, generation: u64) {
    while let Some(message) = stream.next().await {
        if let Some(channel) = lock(&channels).get(message.get_channel_name()) {
            channel.notify.notify_waiters();
        }
    }
    ended(&channels, generation);
}

/// [`read`] for a cluster connection's pushes: a shard channel's message wakes its waiters;
/// a node's connection lost wakes everyone, to look at their keys again while the cluster
/// client subscribes again on the node that now serves the shard.
async fn read_pushes(mut pushes: UnboundedReceiver<PushInfo>, channels: Channels, generation: u64) {
    while let Some(push) = pushes.recv().await {
        match push.kind {
            PushKind::SMessage => {
                if let Some(Value::BulkString(name)) = push.data.first()
                    && let Ok(name) = std::str::from_utf8(name)
                    && let Some(channel) = lock(&channels).get(name)
                {
                    channel.notify.notify_waiters();
                }
            }
            PushKind::Disconnection => {
                for channel in lock(&channels).values() {
                    channel.notify.notify_waiters();
                }
            }
            _ => {}
        }
    }
    ended(&channels, generation);
}

/// The connection of `generation` ended: its subscriptions are gone, and every waiter looks
/// again.
fn ended(channels: &Channels, generation: u64) {
    for channel in lock(channels).values_mut() {
        if channel.subscribed_on == Some(generation) {
            channel.subscribed_on = None;
        }
        channel.notify.notify_waiters();
    }
}
