//! What the caller that acquired a key owes the store: keep the lease alive while the body
//! runs, and give the key back if the body never finishes (panic or cancellation).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::StoreError;
use crate::key::StorageKey;
use crate::options::OnLeaseLoss;
use crate::store::{Bytes, Fence, FencedWrite, Store};
use crate::telemetry::{CallOutcome, CallTrace, short_key};
use tokio::time::Instant;

/// The claim held by this call, and what it still owes the store.
///
/// Dropped while the body may still be running (it panicked, or the call's future was dropped
/// before the body returned), it releases the key in the background, so a retry need not wait
/// for the lease to run out. Dropped after the body returned, while its result is being
/// recorded, it never releases: the body ran, and a freed key would let a retry run it again.
/// The recording then finishes on a task of its own, bounded as it would have been.
pub(crate) struct Holder {
    store: Arc<dyn Store>,
    key: StorageKey,
    fence: Fence,
    trace: CallTrace,
    state: State,
}

/// What dropping the holder must do.
enum State {
    /// The body may not have finished: give the key back.
    Held,
    /// The body returned and this is being recorded: finish recording it.
    Recording(PendingRecord),
    /// Completed, released or lost: nothing.
    Settled,
}

/// A body's result on its way into the store.
#[derive(Clone)]
pub(crate) struct PendingRecord {
    pub(crate) output: Bytes,
    pub(crate) ttl: Duration,
    /// When to stop retrying an unreachable store.
    pub(crate) give_up: tokio::time::Instant,
    /// The event to emit once it is recorded.
    pub(crate) recorded: CallOutcome,
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
            state: State::Held,
        }
    }

    /// Gives the key back now. A failure is only logged: the lease runs out anyway. Dropped
    /// before it is done, the holder releases in the background instead.
    pub(crate) async fn release(mut self) {
        if let Err(error) = self.store.release(&self.key, self.fence).await {
            tracing::warn!(
                target: "idempotent",
                %error,
                "could not release an idempotency key; it becomes claimable when its lease ends"
            );
        }
        self.state = State::Settled;
    }

    /// Records the body's result (see [`complete_with_retries`]). From here on the key is
    /// never released: if this future is dropped, the recording goes on in the background.
    pub(crate) async fn record(
        mut self,
        recording: PendingRecord,
    ) -> Result<FencedWrite, StoreError> {
        self.state = State::Recording(recording.clone());
        let write = complete_with_retries(&*self.store, &self.key, self.fence, recording).await;
        // Whatever `complete` said, the claim is settled: releasing it after a store error
        // would let a quick retry run the body again while this caller reports success.
        self.state = State::Settled;
        write
    }

    /// Runs `body` while renewing the lease every third of itself, so a body that outlives
    /// one lease keeps its claim for as long as this caller is alive. With
    /// [`OnLeaseLoss::Cancel`], the body is dropped, and `Err(LeaseLost)` returned, once the
    /// lease was taken over or renewals failed until a sixth of it was left (counted from
    /// `claimed_at`, when the claim or the last renewal that was applied was sent, so that this
    /// side's estimate never outlasts the store's lease).
    pub(crate) async fn run_with_heartbeat<F: Future>(
        &self,
        lease: Duration,
        on_lease_loss: OnLeaseLoss,
        claimed_at: Option<Instant>,
        body: F,
    ) -> Result<F::Output, LeaseLost> {
        let cancel_at = match (on_lease_loss, claimed_at) {
            (OnLeaseLoss::Cancel, Some(claimed_at)) => Some(claimed_at),
            _ => None,
        };
        let heartbeat = keep_alive(&*self.store, &self.key, self.fence, lease, cancel_at);
        // `biased`: the body is polled first, so a body that finishes at once never starts a timer.
        tokio::select! {
            biased;
            output = body => Ok(output),
            lost = heartbeat => Err(lost),
        }
    }

    /// The lease is lost and the body was dropped: nothing is owed. Not released: another
    /// caller may hold the key now, or the store cannot be reached; the lease runs out.
    pub(crate) fn lost(mut self) {
        self.state = State::Settled;
    }
}

/// The body was cancelled because its lease could no longer be renewed.
#[derive(Debug)]
pub(crate) struct LeaseLost;

