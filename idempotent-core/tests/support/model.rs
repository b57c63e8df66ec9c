//! The protocol's rules for one key's record, written once for the tests' reference models
//! (`protocol_model`, a stateright model, and `memory_model`, a proptest model): what a claim
//! finds, and when a fenced write applies.
//!
//! The record is generic over the model's units: `T` its time (ticks, or a `Duration` on a
//! manual clock), `F` its fences, `P` its fingerprints, `O` its outputs.

use std::ops::{Add, Sub};

/// One key's record, as the store holds it. A record whose lease or expiry has passed is not
/// live: every operation takes it as absent, and [`Record::expire`] makes it so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Record<T, F, P, O> {
    #[default]
    Absent,
    InProgress {
        fingerprint: P,
        fence: F,
        lease_until: T,
    },
    Completed {
        fingerprint: P,
        fence: F,
        output: O,
        expires_at: T,
    },
}

/// What a claim finds on a live record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Found<T, O> {
    /// The record has another fingerprint.
    Mismatch,
    /// Another caller holds the key for `retry_after` more.
    InProgress { retry_after: T },
    /// The key's call was recorded: a replay of `output`.
    Completed { output: O },
}

impl<T, F, P, O> Record<T, F, P, O>
where
    T: Copy + PartialOrd + Add<Output = T> + Sub<Output = T>,
    F: Copy + PartialEq,
    P: PartialEq,
    O: Clone,
{
    /// Whether the record counts at `now`: in progress with a live lease, or completed and
    /// not expired. A lease or a ttl ends exactly at its end.
    pub fn is_live(&self, now: T) -> bool {
        match self {
            Record::Absent => false,
            Record::InProgress { lease_until, .. } => now < *lease_until,
            Record::Completed { expires_at, .. } => now < *expires_at,
        }
    }

    /// Replaces a record that is no longer live at `now` by `Absent`; whether there was one.
    pub fn expire(&mut self, now: T) -> bool {
        let dead = !matches!(self, Record::Absent) && !self.is_live(now);
        if dead {
            *self = Record::Absent;
        }
        dead
    }

    /// What a claim with `fingerprint` finds at `now`; `None` when the key is free and the
    /// claim acquires it (see [`Record::acquire`]).
    pub fn found(&self, fingerprint: &P, now: T) -> Option<Found<T, O>> {
        if !self.is_live(now) {
            return None;
        }
        Some(match self {
            Record::InProgress {
                fingerprint: held, ..
            }
            | Record::Completed {
                fingerprint: held, ..
            } if held != fingerprint => Found::Mismatch,
            Record::InProgress { lease_until, .. } => Found::InProgress {
                retry_after: *lease_until - now,
            },
            Record::Completed { output, .. } => Found::Completed {
                output: output.clone(),
            },
            Record::Absent => unreachable!("an absent record is not live"),
        })
    }

    /// A claim acquired the free key under `fence`: in progress until `now + lease`.
    pub fn acquire(&mut self, fingerprint: P, fence: F, now: T, lease: T) {
        *self = Record::InProgress {
            fingerprint,
            fence,
            lease_until: now + lease,
        };
    }

    /// The one rule of every fenced write: in progress under `fence`, with a live lease.
    pub fn held_by(&self, fence: F, now: T) -> bool {
        matches!(self, Record::InProgress { fence: held, lease_until, .. }
            if *held == fence && now < *lease_until)
    }

    /// `complete` with `fence`: records `output` until `now + ttl` if the fence holds the key;
    /// whether it was applied.
    pub fn complete(&mut self, fence: F, output: O, now: T, ttl: T) -> bool {
        if !self.held_by(fence, now) {
            return false;
        }
        let Record::InProgress { fingerprint, .. } = std::mem::take(self) else {
            unreachable!("held_by means in progress")
        };
        *self = Record::Completed {
            fingerprint,
            fence,
            output,
            expires_at: now + ttl,
        };
        true
    }

    /// `release` with `fence`: frees the key if the fence holds it; whether it was applied.
    pub fn release(&mut self, fence: F, now: T) -> bool {
        if !self.held_by(fence, now) {
            return false;
        }
        *self = Record::Absent;
        true
    }

    /// `extend` with `fence`: the lease runs until `now + lease` if the fence holds the key;
    /// whether it was applied.
    pub fn extend(&mut self, fence: F, now: T, lease: T) -> bool {
        if !self.held_by(fence, now) {
            return false;
        }
        if let Record::InProgress { lease_until, .. } = self {
            *lease_until = now + lease;
        }
        true
    }

    /// The fence of the record, if there is one (live or not).
    pub fn fence(&self) -> Option<F> {
        match self {
            Record::Absent => None,
            Record::InProgress { fence, .. } | Record::Completed { fence, .. } => Some(*fence),
        }
    }
}
