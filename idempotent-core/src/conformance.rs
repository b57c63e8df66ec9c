//! The protocol's conformance suite: one property test per rule of [`Store`](crate::Store), generic over any
//! store.
//!
//! A store's test file runs the whole suite with one line:
//!
//! ```no_run
//! use std::sync::Arc;
//! use idempotent_core::conformance::Harness;
//! use idempotent_core::{ManualClock, MemoryStore};
//!
//! idempotent_core::conformance_suite!({
//!     let clock = ManualClock::new();
//!     let store = MemoryStore::builder().clock(clock.clone()).build();
//!     Harness::with_manual_clock(Arc::new(store), clock)
//! });
//! # fn main() {}
//! ```
//!
//! Each property is also a public `async fn` taking a [`Harness`], so a test can run one of them
//! (or [`run_all`]) against a store it has set up itself. Every property uses its own fresh keys
//! (see [`Harness::key`]), so several properties may share one store or one server. A property
//! fails by panicking with what the protocol requires and what the store did.
//!
//! [`Forwarding`] wraps a store for tests that change one operation (inject a fault, note
//! what a `complete` met) and pass the others on: they write [`Hooks`] for what differs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::fingerprint::CanonicalArguments;
use crate::fingerprint::Fingerprint;
use crate::key::StorageKey;
use crate::store::{Claim, Fence, FencedWrite};

mod calls;
mod durations;
mod forwarding;
mod harness;
pub use calls::*;
pub use durations::*;
pub use forwarding::{Forwarding, Hooks};
pub use harness::Harness;
use harness::Time;

/// A lease or ttl long enough that it never runs out during a property.
const LONG: Duration = Duration::from_secs(3600);
/// The `max` passed to `wait` where the wait must end for another reason.
const WAIT_MAX: Duration = Duration::from_secs(30);
/// How long the suite lets a `wait` that must end (it was woken, or had nothing to wait for)
/// take before failing the property: a third of [`WAIT_MAX`], so a wait that ran to its `max`
/// instead of being woken always fails. A wait that ends with its holder's lease has a bound
/// of its own, relative to the lease (see [`wait_returns_when_lease_runs_out`]).
const WAIT_BOUND: Duration = WAIT_MAX.checked_div(3).unwrap();
/// How many claims race in [`concurrent_claims_have_one_winner`].
const RACERS: usize = 64;

fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// A claim for a message, with long outputs abbreviated.
fn show(claim: &Claim) -> String {
    match claim {
        Claim::Completed { output } => format!("Claim::Completed {{ output: {} }}", bytes(output)),
        other => format!("Claim::{other:?}"),
    }
}

/// Bytes for a message, abbreviated when long.
fn bytes(output: &[u8]) -> String {
    if output.len() <= 48 {
        format!("{output:?}")
    } else {
        format!("{} bytes starting {:?}", output.len(), &output[..16])
    }
}

/// Checks a fenced write's result.
#[track_caller]
fn expect_write(got: FencedWrite, want: FencedWrite, why: &str) {
    assert_eq!(
        got, want,
        "{why}: the protocol requires FencedWrite::{want:?}, the store returned FencedWrite::{got:?}"
    );
}

/// Checks that a claim replays exactly `output`.
fn expect_replay(got: &Claim, output: &[u8], why: &str) {
    match got {
        Claim::Completed { output: replayed } if replayed[..] == *output => {}
        Claim::Completed { output: replayed } => {
            let first_difference = replayed
                .iter()
                .zip(output)
                .position(|(a, b)| a != b)
                .unwrap_or(replayed.len().min(output.len()));
            panic!(
                "{why}: the protocol requires the recorded bytes back exactly ({}), the store replayed {} (first difference at byte {first_difference})",
                bytes(output),
                bytes(replayed)
            );
        }
        other => panic!(
            "{why}: the protocol requires Claim::Completed with the recorded output ({}), the store returned {}",
            bytes(output),
            show(other)
        ),
    }
}

/// Checks that a claim found the key in progress, with `retry_after` in `(0, max]`; returns it.
fn expect_in_progress(got: &Claim, max: Duration, why: &str) -> Duration {
    match got {
        Claim::InProgress { retry_after } => {
            assert!(
                !retry_after.is_zero() && *retry_after <= max,
                "{why}: the protocol requires Claim::InProgress with 0 < retry_after <= {max:?} (what is left of the holder's lease), the store returned retry_after = {retry_after:?}"
            );
            *retry_after
        }
        other => panic!(
            "{why}: the protocol requires Claim::InProgress (another caller holds a live lease), the store returned {}",
            show(other)
        ),
    }
}

/// Checks that a claim reported a fingerprint mismatch.
fn expect_mismatch(got: &Claim, why: &str) {
    assert!(
        matches!(got, Claim::Mismatch),
        "{why}: the protocol requires Claim::Mismatch (a live record has another fingerprint), the store returned {}",
        show(got)
    );
}

/// Awaits a spawned task, passing its panic on.
async fn join<T>(handle: JoinHandle<T>) -> T {
    match handle.await {
        Ok(value) => value,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => panic!("a task of the conformance suite was cancelled: {err}"),
    }
}

/// Starts `wait(key, max)` on its own task.
fn spawn_wait(h: &Harness, key: StorageKey, max: Duration) -> JoinHandle<()> {
    let store = Arc::clone(h.store());
    tokio::spawn(async move {
        store
            .wait(&key, max)
            .await
            .unwrap_or_else(|err| panic!("wait({key}) failed with a store error: {err}"));
    })
}

/// Requires a spawned `wait` to finish within [`WAIT_BOUND`].
async fn expect_wait_ends(waiter: JoinHandle<()>, why: &str) {
    let abort = waiter.abort_handle();
    match tokio::time::timeout(WAIT_BOUND, join(waiter)).await {
        Ok(()) => {}
        Err(_) => {
            abort.abort();
            panic!(
                "{why}: the protocol requires wait to return promptly, but it was still waiting after {WAIT_BOUND:?} (its max was {WAIT_MAX:?})"
            );
        }
    }
}

