//! A model-checked specification of the store protocol (claim, complete, release, extend), with
//! three clients that follow the engine, a clock that moves, leases that run out, and crashes.
//!
//! [`Protocol`] is a `stateright` model of one key. Its state is the key's record (absent, in
//! progress, completed), a logical clock in ticks, the store-wide fence counter, and three
//! clients, each a small state machine that does what `engine.rs` and `holder.rs` do:
//!
//! ```text
//! Idle ──claim──▶ Acquired ⇒ Running ──body Ok──▶ Completing ──complete──▶ Executed | Unrecorded
//!   │                          │  ▲ └──body Err──▶ Releasing ──release──▶ Failed
//!   │                          └──┘ heartbeat (extend)
//!   ├──claim──▶ Replayed | KeyReused
//!   └──claim──▶ Waiting ──claim again──▶ (as from Idle) ─or─ give up ──▶ Conflict
//! Running | Completing | Releasing ──crash──▶ Crashed (forever; the claim is left to expire)
//! ```
//!
//! `Acquired` has no step of its own: the engine starts the body at once, so the client goes
//! straight to `Running`. A body that panics or whose call is cancelled ends like `Err`: the
//! holder's `Drop` releases the key, which is the `Releasing` step. A client *stalls* simply by
//! not acting while `Tick`s happen (every interleaving is explored), which is how a holder's
//! lease runs out under it; a crash is a stall that never ends.
//!
//! Each store operation is one atomic step, with exactly the rules of `store.rs` and
//! `stores/memory.rs` ([`Store`](idempotent_core::Store)). Two tests:
//!
//! - `the_protocol_model_checks`: breadth-first search over every reachable state; every
//!   `always` property holds and every `sometimes` property is reached.
//! - `the_memory_store_agrees_with_the_model`: 2,000 random paths through the model, each
//!   replayed step by step on a real `MemoryStore` with a `ManualClock`: every answer (fences,
//!   retry-after, recorded output) must be the model's. This ties the specification to the code.
//!
//! What it cannot see. The model takes each store operation as atomic; that a real store's
//! operation *is* atomic is not checked here (the replay runs on one thread, one operation at a
//! time), but by the memory store's unit test that pauses a claim between its look-up and its
//! insert while a second claim runs, and by the conformance property
//! `concurrent_claims_have_one_winner` on every store. It models one key, so nothing that
//! couples keys (shards, capacity, sweeping) is in it. Its clients are the engine's protocol as
//! this file restates it, not the engine's code: a change to `engine.rs` or `holder.rs` is
//! seen by the engine's own tests, not by this model. And time is in ticks: how long a real
//! wait or heartbeat takes is outside it.

mod support;

use std::collections::HashMap;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use idempotent_core::{
    BoxFuture, Bytes, Claim, Fence, FencedWrite, ManualClock, MemoryStore, StorageKey, Store,
    StoreError,
};
use stateright::{Checker, Model, Property};
use support::args;
use support::model::{self, Found};

/// Clients; the issue asks for three.
const CLIENTS: usize = 3;
/// The lease a claim or a heartbeat grants, in ticks.
const LEASE: u8 = 2;
/// How long a completed record is kept, in ticks.
const TTL: u8 = 4;
/// The clock stops here: enough for a lease to lapse and be taken over, and for a record
/// completed after a heartbeat to expire and the key to run again (6 also reaches every
/// `sometimes`, with 202,613 states; 10 takes half a minute in debug).
const MAX_TIME: u8 = 8;
/// The fingerprint each client calls with: clients 0 and 1 make the same call (either is the
/// other's retry), client 2 reuses the key with other arguments. Each client calls once;
/// letting even one client call a second time grows the space to 2.8 million states at
/// MAX_TIME = 6.
const FINGERPRINTS: [u8; CLIENTS] = [0, 0, 1];
/// One tick of the model on the real store's clock.
const TICK: Duration = Duration::from_secs(1);

/// The key's record, as the store holds it, in ticks and small numbers (the rules are in
/// `support/model.rs`, shared with `memory_model`). A record whose lease or expiry has passed
/// is replaced by `Absent` when the clock moves: the store counts it as absent for every
/// operation, and folding it keeps equivalent states equal.
type Record = model::Record<u8, u8, u8, u8>;

