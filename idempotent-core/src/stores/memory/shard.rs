//! One shard of the memory store: its records, and a list of every record's key and deadline
//! that expiry walks a few entries at a time.
//!
//! The list is in no order. A sweep looks at the entries after its hand, removes the records
//! whose deadline has passed, and moves on; claims that add a record sweep a few entries each
//! (`SWEEP_STEP`), so the hand goes round the shard while new keys arrive and no call walks
//! the whole store. An entry's deadline is a hint kept up to date by who changes the record:
//! a record is removed only after the record itself was found dead, so a stale entry can
//! delay a removal but never remove a live record.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use super::{Record, SeededKeys};
use crate::key::StorageKey;

pub(super) struct Shard {
    records: HashMap<StorageKey, Record, SeededKeys>,
    /// One entry per record; `Record::slot` is its index.
    deadlines: Vec<Deadline>,
    /// Where the next sweep starts.
    hand: usize,
    /// How many times the table was rebuilt, for the tests of when that happens.
    #[cfg(test)]
    rebuilds: usize,
}

/// What a record's entry in the deadline list takes.
#[cfg(test)]
pub(super) const DEADLINE_BYTES: usize = size_of::<Deadline>();

struct Deadline {
    key: StorageKey,
    /// When the record dies, as far as the entry knows (see the module docs).
    at: Duration,
}

/// What a sweep did.
#[derive(Debug, Default)]
pub(super) struct Swept {
    /// Entries looked at.
    pub(super) examined: usize,
    /// Dead records removed.
    pub(super) records: usize,
    /// Their bytes, as `Record::bytes` counts them.
    pub(super) bytes: usize,
}

/// A table is rebuilt to fit its records once they fill at most a quarter of its room: a
/// table never gives back room by itself, and the slots its removed records leave are marked
/// deleted, which a lookup of an absent key has to probe past.
const SPARSE: usize = 4;

/// Tables with room for at most this many records are left as they are.
const SMALL_TABLE: usize = 64;

impl Shard {
    pub(super) fn new(keys: SeededKeys) -> Self {
        Self {
            records: HashMap::with_hasher(keys),
            deadlines: Vec::new(),
            hand: 0,
            #[cfg(test)]
            rebuilds: 0,
        }
    }

    pub(super) fn get(&self, key: &StorageKey) -> Option<&Record> {
        self.records.get(key)
    }

    /// The record under `key`, and its entry's deadline: who changes the record's deadline
    /// sets it there too.
    pub(super) fn get_mut(&mut self, key: &StorageKey) -> Option<(&mut Record, &mut Duration)> {
        let record = self.records.get_mut(key)?;
        let at = &mut self.deadlines[record.slot].at;
        Some((record, at))
    }

    /// Adds a record for a key that has none.
    pub(super) fn insert(&mut self, key: StorageKey, mut record: Record) {
        record.slot = self.deadlines.len();
        self.deadlines.push(Deadline {
            key,
            at: record.deadline(),
        });
        self.records.insert(key, record);
    }

    pub(super) fn remove(&mut self, key: &StorageKey) -> Option<Record> {
        let record = self.records.remove(key)?;
        self.forget_entry(record.slot);
        Some(record)
    }

    /// Drops the list's entry at `slot`; the last entry takes its place.
    fn forget_entry(&mut self, slot: usize) {
        self.deadlines.swap_remove(slot);
        if let Some(moved) = self.deadlines.get(slot)
            && let Some(record) = self.records.get_mut(&moved.key)
        {
            record.slot = slot;
        }
    }

    /// Looks at up to `budget` entries from the hand on (each at most once), removing the
    /// records that are dead at `now` and waking their waiters, until `enough` says so.
    pub(super) fn sweep(
        &mut self,
        now: Duration,
        budget: usize,
        enough: impl Fn(&Swept) -> bool,
    ) -> Swept {
        let mut hand = self.hand;
        let swept = self.sweep_from(&mut hand, now, budget, enough);
        self.hand = hand;
        swept
    }

    /// Part of a purge: looks at up to `chunk` entries from `*at` to the end of the list,
    /// removing the records dead at `now`; `*at` is then where the next part starts, or
    /// `None` once the list is done. Entries that move while the shard's lock is released
    /// between parts may be missed, or looked at twice: a purge removes what it finds dead.
    pub(super) fn purge_part(
        &mut self,
        at: &mut usize,
        now: Duration,
        chunk: usize,
    ) -> (Swept, bool) {
        // Each entry looked at is either kept (`at` moves on) or removed (the list shrinks),
        // so this many looks end exactly at the end of the list, without wrapping.
        let budget = chunk.min(self.deadlines.len().saturating_sub(*at));
        let swept = self.sweep_from(at, now, budget, |_| false);
        (swept, *at >= self.deadlines.len())
    }