/// Requires `wait(key, WAIT_MAX)` to return at once.
async fn expect_wait_returns_at_once(h: &Harness, key: &StorageKey, why: &str) {
    let waited = tokio::time::timeout(WAIT_BOUND, h.store().wait(key, WAIT_MAX)).await;
    match waited {
        Ok(Ok(())) => {}
        Ok(Err(err)) => panic!("{why}: wait({key}) failed with a store error: {err}"),
        Err(_) => panic!(
            "{why}: the protocol requires wait to return at once (the key is not in progress with a live lease), but it was still waiting after {WAIT_BOUND:?}"
        ),
    }
}

/// The first claim of a fresh key acquires it, and the fence it returns holds the key.
pub async fn first_claim_acquires(h: &Harness) {
    let key = h.key("first_claim_acquires");
    let fence = h
        .acquire(
            &key,
            &fingerprint(1),
            LONG,
            "the first claim of a fresh key",
        )
        .await;
    expect_write(
        h.complete(&key, fence, b"done", LONG).await,
        FencedWrite::Applied,
        "complete with the fence the first claim returned",
    );

    let other = h.key("first_claim_acquires");
    let fence = h
        .acquire(
            &other,
            &fingerprint(2),
            LONG,
            "the first claim of another fresh key",
        )
        .await;
    expect_write(
        h.release(&other, fence).await,
        FencedWrite::Applied,
        "release with the fence the first claim returned",
    );
}

/// A second claim with the same fingerprint while the lease is live gets
/// [`Claim::InProgress`] with `0 < retry_after <= lease` (what is left of the holder's lease, not
/// the second caller's), and takes nothing over.
pub async fn second_claim_is_in_progress(h: &Harness) {
    let key = h.key("second_claim_is_in_progress");
    let fp = fingerprint(1);
    h.acquire(&key, &fp, h.lease(), "the first claim").await;
    let second = h.claim(&key, &fp, h.lease()).await;
    expect_in_progress(
        &second,
        h.lease(),
        "a second claim with the same fingerprint while the lease is live",
    );

    // retry_after is the holder's remaining lease, whatever lease the second caller asks for.
    let key = h.key("second_claim_is_in_progress");
    let fence_long = h.acquire(&key, &fp, LONG, "the first claim").await;
    let second = h.claim(&key, &fp, h.lease()).await;
    let retry_after = expect_in_progress(
        &second,
        LONG,
        "a second claim of a key held with a 1 h lease",
    );
    assert!(
        retry_after > LONG / 2,
        "a second claim of a key held with a 1 h lease: the protocol requires retry_after to be what is left of the holder's lease (about 1 h), the store returned {retry_after:?}"
    );
    let third = h.claim(&key, &fp, h.lease()).await;
    expect_in_progress(
        &third,
        LONG,
        "a third claim (the second must not have taken the key over)",
    );
    expect_write(
        h.complete(&key, fence_long, b"first", LONG).await,
        FencedWrite::Applied,
        "the holder's complete after other claims found the key in progress",
    );
}

/// `complete` then `claim` replays the exact bytes: JSON, empty, non-UTF-8, every byte value,
/// and 256 KiB.
pub async fn completed_claim_replays_exact_bytes(h: &Harness) {
    let large: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let outputs: [(&str, Vec<u8>); 5] = [
        ("JSON", b"{\"receipt\":\"r-1\",\"amount\":42}".to_vec()),
        ("empty", Vec::new()),
        ("non-UTF-8", vec![0xff, 0xfe, 0x00, 0x80, 0xc3, 0x28, 0x00]),
        ("every byte value", (0..=255u8).collect()),
        ("256 KiB", large),
    ];
    let fp = fingerprint(1);
    for (what, output) in outputs {
        let key = h.key("completed_claim_replays_exact_bytes");
        let fence = h.acquire(&key, &fp, LONG, "the first claim").await;
        expect_write(
            h.complete(&key, fence, &output, LONG).await,
            FencedWrite::Applied,
            &format!("the holder's complete with a {what} output"),
        );
        for attempt in ["first", "second"] {
            let replay = h.claim(&key, &fp, LONG).await;
            expect_replay(
                &replay,
                &output,
                &format!("the {attempt} claim after completing with a {what} output"),
            );
        }
    }
}

/// Another fingerprint gets [`Claim::Mismatch`] while the key is in progress and after it is
/// completed, and changes nothing.
pub async fn other_fingerprint_is_mismatch(h: &Harness) {
    let key = h.key("other_fingerprint_is_mismatch");
    let (fp, other) = (fingerprint(1), fingerprint(2));
    let fence = h.acquire(&key, &fp, LONG, "the first claim").await;
    expect_mismatch(
        &h.claim(&key, &other, LONG).await,
        "a claim with another fingerprint while the key is in progress",
    );
    expect_in_progress(
        &h.claim(&key, &fp, LONG).await,
        LONG,
        "a claim with the holder's fingerprint after a mismatched claim (which must change nothing)",
    );
    expect_write(
        h.complete(&key, fence, b"first", LONG).await,
        FencedWrite::Applied,
        "the holder's complete after a mismatched claim",
    );
    expect_mismatch(
        &h.claim(&key, &other, LONG).await,
        "a claim with another fingerprint after the key was completed",
    );
    expect_replay(
        &h.claim(&key, &fp, LONG).await,
        b"first",
        "a claim with the original fingerprint after a mismatched one (complete keeps the fingerprint)",
    );
}

