//! One `tracing` event per call, saying how it ended, and one per change of a record (the
//! audit trail).
//!
//! Call events have target `idempotent` and the fields `function` (the call's name), `key`
//! (the first 16 hex digits of the storage key: enough to find the record, never the raw
//! key), `outcome`, `waited` (whether the call waited for another one) and `elapsed_us`.
//! Routine outcomes are `DEBUG`; a caller's mistake (conflict, mismatch, invalid key) `INFO`;
//! a result that could not be recorded, a panic or a cancellation `WARN` (an `unrecorded`
//! one also has the store's `error`); failures `ERROR`. Every call emits exactly one, however
//! it ends: a call dropped while it claims, waits or runs emits `abandoned` (see
//! [`OpenCall`]). Each event is also the call counted in the metrics (feature `metrics`,
//! [`crate::metrics`]).
//!
//! Audit events have target `idempotent::audit` (see [`AUDIT_TARGET`]), level `DEBUG`, and
//! the fields `function`, `key` (as above), `fence` and `outcome`, the record's change:
//!
//! - `claimed`: this process's call acquired the key under `fence` (in the transactional
//!   mode, in the caller's transaction, which may still roll back);
//! - `completed`: the call's result was recorded under `fence`;
//! - `released`: the claim under `fence` was given back (the body failed or was abandoned, or
//!   its output could not be recorded);
//! - `taken_over`: a write under `fence` was refused because another caller's claim took the
//!   key over after this lease ran out. It is seen by the caller that lost the lease, once:
//!   by the renewal that finds it when the body is then cancelled (`on_lease_loss =
//!   "cancel"`), else by the recording or the release that settles the claim. A claim that
//!   acquires a key cannot tell an expired lease from an absent record ([`Claim::Acquired`]
//!   says neither), so the taker's own event is `claimed`;
//! - `forgotten`: [`Idempotency::forget`] removed the record (`fence` is `-`);
//! - `purged`: [`Idempotency::purge_expired`] removed `count` expired records (the store does
//!   not say which: `function`, `key` and `fence` are `-`).
//!
//! An operator's tool that removes records through the [`admin`](crate::admin) API rather
//! than the engine emits the same two events with [`admin::audit_forgotten`] and
//! [`admin::audit_purged`] (the command `idempotent` does, on its standard error). Changes
//! nobody reports are not seen: a record that expires, a store's own expiry sweep, operations
//! a program sends to the store itself.
//!
//! [`admin::audit_forgotten`]: crate::admin::audit_forgotten
//! [`admin::audit_purged`]: crate::admin::audit_purged
//!
//! [`Claim::Acquired`]: crate::Claim::Acquired
//! [`Idempotency::forget`]: crate::Idempotency::forget
//! [`Idempotency::purge_expired`]: crate::Idempotency::purge_expired

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::Instant;

use crate::hex::write_hex32;
use crate::key::StorageKey;
use crate::metrics::{self, WaitTimer};
use crate::store::Fence;

/// The target of the audit trail's events.
pub(crate) const AUDIT_TARGET: &str = "idempotent::audit";

/// How a call ended, as its event's `outcome` field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallOutcome {
    /// The body ran and its result was recorded.
    Executed,
    /// A recorded result was returned without waiting.
    Replayed,
    /// A recorded result was returned after waiting for the call that produced it.
    Waited,
    /// The body returned `Err`; the key was released.
    Failed,
    /// Another call held the key (reject mode, or waiting timed out).
    Conflict,
    /// The key was used before with other arguments.
    Mismatch,
    /// The body ran, but its lease was taken over first: the result was not recorded.
    Fenced,
    /// The body ran, but the store failed to record its result.
    Unrecorded,
    /// The store failed before the body could run.
    StoreError,
    /// The key, scope, arguments or options were refused before anything was claimed.
    InvalidInput,
    /// The output could not be encoded, or was too large; the key was released.
    EncodeError,
    /// The recorded output does not decode as the return type.
    DecodeError,
    /// The body panicked or the call was cancelled; the key is being released.
    Abandoned,
    /// The key is held by a call around this one on the same task.
    Reentered,
    /// The lease could not be renewed and the body was cancelled (`on_lease_loss = "cancel"`).
    LeaseLost,
}

