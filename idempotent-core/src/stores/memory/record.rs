//! A record of the memory store: what a key holds, and the rules read off it (live, held by a
//! fence, what it counts against the byte budget).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::RECORD_OVERHEAD_BYTES;
use crate::fingerprint::{CanonicalArguments, Fingerprint};
use crate::store::{Bytes, Fence};

pub(super) struct Record {
    pub(super) arguments: KeptArguments,
    pub(super) fence: Fence,
    pub(super) state: State,
    /// Its entry in the shard's deadline list.
    pub(super) slot: usize,
}

/// A record's arguments: as claimed, when they were short enough to be kept exactly (see
/// [`CanonicalArguments`]), else their fingerprint. Exact ones make a replay skip hashing,
/// for at most [`MAX_EXACT_ARGUMENTS`](crate::MAX_EXACT_ARGUMENTS) bytes more per record.
pub(super) enum KeptArguments {
    Exact(Box<[u8]>),
    Digest(Fingerprint),
}

impl KeptArguments {
    /// The bytes kept beside the record (a digest is inline, in the overhead).
    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            Self::Exact(exact) => exact.len(),
            Self::Digest(_) => 0,
        }
    }

    /// [`Record::bytes`] of a new record that keeps `arguments`.
    pub(super) fn record_bytes(arguments: &CanonicalArguments) -> usize {
        RECORD_OVERHEAD_BYTES + arguments.exact().map_or(0, <[u8]>::len)
    }

    pub(super) fn of(arguments: &CanonicalArguments) -> Self {
        match arguments.exact() {
            Some(exact) => Self::Exact(exact.into()),
            None => Self::Digest(arguments.fingerprint()),
        }
    }

    pub(super) fn matches(&self, arguments: &CanonicalArguments) -> bool {
        match self {
            Self::Exact(exact) => arguments.matches_exact(exact),
            Self::Digest(fingerprint) => arguments.fingerprint() == *fingerprint,
        }
    }
}

pub(super) enum State {
    InProgress {
        lease_until: Duration,
        // Made only when someone waits, so an uncontended call allocates nothing for it.
        waiters: Option<Arc<Notify>>,
    },
    Completed {
        // Shared, so a replay hands out a reference instead of copying the output.
        output: Bytes,
        expires_at: Duration,
    },
}

impl Record {
    /// What the record counts against the byte budget.
    pub(super) fn bytes(&self) -> usize {
        let output = match &self.state {
            State::Completed { output, .. } => output.len(),
            State::InProgress { .. } => 0,
        };
        RECORD_OVERHEAD_BYTES + self.arguments.heap_bytes() + output
    }

    /// When the record dies: its lease's end, or its expiry.
    pub(super) fn deadline(&self) -> Duration {
        match &self.state {
            State::InProgress { lease_until, .. } => *lease_until,
            State::Completed { expires_at, .. } => *expires_at,
        }
    }

    pub(super) fn is_live(&self, now: Duration) -> bool {
        now < self.deadline()
    }

    /// `fence` holds the record: in progress under it, with a live lease. The one rule for
    /// every fenced write, so its result never depends on when expired records are purged.
    pub(super) fn held_by(&self, fence: Fence, now: Duration) -> bool {
        self.fence == fence
            && matches!(self.state, State::InProgress { lease_until, .. } if now < lease_until)
    }

    pub(super) fn wake_waiters(&self) {
        if let State::InProgress {
            waiters: Some(waiters),
            ..
        } = &self.state
        {
            waiters.notify_waiters();
        }
    }
}