/// `complete`, `release` and `extend` with a stale fence (a holder whose lease expired and
/// another claimed, or a fence never issued) get [`FencedWrite::Fenced`] and change nothing;
/// the current holder's `complete` still works and the replay shows its bytes.
pub async fn stale_fence_is_fenced(h: &Harness) {
    let key = h.key("stale_fence_is_fenced");
    let fp = fingerprint(1);
    let old = h.acquire(&key, &fp, h.lease(), "the first claim").await;
    h.advance(h.beyond(h.lease())).await;
    let current = h
        .acquire(
            &key,
            &fp,
            LONG,
            "a claim after the first holder's lease expired",
        )
        .await;
    h.check_newer(
        old,
        current,
        "a claim after the first holder's lease expired",
    );

    let stale: Vec<(Fence, &str)> = [
        (old, "the expired holder's fence"),
        (Fence::new(0), "a never-issued fence (0)"),
        (Fence::new(u64::MAX), "a never-issued fence (u64::MAX)"),
    ]
    .into_iter()
    .filter(|(fence, _)| *fence != current)
    .collect();
    for (fence, what) in &stale {
        expect_write(
            h.complete(&key, *fence, b"stale", LONG).await,
            FencedWrite::Fenced,
            &format!("complete with {what} ({fence}) while {current} holds the key"),
        );
        expect_write(
            h.extend(&key, *fence, Duration::from_millis(1)).await,
            FencedWrite::Fenced,
            &format!("extend with {what} ({fence}) while {current} holds the key"),
        );
        expect_write(
            h.release(&key, *fence).await,
            FencedWrite::Fenced,
            &format!("release with {what} ({fence}) while {current} holds the key"),
        );
        // A stale complete would show as Completed, a stale release as Acquired, a stale
        // extend (to 1 ms) as a tiny retry_after.
        let after = h.claim(&key, &fp, LONG).await;
        let retry_after = expect_in_progress(
            &after,
            LONG,
            &format!("a claim after fenced writes with {what} (they must change nothing)"),
        );
        assert!(
            retry_after > LONG / 2,
            "a claim after extend(1 ms) with {what}: the protocol requires the fenced extend to change nothing (the current lease is 1 h), the store returned retry_after = {retry_after:?}"
        );
    }

    expect_write(
        h.complete(&key, current, b"current", LONG).await,
        FencedWrite::Applied,
        "the current holder's complete after stale fenced writes",
    );
    expect_replay(
        &h.claim(&key, &fp, LONG).await,
        b"current",
        "a claim after the current holder completed",
    );
    for (fence, what) in &stale {
        expect_write(
            h.complete(&key, *fence, b"stale", LONG).await,
            FencedWrite::Fenced,
            &format!("complete with {what} ({fence}) after the current holder completed"),
        );
        expect_write(
            h.release(&key, *fence).await,
            FencedWrite::Fenced,
            &format!("release with {what} ({fence}) after the current holder completed"),
        );
        expect_write(
            h.extend(&key, *fence, LONG).await,
            FencedWrite::Fenced,
            &format!("extend with {what} ({fence}) after the current holder completed"),
        );
    }
    // Nor may the current holder's own fence touch its completed record: a second complete
    // (the engine retries one whose answer was lost) changes nothing, nor does a release.
    expect_write(
        h.complete(&key, current, b"again", LONG).await,
        FencedWrite::Fenced,
        "a second complete by the holder after it completed",
    );
    expect_write(
        h.release(&key, current).await,
        FencedWrite::Fenced,
        "release by the holder after it completed",
    );
    expect_replay(
        &h.claim(&key, &fp, LONG).await,
        b"current",
        "a claim after stale completes, releases and extends of a completed key",
    );
}

/// An expired lease can be claimed again (also with another fingerprint), with a strictly
/// larger fence; the old holder's `complete` is then [`FencedWrite::Fenced`].
pub async fn expired_lease_can_be_claimed_again(h: &Harness) {
    let key = h.key("expired_lease_can_be_claimed_again");
    let other_key = h.key("expired_lease_can_be_claimed_again");
    let fp = fingerprint(1);
    let old = h.acquire(&key, &fp, h.lease(), "the first claim").await;
    let other_old = h
        .acquire(&other_key, &fp, h.lease(), "the first claim")
        .await;
    h.advance(h.beyond(h.lease())).await;

    let new = h
        .acquire(&key, &fp, LONG, "a claim after the holder's lease expired")
        .await;
    h.check_newer(old, new, "a claim after the holder's lease expired");
    expect_write(
        h.complete(&key, old, b"old", LONG).await,
        FencedWrite::Fenced,
        "the expired holder's complete after another caller claimed the key",
    );
    expect_write(
        h.complete(&key, new, b"new", LONG).await,
        FencedWrite::Applied,
        "the new holder's complete",
    );
    expect_replay(
        &h.claim(&key, &fp, LONG).await,
        b"new",
        "a claim after the new holder completed",
    );

    let other_new = h
        .acquire(
            &other_key,
            &fingerprint(2),
            LONG,
            "a claim with another fingerprint after the holder's lease expired",
        )
        .await;
    h.check_newer(
        other_old,
        other_new,
        "a claim with another fingerprint after the holder's lease expired",
    );
    expect_write(
        h.complete(&other_key, other_old, b"old", LONG).await,
        FencedWrite::Fenced,
        "the expired holder's complete after a claim with another fingerprint",
    );
    expect_write(
        h.complete(&other_key, other_new, b"new", LONG).await,
        FencedWrite::Applied,
        "the new holder's complete",
    );
    expect_replay(
        &h.claim(&other_key, &fingerprint(2), LONG).await,
        b"new",
        "a claim with the new fingerprint after its holder completed",
    );
}

