//! Properties of whole calls through the engine ([`Idempotency`]), over any store: what a
//! caller sees when the faults of a real service (a request timeout, a client disconnect, a
//! store that answers slowly or fails once) meet the protocol.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Forwarding, Harness, Hooks, LONG, WAIT_BOUND, expect_replay, fingerprint};
use crate::engine::{Call, Idempotency, Outcome};
use crate::error::{Error, StoreError};
use crate::fingerprint::CanonicalArguments;
use crate::key::StorageKey;
use crate::options::{OnConflict, Options};
use crate::store::{BoxFuture, Bytes, Fence, FencedWrite, Store};

/// How long [`SlowComplete`] holds each `complete` before passing it on: long enough that a
/// call cancelled while recording is still recording when its retry arrives.
const COMPLETE_DELAY: Duration = Duration::from_millis(300);

/// Hooks whose `complete` is slow (a pool checkout, a writer queue), and optionally fail
/// its first attempt as an unreachable store does; every other operation passes through.
#[derive(Debug)]
struct SlowComplete {
    fail_first: AtomicBool,
    completes: AtomicU32,
    entered: Notify,
}

impl Hooks for SlowComplete {
    fn complete<'a>(
        &'a self,
        inner: &'a dyn Store,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            self.completes.fetch_add(1, Ordering::SeqCst);
            self.entered.notify_one();
            if self.fail_first.swap(false, Ordering::SeqCst) {
                return Err(StoreError::Unavailable {
                    message: "connection reset while recording (injected)".into(),
                    source: None,
                });
            }
            tokio::time::sleep(COMPLETE_DELAY).await;
            inner.complete(key, fence, output, ttl).await
        })
    }
}

/// A call whose future is dropped after its body returned (a request timeout, a client that
/// disconnected) while `complete` is slow, or after a failed first `complete`, does not free
/// its key: the recording finishes without the caller. A retry at once is refused in reject
/// mode (the key is still being recorded), a waiting retry gets the recorded value, and the
/// body ran once.
pub async fn a_call_dropped_after_its_body_ran_keeps_its_key(h: &Harness) {
    for fail_first in [false, true] {
        let store = Arc::new(Forwarding::new(
            Arc::clone(h.store()),
            SlowComplete {
                fail_first: AtomicBool::new(fail_first),
                completes: AtomicU32::new(0),
                entered: Notify::new(),
            },
        ));
        let dyn_store: Arc<dyn Store> = store.clone();
        let engine = Idempotency::new(dyn_store)
            .with_options(Options::new().with_lease(LONG).with_ttl(LONG));
        let key = h.key("dropped-while-recording").to_string();
        let fingerprint = fingerprint(9);
        let runs = Arc::new(AtomicU32::new(0));
        let what = if fail_first {
            "a call dropped after its first complete failed"
        } else {
            "a call dropped while its complete was in flight"
        };

        let first = {
            let (engine, key, runs) = (engine.clone(), key.clone(), Arc::clone(&runs));
            tokio::spawn(async move {
                let call = Call::new("conformance::dropped", fingerprint).key(&key);
                engine
                    .run(call, async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Error>("charged once".to_string())
                    })
                    .await
            })
        };
        // The body has returned once `complete` is entered: cancel the call there.
        tokio::time::timeout(WAIT_BOUND, store.entered.notified())
            .await
            .unwrap_or_else(|_| panic!("{what}: the body never reached complete"));
        first.abort();
        assert!(
            first.await.is_err_and(|e| e.is_cancelled()),
            "{what}: the call should have been cancelled while recording"
        );

        let call = Call::new("conformance::dropped", fingerprint).key(&key);
        let rejecting = engine.clone().with_options(
            Options::new()
                .with_lease(LONG)
                .with_ttl(LONG)
                .with_on_conflict(OnConflict::Reject),
        );
        let retry = rejecting
            .run(call, async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>("charged twice".to_string())
            })
            .await;
        assert!(
            matches!(retry, Err(Error::Conflict { .. })),
            "{what}: a retry at once must find the key still held (Error::Conflict under reject), got {retry:?}"
        );

        let waiting = engine.with_options(
            Options::new()
                .with_lease(LONG)
                .with_ttl(LONG)
                .with_on_conflict(OnConflict::Wait {
                    timeout: WAIT_BOUND,
                }),
        );
        let retry = waiting
            .run(call, async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>("charged twice".to_string())
            })
            .await;
        assert!(
            matches!(&retry, Ok(Outcome::Replayed(value)) if value == "charged once"),
            "{what}: a waiting retry must get the value recorded for the cancelled call, got {retry:?}"
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "{what}: the body ran again for a retry"
        );
        let storage_key = call.storage_key().expect("a valid key");
        let stored = h
            .store()
            .claim(&storage_key, &CanonicalArguments::from(fingerprint), LONG)
            .await
            .unwrap_or_else(|err| panic!("{what}: claim failed with a store error: {err}"));
        expect_replay(
            &stored,
            br#"{"ok":"charged once"}"#,
            &format!("{what}: the store must hold the cancelled call's record"),
        );
    }
}

