//! Which keys this store has seen completed, so that their replays can be a plain `GET`.
//!
//! A claim is `SET <record> <claim> NX PX <lease> GET`: it claims an absent key and answers a
//! present one. For a key that is known to be completed, a `GET` answers the same (a completed
//! record does not change until it ends) for less: the client writes no claim record and takes
//! no fence, and the server runs a read. The table is a hint, never an answer: the `GET` reads
//! the record, and whatever it finds other than a completed record (nothing, a claim in
//! progress, a tombstone) sends the call on to the claim as before, with one round trip more,
//! and clears the hint. A wrong hint therefore costs time, never a wrong answer.
//!
//! Bounded and lock-free: a fixed table of slots indexed by the storage key's first bytes,
//! each holding a tag from its next bytes (the key is a SHA-256 digest). A key's slot is
//! overwritten by another key's; then the hint is lost, which only costs the claim's price.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::key::StorageKey;

/// Slots in the table: 32 KiB, for the hot keys of a process.
const SLOTS: usize = 4096;

pub(super) struct CompletedKeys {
    slots: Box<[AtomicU64]>,
}

impl CompletedKeys {
    pub(super) fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The slot of `key` and its tag there (never 0, which marks an empty slot).
    fn place(key: &StorageKey) -> (usize, u64) {
        let bytes = key.as_bytes();
        let mut index = [0u8; 8];
        index.copy_from_slice(&bytes[..8]);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&bytes[8..16]);
        (
            (u64::from_le_bytes(index) % SLOTS as u64) as usize,
            u64::from_le_bytes(tag) | 1,
        )
    }

    /// `key` was seen completed.
    pub(super) fn insert(&self, key: &StorageKey) {
        let (slot, tag) = Self::place(key);
        self.slots[slot].store(tag, Ordering::Relaxed);
    }

    /// Whether `key` was seen completed (and its slot not taken by another key since).
    pub(super) fn contains(&self, key: &StorageKey) -> bool {
        let (slot, tag) = Self::place(key);
        self.slots[slot].load(Ordering::Relaxed) == tag
    }

    /// `key` is no longer known completed: its next claim goes straight to the claim.
    pub(super) fn remove(&self, key: &StorageKey) {
        let (slot, tag) = Self::place(key);
        let _ = self.slots[slot].compare_exchange(tag, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &[u8]) -> StorageKey {
        StorageKey::derive("redis::hints", None, name).unwrap()
    }

    #[test]
    fn a_key_is_known_from_its_insertion_until_its_removal() {
        let keys = CompletedKeys::new();
        assert!(!keys.contains(&key(b"a")));
        keys.insert(&key(b"a"));
        assert!(keys.contains(&key(b"a")));
        assert!(!keys.contains(&key(b"b")));
        keys.remove(&key(b"b"));
        assert!(keys.contains(&key(b"a")), "another key's removal leaves it");
        keys.remove(&key(b"a"));
        assert!(!keys.contains(&key(b"a")));
    }

    #[test]
    fn a_key_whose_slot_is_taken_is_no_longer_known() {
        let keys = CompletedKeys::new();
        let mut first = [0u8; 32];
        first[8] = 1;
        let mut second = first;
        second[8] = 2;
        let (first, second) = (
            StorageKey::from_bytes(first),
            StorageKey::from_bytes(second),
        );
        keys.insert(&first);
        keys.insert(&second);
        assert!(keys.contains(&second));
        assert!(!keys.contains(&first));
    }
}
