//! The call a body runs for, as the body sees it: [`CallContext::current`].
//!
//! While a body runs, the engine keeps the claim it holds in a Tokio task-local, linked to the
//! claims of the calls around it on the same task. That serves two things:
//!
//! - A body can pass its claim on: its [fence](CallContext::fence), a fencing token that only
//!   grows, for systems that accept one, and [keys derived](CallContext::derived_key) from the
//!   call for downstream systems that deduplicate (a payment provider's idempotency key), so
//!   that a second execution after a lost lease is refused there too.
//! - A call that finds its key in progress can tell whether the holder is a call around it on
//!   this very task, which would wait for itself: it is refused at once with
//!   [`Error::Reentered`](crate::Error::Reentered).

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::hex::write_hex32;
use crate::key::StorageKey;
use crate::store::{Fence, Store};

tokio::task_local! {
    static HELD: Arc<Held>;
}

/// A claim held by a running body, and the one of the call around it on the same task.
struct Held {
    /// Which store: the same key in two stores is two claims.
    store: usize,
    key: StorageKey,
    fence: Fence,
    outer: Option<Arc<Held>>,
}

/// Tells stores apart by address (the data pointer, not the vtable).
fn store_id(store: &dyn Store) -> usize {
    (store as *const dyn Store).cast::<()>() as usize
}

/// Runs `body` as the holder of `key` under `fence` in `store`: [`CallContext::current`] sees
/// it, and a call inside it that finds the key in progress knows it is its own.
pub(crate) fn hold<F: Future>(
    store: &dyn Store,
    key: StorageKey,
    fence: Fence,
    body: F,
) -> impl Future<Output = F::Output> {
    let held = Arc::new(Held {
        store: store_id(store),
        key,
        fence,
        outer: HELD.try_with(Arc::clone).ok(),
    });
    HELD.scope(held, body)
}

/// Whether a call around this one, on this task, holds `key` in `store`: waiting for it would
/// wait for ourselves.
pub(crate) fn held_by_this_task(store: &dyn Store, key: &StorageKey) -> bool {
    let store = store_id(store);
    HELD.try_with(|held| {
        let mut next = Some(held);
        while let Some(held) = next {
            if held.store == store && held.key == *key {
                return true;
            }
            next = held.outer.as_ref();
        }
        false
    })
    .unwrap_or(false)
}

/// The idempotent call whose body is running: its storage key and fence, as the body sees it.
///
/// Available inside the body of an `#[idempotent]` function or of [`Idempotency::run`], on the
/// task that runs it (not on tasks the body spawns; pass the context to them).
///
/// ```
/// # use std::sync::Arc;
/// use idempotent_core::{Call, CallContext, Fingerprint, Idempotency, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::Error> {
/// let engine = Idempotency::new(Arc::new(MemoryStore::new()));
/// let call = Call::new("billing::charge", Fingerprint::of(&4200)?).key("order-42");
/// let provider_key = engine
///     .run(call, async {
///         let context = CallContext::current().expect("inside an idempotent body");
///         // Every execution for this order sends the provider the same key.
///         Ok::<_, idempotent_core::Error>(context.derived_key("payment-provider"))
///     })
///     .await?
///     .into_value();
/// assert_eq!(provider_key.len(), 64);
/// assert!(CallContext::current().is_none(), "outside a body there is none");
/// # Ok(()) }
/// ```
///
/// [`Idempotency::run`]: crate::Idempotency::run
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CallContext {
    key: StorageKey,
    fence: Fence,
}

impl CallContext {
    /// The call whose body is running on this task, if any (the innermost, when idempotent
    /// calls are nested).
    ///
    /// ```
    /// assert!(idempotent_core::CallContext::current().is_none());
    /// ```
    pub fn current() -> Option<Self> {
        HELD.try_with(|held| Self {
            key: held.key,
            fence: held.fence,
        })
        .ok()
    }

    /// The fence of this execution: a later execution of the same key (after this one's lease
    /// was lost) gets a larger one on every store that promises growing fences. Pass it to a
    /// system that accepts fencing tokens, so that it refuses a stale holder's writes.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idempotent_core::{Call, CallContext, Fingerprint, Idempotency, MemoryStore};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::Error> {
    /// # let engine = Idempotency::new(Arc::new(MemoryStore::new()));
    /// # let call = Call::new("f", Fingerprint::of(&1)?).key("k");
    /// engine.run(call, async {
    ///     let fence = CallContext::current().unwrap().fence();
    ///     assert!(fence.get() > 0);
    ///     Ok::<_, idempotent_core::Error>(())
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub fn fence(&self) -> Fence {
        self.fence
    }

    /// The storage key of this call (a SHA-256 digest, never the raw key).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idempotent_core::{Call, CallContext, Fingerprint, Idempotency, MemoryStore};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::Error> {
    /// # let engine = Idempotency::new(Arc::new(MemoryStore::new()));
    /// let call = Call::new("f", Fingerprint::of(&1)?).key("k");
    /// let key = engine.run(call, async {
    ///     Ok::<_, idempotent_core::Error>(CallContext::current().unwrap().storage_key().to_string())
    /// }).await?.into_value();
    /// assert_eq!(key, call.storage_key()?.to_string());
    /// # Ok(()) }
    /// ```
    pub fn storage_key(&self) -> StorageKey {
        self.key
    }

    /// A key for a downstream system, derived from this call's storage key and `purpose`: 64
    /// lowercase hex digits, the same for every execution of the call (a retry, a takeover
    /// after a lost lease) and different for every purpose, call name, scope and key. Send it
    /// as the idempotency key of a payment provider or another service that deduplicates, so
    /// that an execution that runs again is deduplicated there too. It reveals neither the
    /// raw key nor the storage key.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idempotent_core::{Call, CallContext, Fingerprint, Idempotency, MemoryStore};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::Error> {
    /// # let engine = Idempotency::new(Arc::new(MemoryStore::new()));
    /// # let call = Call::new("f", Fingerprint::of(&1)?).key("k");
    /// engine.run(call, async {
    ///     let context = CallContext::current().unwrap();
    ///     assert_ne!(context.derived_key("stripe"), context.derived_key("mailer"));
    ///     Ok::<_, idempotent_core::Error>(())
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub fn derived_key(&self, purpose: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"idempotent.derived-key.v1\0");
        hasher.update(self.key.as_bytes());
        hasher.update(purpose.as_bytes());
        let digest: [u8; 32] = hasher.finalize().into();
        struct Hex([u8; 32]);
        impl fmt::Display for Hex {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex32(f, &self.0, 64)
            }
        }
        Hex(digest).to_string()
    }
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The storage key is a digest, but logs get its short form, as the telemetry does.
        f.debug_struct("CallContext")
            .field(
                "key",
                &format_args!("{}", crate::telemetry::short_key(&self.key)),
            )
            .field("fence", &self.fence)
            .finish()
    }
}
