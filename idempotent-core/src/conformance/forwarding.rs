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
/// default passes the operation to `inner` unchanged, so a test overrides only the ones it
/// changes (and [`before`](Hooks::before), to refuse every operation at once).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// use idempotent_core::conformance::{Forwarding, Hooks};
/// use idempotent_core::{BoxFuture, Bytes, Fence, FencedWrite, MemoryStore, StorageKey, Store, StoreError};
///
/// /// Counts the `complete`s sent to the store.
/// #[derive(Debug, Default)]
/// struct CountCompletes(AtomicU32);
///
/// impl Hooks for CountCompletes {
///     fn complete<'a>(
///         &'a self,
///         inner: &'a dyn Store,
///         key: &'a StorageKey,
///         fence: Fence,
///         output: Bytes,
///         ttl: Duration,
///     ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
///         self.0.fetch_add(1, Ordering::SeqCst);
///         inner.complete(key, fence, output, ttl)
///     }
/// }
///
/// let store = Forwarding::new(Arc::new(MemoryStore::new()), CountCompletes::default());
/// assert_eq!(store.0.load(Ordering::SeqCst), 0, "the hooks are reached through the store");
/// ```
#[allow(unused_variables)]
pub trait Hooks: fmt::Debug + Send + Sync {
    /// Runs as each operation is called, before it is passed on (or to the hook that replaces
    /// it): an error is returned in place of the operation's answer, and the operation is not
    /// passed on. The default lets every operation through.
    fn before(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// [`Store::claim`]; the default passes it on.
    fn claim<'a>(
        &'a self,
        inner: &'a dyn Store,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        inner.claim(key, arguments, lease)
    }

    /// [`Store::complete`]; the default passes it on.
    fn complete<'a>(
        &'a self,
        inner: &'a dyn Store,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        inner.complete(key, fence, output, ttl)
    }

    /// [`Store::release`]; the default passes it on.
    fn release<'a>(
        &'a self,
        inner: &'a dyn Store,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        inner.release(key, fence)
    }

    /// [`Store::extend`]; the default passes it on.
    fn extend<'a>(
        &'a self,
        inner: &'a dyn Store,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        inner.extend(key, fence, lease)
    }

    /// [`Store::wait`]; the default passes it on.
    fn wait<'a>(
        &'a self,
        inner: &'a dyn Store,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        inner.wait(key, max)
    }

    /// [`Store::purge_expired`]; the default passes it on.
    fn purge_expired<'a>(&'a self, inner: &'a dyn Store) -> BoxFuture<'a, Result<u64, StoreError>> {
        inner.purge_expired()
    }

    /// [`Store::remove`]; the default passes it on.
    fn remove<'a>(
        &'a self,
        inner: &'a dyn Store,
        key: &'a StorageKey,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        inner.remove(key)
    }
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
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        self.through(|hooks, inner| hooks.claim(inner, key, arguments, lease))
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        self.through(|hooks, inner| hooks.complete(inner, key, fence, output, ttl))
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        self.through(|hooks, inner| hooks.release(inner, key, fence))
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        self.through(|hooks, inner| hooks.extend(inner, key, fence, lease))
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.through(|hooks, inner| hooks.wait(inner, key, max))
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.through(|hooks, inner| hooks.purge_expired(inner))
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.through(|hooks, inner| hooks.remove(inner, key))
    }
}
