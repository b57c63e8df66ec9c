//! What the caller that acquired a key owes the store: keep the lease alive while the body
//! runs, and give the key back if the body never finishes (panic or cancellation).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::key::StorageKey;
use crate::store::{Fence, FencedWrite, Store};
use crate::telemetry::{CallOutcome, CallTrace};

/// The claim held by this call. If it is dropped still armed (the body panicked, or the
/// call's future was dropped), it releases the key in the background, so a retry need not
/// wait for the lease to run out.
pub(crate) struct Holder {
    store: Arc<dyn Store>,
    key: StorageKey,
    fence: Fence,
    trace: CallTrace,
    armed: bool,
}

impl Holder {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        key: StorageKey,
        fence: Fence,
        trace: CallTrace,
    ) -> Self {
        Self {
            store,
            key,
            fence,
            trace,
            armed: true,
        }
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn key(&self) -> &StorageKey {
        &self.key
    }

    pub(crate) fn fence(&self) -> Fence {
        self.fence
    }

    /// The claim is settled (completed, released or lost): nothing to do on drop.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }

    /// Gives the key back now. A failure is only logged: the lease runs out anyway.
    pub(crate) async fn release(mut self) {
        self.armed = false;
        if let Err(error) = self.store.release(&self.key, self.fence).await {
            tracing::warn!(
                target: "idempotent",
                %error,
                "could not release an idempotency key; it becomes claimable when its lease ends"
            );
        }
    }

    /// Runs `body` while renewing the lease every third of itself, so a body that outlives
    /// one lease keeps its claim for as long as this caller is alive.
    pub(crate) async fn run_with_heartbeat<F: Future>(
        &self,
        lease: Duration,
        body: F,
    ) -> F::Output {
        let heartbeat = keep_alive(&*self.store, &self.key, self.fence, lease);
        // `biased`: the body is polled first, so a body that finishes at once never starts a timer.
        tokio::select! {
            biased;
            output = body => output,
            never = heartbeat => match never {},
        }
    }
}

async fn keep_alive(
    store: &dyn Store,
    key: &StorageKey,
    fence: Fence,
    lease: Duration,
) -> Infallible {
    let period = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(period).await;
        match store.extend(key, fence, lease).await {
            Ok(FencedWrite::Applied) => {}
            Ok(FencedWrite::Fenced) => {
                tracing::warn!(
                    target: "idempotent",
                    key = %key,
                    "lost the lease of an idempotency key while its body runs: another caller may run it too; raise the lease"
                );
                return std::future::pending().await;
            }
            // Try again next period: the lease has two more periods to go.
            Err(error) => tracing::warn!(target: "idempotent", %error, "could not extend a lease"),
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.trace.emit(CallOutcome::Abandoned);
        let store = Arc::clone(&self.store);
        let (key, fence) = (self.key, self.fence);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = store.release(&key, fence).await;
                });
            }
            Err(_) => tracing::warn!(
                target: "idempotent",
                "an idempotent call was abandoned outside a Tokio runtime; its key becomes claimable when its lease ends"
            ),
        }
    }
}
