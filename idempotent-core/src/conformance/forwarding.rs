//! [`Forwarding`]: a store that passes every operation on to another store, except those its
//! [`Hooks`] change, for tests that inject a fault or watch one operation.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use crate::error::StoreError;
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};

/// What a [`Forwarding`] store does in place of passing an operation on: every method's
/// default passes the operation to the inner store unchanged ([`send`](Completing::send)), so
/// a test overrides only the ones it changes (and [`before`](Hooks::before), to refuse every
/// operation at once). Each method gets its operation as one value: the inner store and the
/// operation's arguments.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use idempotent_core::conformance::{Completing, Forwarding, Hooks};
/// use idempotent_core::{BoxFuture, FencedWrite, MemoryStore, StoreError};
///
/// /// Counts the `complete`s sent to the store.
/// #[derive(Debug, Default)]
/// struct CountCompletes(AtomicU32);
///
/// impl Hooks for CountCompletes {
///     fn complete<'a>(&'a self, op: Completing<'a>) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
///         self.0.fetch_add(1, Ordering::SeqCst);
///         op.send()
///     }
/// }
///
/// let store = Forwarding::new(Arc::new(MemoryStore::new()), CountCompletes::default());
/// assert_eq!(store.0.load(Ordering::SeqCst), 0, "the hooks are reached through the store");
/// ```
pub trait Hooks: fmt::Debug + Send + Sync {
    /// Runs as each operation is called, before it is passed on (or to the hook that replaces
    /// it): an error is returned in place of the operation's answer, and the operation is not
    /// passed on. The default lets every operation through.
    fn before(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// [`Store::claim`]; the default passes it on.
    fn claim<'a>(&'a self, op: Claiming<'a>) -> BoxFuture<'a, Result<Claim, StoreError>> {
        op.send()
    }

    /// [`Store::complete`]; the default passes it on.
    fn complete<'a>(
        &'a self,
        op: Completing<'a>,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        op.send()
    }

    /// [`Store::release`]; the default passes it on.
    fn release<'a>(&'a self, op: Releasing<'a>) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        op.send()
    }

    /// [`Store::extend`]; the default passes it on.
    fn extend<'a>(&'a self, op: Extending<'a>) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        op.send()
    }

    /// [`Store::wait`]; the default passes it on.
    fn wait<'a>(&'a self, op: Waiting<'a>) -> BoxFuture<'a, Result<(), StoreError>> {
        op.send()
    }

    /// [`Store::purge_expired`]; the default passes it on.
    fn purge_expired<'a>(&'a self, op: Purging<'a>) -> BoxFuture<'a, Result<u64, StoreError>> {
        op.send()
    }

    /// [`Store::remove`]; the default passes it on.
    fn remove<'a>(&'a self, op: Removing<'a>) -> BoxFuture<'a, Result<bool, StoreError>> {
        op.send()
    }
}

/// One type per operation a [`Hooks`] method is given: the inner store and the operation's
/// arguments, and `send` to pass it on unchanged.
macro_rules! operations {
    ($(
        $(#[$doc:meta])*
        $name:ident => $method:ident($($field:ident: $ty:ty),*) -> $answer:ty;
    )*) => {$(
        $(#[$doc])*
        pub struct $name<'a> {
            /// The store the operation is passed on to.
            pub inner: &'a dyn Store,
            $(
                #[doc = concat!("The operation's `", stringify!($field), "`.")]
                pub $field: $ty,
            )*
        }

        /// The operation's name only: its fields may hold an output, which is the
        /// application's data and stays out of debug output.
        impl fmt::Debug for $name<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }

        impl<'a> $name<'a> {
            /// Passes the operation on to the inner store, unchanged.
            pub fn send(self) -> BoxFuture<'a, Result<$answer, StoreError>> {
                self.inner.$method($(self.$field),*)
            }
        }
    )*};
}

