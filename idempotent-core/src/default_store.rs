//! The process-wide default store: what `#[idempotent]` uses when no `store = ...` is given.

use std::sync::{Arc, OnceLock};

use crate::store::Store;
use crate::stores::memory::MemoryStore;

static DEFAULT_STORE: OnceLock<Arc<dyn Store>> = OnceLock::new();

/// The process-wide default store: the one set by [`set_default_store`], or else an in-memory
/// store made on first use.
///
/// ```
/// let store = idempotent_core::default_store();
/// assert!(format!("{store:?}").starts_with("MemoryStore"));
/// ```
pub fn default_store() -> &'static Arc<dyn Store> {
    DEFAULT_STORE.get_or_init(|| Arc::new(MemoryStore::new()))
}

/// Sets the process-wide default store. Call it once, at startup, before the first idempotent
/// call: once a default is in use it cannot change, or calls before and after would consult
/// different records and a retry could run twice.
///
/// ```
/// use std::sync::Arc;
/// use idempotent_core::{MemoryStore, set_default_store};
///
/// let store = Arc::new(MemoryStore::builder().capacity(10_000).build());
/// set_default_store(store).expect("nothing used the default store yet");
/// assert!(set_default_store(Arc::new(MemoryStore::new())).is_err());
/// ```
pub fn set_default_store(store: Arc<dyn Store>) -> Result<(), DefaultStoreAlreadySet> {
    DEFAULT_STORE.set(store).map_err(|_| DefaultStoreAlreadySet)
}

/// [`set_default_store`] was called after the default store was set or used.
///
/// ```
/// let message = idempotent_core::DefaultStoreAlreadySet.to_string();
/// assert!(message.contains("before the first idempotent call"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the default idempotency store was already set or used; set it once at startup, before the first idempotent call"
)]
pub struct DefaultStoreAlreadySet;

impl crate::engine::Idempotency {
    /// An engine over the process-wide [`default_store`].
    ///
    /// ```
    /// let engine = idempotent_core::Idempotency::with_default_store();
    /// ```
    pub fn with_default_store() -> Self {
        Self::new(Arc::clone(default_store()))
    }
}
