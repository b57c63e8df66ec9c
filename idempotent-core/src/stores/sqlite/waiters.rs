//! Waking this store object's own waiters when it completes or releases a key.
//!
//! SQLite cannot notify other connections, let alone other processes; those are seen by the
//! waiters' polling. A key has an entry only while someone waits on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use crate::key::StorageKey;

#[derive(Default)]
pub(super) struct Waiters {
    keys: Mutex<HashMap<StorageKey, Entry>>,
}

struct Entry {
    notify: Arc<Notify>,
    waiters: usize,
}

/// One waiter's registration on a key; unregisters on drop.
pub(super) struct Registration {
    waiters: Arc<Waiters>,
    key: StorageKey,
    notify: Arc<Notify>,
}

impl Registration {
    /// A future that completes at the key's next notification. Make it (and
    /// [`enable`](tokio::sync::futures::Notified::enable) it) before looking at the record, so
    /// that a notification between the look and the wait is not missed.
    pub(super) fn notified(&self) -> OwnedNotified {
        Arc::clone(&self.notify).notified_owned()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut keys = self.waiters.lock();
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<StorageKey, Entry>> {
        // Every update under this lock is a single insert, remove or counter change.
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn register(self: &Arc<Self>, key: StorageKey) -> Registration {
        let notify = {
            let mut keys = self.lock();
            let entry = keys.entry(key).or_insert_with(|| Entry {
                notify: Arc::default(),
                waiters: 0,
            });
            entry.waiters += 1;
            Arc::clone(&entry.notify)
        };
        Registration {
            waiters: Arc::clone(self),
            key,
            notify,
        }
    }

    /// Wakes everyone waiting on `key` in this store object.
    pub(super) fn wake(&self, key: &StorageKey) {
        if let Some(entry) = self.lock().get(key) {
            entry.notify.notify_waiters();
        }
    }
}
