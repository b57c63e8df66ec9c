//! Properties of the durations a store is given: every store counts leases and ttls in whole
//! milliseconds, rounded up, and holds at most [`MAX_DURATION`], whatever it is asked for.

use std::time::{Duration, Instant};

use super::{
    Harness, LONG, Time, expect_in_progress, expect_replay, expect_write, fingerprint, show,
};
use crate::store::{Claim, FencedWrite, MAX_DURATION};

/// A lease or ttl longer than [`MAX_DURATION`] (up to `Duration::MAX`) is held as
/// `MAX_DURATION`: claim, extend and complete succeed, the key stays in progress, then
/// completed, and `retry_after` is at most `MAX_DURATION`. No store overflows a timestamp or
/// an expiry with it after the body ran.
pub async fn durations_beyond_the_maximum_are_held_as_the_maximum(h: &Harness) {
    for huge in [
        Duration::MAX,
        MAX_DURATION + Duration::from_secs(1),
        MAX_DURATION,
    ] {
        let key = h.key("durations_beyond_the_maximum");
        let fp = fingerprint(3);
        let why = format!("a lease of {huge:?}");
        let fence = h.acquire(&key, &fp, huge, &why).await;
        let second = h.claim(&key, &fp, LONG).await;
        let retry_after = expect_in_progress(&second, MAX_DURATION, &why);
        assert!(
            retry_after > MAX_DURATION / 2,
            "{why}: the store must hold it as the maximum ({MAX_DURATION:?}), but retry_after is {retry_after:?}"
        );
        expect_write(
            h.extend(&key, fence, huge).await,
            FencedWrite::Applied,
            &format!("extend with {why}"),
        );
        expect_write(
            h.complete(&key, fence, b"kept", huge).await,
            FencedWrite::Applied,
            &format!("complete with a ttl of {huge:?}"),
        );
        let replay = h.claim(&key, &fp, huge).await;
        expect_replay(
            &replay,
            b"kept",
            &format!("a replay of a record with a ttl of {huge:?}"),
        );
    }
}

/// A lease under a millisecond is held for one whole millisecond on every store (durations are
/// counted in whole milliseconds, rounded up): a second claim within that millisecond finds the
/// key in progress with `retry_after` of at most 1 ms, and once it has passed the key is free.
pub async fn sub_millisecond_leases_hold_one_millisecond(h: &Harness) {
    let tiny = Duration::from_micros(1);
    let ms = Duration::from_millis(1);
    let fp = fingerprint(4);
    match &h.time {
        Time::Manual(_) => {
            let key = h.key("sub_millisecond_leases");
            h.acquire(&key, &fp, tiny, "a claim with a 1 µs lease")
                .await;
            h.advance(Duration::from_micros(999)).await;
            let second = h.claim(&key, &fp, LONG).await;
            expect_in_progress(
                &second,
                ms,
                "999 µs after a claim with a 1 µs lease (held for a whole millisecond)",
            );
            h.advance(Duration::from_micros(2)).await;
            let third = h.claim(&key, &fp, LONG).await;
            assert!(
                matches!(third, Claim::Acquired { .. }),
                "1.001 ms after a claim with a 1 µs lease: the lease has ended and the key must be claimable, the store returned {}",
                show(&third)
            );
        }
        Time::Real { .. } => {
            // Real time cannot be stopped: a pair of claims is decisive only when both ran
            // within the millisecond, as seen from here (the store saw less time pass).
            // Pairs are tried for up to ten seconds: on a loaded machine a store whose claim
            // takes a few hundred microseconds (sqlx's) may need the load to pass first.
            let mut decisive = 0;
            let tried_until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < tried_until {
                let key = h.key("sub_millisecond_leases");
                let started = Instant::now();
                h.acquire(&key, &fp, tiny, "a claim with a 1 µs lease")
                    .await;
                let second = h.claim(&key, &fp, LONG).await;
                if started.elapsed() < Duration::from_micros(900) {
                    expect_in_progress(
                        &second,
                        ms,
                        "a second claim within a millisecond of a claim with a 1 µs lease (held for a whole millisecond)",
                    );
                    decisive += 1;
                    if decisive == 5 {
                        break;
                    }
                }
            }
            assert!(
                decisive > 0,
                "no two claims completed within a millisecond in ten seconds of tries: the property could not be checked on this machine"
            );
            let key = h.key("sub_millisecond_leases");
            h.acquire(&key, &fp, tiny, "a claim with a 1 µs lease")
                .await;
            h.advance(Duration::from_millis(20)).await;
            h.acquire(
                &key,
                &fp,
                LONG,
                "a claim 20 ms after a claim with a 1 µs lease",
            )
            .await;
        }
    }
}
