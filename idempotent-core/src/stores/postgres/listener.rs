//! Waiting by LISTEN/NOTIFY: one connection listens on the store's channel; `complete` and
//! `release` notify it with the key (at commit) when a waiter marked the record, and the
//! waiters of that key are woken.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::tls::Connector;
use crate::stores::wake_table::{Registration, WakeTable};

struct Listening {
    // Kept alive: dropping the client would close the listening connection.
    _client: tokio_postgres::Client,
    task: JoinHandle<()>,
}

pub(super) struct Listener {
    /// Where to listen, and with what TLS; `None`: nowhere (waiters poll).
    target: Option<(tokio_postgres::Config, Connector)>,
    listen: String,
    connect_timeout: Duration,
    connection: tokio::sync::Mutex<Option<Listening>>,
    /// By key in hex, the notifications' payload.
    waiting: Arc<WakeTable<String>>,
}

impl Listener {
    pub(super) fn new(
        target: Option<(tokio_postgres::Config, Connector)>,
        listen: String,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            target,
            listen,
            connect_timeout,
            connection: tokio::sync::Mutex::new(None),
            waiting: Arc::default(),
        }
    }

    /// Whether there is somewhere to listen (a store on the service's pool without
    /// `listen_url` has not).
    pub(super) fn configured(&self) -> bool {
        self.target.is_some()
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
        let (config, connector) = self.target.as_ref()?;
        let waiting = Arc::clone(&self.waiting);
        let messages = move |message| match message {
            Some(AsyncMessage::Notification(notification)) => {
                waiting.wake(notification.payload());
            }
            Some(_) => {}
            // The connection is gone: wake everyone, so they look at their keys again.
            None => waiting.wake_all(),
        };
        let (client, task) =
            tokio::time::timeout(self.connect_timeout, connector.connect(config, messages))
                .await
                .ok()?
                .ok()?;
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
