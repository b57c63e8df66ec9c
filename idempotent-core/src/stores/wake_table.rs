//! The in-process wake-up table of one store object: by key, a [`Notify`] per key that someone
//! waits on, counted, and removed when its last waiter is gone. The store wakes a key's waiters when it
//! learns the key changed (its own write in SQLite, a notification in PostgreSQL).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

pub(crate) struct WakeTable<K> {
    keys: Mutex<HashMap<K, Entry>>,
}

struct Entry {
    notify: Arc<Notify>,
    waiters: usize,
}

impl<K> Default for WakeTable<K> {
    fn default() -> Self {
        Self {
            keys: Mutex::default(),
        }
    }
}

/// One waiter's registration on a key; unregisters on drop.
pub(crate) struct Registration<K: Hash + Eq> {
    table: Arc<WakeTable<K>>,
    key: K,
    notify: Arc<Notify>,
    /// Made under the registry's lock, at registration: the first [`notified`](Self::notified).
    first: Option<OwnedNotified>,
}

impl<K: Hash + Eq> Registration<K> {
    /// A future that completes at the key's next wake after it was made: the first one was
    /// made at registration, each later one now. Make it (and, to be woken by a `select!`,
    /// [`enable`](tokio::sync::futures::Notified::enable) it) before looking at the record, so
    /// that a wake between the look and the wait is not missed.
    pub(crate) fn notified(&mut self) -> OwnedNotified {
        self.first
            .take()
            .unwrap_or_else(|| Arc::clone(&self.notify).notified_owned())
    }
}

impl<K: Hash + Eq> Drop for Registration<K> {
    fn drop(&mut self) {
        let mut keys = self.table.lock();
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl<K> WakeTable<K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        // Every update under this lock is a single insert, remove or counter change: a panic
        // cannot leave it torn.
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes everyone waiting, on any key (the store may have missed a change).
    #[cfg(any(feature = "postgres", feature = "sqlx-postgres"))]
    pub(crate) fn wake_all(&self) {
        for entry in self.lock().values() {
            entry.notify.notify_waiters();
        }
    }
}

impl<K: Hash + Eq + Clone> WakeTable<K> {
    pub(crate) fn register(self: &Arc<Self>, key: K) -> Registration<K> {
        let (notify, first) = {
            let mut keys = self.lock();
            let entry = keys.entry(key.clone()).or_insert_with(|| Entry {
                notify: Arc::default(),
                waiters: 0,
            });
            entry.waiters += 1;
            (
                Arc::clone(&entry.notify),
                Arc::clone(&entry.notify).notified_owned(),
            )
        };
        Registration {
            table: Arc::clone(self),
            key,
            notify,
            first: Some(first),
        }
    }

    /// Wakes everyone waiting on `key`.
    pub(crate) fn wake<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(entry) = self.lock().get(key) {
            entry.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn is_ready(future: impl Future<Output = ()>) -> bool {
        let mut context = Context::from_waker(Waker::noop());
        pin!(future).poll(&mut context) == Poll::Ready(())
    }

    #[test]
    fn a_wake_after_registering_is_heard_and_only_on_its_key() {
        let table = Arc::new(WakeTable::<String>::default());
        let mut registration = table.register("a".to_string());
        let mut other = table.register("b".to_string());
        // Before the first notified() is asked for: it was made at registration.
        table.wake("a");
        assert!(is_ready(registration.notified()));
        assert!(!is_ready(other.notified()));

        let later = registration.notified();
        assert!(!is_ready(registration.notified()), "no wake since");
        table.wake("a");
        assert!(is_ready(later));
    }

    #[test]
    fn a_key_is_kept_while_someone_waits_on_it() {
        let table = Arc::new(WakeTable::<u8>::default());
        let first = table.register(1);
        let second = table.register(1);
        drop(first);
        assert_eq!(table.lock().get(&1).map(|entry| entry.waiters), Some(1));
        drop(second);
        assert!(table.lock().is_empty());
    }
}