/// An expired completed record can be claimed again ([`Claim::Acquired`] with a larger fence),
/// also with another fingerprint.
pub async fn expired_completed_record_can_be_claimed_again(h: &Harness) {
    let key = h.key("expired_completed_record_can_be_claimed_again");
    let other_key = h.key("expired_completed_record_can_be_claimed_again");
    let (fp, other) = (fingerprint(1), fingerprint(2));
    let ttl = h.lease() * 2;
    let old = h.acquire(&key, &fp, LONG, "the first claim").await;
    let other_old = h.acquire(&other_key, &fp, LONG, "the first claim").await;
    for (key, fence) in [(&key, old), (&other_key, other_old)] {
        expect_write(
            h.complete(key, fence, b"old", ttl).await,
            FencedWrite::Applied,
            "the holder's complete",
        );
        expect_replay(
            &h.claim(key, &fp, LONG).await,
            b"old",
            "a claim right after completing (the ttl has not passed)",
        );
    }
    h.advance(h.beyond(ttl)).await;

    let new = h
        .acquire(
            &key,
            &fp,
            LONG,
            "a claim after the completed record's ttl passed",
        )
        .await;
    h.check_newer(old, new, "a claim after the completed record's ttl passed");
    let other_new = h
        .acquire(
            &other_key,
            &other,
            LONG,
            "a claim with another fingerprint after the completed record's ttl passed",
        )
        .await;
    h.check_newer(
        other_old,
        other_new,
        "a claim with another fingerprint after the completed record's ttl passed",
    );
    expect_write(
        h.complete(&key, old, b"stale", LONG).await,
        FencedWrite::Fenced,
        "complete with the fence of the expired completed record",
    );
    expect_write(
        h.complete(&key, new, b"new", LONG).await,
        FencedWrite::Applied,
        "the new holder's complete",
    );
    expect_replay(
        &h.claim(&key, &fp, LONG).await,
        b"new",
        "a claim after the new holder completed",
    );
    expect_write(
        h.complete(&other_key, other_new, b"other", LONG).await,
        FencedWrite::Applied,
        "the new holder's complete (another fingerprint)",
    );
    expect_replay(
        &h.claim(&other_key, &other, LONG).await,
        b"other",
        "a claim with the new fingerprint after its holder completed",
    );
    expect_mismatch(
        &h.claim(&other_key, &fp, LONG).await,
        "a claim with the old fingerprint after the key was completed with a new one",
    );
}

/// `release` makes the key claimable at once ([`Claim::Acquired`]); the released fence is then
/// [`FencedWrite::Fenced`]; `release` after `complete` is Fenced and deletes nothing.
pub async fn release_frees_key_at_once(h: &Harness) {
    let key = h.key("release_frees_key_at_once");
    let fp = fingerprint(1);
    let first = h.acquire(&key, &fp, LONG, "the first claim").await;
    expect_write(
        h.release(&key, first).await,
        FencedWrite::Applied,
        "the holder's release",
    );
    let second = h
        .acquire(&key, &fp, LONG, "a claim right after the holder released")
        .await;
    h.check_newer(first, second, "a claim right after the holder released");
    expect_write(
        h.release(&key, first).await,
        FencedWrite::Fenced,
        "a second release with the released fence",
    );
    expect_write(
        h.complete(&key, first, b"released", LONG).await,
        FencedWrite::Fenced,
        "complete with the released fence",
    );
    expect_write(
        h.complete(&key, second, b"second", LONG).await,
        FencedWrite::Applied,
        "the new holder's complete",
    );
    expect_write(
        h.release(&key, second).await,
        FencedWrite::Fenced,
        "release after complete (a completed record is not deleted by release)",
    );
    expect_replay(
        &h.claim(&key, &fp, LONG).await,
        b"second",
        "a claim after a release of a completed record (which must delete nothing)",
    );

    let other_key = h.key("release_frees_key_at_once");
    let fence = h.acquire(&other_key, &fp, LONG, "the first claim").await;
    expect_write(
        h.release(&other_key, fence).await,
        FencedWrite::Applied,
        "the holder's release",
    );
    h.acquire(
        &other_key,
        &fingerprint(2),
        LONG,
        "a claim with another fingerprint right after the holder released",
    )
    .await;
}

/// `extend` keeps a lease alive past its original end; `extend` after the lease expired is
/// [`FencedWrite::Fenced`] and revives nothing.
pub async fn extend_keeps_lease_alive(h: &Harness) {
    let key = h.key("extend_keeps_lease_alive");
    let fp = fingerprint(1);
    let lease = h.lease();
    let fence = h.acquire(&key, &fp, lease, "the first claim").await;
    h.advance(lease * 2 / 3).await;
    expect_write(
        h.extend(&key, fence, lease).await,
        FencedWrite::Applied,
        "the holder's extend two thirds into its lease",
    );
    h.advance(lease * 2 / 3).await;
    expect_in_progress(
        &h.claim(&key, &fp, lease).await,
        lease,
        "a claim after the original lease's end, within the extended lease",
    );
    expect_write(
        h.extend(&key, fence, lease).await,
        FencedWrite::Applied,
        "the holder's second extend within the extended lease",
    );
    h.advance(h.beyond(lease)).await;
    expect_write(
        h.extend(&key, fence, LONG).await,
        FencedWrite::Fenced,
        "extend after the lease expired",
    );
    let next = h
        .acquire(
            &key,
            &fp,
            LONG,
            "a claim after the lease expired (a late extend must not revive it)",
        )
        .await;
    h.check_newer(fence, next, "a claim after the lease expired");
    expect_write(
        h.complete(&key, fence, b"late", LONG).await,
        FencedWrite::Fenced,
        "the expired holder's complete",
    );
}