impl CallOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::Waited => "waited",
            Self::Failed => "failed",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::Fenced => "fenced",
            Self::Unrecorded => "unrecorded",
            Self::StoreError => "store_error",
            Self::InvalidInput => "invalid_input",
            Self::EncodeError => "encode_error",
            Self::DecodeError => "decode_error",
            Self::Abandoned => "abandoned",
            Self::Reentered => "reentered",
            Self::LeaseLost => "lease_lost",
        }
    }
}

/// What the event of one call needs, gathered as the call goes.
#[derive(Clone)]
pub(crate) struct CallTrace {
    function: &'static str,
    key: Option<StorageKey>,
    // Read only when an event could be recorded: a clock read is a noticeable share of a
    // replay from memory.
    started: Option<Instant>,
    pub(crate) waited: bool,
    wait: WaitTimer,
}

/// A storage key as logs show it: its first 16 hex digits, enough to find the record.
pub(crate) fn short_key(key: &StorageKey) -> impl fmt::Display {
    ShortKey(Some(*key))
}

/// Prints a storage key's first 8 bytes as hex, only if the event is enabled.
struct ShortKey(Option<StorageKey>);

impl fmt::Display for ShortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(key) => write_hex32(f, key.as_bytes(), 16),
            None => f.write_str("-"),
        }
    }
}

macro_rules! call_event {
    ($level:expr, $trace:expr, $outcome:expr) => {
        tracing::event!(
            target: "idempotent",
            $level,
            function = $trace.function,
            key = %ShortKey($trace.key),
            outcome = $outcome.as_str(),
            waited = $trace.waited,
            elapsed_us = $trace.elapsed_us(),
            "idempotent call {}",
            $outcome.as_str()
        )
    };
    ($level:expr, $trace:expr, $outcome:expr, $error:expr) => {
        tracing::event!(
            target: "idempotent",
            $level,
            function = $trace.function,
            key = %ShortKey($trace.key),
            outcome = $outcome.as_str(),
            waited = $trace.waited,
            elapsed_us = $trace.elapsed_us(),
            error = %$error,
            "idempotent call {}: the body ran, its result was returned but not recorded, and a retry may run it again",
            $outcome.as_str()
        )
    };
}

/// A change of a record, as the audit trail's `outcome` field names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Claimed,
    Completed,
    Released,
    TakenOver,
    Forgotten,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Self::Claimed => "claimed",
            Self::Completed => "completed",
            Self::Released => "released",
            Self::TakenOver => "taken_over",
            Self::Forgotten => "forgotten",
        }
    }
}

/// A fence as the audit trail shows it: its number, or `-` when there is none.
struct ShownFence(Option<Fence>);

impl fmt::Display for ShownFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(fence) => fence.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The audit trail's event for `change` of `key`'s record.
pub(crate) fn audit(function: &str, key: &StorageKey, fence: Option<Fence>, change: Change) {
    tracing::debug!(
        target: AUDIT_TARGET,
        function,
        key = %short_key(key),
        fence = %ShownFence(fence),
        outcome = change.as_str(),
        "idempotency record {}",
        change.as_str()
    );
}

/// The audit trail's event for a purge of expired records, which names none of them.
pub(crate) fn audit_purged(count: u64) {
    tracing::debug!(
        target: AUDIT_TARGET,
        function = "-",
        key = "-",
        fence = "-",
        outcome = "purged",
        count,
        "idempotency records purged"
    );
}

impl CallTrace {
    pub(crate) fn start(function: &'static str) -> Self {
        Self {
            function,
            key: None,
            started: (metrics::TIMES_CALLS
                || tracing::enabled!(target: "idempotent", tracing::Level::ERROR))
            .then(Instant::now),
            waited: false,
            wait: WaitTimer::default(),
        }
    }