/// How a client's call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Ending {
    /// Its body ran and its complete was applied.
    Executed,
    /// It got another client's recorded output.
    Replayed,
    /// Its body ran but its complete was fenced (`Outcome::Unrecorded`).
    Unrecorded,
    /// Its body failed (or panicked, or was cancelled) and it released the key.
    Failed,
    /// The key held a live record with another fingerprint (`Error::KeyReused`).
    KeyReused,
    /// It stopped waiting for the holder (`Error::Conflict`).
    Conflict,
}

/// One client's local state. `lease_until` is the lease the store last granted this client
/// (by `Acquired` or by an applied heartbeat), as the client knows it; 0 once it has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Client {
    Idle,
    /// Got `InProgress`: waits, then claims again.
    Waiting,
    /// Holds `fence`; its body runs and its heartbeat extends the lease until it is fenced.
    Running {
        fence: u8,
        lease_until: u8,
        heartbeat: bool,
    },
    /// The body returned `Ok`: about to complete.
    Completing {
        fence: u8,
        lease_until: u8,
    },
    /// The body returned `Err`, panicked or was cancelled: about to release.
    Releasing {
        fence: u8,
        lease_until: u8,
    },
    /// Stopped forever while holding `fence`.
    Crashed {
        fence: u8,
        lease_until: u8,
    },
    Done(Ending),
}

impl Client {
    /// The fence and the granted lease of a client that holds (or held, until it crashed) a key.
    fn holding(self) -> Option<(u8, u8)> {
        match self {
            Client::Running {
                fence, lease_until, ..
            }
            | Client::Completing { fence, lease_until }
            | Client::Releasing { fence, lease_until }
            | Client::Crashed { fence, lease_until } => Some((fence, lease_until)),
            _ => None,
        }
    }

    fn forget_expired_lease(&mut self, now: u8) {
        if let Client::Running { lease_until, .. }
        | Client::Completing { lease_until, .. }
        | Client::Releasing { lease_until, .. }
        | Client::Crashed { lease_until, .. } = self
            && *lease_until <= now
        {
            *lease_until = 0;
        }
    }
}

/// What the store did, recorded in the state for the properties to judge (a history variable).
/// Only the events the properties need are kept, so the history stays short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Event {
    /// A claim acquired `fence` at time `at`.
    Acquired { client: u8, fence: u8, at: u8 },
    /// A complete was applied. `newest_fence` is the last fence the store had issued,
    /// `record_fence` the fence of the record it replaced, `holder_lease_live` whether the lease
    /// the store had granted the completing client was still running.
    Completed {
        client: u8,
        fence: u8,
        at: u8,
        newest_fence: u8,
        record_fence: Option<u8>,
        holder_lease_live: bool,
        fingerprint: u8,
        output: u8,
        expires_at: u8,
    },
    /// A release was applied.
    Released { fence: u8 },
    /// The first claim after an applied release, and what it got.
    ClaimAfterRelease { client: u8, answer: Answer },
}

/// A store operation's answer, in the model's units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Answer {
    Acquired { fence: u8 },
    InProgress { retry_after: u8 },
    Completed { output: u8 },
    Mismatch,
    Applied,
    Fenced,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    now: u8,
    record: Record,
    /// The store-wide fence counter: the fence the next acquiring claim gets (the memory store
    /// starts at 1).
    next_fence: u8,
    clients: [Client; CLIENTS],
    /// An applied release has not been followed by a claim yet.
    released: bool,
    history: Vec<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// The clock moves one tick (up to `MAX_TIME`).
    Tick,
    /// `claim` from `Idle` or `Waiting`.
    Claim(usize),
    /// `extend` from `Running`, while the heartbeat has not been fenced.
    Heartbeat(usize),
    /// The body returns `Ok`.
    BodyOk(usize),
    /// The body returns `Err` (or panics, or its call is dropped).
    BodyErr(usize),
    /// `complete` from `Completing`.
    Complete(usize),
    /// `release` from `Releasing`.
    Release(usize),
    /// A waiting client's deadline passes.
    GiveUp(usize),
    /// The client's process dies while it holds the key: no release, no heartbeat.
    Crash(usize),
}

/// The store's side of the protocol, for one key: the rules of `stores/memory.rs`, as the
/// shared [`model::Record`] states them, with the store-wide fence counter.
impl State {
    fn claim(&mut self, fingerprint: u8) -> Answer {
        match self.record.found(&fingerprint, self.now) {
            Some(Found::Mismatch) => Answer::Mismatch,
            Some(Found::InProgress { retry_after }) => Answer::InProgress { retry_after },
            Some(Found::Completed { output }) => Answer::Completed { output },
            None => {
                let fence = self.next_fence;
                self.next_fence += 1;
                self.record.acquire(fingerprint, fence, self.now, LEASE);
                Answer::Acquired { fence }
            }
        }
    }