/// `complete` (and `release`, `extend`) after the lease expired is [`FencedWrite::Fenced`] even
/// when nobody else claimed: fenced writes apply only while the fence holds a live lease.
pub async fn complete_after_lease_expired_is_fenced(h: &Harness) {
    let key = h.key("complete_after_lease_expired_is_fenced");
    let fp = fingerprint(1);
    let fence = h.acquire(&key, &fp, h.lease(), "the first claim").await;
    h.advance(h.beyond(h.lease())).await;
    expect_write(
        h.complete(&key, fence, b"late", LONG).await,
        FencedWrite::Fenced,
        "complete after the lease expired, nobody else having claimed",
    );
    expect_write(
        h.extend(&key, fence, LONG).await,
        FencedWrite::Fenced,
        "extend after the lease expired, nobody else having claimed",
    );
    expect_write(
        h.release(&key, fence).await,
        FencedWrite::Fenced,
        "release after the lease expired, nobody else having claimed",
    );
    // A late complete would replay here, a late extend would show as InProgress.
    let next = h
        .acquire(
            &key,
            &fp,
            LONG,
            "a claim after late fenced writes to an expired lease (they must change nothing)",
        )
        .await;
    h.check_newer(fence, next, "a claim after the lease expired");
}

/// `wait` returns promptly when the holder completes (never only at its `max`), and not before.
pub async fn wait_returns_when_holder_completes(h: &Harness) {
    let key = h.key("wait_returns_when_holder_completes");
    let fp = fingerprint(1);
    let fence = h.acquire(&key, &fp, LONG, "the first claim").await;
    let waiters: Vec<_> = (0..3).map(|_| spawn_wait(h, key, WAIT_MAX)).collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for waiter in &waiters {
        assert!(
            !waiter.is_finished(),
            "wait on a key in progress with a 1 h lease: the protocol requires wait to block until the key leaves in-progress (or max = {WAIT_MAX:?}), it returned at once"
        );
    }
    expect_write(
        h.complete(&key, fence, b"done", LONG).await,
        FencedWrite::Applied,
        "the holder's complete while others wait",
    );
    for waiter in waiters {
        expect_wait_ends(waiter, "wait while the holder completes").await;
    }
    expect_replay(
        &h.claim(&key, &fp, LONG).await,
        b"done",
        "a claim after the wait ended",
    );
}

/// `wait` returns promptly when the holder releases.
pub async fn wait_returns_when_holder_releases(h: &Harness) {
    let key = h.key("wait_returns_when_holder_releases");
    let fp = fingerprint(1);
    let fence = h.acquire(&key, &fp, LONG, "the first claim").await;
    let waiters: Vec<_> = (0..3).map(|_| spawn_wait(h, key, WAIT_MAX)).collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for waiter in &waiters {
        assert!(
            !waiter.is_finished(),
            "wait on a key in progress with a 1 h lease: the protocol requires wait to block until the key leaves in-progress (or max = {WAIT_MAX:?}), it returned at once"
        );
    }
    expect_write(
        h.release(&key, fence).await,
        FencedWrite::Applied,
        "the holder's release while others wait",
    );
    for waiter in waiters {
        expect_wait_ends(waiter, "wait while the holder releases").await;
    }
    h.acquire(&key, &fp, LONG, "a claim after the wait ended")
        .await;
}

/// `wait` returns (by the lease's end at the latest) when the holder's lease runs out: within
/// a lease and a margin of the wait's start, however long its `max`. (A store that reads a
/// manual clock may sleep in real time for what was left of the lease when the wait began.)
pub async fn wait_returns_when_lease_runs_out(h: &Harness) {
    let key = h.key("wait_returns_when_lease_runs_out");
    let fp = fingerprint(1);
    let fence = h.acquire(&key, &fp, h.lease(), "the first claim").await;
    let started = tokio::time::Instant::now();
    let waiter = spawn_wait(h, key, WAIT_MAX);
    // Let the waiter start waiting before the lease runs out.
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.advance(h.beyond(h.lease())).await;
    let bound = h.beyond(h.lease()) + h.lease();
    let abort = waiter.abort_handle();
    if tokio::time::timeout_at(started + bound, join(waiter))
        .await
        .is_err()
    {
        abort.abort();
        panic!(
            "wait while the holder's lease ({:?}) runs out: the protocol requires wait to return by the lease's end, but it was still waiting {bound:?} after it began (its max was {WAIT_MAX:?})",
            h.lease()
        );
    }
    let next = h
        .acquire(&key, &fp, LONG, "a claim after the lease ran out")
        .await;
    h.check_newer(fence, next, "a claim after the lease ran out");
}

/// `wait` on a key in progress gives up after its `max`.
pub async fn wait_gives_up_after_max(h: &Harness) {
    let key = h.key("wait_gives_up_after_max");
    let fp = fingerprint(1);
    let fence = h.acquire(&key, &fp, LONG, "the first claim").await;
    let waiter = spawn_wait(h, key, Duration::from_millis(200));
    let abort = waiter.abort_handle();
    if tokio::time::timeout(WAIT_BOUND, join(waiter))
        .await
        .is_err()
    {
        abort.abort();
        panic!(
            "wait(max = 200 ms) on a key held with a 1 h lease: the protocol requires wait to return after max, it was still waiting after {WAIT_BOUND:?}"
        );
    }
    expect_in_progress(
        &h.claim(&key, &fp, LONG).await,
        LONG,
        "a claim after a wait gave up (waiting changes nothing)",
    );
    expect_write(
        h.release(&key, fence).await,
        FencedWrite::Applied,
        "the holder's release",
    );
}

