//! Waiting by LISTEN/NOTIFY: one connection listens on the store's channel; `complete` and
//! `release` notify it with the key (at commit), and the waiters of that key are woken.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

type Waiting = Arc<Mutex<HashMap<String, (Arc<Notify>, usize)>>>;

struct Listening {
    // Kept alive: dropping the client would close the listening connection.
    _client: tokio_postgres::Client,
    task: JoinHandle<()>,
}

pub(super) struct Listener {
    config: tokio_postgres::Config,
    listen: String,
    connect_timeout: Duration,
    connection: tokio::sync::Mutex<Option<Listening>>,
    waiting: Waiting,
}

/// A waiter's interest in one key, woken by its next notification.
pub(super) struct Interest {
    notified: Option<OwnedNotified>,
    key: String,
    waiting: Waiting,
}

impl Interest {
    pub(super) async fn notified(mut self) {
        if let Some(notified) = self.notified.take() {
            notified.await;
        }
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut waiting = lock(&self.waiting);
        if let Some((_, count)) = waiting.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(&self.key);
            }
        }
    }
}

fn lock(waiting: &Waiting) -> MutexGuard<'_, HashMap<String, (Arc<Notify>, usize)>> {
    // Each update under this lock is one insert, change or removal: a panic cannot tear it.
    waiting
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Listener {
    pub(super) fn new(
        config: tokio_postgres::Config,
        listen: String,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            config,
            listen,
            connect_timeout,
            connection: tokio::sync::Mutex::new(None),
            waiting: Arc::default(),
        }
    }

    /// Registers interest in `key` on a connection that is listening; `None` if no such
    /// connection can be had now (the caller polls instead).
    pub(super) async fn interest(&self, key: String) -> Option<Interest> {
        let mut connection = self.connection.lock().await;
        if connection.as_ref().is_none_or(|c| c.task.is_finished()) {
            *connection = Some(self.connect().await?);
        }
        let notified = {
            let mut waiting = lock(&self.waiting);
            let (notify, count) = waiting
                .entry(key.clone())
                .or_insert_with(|| (Arc::default(), 0));
            *count += 1;
            Arc::clone(notify).notified_owned()
        };
        Some(Interest {
            notified: Some(notified),
            key,
            waiting: Arc::clone(&self.waiting),
        })
    }

    async fn connect(&self) -> Option<Listening> {
        let (client, mut connection) =
            tokio::time::timeout(self.connect_timeout, self.config.connect(NoTls))
                .await
                .ok()?
                .ok()?;
        let waiting = Arc::clone(&self.waiting);
        let task = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(notification) = message
                    && let Some((notify, _)) = lock(&waiting).get(notification.payload())
                {
                    notify.notify_waiters();
                }
            }
            // The connection is gone: wake everyone, so they look at their keys again.
            for (notify, _) in lock(&waiting).values() {
                notify.notify_waiters();
            }
        });
        let listening =
            tokio::time::timeout(self.connect_timeout, client.batch_execute(&self.listen)).await;
        if !matches!(listening, Ok(Ok(()))) {
            task.abort();
            return None;
        }
        Some(Listening {
            _client: client,
            task,
        })
    }
}
