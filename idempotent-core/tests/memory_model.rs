//! Random sequences of operations and clock advances against the memory store and a small
//! reference model of the protocol, which must agree after every step.
//!
//! What it cannot see: the operations run one after another on one thread, so it checks what
//! each operation does, never how two of them interleave. A store that let go of its lock in
//! the middle of a claim would agree with the model on every sequence. Interleavings are
//! checked elsewhere: the memory store's unit test that pauses a claim between its look-up and
//! its insert while another claim runs (`stores/memory.rs`), and the conformance property
//! `concurrent_claims_have_one_winner`. Nor does it see real time: its clock is manual, so
//! `wait`, which sleeps in real time, is not among its operations.

mod support;

use std::time::Duration;

use idempotent_core::stores::memory::RECORD_OVERHEAD_BYTES;
use idempotent_core::{Claim, Fence, FencedWrite, ManualClock, MemoryStore, StorageKey, Store};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError};
use support::args;
use support::model::{self, Found};

const KEYS: usize = 3;
const LEASE: Duration = Duration::from_millis(1000);
const TTL: Duration = Duration::from_millis(2000);
/// A fence the memory store never hands out (its fences count up from 1).
const UNKNOWN_FENCE: Fence = Fence::new(u64::MAX);

/// Which fence a fenced write uses.
#[derive(Debug, Clone)]
enum FenceChoice {
    /// The key's most recent fence.
    Latest,
    /// Any fence issued for the key so far (stale ones too).
    OfKey(Index),
    /// Any fence issued so far, for any key.
    AnyKey(Index),
    /// A fence never issued.
    Unknown,
}

#[derive(Debug, Clone)]
enum Op {
    Claim { key: usize, fp: u8 },
    Complete { key: usize, fence: FenceChoice },
    Release { key: usize, fence: FenceChoice },
    Extend { key: usize, fence: FenceChoice },
    Advance { ms: u64 },
    Purge,
}

fn fence_choice() -> impl Strategy<Value = FenceChoice> {
    prop_oneof![
        4 => Just(FenceChoice::Latest),
        2 => any::<Index>().prop_map(FenceChoice::OfKey),
        1 => any::<Index>().prop_map(FenceChoice::AnyKey),
        1 => Just(FenceChoice::Unknown),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS;
    prop_oneof![
        4 => (key.clone(), 0..2u8).prop_map(|(key, fp)| Op::Claim { key, fp }),
        3 => (key.clone(), fence_choice()).prop_map(|(key, fence)| Op::Complete { key, fence }),
        1 => (key.clone(), fence_choice()).prop_map(|(key, fence)| Op::Release { key, fence }),
        1 => (key, fence_choice()).prop_map(|(key, fence)| Op::Extend { key, fence }),
        2 => (0..3000u64).prop_map(|ms| Op::Advance { ms }),
        // Small steps, so that records live through several operations.
        2 => (0..300u64).prop_map(|ms| Op::Advance { ms }),
        // Exactly to a lease's or ttl's end, and just around it.
        1 => prop::sample::select(vec![0u64, 1, 999, 1000, 1001, 1999, 2000])
            .prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Purge),
    ]
}

/// A key's record in the model (the rules are in `support/model.rs`, shared with
/// `protocol_model`): its fence is an index into [`Model::fences`].
type ModelRecord = model::Record<Duration, usize, u8, Vec<u8>>;

/// The protocol as store.rs states it, for a few keys.
#[derive(Debug, Default)]
struct Model {
    now: Duration,
    records: [ModelRecord; KEYS],
    /// Every fence issued so far: the key and the store's real fence. A model fence id is an
    /// index into this list.
    fences: Vec<(usize, Fence)>,
}

impl Model {
    /// What a claim must return; `None` means "a new fence": the caller records the real one.
    fn claim(&mut self, key: usize, fp: u8) -> Option<Claim> {
        self.records[key]
            .found(&fp, self.now)
            .map(|found| match found {
                Found::Mismatch => Claim::Mismatch,
                Found::InProgress { retry_after } => Claim::InProgress { retry_after },
                Found::Completed { output } => Claim::Completed {
                    output: output.into(),
                },
            })
    }