/// `wait` on a key that is not in progress with a live lease (absent, completed, released,
/// expired) returns at once.
pub async fn wait_returns_at_once_when_not_in_progress(h: &Harness) {
    let fp = fingerprint(1);
    let absent = h.key("wait_returns_at_once_when_not_in_progress");
    expect_wait_returns_at_once(h, &absent, "wait on an absent key").await;

    let completed = h.key("wait_returns_at_once_when_not_in_progress");
    let fence = h.acquire(&completed, &fp, LONG, "the first claim").await;
    expect_write(
        h.complete(&completed, fence, b"done", LONG).await,
        FencedWrite::Applied,
        "the holder's complete",
    );
    expect_wait_returns_at_once(h, &completed, "wait on a completed key").await;

    let released = h.key("wait_returns_at_once_when_not_in_progress");
    let fence = h.acquire(&released, &fp, LONG, "the first claim").await;
    expect_write(
        h.release(&released, fence).await,
        FencedWrite::Applied,
        "the holder's release",
    );
    expect_wait_returns_at_once(h, &released, "wait on a released key").await;

    let expired = h.key("wait_returns_at_once_when_not_in_progress");
    h.acquire(&expired, &fp, h.lease(), "the first claim").await;
    h.advance(h.beyond(h.lease())).await;
    expect_wait_returns_at_once(h, &expired, "wait on a key whose lease expired").await;
}