    fn complete(&mut self, fence: u8, output: u8) -> Answer {
        write(self.record.complete(fence, output, self.now, TTL))
    }

    fn release(&mut self, fence: u8) -> Answer {
        write(self.record.release(fence, self.now))
    }

    fn extend(&mut self, fence: u8) -> Answer {
        write(self.record.extend(fence, self.now, LEASE))
    }

    fn record_fence(&self) -> Option<u8> {
        self.record.fence()
    }
}

/// A fenced write's answer.
fn write(applied: bool) -> Answer {
    if applied {
        Answer::Applied
    } else {
        Answer::Fenced
    }
}

/// The model: the parameters are the constants above.
struct Protocol;

impl Protocol {
    /// One step: the next state and, for a store operation, the store's answer. The
    /// differential test replays the answers on a real store.
    fn step(&self, last: &State, action: Action) -> (State, Option<Answer>) {
        let mut s = last.clone();
        let answer = match action {
            Action::Tick => {
                s.now += 1;
                s.record.expire(s.now);
                for client in &mut s.clients {
                    client.forget_expired_lease(s.now);
                }
                None
            }
            Action::Claim(c) => {
                let answer = s.claim(FINGERPRINTS[c]);
                if s.released {
                    s.released = false;
                    s.history.push(Event::ClaimAfterRelease {
                        client: c as u8,
                        answer,
                    });
                }
                s.clients[c] = match answer {
                    Answer::Acquired { fence } => {
                        s.history.push(Event::Acquired {
                            client: c as u8,
                            fence,
                            at: s.now,
                        });
                        Client::Running {
                            fence,
                            lease_until: s.now + LEASE,
                            heartbeat: true,
                        }
                    }
                    Answer::InProgress { .. } => Client::Waiting,
                    Answer::Completed { .. } => Client::Done(Ending::Replayed),
                    Answer::Mismatch => Client::Done(Ending::KeyReused),
                    Answer::Applied | Answer::Fenced => unreachable!("a claim's answer"),
                };
                Some(answer)
            }
            Action::Heartbeat(c) => {
                let Client::Running { fence, .. } = s.clients[c] else {
                    unreachable!("only a running client beats")
                };
                let answer = s.extend(fence);
                s.clients[c] = match answer {
                    Answer::Applied => Client::Running {
                        fence,
                        lease_until: s.now + LEASE,
                        heartbeat: true,
                    },
                    // `keep_alive` stops once fenced; the body goes on.
                    _ => Client::Running {
                        fence,
                        lease_until: 0,
                        heartbeat: false,
                    },
                };
                Some(answer)
            }
            Action::BodyOk(c) | Action::BodyErr(c) => {
                let Client::Running {
                    fence, lease_until, ..
                } = s.clients[c]
                else {
                    unreachable!("only a running body finishes")
                };
                s.clients[c] = if matches!(action, Action::BodyOk(_)) {
                    Client::Completing { fence, lease_until }
                } else {
                    Client::Releasing { fence, lease_until }
                };
                None
            }
            Action::Complete(c) => {
                let Client::Completing { fence, lease_until } = s.clients[c] else {
                    unreachable!("only a completing client completes")
                };
                let newest_fence = s.next_fence - 1;
                let record_fence = s.record_fence();
                let output = c as u8;
                let answer = s.complete(fence, output);
                if answer == Answer::Applied {
                    let Record::Completed {
                        fingerprint,
                        expires_at,
                        ..
                    } = s.record
                    else {
                        unreachable!("an applied complete leaves a completed record")
                    };
                    s.history.push(Event::Completed {
                        client: c as u8,
                        fence,
                        at: s.now,
                        newest_fence,
                        record_fence,
                        holder_lease_live: s.now < lease_until,
                        fingerprint,
                        output,
                        expires_at,
                    });
                    s.clients[c] = Client::Done(Ending::Executed);
                } else {
                    s.clients[c] = Client::Done(Ending::Unrecorded);
                }
                Some(answer)
            }
            Action::Release(c) => {
                let Client::Releasing { fence, .. } = s.clients[c] else {
                    unreachable!("only a releasing client releases")
                };
                let answer = s.release(fence);
                if answer == Answer::Applied {
                    s.released = true;
                    s.history.push(Event::Released { fence });
                }
                s.clients[c] = Client::Done(Ending::Failed);
                Some(answer)
            }
            Action::GiveUp(c) => {
                s.clients[c] = Client::Done(Ending::Conflict);
                None
            }
            Action::Crash(c) => {
                let (fence, lease_until) = s.clients[c].holding().expect("only a holder crashes");
                s.clients[c] = Client::Crashed { fence, lease_until };
                None
            }
        };
        (s, answer)
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            now: 0,
            record: Record::Absent,
            next_fence: 1,
            clients: [Client::Idle; CLIENTS],
            released: false,
            history: Vec::new(),
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        if state.now < MAX_TIME {
            actions.push(Action::Tick);
        }
        for (c, client) in state.clients.iter().enumerate() {
            match client {
                Client::Idle => actions.push(Action::Claim(c)),
                Client::Waiting => {
                    actions.push(Action::Claim(c));
                    actions.push(Action::GiveUp(c));
                }
                Client::Running { heartbeat, .. } => {
                    if *heartbeat {
                        actions.push(Action::Heartbeat(c));
                    }
                    actions.push(Action::BodyOk(c));
                    actions.push(Action::BodyErr(c));
                    actions.push(Action::Crash(c));
                }
                Client::Completing { .. } => {
                    actions.push(Action::Complete(c));
                    actions.push(Action::Crash(c));
                }
                Client::Releasing { .. } => {
                    actions.push(Action::Release(c));
                    actions.push(Action::Crash(c));
                }
                Client::Crashed { .. } | Client::Done(_) => {}
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        Some(self.step(last, action).0)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            // A complete is applied only for the fence the store issued last, while the record
            // is in progress under that fence and the lease the store granted that client is
            // still running. A holder whose lease ran out, or was taken over, never writes.
            Property::always("completion only from the current fence", |_, s: &State| {
                s.history.iter().all(|event| match *event {
                    Event::Completed {
                        fence,
                        newest_fence,
                        record_fence,
                        holder_lease_live,
                        ..
                    } => fence == newest_fence && record_fence == Some(fence) && holder_lease_live,
                    _ => true,
                })
            }),
            // Until its expiry, the record a complete wrote stays exactly as written: no claim,
            // complete or release (stale or not) replaces or deletes it.
            Property::always(
                "a completed record is never overwritten before it expires",
                |_, s: &State| {
                    s.history.iter().all(|event| match *event {
                        Event::Completed {
                            fence,
                            fingerprint,
                            output,
                            expires_at,
                            ..
                        } => {
                            s.now >= expires_at
                                || s.record
                                    == Record::Completed {
                                        fingerprint,
                                        fence,
                                        output,
                                        expires_at,
                                    }
                        }
                        _ => true,
                    })
                },
            ),
            // After an applied release, the next claim, by anyone and with any arguments,
            // acquires the key.
            Property::always("a released key is claimable", |_, s: &State| {
                s.history.iter().all(|event| match event {
                    Event::ClaimAfterRelease { answer, .. } => {
                        matches!(answer, Answer::Acquired { .. })
                    }
                    _ => true,
                })
            }),
            // Every fence handed out is larger than every one before it, so a fence can be a
            // fencing token downstream.
            Property::always("fences issued strictly increase", |_, s: &State| {
                let issued: Vec<u8> = s
                    .history
                    .iter()
                    .filter_map(|event| match event {
                        Event::Acquired { fence, .. } => Some(*fence),
                        _ => None,
                    })
                    .collect();
                issued.windows(2).all(|pair| pair[0] < pair[1])
                    && issued.last().is_none_or(|last| *last < s.next_fence)
            }),
            // The store never grants a lease while another client's granted lease is running
            // (crashed holders count: their lease runs until it ends).
            Property::always("at most one client holds a live claim", |_, s: &State| {
                s.clients
                    .iter()
                    .filter_map(|client| client.holding())
                    .filter(|(_, lease_until)| s.now < *lease_until)
                    .count()
                    <= 1
            }),
            // The model reaches the states the properties are about.
            Property::sometimes(
                "a completion is replayed by another client",
                |_, s: &State| s.clients.contains(&Client::Done(Ending::Replayed)),
            ),
            Property::sometimes("a crashed holder's key is taken over", |_, s: &State| {
                s.clients.iter().any(|client| match client {
                    Client::Crashed { fence, .. } => s.history.iter().any(
                        |event| matches!(event, Event::Acquired { fence: newer, .. } if newer > fence),
                    ),
                    _ => false,
                })
            }),
            Property::sometimes("a stale holder's complete is fenced", |_, s: &State| {
                s.clients.contains(&Client::Done(Ending::Unrecorded))
            }),
            Property::sometimes("a released key is acquired again", |_, s: &State| {
                s.history.iter().any(|event| {
                    matches!(
                        event,
                        Event::ClaimAfterRelease {
                            answer: Answer::Acquired { .. },
                            ..
                        }
                    )
                })
            }),
            Property::sometimes(
                "a completed record expires and the key runs again",
                |_, s: &State| {
                    s.history
                        .iter()
                        .skip_while(|event| !matches!(event, Event::Completed { .. }))
                        .any(|event| matches!(event, Event::Acquired { .. }))
                },
            ),
            Property::sometimes(
                "the heartbeat keeps a claim past its first lease",
                |_, s: &State| {
                    s.history.iter().any(|event| match *event {
                        Event::Completed { fence, at, .. } => s.history.iter().any(|acquired| {
                            matches!(*acquired, Event::Acquired { fence: f, at: from, .. }
                            if f == fence && at >= from + LEASE)
                        }),
                        _ => false,
                    })
                },
            ),
            Property::sometimes(
                "a key reused with other arguments is refused",
                |_, s: &State| s.clients.contains(&Client::Done(Ending::KeyReused)),
            ),
        ]
    }
}

/// Exhaustive breadth-first search: 724,147 unique states (MAX_TIME = 8), about 7 s in a debug
/// build on two cores. Every `always` property holds in every state, and every `sometimes`
/// property is reached.
///
/// The checker can fail. Weakening one rule of the model at a time (and putting it back):
///
/// - `complete` accepting any fence while the record's lease is live (`Record::held_by` in
///   `support/model.rs` without `*held == fence`) breaks "completion only from the current fence" in six steps: client 1
///   claims (fence 1, lease to t=2); Tick; Tick (its lease lapses); its body returns Ok;
///   client 2, with the other fingerprint, claims and gets fence 2; client 1 completes with
///   fence 1 and is applied: the record becomes `Completed { fingerprint: 1, fence: 1,
///   output: 1 }`, client 1's output filed under client 2's arguments, while client 2 still
///   runs (`newest_fence: 2, record_fence: Some(2), holder_lease_live: false`).
/// - `release` ignoring the fence breaks "at most one client holds a live claim": client 2
///   claims (fence 1); its lease lapses; client 1 claims (fence 2, lease to t=4); client 2's
///   body fails and its stale release deletes client 1's claim; client 0 claims and gets
///   fence 3 at t=2 while client 1's lease runs: two bodies run at once.
#[test]
fn the_protocol_model_checks() {
    let checker = Protocol.checker().threads(2).spawn_bfs().join();
    checker.assert_properties();
    assert_eq!(
        checker.unique_state_count(),
        724_147,
        "the model changed: check the bounds and update the count here and above"
    );
}

/// A small deterministic generator (splitmix64), so that the paths are the same on every run.
struct SplitMix64(u64);

impl SplitMix64 {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n as u64) as usize
    }
}

