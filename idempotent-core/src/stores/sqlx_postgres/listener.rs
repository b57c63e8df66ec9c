//! Waiting by LISTEN/NOTIFY through `sqlx::postgres::PgListener`: one connection taken from
//! the pool listens on the store's channel; `complete` and `release` notify it with the key
//! (at commit) when a waiter marked the record, and the waiters of that key are woken.
//!
//! A task owns the listener. When its connection is lost, every waiter is woken (to look at
//! its key again, as a notification may have been missed), waiters poll until the task has a
//! new connection listening, and it takes one from the pool again, every `retry` until it can.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;

use crate::stores::wake_table::{Registration, WakeTable};

pub(super) struct Listener {
    pool: PgPool,
    channel: String,
    connect_timeout: Duration,
    retry: Duration,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Whether the task's connection is listening now.
    listening: Arc<AtomicBool>,
    /// By key in hex, the notifications' payload.
    waiting: Arc<WakeTable<String>>,
}

impl Listener {
    pub(super) fn new(
        pool: PgPool,
        channel: String,
        connect_timeout: Duration,
        retry: Duration,
    ) -> Self {
        Self {
            pool,
            channel,
            connect_timeout,
            retry,
            task: tokio::sync::Mutex::new(None),
            listening: Arc::default(),
            waiting: Arc::default(),
        }
    }

    /// Registers interest in `key` (in hex) while a connection is listening; `None` if none
    /// is now (the caller polls instead). Its first `notified()` hears every notification
    /// from now on. The first call starts listening.
    pub(super) async fn interest(&self, key: String) -> Option<Registration<String>> {
        {
            let mut task = self.task.lock().await;
            if task.as_ref().is_none_or(JoinHandle::is_finished) {
                let listener = self.connect().await?;
                self.listening.store(true, Ordering::SeqCst);
                *task = Some(tokio::spawn(listen(
                    listener,
                    self.pool.clone(),
                    self.channel.clone(),
                    self.connect_timeout,
                    self.retry,
                    Arc::clone(&self.listening),
                    Arc::clone(&self.waiting),
                )));
            }
        }
        // Registered first, then the flag read: a connection lost after this read wakes
        // this registration too.
        let registration = self.waiting.register(key);
        self.listening
            .load(Ordering::SeqCst)
            .then_some(registration)
    }

    async fn connect(&self) -> Option<PgListener> {
        connect(&self.pool, &self.channel, self.connect_timeout).await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The task holds a pooled connection: give it back when the store goes.
        if let Some(task) = self.task.get_mut().take() {
            task.abort();
        }
    }
}

/// A listener on a connection of `pool`, listening on `channel`, within `timeout`.
async fn connect(pool: &PgPool, channel: &str, timeout: Duration) -> Option<PgListener> {
    let connecting = async {
        let mut listener = PgListener::connect_with(pool).await?;
        // Lost connections are taken again by `listen`, which knows when they are back.
        listener.eager_reconnect(false);
        listener.listen(channel).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(listener)) => Some(listener),
        Ok(Err(error)) => {
            tracing::debug!(target: "idempotent", %error, "could not listen for completions; waiters poll");
            None
        }
        Err(_) => None,
    }
}

/// The listening task: wakes the waiters of each notification's key; when the connection is
/// lost, wakes every waiter and takes a new one, until the pool is closed.
async fn listen(
    mut listener: PgListener,
    pool: PgPool,
    channel: String,
    timeout: Duration,
    retry: Duration,
    listening: Arc<AtomicBool>,
    waiting: Arc<WakeTable<String>>,
) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => waiting.wake(notification.payload()),
            lost => {
                listening.store(false, Ordering::SeqCst);
                waiting.wake_all();
                drop(listener);
                if matches!(lost, Err(sqlx::Error::PoolClosed)) {
                    return;
                }
                listener = loop {
                    if pool.is_closed() {
                        return;
                    }
                    if let Some(listener) = connect(&pool, &channel, timeout).await {
                        break listener;
                    }
                    tokio::time::sleep(retry).await;
                };
                listening.store(true, Ordering::SeqCst);
                // Waiters that polled meanwhile look again, now heard.
                waiting.wake_all();
            }
        }
    }
}
