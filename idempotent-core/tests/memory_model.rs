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

use std::time::Duration;

use idempotent_core::stores::memory::RECORD_OVERHEAD_BYTES;
use idempotent_core::{
    CanonicalArguments, Claim, Fence, FencedWrite, Fingerprint, ManualClock, MemoryStore,
    StorageKey, Store,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError};

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

#[derive(Debug, Clone, PartialEq)]
enum ModelState {
    InProgress {
        lease_until: Duration,
    },
    Completed {
        output: Vec<u8>,
        expires_at: Duration,
    },
}

#[derive(Debug, Clone)]
struct ModelRecord {
    fp: u8,
    /// Index into [`Model::fences`].
    fence_id: usize,
    state: ModelState,
}

impl ModelRecord {
    fn is_live(&self, now: Duration) -> bool {
        match &self.state {
            ModelState::InProgress { lease_until } => now < *lease_until,
            ModelState::Completed { expires_at, .. } => now < *expires_at,
        }
    }
}

/// The protocol as store.rs states it, for a few keys.
#[derive(Debug, Default)]
struct Model {
    now: Duration,
    records: [Option<ModelRecord>; KEYS],
    /// Every fence issued so far: the key and the store's real fence. A model fence id is an
    /// index into this list.
    fences: Vec<(usize, Fence)>,
}

impl Model {
    /// What a claim must return; `None` means "a new fence": the caller records the real one.
    fn claim(&mut self, key: usize, fp: u8) -> Option<Claim> {
        let now = self.now;
        match &self.records[key] {
            Some(record) if record.is_live(now) => Some(if record.fp != fp {
                Claim::Mismatch
            } else {
                match &record.state {
                    ModelState::InProgress { lease_until } => Claim::InProgress {
                        retry_after: *lease_until - now,
                    },
                    ModelState::Completed { output, .. } => Claim::Completed {
                        output: output.clone().into(),
                    },
                }
            }),
            _ => None,
        }
    }

    fn acquired(&mut self, key: usize, fp: u8, fence: Fence) {
        self.fences.push((key, fence));
        self.records[key] = Some(ModelRecord {
            fp,
            fence_id: self.fences.len() - 1,
            state: ModelState::InProgress {
                lease_until: self.now + LEASE,
            },
        });
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

    /// The one rule: a fenced write applies only while the key is in progress under that fence
    /// with a live lease.
    fn held(&self, key: usize, fence_id: Option<usize>) -> bool {
        matches!(
            &self.records[key],
            Some(ModelRecord { fence_id: held_by, state: ModelState::InProgress { lease_until }, .. })
                if Some(*held_by) == fence_id && self.now < *lease_until
        )
    }

    fn write(applied: bool) -> FencedWrite {
        if applied {
            FencedWrite::Applied
        } else {
            FencedWrite::Fenced
        }
    }

    fn complete(&mut self, key: usize, fence_id: Option<usize>, output: Vec<u8>) -> FencedWrite {
        let applied = self.held(key, fence_id);
        if applied {
            let record = self.records[key].as_mut().expect("held");
            record.state = ModelState::Completed {
                output,
                expires_at: self.now + TTL,
            };
        }
        Self::write(applied)
    }

    fn release(&mut self, key: usize, fence_id: Option<usize>) -> FencedWrite {
        let applied = self.held(key, fence_id);
        if applied {
            self.records[key] = None;
        }
        Self::write(applied)
    }

    fn extend(&mut self, key: usize, fence_id: Option<usize>) -> FencedWrite {
        let applied = self.held(key, fence_id);
        if applied {
            let record = self.records[key].as_mut().expect("held");
            record.state = ModelState::InProgress {
                lease_until: self.now + LEASE,
            };
        }
        Self::write(applied)
    }

    fn purge(&mut self) -> u64 {
        let now = self.now;
        let mut purged = 0;
        for slot in &mut self.records {
            if slot.as_ref().is_some_and(|record| !record.is_live(now)) {
                *slot = None;
                purged += 1;
            }
        }
        purged
    }

    fn len(&self) -> usize {
        self.records.iter().flatten().count()
    }

    fn live_len(&self) -> usize {
        self.records
            .iter()
            .flatten()
            .filter(|record| record.is_live(self.now))
            .count()
    }

    /// What the store counts against its byte budget: each record's overhead and output (the
    /// claims give fingerprints, so no arguments are kept beside the record).
    fn bytes(&self, dead_too: bool) -> usize {
        self.records
            .iter()
            .flatten()
            .filter(|record| dead_too || record.is_live(self.now))
            .map(|record| {
                RECORD_OVERHEAD_BYTES
                    + match &record.state {
                        ModelState::Completed { output, .. } => output.len(),
                        ModelState::InProgress { .. } => 0,
                    }
            })
            .sum()
    }
}

fn fingerprint(fp: u8) -> Fingerprint {
    Fingerprint::from_bytes([fp; 32])
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
                    .block_on(store.claim(
                        &keys[*key],
                        &CanonicalArguments::from(fingerprint(*fp)),
                        LEASE,
                    ))
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