/// The real store, answering in the model's units.
struct Real {
    store: MemoryStore,
    clock: ManualClock,
    key: StorageKey,
}

impl Real {
    fn new() -> Self {
        let clock = ManualClock::new();
        Self {
            store: MemoryStore::builder().clock(clock.clone()).build(),
            clock,
            key: StorageKey::derive("protocol_model", None, b"the-key").unwrap(),
        }
    }

    fn run(&self, state: &State, action: Action) -> Option<Answer> {
        let lease = TICK * u32::from(LEASE);
        let fence_of = |client: Client| Fence::new(u64::from(client.holding().unwrap().0));
        let write = |w: BoxFuture<'_, Result<FencedWrite, StoreError>>| match ready(w).unwrap() {
            FencedWrite::Applied => Answer::Applied,
            FencedWrite::Fenced => Answer::Fenced,
        };
        match action {
            Action::Tick => {
                self.clock.advance(TICK);
                None
            }
            Action::Claim(c) => {
                let arguments = args(FINGERPRINTS[c]);
                let claim = self.store.claim(&self.key, &arguments, lease);
                Some(match ready(claim).unwrap() {
                    Claim::Acquired { fence } => Answer::Acquired {
                        fence: u8::try_from(fence.get()).unwrap(),
                    },
                    Claim::InProgress { retry_after } => {
                        assert_eq!(retry_after.subsec_nanos(), 0, "{retry_after:?}");
                        Answer::InProgress {
                            retry_after: u8::try_from(retry_after.as_secs()).unwrap(),
                        }
                    }
                    Claim::Completed { output } => {
                        let [output] = output[..] else {
                            panic!("recorded {output:?}")
                        };
                        Answer::Completed { output }
                    }
                    Claim::Mismatch => Answer::Mismatch,
                })
            }
            Action::Heartbeat(c) => Some(write(self.store.extend(
                &self.key,
                fence_of(state.clients[c]),
                lease,
            ))),
            Action::Complete(c) => Some(write(self.store.complete(
                &self.key,
                fence_of(state.clients[c]),
                Bytes::from(vec![c as u8]),
                TICK * u32::from(TTL),
            ))),
            Action::Release(c) => Some(write(
                self.store.release(&self.key, fence_of(state.clients[c])),
            )),
            Action::BodyOk(_) | Action::BodyErr(_) | Action::GiveUp(_) | Action::Crash(_) => None,
        }
    }
}