    fn acquired(&mut self, key: usize, fp: u8, fence: Fence) {
        self.fences.push((key, fence));
        let fence_id = self.fences.len() - 1;
        self.records[key].acquire(fp, fence_id, self.now, LEASE);
    }

    /// The model fence id and the real fence a choice stands for.
    fn choose(&self, key: usize, choice: &FenceChoice) -> (Option<usize>, Fence) {
        let of_key: Vec<usize> = (0..self.fences.len())
            .filter(|&id| self.fences[id].0 == key)
            .collect();
        let id = match choice {
            FenceChoice::Latest => of_key.last().copied(),
            FenceChoice::OfKey(index) => {
                (!of_key.is_empty()).then(|| of_key[index.index(of_key.len())])
            }
            FenceChoice::AnyKey(index) => {
                (!self.fences.is_empty()).then(|| index.index(self.fences.len()))
            }
            FenceChoice::Unknown => None,
        };
        (id, id.map_or(UNKNOWN_FENCE, |id| self.fences[id].1))
    }

    /// A fenced write's answer; a fence the model never issued (`None`) holds no key.
    fn write(fence_id: Option<usize>, write: impl FnOnce(usize) -> bool) -> FencedWrite {
        if fence_id.is_some_and(write) {
            FencedWrite::Applied
        } else {
            FencedWrite::Fenced
        }
    }

    fn complete(&mut self, key: usize, fence_id: Option<usize>, output: Vec<u8>) -> FencedWrite {
        let (record, now) = (&mut self.records[key], self.now);
        Self::write(fence_id, |fence| record.complete(fence, output, now, TTL))
    }

    fn release(&mut self, key: usize, fence_id: Option<usize>) -> FencedWrite {
        let (record, now) = (&mut self.records[key], self.now);
        Self::write(fence_id, |fence| record.release(fence, now))
    }

    fn extend(&mut self, key: usize, fence_id: Option<usize>) -> FencedWrite {
        let (record, now) = (&mut self.records[key], self.now);
        Self::write(fence_id, |fence| record.extend(fence, now, LEASE))
    }

    fn purge(&mut self) -> u64 {
        let now = self.now;
        let mut purged = 0;
        for record in &mut self.records {
            if record.expire(now) {
                purged += 1;
            }
        }
        purged
    }

    fn len(&self) -> usize {
        self.records
            .iter()
            .filter(|record| **record != ModelRecord::Absent)
            .count()
    }

    fn live_len(&self) -> usize {
        self.records
            .iter()
            .filter(|record| record.is_live(self.now))
            .count()
    }

    /// What the store counts against its byte budget: each record's overhead and output (the
    /// claims give fingerprints, so no arguments are kept beside the record).
    fn bytes(&self, dead_too: bool) -> usize {
        self.records
            .iter()
            .filter(|record| dead_too || record.is_live(self.now))
            .map(|record| match record {
                ModelRecord::Absent => 0,
                ModelRecord::InProgress { .. } => RECORD_OVERHEAD_BYTES,
                ModelRecord::Completed { output, .. } => RECORD_OVERHEAD_BYTES + output.len(),
            })
            .sum()
    }
}