/// Renews the lease every third of itself. Never returns unless `cancel_from` is given (the
/// lease was taken then): then it returns once the lease is lost, or once renewals failed
/// until a sixth of the lease is left.
async fn keep_alive(
    store: &dyn Store,
    key: &StorageKey,
    fence: Fence,
    lease: Duration,
    cancel_from: Option<Instant>,
) -> LeaseLost {
    let period = (lease / 3).max(Duration::from_millis(1));
    // When to give up: a sixth of the lease before this side's estimate of its end.
    let give_up_after = |sent: Instant| sent + lease - lease / 6;
    let mut give_up = cancel_from.map(give_up_after);
    loop {
        let next = Instant::now() + period;
        match give_up {
            Some(deadline) if deadline <= next => {
                tokio::time::sleep_until(deadline).await;
                return lease_lost(key, "its renewals failed");
            }
            _ => tokio::time::sleep_until(next).await,
        }
        let sent = Instant::now();
        let extend = store.extend(key, fence, lease);
        let write = match give_up {
            Some(deadline) => match tokio::time::timeout_at(deadline, extend).await {
                Ok(write) => write,
                Err(_) => return lease_lost(key, "its renewal did not answer in time"),
            },
            None => extend.await,
        };
        match write {
            Ok(FencedWrite::Applied) => give_up = cancel_from.map(|_| give_up_after(sent)),
            Ok(FencedWrite::Fenced) if cancel_from.is_some() => {
                return lease_lost(key, "another caller took it over");
            }
            Ok(FencedWrite::Fenced) => {
                tracing::warn!(
                    target: "idempotent",
                    key = %short_key(key),
                    "lost the lease of an idempotency key while its body runs: another caller may run it too; raise the lease, or cancel such bodies with on_lease_loss = \"cancel\""
                );
                return std::future::pending().await;
            }
            // Try again next period: the lease has two more periods to go.
            Err(error) => tracing::warn!(target: "idempotent", %error, "could not extend a lease"),
        }
    }
}

fn lease_lost(key: &StorageKey, why: &str) -> LeaseLost {
    tracing::warn!(
        target: "idempotent",
        key = %short_key(key),
        "cancelled the body of an idempotent call: its lease could not be renewed ({why})"
    );
    LeaseLost
}

impl Drop for Holder {
    fn drop(&mut self) {
        let state = std::mem::replace(&mut self.state, State::Settled);
        if matches!(state, State::Settled) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.trace.emit(CallOutcome::Abandoned);
            tracing::warn!(
                target: "idempotent",
                "an idempotent call was dropped outside a Tokio runtime; its key becomes claimable when its lease ends"
            );
            return;
        };
        let store = Arc::clone(&self.store);
        let (key, fence) = (self.key, self.fence);
        match state {
            State::Held => {
                self.trace.emit(CallOutcome::Abandoned);
                runtime.spawn(async move {
                    let _ = store.release(&key, fence).await;
                });
            }
            State::Recording(recording) => {
                let trace = self.trace.clone();
                runtime.spawn(async move {
                    let recorded = recording.recorded;
                    let write = complete_with_retries(&*store, &key, fence, recording).await;
                    trace.emit(settled_outcome(write, recorded));
                });
            }
            State::Settled => {}
        }
    }
}

/// The event for a recording that ended with `write`.
pub(crate) fn settled_outcome(
    write: Result<FencedWrite, StoreError>,
    recorded: CallOutcome,
) -> CallOutcome {
    match write {
        Ok(FencedWrite::Applied) => recorded,
        Ok(FencedWrite::Fenced) => CallOutcome::Fenced,
        Err(error) => {
            tracing::warn!(target: "idempotent", %error, "could not record an idempotent result");
            CallOutcome::Unrecorded
        }
    }
}

/// Records the result, trying again while the store is unreachable until `give_up`: the body
/// has run, and an unrecorded result is one a retry would run again. A second attempt is safe;
/// if the first one was applied after all, the second is fenced and changes nothing.
async fn complete_with_retries(
    store: &dyn Store,
    key: &StorageKey,
    fence: Fence,
    recording: PendingRecord,
) -> Result<FencedWrite, StoreError> {
    let mut pause = Duration::from_millis(5);
    loop {
        // Shared, not copied: a retry sends the same bytes.
        let write = store
            .complete(key, fence, recording.output.clone(), recording.ttl)
            .await;
        match write {
            Err(StoreError::Unavailable { .. })
                if tokio::time::Instant::now() + pause < recording.give_up =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}