/// The memory store's operations are ready at once (they return `std::future::ready`), so
/// one poll with a no-op waker gets the answer.
fn ready<T>(mut operation: BoxFuture<'_, T>) -> T {
    match operation
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(answer) => answer,
        Poll::Pending => panic!("a memory store operation is not ready at once"),
    }
}

/// Which store operation and which kind of answer, to show what the random paths covered.
fn coverage_key(action: Action, answer: Answer) -> (&'static str, &'static str) {
    let operation = match action {
        Action::Claim(_) => "claim",
        Action::Heartbeat(_) => "extend",
        Action::Complete(_) => "complete",
        Action::Release(_) => "release",
        _ => unreachable!("only store operations answer"),
    };
    let answer = match answer {
        Answer::Acquired { .. } => "Acquired",
        Answer::InProgress { .. } => "InProgress",
        Answer::Completed { .. } => "Completed",
        Answer::Mismatch => "Mismatch",
        Answer::Applied => "Applied",
        Answer::Fenced => "Fenced",
    };
    (operation, answer)
}

/// 2,000 random paths through the model (fixed seed), each replayed on a fresh `MemoryStore`
/// whose `ManualClock` moves one second per `Tick`: after every store operation the real answer
/// (fence values, retry-after, recorded output, applied or fenced) must be the model's.
#[test]
fn the_memory_store_agrees_with_the_model() {
    const PATHS: usize = 2_000;
    const MAX_STEPS: usize = 40;
    let model = Protocol;
    let mut random = SplitMix64(0x1DE4_7E17);
    let mut covered: HashMap<(&str, &str), usize> = HashMap::new();
    for path in 0..PATHS {
        let real = Real::new();
        let mut state = model.init_states().remove(0);
        let mut taken = Vec::new();
        for _ in 0..MAX_STEPS {
            let mut actions = Vec::new();
            model.actions(&state, &mut actions);
            if actions.is_empty() {
                break;
            }
            let action = actions[random.below(actions.len())];
            taken.push(action);
            let (next, expected) = model.step(&state, action);
            let actual = real.run(&state, action);
            assert_eq!(
                actual, expected,
                "path {path}: the memory store and the model disagree after {taken:?}\nmodel state before: {state:#?}"
            );
            if let Some(answer) = expected {
                *covered.entry(coverage_key(action, answer)).or_default() += 1;
            }
            state = next;
        }
    }
    // Every answer of every operation came up, many times over.
    let every_answer = [
        ("claim", "Acquired"),
        ("claim", "InProgress"),
        ("claim", "Completed"),
        ("claim", "Mismatch"),
        ("extend", "Applied"),
        ("extend", "Fenced"),
        ("complete", "Applied"),
        ("complete", "Fenced"),
        ("release", "Applied"),
        ("release", "Fenced"),
    ];
    for answer in every_answer {
        let seen = covered.get(&answer).copied().unwrap_or(0);
        assert!(seen >= 20, "{answer:?} came up {seen} times: {covered:?}");
    }
}