    fn sweep_from(
        &mut self,
        hand: &mut usize,
        now: Duration,
        budget: usize,
        enough: impl Fn(&Swept) -> bool,
    ) -> Swept {
        let budget = budget.min(self.deadlines.len());
        let mut swept = Swept::default();
        while swept.examined < budget && !enough(&swept) {
            if *hand >= self.deadlines.len() {
                *hand = 0;
            }
            swept.examined += 1;
            let entry = &self.deadlines[*hand];
            if now < entry.at {
                *hand += 1;
                continue;
            }
            let live_until = match self.records.entry(entry.key) {
                Entry::Occupied(record) if record.get().is_live(now) => {
                    Some(record.get().deadline())
                }
                Entry::Occupied(record) => {
                    let record = record.remove();
                    record.wake_waiters();
                    swept.records += 1;
                    swept.bytes += record.bytes();
                    None
                }
                // Every entry has its record; should one not, the entry goes.
                Entry::Vacant(_) => None,
            };
            match live_until {
                Some(at) => {
                    self.deadlines[*hand].at = at;
                    *hand += 1;
                }
                // The last entry moves here, and is looked at next.
                None => self.forget_entry(*hand),
            }
        }
        if swept.records > 0 {
            self.rebuild_if_sparse();
        }
        swept
    }

    fn rebuild_if_sparse(&mut self) {
        let room = self.records.capacity();
        if room > SMALL_TABLE && self.records.len() * SPARSE <= room {
            let keep = self.records.len() * 2;
            self.records.shrink_to(keep);
            self.deadlines.shrink_to(keep);
            #[cfg(test)]
            {
                self.rebuilds += 1;
            }
        }
    }

    /// How many records the shard holds.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    /// How many records the table has room for.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.records.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stores::memory::{KeptArguments, State};
    use crate::{CanonicalArguments, Fence, Fingerprint};

    fn in_progress(until: Duration) -> Record {
        Record {
            arguments: KeptArguments::of(&CanonicalArguments::from(Fingerprint::of(&1).unwrap())),
            fence: Fence::new(1),
            state: State::InProgress {
                lease_until: until,
                waiters: None,
            },
            slot: 0,
        }
    }

    /// A shard of `live` records with a long lease and `dead` ones whose lease ended at 10 ms.
    fn shard_of(live: u32, dead: u32) -> Shard {
        let mut shard = Shard::new(SeededKeys::new());
        for n in 0..live + dead {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&n.to_le_bytes());
            let until = if n < live { 3600 * 1000 } else { 10 };
            shard.insert(
                StorageKey::from_bytes(bytes),
                in_progress(Duration::from_millis(until)),
            );
        }
        shard
    }

    /// Sweeps every entry at 1 s, when the dead records are dead; returns how many went.
    fn sweep_all(shard: &mut Shard) -> usize {
        let entries = shard.deadlines.len();
        shard
            .sweep(Duration::from_secs(1), entries, |_| false)
            .records
    }

    /// A table is rebuilt only once it is sparse (a quarter full or less) and not small, and
    /// then keeps room for twice what is left: rebuilding on every sweep would cost a copy of
    /// the table per claim, and a rebuilt table with no room would grow again at once.
    #[test]
    fn only_sparse_tables_are_rebuilt_with_room_to_grow() {
        // (A table's `capacity()` is no measure here: removals that leave tombstones lower it.)
        let mut busy = shard_of(900, 100);
        assert_eq!(sweep_all(&mut busy), 100);
        assert_eq!(busy.rebuilds, 0, "nine tenths full: left as it is");

        let mut sparse = shard_of(100, 900);
        assert_eq!(sweep_all(&mut sparse), 900);
        assert_eq!(sparse.rebuilds, 1, "a tenth full: rebuilt");
        assert!(
            sparse.capacity() >= 200,
            "rebuilt with room for twice the 100 left, got {}",
            sparse.capacity()
        );

        let mut small = shard_of(1, 39);
        assert!(small.capacity() <= SMALL_TABLE, "{}", small.capacity());
        assert_eq!(sweep_all(&mut small), 39);
        assert_eq!(small.rebuilds, 0, "a small table is left as it is");
    }

    /// The module's promise: an entry's deadline is only a hint, and a sweep removes a record
    /// only once the record itself is dead. Here the record's lease moves on without its
    /// entry, as if an update had missed it: the sweep keeps the record and the entry catches
    /// up with it.
    #[test]
    fn a_stale_entry_never_removes_a_live_record() {
        let mut shard = Shard::new(SeededKeys::new());
        let key = StorageKey::from_bytes([1; 32]);
        shard.insert(key, in_progress(Duration::from_millis(10)));
        let later = Duration::from_secs(60);
        match &mut shard.records.get_mut(&key).unwrap().state {
            State::InProgress { lease_until, .. } => *lease_until = later,
            State::Completed { .. } => unreachable!("inserted in progress"),
        }

        // A dead record after it: one look at each entry finds it.
        let dead = StorageKey::from_bytes([2; 32]);
        shard.insert(dead, in_progress(Duration::from_millis(10)));

        let swept = shard.sweep(Duration::from_secs(1), 2, |_| false);
        assert!(
            shard.get(&key).is_some(),
            "a live record was swept by its stale entry"
        );
        assert_eq!(
            shard.deadlines[0].at, later,
            "the entry learns the record's deadline"
        );
        assert_eq!(swept.examined, 2);
        assert_eq!(swept.records, 1, "the sweep moved on to the dead record");
        assert!(shard.get(&dead).is_none());

        let swept = shard.sweep(later, 8, |_| false);
        assert_eq!(swept.records, 1, "once dead, the record goes");
        assert!(shard.get(&key).is_none());
    }
}