    /// The call's function, as its events name it.
    pub(crate) fn function(&self) -> &'static str {
        self.function
    }

    /// The call waits for another holder of its key, from now unless it already did.
    pub(crate) fn start_waiting(&mut self) {
        self.waited = true;
        self.wait.start();
    }

    /// The call no longer waits: its wait (if it waited) is measured.
    pub(crate) fn stop_waiting(&mut self) {
        self.wait.stop(self.function);
    }

    /// The audit trail's event for `change` of this call's record under `fence`.
    pub(crate) fn audit(&self, fence: Fence, change: Change) {
        if let Some(key) = &self.key {
            audit(self.function, key, Some(fence), change);
        }
    }

    /// Microseconds since the call started; 0 if no event was enabled when it started.
    fn elapsed_us(&self) -> u64 {
        self.started.map_or(0, |started| {
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
        })
    }

    pub(crate) fn set_key(&mut self, key: StorageKey) {
        self.key = Some(key);
    }

    /// The call's event, and the call counted in the metrics.
    pub(crate) fn emit(&mut self, outcome: CallOutcome) {
        self.count(outcome);
        self.event(outcome);
    }

    /// The event of a call whose result the store failed to record (`unrecorded`), with the
    /// store's error: one `WARN` says both.
    pub(crate) fn emit_unrecorded(&mut self, error: &crate::error::StoreError) {
        self.count(CallOutcome::Unrecorded);
        call_event!(tracing::Level::WARN, self, CallOutcome::Unrecorded, error);
    }

    fn count(&mut self, outcome: CallOutcome) {
        // A call dropped while it waits never reached the end of its wait.
        self.stop_waiting();
        metrics::call_ended(
            self.function,
            outcome.as_str(),
            self.started.map(|started| started.elapsed()),
        );
    }

    fn event(&self, outcome: CallOutcome) {
        use tracing::Level;
        match outcome {
            CallOutcome::Executed
            | CallOutcome::Replayed
            | CallOutcome::Waited
            | CallOutcome::Failed => call_event!(Level::DEBUG, self, outcome),
            CallOutcome::Conflict | CallOutcome::Mismatch | CallOutcome::InvalidInput => {
                call_event!(Level::INFO, self, outcome)
            }
            CallOutcome::Fenced
            | CallOutcome::Unrecorded
            | CallOutcome::Abandoned
            | CallOutcome::LeaseLost
            | CallOutcome::Reentered => {
                call_event!(Level::WARN, self, outcome)
            }
            CallOutcome::StoreError | CallOutcome::EncodeError | CallOutcome::DecodeError => {
                call_event!(Level::ERROR, self, outcome)
            }
        }
    }
}

/// A call whose event is still owed. Dropped before [`OpenCall::emit`] or
/// [`OpenCall::hand_over`] (its future dropped while it claims or waits, or, in the
/// transactional mode, while its body runs or its result is written; or a panic in the body),
/// it emits `abandoned`, so that every call is seen.
pub(crate) struct OpenCall(Option<CallTrace>);

impl OpenCall {
    pub(crate) fn new(trace: CallTrace) -> Self {
        Self(Some(trace))
    }

    /// The call's event: the call is settled.
    pub(crate) fn emit(mut self, outcome: CallOutcome) {
        if let Some(mut trace) = self.0.take() {
            trace.emit(outcome);
        }
    }

    /// The trace, for what owes the event from here on (the holder of a leased claim, which
    /// emits `abandoned` itself if it is dropped unsettled).
    pub(crate) fn hand_over(mut self) -> CallTrace {
        self.0
            .take()
            .expect("an open call has its trace until it is settled")
    }
}

impl Deref for OpenCall {
    type Target = CallTrace;

    fn deref(&self) -> &CallTrace {
        self.0
            .as_ref()
            .expect("an open call has its trace until it is settled")
    }
}

impl DerefMut for OpenCall {
    fn deref_mut(&mut self) -> &mut CallTrace {
        self.0
            .as_mut()
            .expect("an open call has its trace until it is settled")
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        if let Some(mut trace) = self.0.take() {
            trace.emit(CallOutcome::Abandoned);
        }
    }
}