/// 64 concurrent claims of one key (spawned tasks started together) give exactly one
/// [`Claim::Acquired`] and 63 [`Claim::InProgress`].
pub async fn concurrent_claims_have_one_winner(h: &Harness) {
    for round in 0..3 {
        let key = h.key("concurrent_claims_have_one_winner");
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let racers: Vec<JoinHandle<Claim>> = (0..RACERS)
            .map(|_| {
                let store = Arc::clone(h.store());
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    let fp = fingerprint(1);
                    barrier.wait().await;
                    store
                        .claim(&key, &CanonicalArguments::from(fp), LONG)
                        .await
                        .unwrap_or_else(|err| {
                            panic!("claim({key}) failed with a store error: {err}")
                        })
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut in_progress = 0;
        let mut others = Vec::new();
        for racer in racers {
            match join(racer).await {
                Claim::Acquired { fence } => winners.push(fence),
                Claim::InProgress { .. } => in_progress += 1,
                other => others.push(show(&other)),
            }
        }
        assert!(
            winners.len() == 1 && in_progress == RACERS - 1,
            "{RACERS} concurrent claims of one fresh key (round {round}): the protocol requires exactly 1 Acquired and {} InProgress, the store gave {} Acquired (fences {winners:?}), {in_progress} InProgress and {others:?}",
            RACERS - 1,
            winners.len()
        );
        expect_write(
            h.complete(&key, winners[0], b"winner", LONG).await,
            FencedWrite::Applied,
            "the winner's complete",
        );
    }
}

/// Keys are independent: completing, releasing or expiring one key does not affect another, and
/// one key's fence is no good on another.
pub async fn keys_are_independent(h: &Harness) {
    let (a, b) = (h.key("keys_are_independent"), h.key("keys_are_independent"));
    let fp = fingerprint(1);
    let fence_a = h.acquire(&a, &fp, LONG, "the first claim of key A").await;
    let fence_b = h.acquire(&b, &fp, LONG, "the first claim of key B").await;
    assert_ne!(
        fence_a, fence_b,
        "claims of two keys: the protocol requires fences never handed out twice, the store gave both {fence_a}"
    );
    expect_write(
        h.complete(&b, fence_a, b"cross", LONG).await,
        FencedWrite::Fenced,
        "complete of key B with key A's fence",
    );
    expect_write(
        h.release(&a, fence_b).await,
        FencedWrite::Fenced,
        "release of key A with key B's fence",
    );
    expect_write(
        h.complete(&a, fence_a, b"output A", LONG).await,
        FencedWrite::Applied,
        "the holder's complete of key A",
    );
    expect_in_progress(
        &h.claim(&b, &fp, LONG).await,
        LONG,
        "a claim of key B after key A was completed",
    );
    expect_write(
        h.complete(&b, fence_b, b"output B", LONG).await,
        FencedWrite::Applied,
        "the holder's complete of key B",
    );
    expect_replay(
        &h.claim(&a, &fp, LONG).await,
        b"output A",
        "a claim of key A",
    );
    expect_replay(
        &h.claim(&b, &fp, LONG).await,
        b"output B",
        "a claim of key B",
    );

    // One key's lease running out leaves another's alone.
    let (c, d) = (h.key("keys_are_independent"), h.key("keys_are_independent"));
    h.acquire(&c, &fp, h.lease(), "the first claim of key C")
        .await;
    let fence_d = h.acquire(&d, &fp, LONG, "the first claim of key D").await;
    h.advance(h.beyond(h.lease())).await;
    h.acquire(&c, &fp, LONG, "a claim of key C after its lease expired")
        .await;
    expect_in_progress(
        &h.claim(&d, &fp, LONG).await,
        LONG,
        "a claim of key D (1 h lease) after key C's lease expired",
    );
    expect_write(
        h.extend(&d, fence_d, LONG).await,
        FencedWrite::Applied,
        "the holder's extend of key D after key C's lease expired",
    );
}

/// Fences never repeat over many claim / release / complete / expire cycles of one key and of
/// several keys (also across [`Store::purge_expired`](crate::Store::purge_expired)); where the store says fences grow, they
/// grow strictly per key.
pub async fn fences_never_repeat(h: &Harness) {
    const KEYS: usize = 4;
    const ROUNDS: usize = 4;
    let keys: Vec<StorageKey> = (0..KEYS).map(|_| h.key("fences_never_repeat")).collect();
    let fp = fingerprint(1);
    let lease = h.lease();
    let mut per_key: HashMap<StorageKey, Vec<Fence>> = HashMap::new();
    let mut seen: HashMap<Fence, StorageKey> = HashMap::new();

    let mut issued = |key: StorageKey, fence: Fence, how: &str| {
        if let Some(earlier) = seen.insert(fence, key) {
            panic!(
                "{how}: the protocol requires fences never handed out twice, the store handed out {fence} again (first for key {earlier}, now for key {key})"
            );
        }
        let fences = per_key.entry(key).or_default();
        if let Some(&last) = fences.last() {
            h.check_newer(last, fence, how);
        }
        fences.push(fence);
    };

    // Release cycles: the key is free again at once.
    for _ in 0..12 {
        let fence = h
            .acquire(&keys[0], &fp, LONG, "a claim after a release")
            .await;
        issued(keys[0], fence, "a claim after a release");
        expect_write(
            h.release(&keys[0], fence).await,
            FencedWrite::Applied,
            "the holder's release",
        );
    }
    // Rounds over several keys, each key freed in turn by release, by an expired completed
    // record, or by an expired lease.
    for round in 0..ROUNDS {
        for (i, key) in keys.iter().enumerate() {
            let how = "a claim of a key freed by release, ttl or lease expiry";
            let fence = h.acquire(key, &fp, lease, how).await;
            issued(*key, fence, how);
            match (round + i) % 3 {
                0 => expect_write(
                    h.release(key, fence).await,
                    FencedWrite::Applied,
                    "the holder's release",
                ),
                1 => expect_write(
                    h.complete(key, fence, b"done", lease).await,
                    FencedWrite::Applied,
                    "the holder's complete (ttl = lease)",
                ),
                _ => {}
            }
        }
        h.advance(h.beyond(lease)).await;
        if round % 2 == 1 {
            h.store()
                .purge_expired()
                .await
                .unwrap_or_else(|err| panic!("purge_expired failed with a store error: {err}"));
        }
    }
}

/// [`Store::purge_expired`](crate::Store::purge_expired) removes expired records (counting at least those) and never a live
/// one: live in-progress and completed records answer the same after it.
pub async fn purge_removes_only_expired(h: &Harness) {
    let (fp, other) = (fingerprint(1), fingerprint(2));
    let lease = h.lease();
    let expired_lease = h.key("purge_removes_only_expired");
    let expired_lease_other_fp = h.key("purge_removes_only_expired");
    let expired_completed = h.key("purge_removes_only_expired");
    let live_lease = h.key("purge_removes_only_expired");
    let live_completed = h.key("purge_removes_only_expired");

    let old_lease = h
        .acquire(&expired_lease, &fp, lease, "the first claim")
        .await;
    let old_other = h
        .acquire(&expired_lease_other_fp, &other, lease, "the first claim")
        .await;
    let old_completed = h
        .acquire(&expired_completed, &fp, LONG, "the first claim")
        .await;
    expect_write(
        h.complete(&expired_completed, old_completed, b"short", lease)
            .await,
        FencedWrite::Applied,
        "the holder's complete (ttl = lease)",
    );
    let live = h.acquire(&live_lease, &fp, LONG, "the first claim").await;
    let done = h
        .acquire(&live_completed, &fp, LONG, "the first claim")
        .await;
    expect_write(
        h.complete(&live_completed, done, b"kept", LONG).await,
        FencedWrite::Applied,
        "the holder's complete (ttl = 1 h)",
    );

    h.advance(h.beyond(lease)).await;
    let purged = h
        .store()
        .purge_expired()
        .await
        .unwrap_or_else(|err| panic!("purge_expired failed with a store error: {err}"));
    if !h.native_expiry {
        assert!(
            purged >= 3,
            "purge_expired after 3 records expired: the protocol requires it to delete and count at least those 3, the store returned {purged}"
        );
    }

    // Live records answer as before.
    let retry_after = expect_in_progress(
        &h.claim(&live_lease, &fp, LONG).await,
        LONG,
        "a claim of a live in-progress record after purge_expired",
    );
    assert!(
        retry_after > LONG / 2,
        "a claim of a record held with a 1 h lease after purge_expired: the protocol requires its lease untouched, the store returned retry_after = {retry_after:?}"
    );
    expect_replay(
        &h.claim(&live_completed, &fp, LONG).await,
        b"kept",
        "a claim of a live completed record after purge_expired",
    );
    expect_mismatch(
        &h.claim(&live_completed, &other, LONG).await,
        "a claim with another fingerprint of a live completed record after purge_expired",
    );
    expect_write(
        h.complete(&live_lease, live, b"live", LONG).await,
        FencedWrite::Applied,
        "the live holder's complete after purge_expired",
    );
    expect_replay(
        &h.claim(&live_lease, &fp, LONG).await,
        b"live",
        "a claim after the live holder completed",
    );

    // Expired records are gone: their old fences are fenced, their keys free.
    expect_write(
        h.complete(&expired_lease, old_lease, b"late", LONG).await,
        FencedWrite::Fenced,
        "the expired holder's complete after purge_expired",
    );
    let new = h
        .acquire(
            &expired_lease,
            &fp,
            LONG,
            "a claim of a purged expired lease",
        )
        .await;
    h.check_newer(old_lease, new, "a claim of a purged expired lease");
    let new = h
        .acquire(
            &expired_lease_other_fp,
            &fp,
            LONG,
            "a claim with another fingerprint of a purged expired lease",
        )
        .await;
    h.check_newer(old_other, new, "a claim of a purged expired lease");
    let new = h
        .acquire(
            &expired_completed,
            &other,
            LONG,
            "a claim of a purged expired completed record",
        )
        .await;
    h.check_newer(
        old_completed,
        new,
        "a claim of a purged expired completed record",
    );
}

/// `remove` deletes a record whatever its state and says whether there was one; the key is
/// then claimable at once, and other keys are untouched.
pub async fn remove_deletes_any_record(h: &Harness) {
    let store = h.store();
    let remove = |key: StorageKey| async move {
        store
            .remove(&key)
            .await
            .unwrap_or_else(|err| panic!("remove({key}) failed with a store error: {err}"))
    };
    let fp = fingerprint(1);
    let (completed, in_progress, absent, bystander) = (
        h.key("remove_completed"),
        h.key("remove_in_progress"),
        h.key("remove_absent"),
        h.key("remove_bystander"),
    );
    let fence = h.acquire(&completed, &fp, LONG, "the first claim").await;
    expect_write(
        h.complete(&completed, fence, b"done", LONG).await,
        FencedWrite::Applied,
        "complete",
    );
    h.acquire(&in_progress, &fp, LONG, "the first claim").await;
    let bystander_fence = h.acquire(&bystander, &fp, LONG, "the first claim").await;
    expect_write(
        h.complete(&bystander, bystander_fence, b"kept", LONG).await,
        FencedWrite::Applied,
        "complete",
    );

    assert!(
        remove(completed).await,
        "remove of a completed record: the protocol requires true"
    );
    assert!(
        remove(in_progress).await,
        "remove of an in-progress record: the protocol requires true"
    );
    assert!(
        !remove(absent).await,
        "remove of an absent key: the protocol requires false"
    );
    h.acquire(
        &completed,
        &fp,
        LONG,
        "a claim after the completed record was removed",
    )
    .await;
    h.acquire(
        &in_progress,
        &fp,
        LONG,
        "a claim after the in-progress record was removed",
    )
    .await;
    expect_replay(
        &h.claim(&bystander, &fp, LONG).await,
        b"kept",
        "another key after removals",
    );
}

// `run_all`, made from the one list of properties.
macro_rules! define_run_all {
    ([$($property:ident),* $(,)?]) => {
        /// Every property in turn, on one harness: the same list of properties that
        /// [`conformance_suite!`](crate::conformance_suite!) makes one test each of.
        pub async fn run_all(h: &Harness) {
            $($property(h).await;)*
        }
    };
}
crate::__conformance_properties!(define_run_all!());

/// Runs the whole conformance suite against a store: one test per property, each named after
/// the property (`first_claim_acquires`, `stale_fence_is_fenced`, ...).
///
/// `$make_harness` is an expression giving a [`Harness`](crate::conformance::Harness); it is
/// evaluated afresh in every test, inside an `async` test body, so it may `.await`
/// (e.g. `conformance_suite!(async { Harness::with_real_time(connect().await, short) }.await)`).
///
/// Each test is a `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`: the calling
/// crate must have `tokio` as a dev-dependency with the `macros` and `rt-multi-thread`
/// features. Invoke the macro once per module (the tests' names would clash otherwise).
///
/// ```no_run
/// use std::sync::Arc;
/// use idempotent_core::conformance::Harness;
/// use idempotent_core::{ManualClock, MemoryStore};
///
/// idempotent_core::conformance_suite!({
///     let clock = ManualClock::new();
///     let store = MemoryStore::builder().clock(clock.clone()).build();
///     Harness::with_manual_clock(Arc::new(store), clock)
/// });
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($make_harness:expr $(,)?) => {
        $crate::__conformance_properties!($crate::__conformance_tests!(($make_harness)));
    };
}

/// The suite's properties, listed once: calls `$then!(<its arguments> [property, ...])`.
/// Both [`run_all`] and [`conformance_suite!`] are made from this list, so a property added
/// here is run by both. A property is a `pub async fn(&Harness)` of this module (or of
/// `calls` or `durations`, re-exported here); the test `every_property_is_listed` below fails
/// while one is missing from the list.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_properties {
    ($($then:ident)::+ ! ($($args:tt)*)) => {
        $($then)::+! {
            $($args)*
            [
            first_claim_acquires,
            second_claim_is_in_progress,
            completed_claim_replays_exact_bytes,
            other_fingerprint_is_mismatch,
            stale_fence_is_fenced,
            expired_lease_can_be_claimed_again,
            expired_completed_record_can_be_claimed_again,
            release_frees_key_at_once,
            extend_keeps_lease_alive,
            complete_after_lease_expired_is_fenced,
            wait_returns_when_holder_completes,
            wait_returns_when_holder_releases,
            wait_returns_when_lease_runs_out,
            wait_gives_up_after_max,
            wait_returns_at_once_when_not_in_progress,
            concurrent_claims_have_one_winner,
            keys_are_independent,
            fences_never_repeat,
            purge_removes_only_expired,
            remove_deletes_any_record,
            durations_beyond_the_maximum_are_held_as_the_maximum,
            sub_millisecond_leases_hold_one_millisecond,
            a_call_dropped_after_its_body_ran_keeps_its_key,
            a_body_that_reenters_its_own_key_is_refused_at_once,
            ]
        }
    };
}

