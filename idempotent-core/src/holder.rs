//! What the caller that acquired a key owes the store: keep the lease alive while the body
//! runs, and give the key back if the body never finishes (panic or cancellation).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::StoreError;
use crate::key::StorageKey;
use crate::metrics::{InFlight, StoreOperation, timed};
use crate::options::OnLeaseLoss;
use crate::store::{Bytes, Fence, FencedWrite, Store};
use crate::telemetry::{CallOutcome, CallTrace, Change, short_key};
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
    /// Counts the claim in the metrics until it is settled.
    in_flight: InFlight,
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
            in_flight: InFlight::start(trace.function()),
            store,
            key,
            fence,
            trace,
            state: State::Held,
        }
    }

    /// The fence the key is held under.
    pub(crate) fn fence(&self) -> Fence {
        self.fence
    }

    /// Gives the key back now. A failure is only logged: the lease runs out anyway. Dropped
    /// before it is done, the holder releases in the background instead.
    pub(crate) async fn release(mut self) {
        let release = self.store.release(&self.key, self.fence);
        match timed(&*self.store, StoreOperation::Release, release).await {
            Ok(write) => audit_release(&self.trace, self.fence, write),
            Err(error) => tracing::warn!(
                target: "idempotent",
                %error,
                "could not release an idempotency key; it becomes claimable when its lease ends"
            ),
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
        let heartbeat = keep_alive(
            &*self.store,
            &self.trace,
            &self.key,
            self.fence,
            lease,
            cancel_at,
        );
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
    trace: &CallTrace,
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
        let extend = timed(
            store,
            StoreOperation::Extend,
            store.extend(key, fence, lease),
        );
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
                trace.audit(fence, Change::TakenOver);
                return lease_lost(key, "another caller took it over");
            }
            // Not audited here: the recording or the release that settles this claim is fenced
            // too, and says so once.
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
        // The claim stays in flight until the task settles it.
        let in_flight = self.in_flight.take();
        let mut trace = self.trace.clone();
        match state {
            State::Held => {
                trace.emit(CallOutcome::Abandoned);
                runtime.spawn(async move {
                    let release = store.release(&key, fence);
                    // A failure is not logged (nor was it before): the lease runs out anyway.
                    if let Ok(write) = timed(&*store, StoreOperation::Release, release).await {
                        audit_release(&trace, fence, write);
                    }
                    drop(in_flight);
                });
            }
            State::Recording(recording) => {
                runtime.spawn(async move {
                    let recorded = recording.recorded;
                    let write = complete_with_retries(&*store, &key, fence, recording).await;
                    settle_recording(&mut trace, fence, write, recorded);
                    drop(in_flight);
                });
            }
            State::Settled => {}
        }
    }
}

/// The audit trail's event for a release the store answered with `write`.
fn audit_release(trace: &CallTrace, fence: Fence, write: FencedWrite) {
    match write {
        FencedWrite::Applied => trace.audit(fence, Change::Released),
        FencedWrite::Fenced => trace.audit(fence, Change::TakenOver),
    }
}

/// Emits the call's event (and the audit trail's) for a recording that ended with `write`,
/// and returns its outcome. An unrecorded result is one `WARN`, with the store's error.
pub(crate) fn settle_recording(
    trace: &mut CallTrace,
    fence: Fence,
    write: Result<FencedWrite, StoreError>,
    recorded: CallOutcome,
) -> CallOutcome {
    match write {
        Ok(FencedWrite::Applied) => {
            trace.audit(fence, Change::Completed);
            trace.emit(recorded);
            recorded
        }
        Ok(FencedWrite::Fenced) => {
            trace.audit(fence, Change::TakenOver);
            trace.emit(CallOutcome::Fenced);
            CallOutcome::Fenced
        }
        Err(error) => {
            trace.emit_unrecorded(&error);
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
        let complete = store.complete(key, fence, recording.output.clone(), recording.ttl);
        let write = timed(store, StoreOperation::Complete, complete).await;
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