operations! {
    /// A [`Store::claim`] on its way to the inner store.
    Claiming => claim(key: &'a StorageKey, arguments: &'a CanonicalArguments, lease: Duration) -> Claim;
    /// A [`Store::complete`] on its way to the inner store.
    Completing => complete(key: &'a StorageKey, fence: Fence, output: Bytes, ttl: Duration) -> FencedWrite;
    /// A [`Store::release`] on its way to the inner store.
    Releasing => release(key: &'a StorageKey, fence: Fence) -> FencedWrite;
    /// A [`Store::extend`] on its way to the inner store.
    Extending => extend(key: &'a StorageKey, fence: Fence, lease: Duration) -> FencedWrite;
    /// A [`Store::wait`] on its way to the inner store.
    Waiting => wait(key: &'a StorageKey, max: Duration) -> ();
    /// A [`Store::purge_expired`] on its way to the inner store.
    Purging => purge_expired() -> u64;
    /// A [`Store::remove`] on its way to the inner store.
    Removing => remove(key: &'a StorageKey) -> bool;
}

/// A [`Store`] that passes every operation on to `inner` through its [`Hooks`], which change
/// the operations a test is about and leave the others as they are.
///
/// It dereferences to its hooks, so a test reads what they noted (or flips a switch in them)
/// through the store. See [`Hooks`] for an example.
pub struct Forwarding<H> {
    inner: Arc<dyn Store>,
    hooks: H,
}

impl<H: Hooks> Forwarding<H> {
    /// Passes operations on to `inner` through `hooks`.
    pub fn new(inner: Arc<dyn Store>, hooks: H) -> Self {
        Self { inner, hooks }
    }

    /// The store operations are passed on to.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
}

impl<H> Deref for Forwarding<H> {
    type Target = H;

    fn deref(&self) -> &H {
        &self.hooks
    }
}

impl<H: fmt::Debug> fmt::Debug for Forwarding<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarding")
            .field("inner", &self.inner)
            .field("hooks", &self.hooks)
            .finish()
    }
}

impl<H: Hooks> Forwarding<H> {
    /// Runs [`Hooks::before`], then `operation` (a hook given the inner store), or answers
    /// with the error `before` returned.
    fn through<'a, T: Send + 'a>(
        &'a self,
        operation: impl FnOnce(&'a H, &'a dyn Store) -> BoxFuture<'a, Result<T, StoreError>>,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        match self.hooks.before() {
            Ok(()) => operation(&self.hooks, &*self.inner),
            Err(error) => Box::pin(async move { Err(error) }),
        }
    }
}

impl<H: Hooks> Store for Forwarding<H> {
    /// The inner store's kind: forwarding changes what a store answers, not what it is.
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        self.through(|hooks, inner| {
            hooks.claim(Claiming {
                inner,
                key,
                arguments,
                lease,
            })
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        self.through(|hooks, inner| {
            hooks.complete(Completing {
                inner,
                key,
                fence,
                output,
                ttl,
            })
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        self.through(|hooks, inner| hooks.release(Releasing { inner, key, fence }))
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        self.through(|hooks, inner| {
            hooks.extend(Extending {
                inner,
                key,
                fence,
                lease,
            })
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.through(|hooks, inner| hooks.wait(Waiting { inner, key, max }))
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.through(|hooks, inner| hooks.purge_expired(Purging { inner }))
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.through(|hooks, inner| hooks.remove(Removing { inner, key }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stores::memory::MemoryStore;

    /// An operation's debug output names it and nothing it carries: a `complete` carries the
    /// application's output.
    #[test]
    fn an_operation_keeps_its_output_out_of_debug() {
        let inner = MemoryStore::new();
        let key = StorageKey::derive("tests::debug", None, b"k").unwrap();
        let op = Completing {
            inner: &inner,
            key: &key,
            fence: Fence::new(7),
            output: Bytes::from_static(b"card 4242-4242"),
            ttl: Duration::from_secs(1),
        };
        let shown = format!("{op:?}");
        assert!(shown.starts_with("Completing"), "{shown}");
        assert!(
            !shown.contains("4242") && !shown.contains("52, 50"),
            "{shown}"
        );
    }
}
