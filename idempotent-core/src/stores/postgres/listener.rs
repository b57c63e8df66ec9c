//! Waiting by LISTEN/NOTIFY: one connection listens on the store's channel; `complete` and
//! `release` notify it with the key (at commit) when a waiter marked the record, and the
//! waiters of that key are woken.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::stores::wake_table::{Registration, WakeTable};

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
    /// By key in hex, the notifications' payload.
    waiting: Arc<WakeTable<String>>,
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

    /// Registers interest in `key` (in hex) on a connection that is listening; `None` if no
    /// such connection can be had now (the caller polls instead). Its first `notified()`
    /// hears every notification from now on.
    pub(super) async fn interest(&self, key: String) -> Option<Registration<String>> {
        let mut connection = self.connection.lock().await;
        if connection.as_ref().is_none_or(|c| c.task.is_finished()) {
            *connection = Some(self.connect().await?);
        }
        Some(self.waiting.register(key))
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
                if let AsyncMessage::Notification(notification) = message {
                    waiting.wake(notification.payload());
                }
            }
            // The connection is gone: wake everyone, so they look at their keys again.
            waiting.wake_all();
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