/// A body that calls its own key again (directly, or through another idempotent call) is
/// refused at once with [`Error::Reentered`] instead of waiting for itself; the same key from
/// another task still finds the key in progress, and the outer call completes as usual.
pub async fn a_body_that_reenters_its_own_key_is_refused_at_once(h: &Harness) {
    let engine = Idempotency::new(Arc::clone(h.store())).with_options(
        Options::new()
            .with_lease(LONG)
            .with_ttl(LONG)
            .with_on_conflict(OnConflict::Wait {
                timeout: WAIT_BOUND * 2,
            }),
    );
    let outer_key = h.key("reentered-outer").to_string();
    let inner_key = h.key("reentered-inner").to_string();
    let outer = Call::new("conformance::reentered", fingerprint(5)).key(&outer_key);
    let inner = Call::new("conformance::reentered", fingerprint(5)).key(&inner_key);
    let rejecting = engine.clone().with_options(
        Options::new()
            .with_lease(LONG)
            .with_ttl(LONG)
            .with_on_conflict(OnConflict::Reject),
    );

    let body = async {
        // Directly: the body calls its own key.
        let direct = engine
            .run(outer, async { Ok::<_, Error>("inner run".to_string()) })
            .await;
        // Through another call: outer -> inner -> outer.
        let through = engine
            .run(inner, async {
                let again = engine
                    .run(outer, async { Ok::<_, Error>("inner run".to_string()) })
                    .await;
                Ok::<_, Error>(format!("{again:?}"))
            })
            .await;
        // From another task the key is in progress, not re-entered.
        let elsewhere = {
            let rejecting = rejecting.clone();
            let outer_key = outer_key.clone();
            tokio::spawn(async move {
                let outer = Call::new("conformance::reentered", fingerprint(5)).key(&outer_key);
                rejecting
                    .run(outer, async { Ok::<_, Error>("other task".to_string()) })
                    .await
            })
            .await
            .expect("the other task panicked")
        };
        Ok::<_, Error>((
            format!("{direct:?}"),
            format!("{through:?}"),
            format!("{elsewhere:?}"),
        ))
    };
    let ran = tokio::time::timeout(WAIT_BOUND, engine.run(outer, body))
        .await
        .unwrap_or_else(|_| {
            panic!("a body that re-entered its own key was still waiting (for itself) after {WAIT_BOUND:?}")
        });
    let (direct, through, elsewhere) = match ran {
        Ok(Outcome::Executed(seen)) => seen,
        other => panic!("the outer call should have run and been recorded, got {other:?}"),
    };
    assert_eq!(
        direct, "Err(Reentered)",
        "a body calling its own key must get Error::Reentered"
    );
    assert_eq!(
        through, r#"Ok(Executed("Err(Reentered)"))"#,
        "a body calling its own key through another idempotent call (which runs) must get Error::Reentered"
    );
    assert!(
        elsewhere.starts_with("Err(Conflict"),
        "the same key from another task is in progress, not re-entered: got {elsewhere}"
    );
    let replay = engine
        .run(outer, async {
            Ok::<(String, String, String), Error>(Default::default())
        })
        .await;
    assert!(
        matches!(replay, Ok(Outcome::Replayed(_))),
        "the outer call was recorded: got {replay:?}"
    );
}