/// Runs `ops` against a fresh store and a fresh model, comparing every result.
fn check(ops: &[Op]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let clock = ManualClock::new();
    let store = MemoryStore::builder()
        .capacity(1_000)
        .clock(clock.clone())
        .build();
    let keys: Vec<StorageKey> = (0..KEYS)
        .map(|i| StorageKey::derive("memory_model", None, &[b'k', i as u8]).expect("a valid key"))
        .collect();
    let mut model = Model::default();

    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Claim { key, fp } => {
                let got = runtime
                    .block_on(store.claim(&keys[*key], &args(*fp), LEASE))
                    .expect("claim");
                match model.claim(*key, *fp) {
                    Some(want) => prop_assert_eq!(got, want, "step {}: {:?}", step, op),
                    None => {
                        let Claim::Acquired { fence } = got else {
                            return Err(TestCaseError::fail(format!(
                                "step {step}: {op:?}: the model acquires, the store returned {got:?}"
                            )));
                        };
                        if let Some(&(_, last)) = model.fences.iter().max_by_key(|(_, f)| *f) {
                            prop_assert!(
                                fence > last,
                                "step {}: {:?}: new fence {} is not greater than every earlier fence (max {})",
                                step,
                                op,
                                fence,
                                last
                            );
                        }
                        model.acquired(*key, *fp, fence);
                    }
                }
            }
            Op::Complete { key, fence } => {
                let (id, real) = model.choose(*key, fence);
                // Distinct bytes per op (not UTF-8), so a replay shows which complete it was.
                let mut output = vec![0xff];
                output.extend_from_slice(&(step as u32).to_be_bytes());
                let got = runtime
                    .block_on(store.complete(&keys[*key], real, output.clone().into(), TTL))
                    .expect("complete");
                let want = model.complete(*key, id, output);
                prop_assert_eq!(got, want, "step {}: {:?} with fence {}", step, op, real);
            }
            Op::Release { key, fence } => {
                let (id, real) = model.choose(*key, fence);
                let got = runtime
                    .block_on(store.release(&keys[*key], real))
                    .expect("release");
                let want = model.release(*key, id);
                prop_assert_eq!(got, want, "step {}: {:?} with fence {}", step, op, real);
            }
            Op::Extend { key, fence } => {
                let (id, real) = model.choose(*key, fence);
                let got = runtime
                    .block_on(store.extend(&keys[*key], real, LEASE))
                    .expect("extend");
                let want = model.extend(*key, id);
                prop_assert_eq!(got, want, "step {}: {:?} with fence {}", step, op, real);
            }
            Op::Advance { ms } => {
                clock.advance(Duration::from_millis(*ms));
                model.now += Duration::from_millis(*ms);
            }
            Op::Purge => {
                let got = runtime
                    .block_on(store.purge_expired())
                    .expect("purge_expired");
                // A claim of a new key may have removed dead records of other keys already.
                let want = model.purge();
                prop_assert!(
                    got <= want,
                    "step {}: purge_expired removed {} records, {} were dead",
                    step,
                    got,
                    want
                );
                prop_assert_eq!(store.len(), model.len(), "step {}: after a purge", step);
                prop_assert_eq!(
                    store.bytes(),
                    model.bytes(true),
                    "step {}: bytes after a purge",
                    step
                );
            }
        }
        // Dead records may or may not be held yet (new keys' claims remove them a few at a
        // time); live ones are, and nothing else.
        prop_assert!(
            (model.live_len()..=model.len()).contains(&store.len()),
            "step {}: after {:?}, {} records held; the model has {} live of {} ({:?})",
            step,
            op,
            store.len(),
            model.live_len(),
            model.len(),
            model.records
        );
        prop_assert!(
            (model.bytes(false)..=model.bytes(true)).contains(&store.bytes()),
            "step {}: after {:?}, {} bytes counted; the model's live records take {}, all {} ({:?})",
            step,
            op,
            store.bytes(),
            model.bytes(false),
            model.bytes(true),
            model.records
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn memory_store_agrees_with_the_model(ops in prop::collection::vec(op(), 1..=60)) {
        check(&ops)?;
    }
}

/// The boundaries the model states: a lease is dead at exactly its end, and so is a ttl.
#[test]
fn leases_and_ttls_end_exactly_at_their_end() {
    let ops = [
        Op::Claim { key: 0, fp: 0 },
        Op::Advance { ms: 999 },
        Op::Claim { key: 0, fp: 0 },
        Op::Complete {
            key: 0,
            fence: FenceChoice::Latest,
        },
        Op::Advance { ms: 1999 },
        Op::Claim { key: 0, fp: 1 },
        Op::Advance { ms: 1 },
        Op::Claim { key: 0, fp: 1 },
        Op::Advance { ms: 1000 },
        Op::Extend {
            key: 0,
            fence: FenceChoice::Latest,
        },
        Op::Purge,
        Op::Claim { key: 0, fp: 0 },
    ];
    check(&ops).expect("the store agrees with the model");
}