/// One test per named property: the body of [`conformance_suite!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    (($make_harness:expr) [$($property:ident),* $(,)?]) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $property() {
                let h: $crate::conformance::Harness = $make_harness;
                $crate::conformance::$property(&h).await;
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    /// The names in the one list of properties.
    macro_rules! listed {
        ([$($property:ident),* $(,)?]) => {
            [$(stringify!($property)),*]
        };
    }

    /// Every `pub async fn` at the top level of the properties' files is in the list, once,
    /// and the list names nothing else: a property written but not listed would be run by
    /// neither `run_all` nor `conformance_suite!`.
    #[test]
    fn every_property_is_listed() {
        let sources = [
            include_str!("conformance.rs"),
            include_str!("conformance/calls.rs"),
            include_str!("conformance/durations.rs"),
        ];
        let mut written: Vec<&str> = sources
            .iter()
            .flat_map(|source| source.lines())
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .map(|rest| rest.split('(').next().unwrap_or(rest))
            .filter(|name| *name != "run_all")
            .collect();
        let mut listed: Vec<&str> = crate::__conformance_properties!(listed!()).to_vec();
        written.sort_unstable();
        listed.sort_unstable();
        assert_eq!(
            listed, written,
            "the list in __conformance_properties! must name every `pub async fn` property of conformance.rs, conformance/calls.rs and conformance/durations.rs, once"
        );
    }
}
