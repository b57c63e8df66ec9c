//! One `tracing` event per call, saying how it ended.
//!
//! Events have target `idempotent` and the fields `function` (the call's name), `key` (the
//! first 16 hex digits of the storage key: enough to find the record, never the raw key),
//! `outcome`, `waited` (whether the call waited for another one) and `elapsed_us`. Routine
//! outcomes are `DEBUG`; a caller's mistake (conflict, mismatch, invalid key) `INFO`; a result
//! that could not be recorded `WARN`; failures `ERROR`.

use std::fmt;
use std::time::Instant;

use crate::hex::write_hex32;
use crate::key::StorageKey;

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
}

impl CallTrace {
    pub(crate) fn start(function: &'static str) -> Self {
        Self {
            function,
            key: None,
            started: tracing::enabled!(target: "idempotent", tracing::Level::ERROR)
                .then(Instant::now),
            waited: false,
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

    pub(crate) fn emit(&self, outcome: CallOutcome) {
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
