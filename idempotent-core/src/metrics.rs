//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (cargo feature `metrics`).
//!
//! The crate records; the application chooses the exporter (Prometheus, StatsD, ...) by
//! installing a `metrics` recorder. Without a recorder every metric is a no-op; without the
//! feature nothing is compiled in. The names below are constants of this module.
//!
//! | name | type | labels | what it measures |
//! |---|---|---|---|
//! | `idempotent_calls_total` | counter | `function`, `outcome` | calls, by how they ended (the outcomes below) |
//! | `idempotent_call_duration_seconds` | histogram | `function`, `outcome` | a call's time, from its start to its outcome |
//! | `idempotent_wait_duration_seconds` | histogram | `function` | the time a call waited for another holder of its key (only calls that waited) |
//! | `idempotent_store_operation_duration_seconds` | histogram | `store`, `operation` | one store operation's time, whatever it answered |
//! | `idempotent_claims_in_flight` | gauge | `function` | claims held by this process: bodies running, results being recorded |
//!
//! `function` is the function's name as the attribute (or [`Call::new`](crate::Call::new))
//! gives it, a static string; `store` is [`Store::kind`] (`memory`,
//! `sqlite`, `postgres`, `redis`, `sqlx_postgres`, `sqlx_sqlite`, or `custom`); `operation`
//! is one of `claim`, `complete`, `release`, `extend`, `wait`, `remove` and `purge_expired`.
//! No label ever holds a key, a scope or an argument: every label value is a static string,
//! so the number of series is bounded by the number of functions.
//!
//! The `outcome` label is the `outcome` field of the call's `tracing` event (target
//! `idempotent`): every event emitted is one call counted, and the other way round.
//!
//! | `outcome` | the call |
//! |---|---|
//! | `executed` | ran its body and recorded the result |
//! | `replayed` | returned a recorded result without waiting |
//! | `waited` | returned a recorded result after waiting for the call that produced it |
//! | `conflict` | found its key held by another call (`reject`, or the wait timed out) |
//! | `mismatch` | found its key used before with other arguments (`Error::KeyReused`: key reused) |
//! | `store_error` | failed on the store before its body could run |
//! | `unrecorded` | ran its body, but the store failed to record the result |
//! | `fenced` | ran its body, but its lease was taken over first: the result was not recorded |
//! | `failed` | ran its body, which returned `Err`: the key was released (or, with `cache_errors`, the error recorded) |
//! | `abandoned` | ended before its body returned: a panic, or the call's future dropped (cancelled) while it claimed, waited or ran |
//! | `lease_lost` | had its body cancelled because its lease could not be renewed (`on_lease_loss = "cancel"`) |
//! | `reentered` | found its key held by a call around it on the same task |
//! | `invalid_input` | was refused before claiming: an invalid key, scope, argument or option |
//! | `encode_error` | ran its body, whose output could not be recorded (does not serialize, is too large): the key was released |
//! | `decode_error` | found a recorded result that does not decode as its return type |
//!
//! An `#[idempotent]` function returns its value for `unrecorded` and `fenced` calls as it
//! does for `executed` ones ([`Outcome::Unrecorded`](crate::Outcome::Unrecorded) is not in its
//! return type): these outcomes, and the `WARN` event of each, are how an operator sees them.
//!
//! Store operations are timed where the engine calls the store: the claims and waits of a
//! call, the lease's renewals, the recording and the release, [`Idempotency::forget`]
//! (`remove`) and [`Idempotency::purge_expired`]. Operations a program sends to a store
//! itself are not, nor are the statements of the transactional mode, which run in the
//! caller's transaction rather than through the [`Store`] trait.
//!
//! [`Idempotency::forget`]: crate::Idempotency::forget
//! [`Idempotency::purge_expired`]: crate::Idempotency::purge_expired
//!
//! # Installing a recorder
//!
//! A service installs one recorder for the process (an exporter's builder does it, such as
//! `metrics_exporter_prometheus::PrometheusBuilder::new().install()`), and may call
//! [`describe`] once to give the metrics their units and descriptions. Here a recorder of
//! `metrics-util` is installed for a closure only, as tests do:
//!
//! ```
//! # #[cfg(feature = "metrics")] {
//! use std::sync::Arc;
//! use idempotent_core::{Call, Fingerprint, Idempotency, MemoryStore};
//! use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::with_local_recorder(&recorder, || {
//!     idempotent_core::metrics::describe();
//!     let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
//!     runtime.block_on(async {
//!         let engine = Idempotency::new(Arc::new(MemoryStore::new()));
//!         let call = Call::new("mailer::welcome", Fingerprint::of("ada").unwrap()).key("user-1");
//!         for _ in 0..2 {
//!             engine.run(call, async { Ok::<_, idempotent_core::Error>(true) }).await.unwrap();
//!         }
//!     });
//! });
//! let calls: Vec<_> = snapshotter
//!     .snapshot()
//!     .into_vec()
//!     .into_iter()
//!     .filter(|(key, ..)| key.key().name() == idempotent_core::metrics::CALLS_TOTAL)
//!     .map(|(key, _, _, value)| {
//!         let outcome = key.key().labels().find(|l| l.key() == "outcome").unwrap();
//!         (outcome.value().to_owned(), value)
//!     })
//!     .collect();
//! assert!(calls.contains(&("executed".to_owned(), DebugValue::Counter(1))));
//! assert!(calls.contains(&("replayed".to_owned(), DebugValue::Counter(1))));
//! # }
//! ```

#[cfg(feature = "metrics")]
use std::time::Instant;

#[cfg(feature = "metrics")]
use registry::Metric;

use std::future::Future;
use std::time::Duration;

use crate::store::Store;

/// Counter: calls, by `function` and `outcome`.
pub const CALLS_TOTAL: &str = "idempotent_calls_total";
/// Histogram (seconds): a call's time, by `function` and `outcome`.
pub const CALL_DURATION_SECONDS: &str = "idempotent_call_duration_seconds";
/// Histogram (seconds): a call's wait for another holder of its key, by `function`.
pub const WAIT_DURATION_SECONDS: &str = "idempotent_wait_duration_seconds";
/// Histogram (seconds): a store operation's time, by `store` and `operation`.
pub const STORE_OPERATION_DURATION_SECONDS: &str = "idempotent_store_operation_duration_seconds";
/// Gauge: claims this process holds, by `function`.
pub const CLAIMS_IN_FLIGHT: &str = "idempotent_claims_in_flight";

/// Gives every metric of the crate its unit and description in the installed recorder. Call
/// it once after installing the recorder; the metrics are recorded without it too.
#[cfg(feature = "metrics")]
pub fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(CALLS_TOTAL, "Idempotent calls, by function and outcome.");
    metrics::describe_histogram!(
        CALL_DURATION_SECONDS,
        Unit::Seconds,
        "Time of an idempotent call, from its start to its outcome."
    );
    metrics::describe_histogram!(
        WAIT_DURATION_SECONDS,
        Unit::Seconds,
        "Time an idempotent call waited for another holder of its key."
    );
    metrics::describe_histogram!(
        STORE_OPERATION_DURATION_SECONDS,
        Unit::Seconds,
        "Time of one idempotency store operation, by store and operation."
    );
    metrics::describe_gauge!(
        CLAIMS_IN_FLIGHT,
        "Idempotency keys claimed by this process and not yet settled."
    );
}

/// Counts a call that ended with `outcome` (the name its event gives it), and its time if it
/// was measured.
#[inline]
pub(crate) fn call_ended(function: &'static str, outcome: &'static str, took: Option<Duration>) {
    #[cfg(feature = "metrics")]
    {
        registry::counter(Metric::Calls, function, outcome).increment(1);
        if let Some(took) = took {
            registry::histogram(Metric::CallDuration, function, outcome).record(took.as_secs_f64());
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (function, outcome, took);
}

/// Whether calls read the clock for the metrics: with the feature, always.
pub(crate) const TIMES_CALLS: bool = cfg!(feature = "metrics");

/// When a call started waiting for another holder of its key, until the wait is recorded.
#[derive(Clone, Default)]
pub(crate) struct WaitTimer {
    #[cfg(feature = "metrics")]
    since: Option<Instant>,
}

impl WaitTimer {
    /// Notes that the call waits, from now unless it already did.
    #[inline]
    pub(crate) fn start(&mut self) {
        #[cfg(feature = "metrics")]
        if self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }

    /// Records the wait, if one was started and not yet recorded.
    #[inline]
    pub(crate) fn stop(&mut self, function: &'static str) {
        #[cfg(feature = "metrics")]
        if let Some(since) = self.since.take() {
            registry::histogram(Metric::Wait, function, "").record(since.elapsed().as_secs_f64());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = function;
    }
}

/// One claim held by this process: counted in [`CLAIMS_IN_FLIGHT`] from its creation until
/// it is dropped.
pub(crate) struct InFlight {
    #[cfg(feature = "metrics")]
    function: Option<&'static str>,
}

impl InFlight {
    #[inline]
    pub(crate) fn start(function: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            registry::gauge(Metric::InFlight, function).increment(1.0);
            Self {
                function: Some(function),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = function;
            Self {}
        }
    }

    /// The same claim, counted until the returned value is dropped (this one counts nothing
    /// more): for the task that finishes recording a dropped call's result.
    #[inline]
    pub(crate) fn take(&mut self) -> Self {
        Self {
            #[cfg(feature = "metrics")]
            function: self.function.take(),
        }
    }
}

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        if let Some(function) = self.function.take() {
            registry::gauge(Metric::InFlight, function).decrement(1.0);
        }
    }
}

/// A store operation, as the `operation` label names it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoreOperation {
    Claim,
    Complete,
    Release,
    Extend,
    Wait,
    Remove,
    PurgeExpired,
}

impl StoreOperation {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn as_str(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Complete => "complete",
            Self::Release => "release",
            Self::Extend => "extend",
            Self::Wait => "wait",
            Self::Remove => "remove",
            Self::PurgeExpired => "purge_expired",
        }
    }
}

/// `operation`, timed into [`STORE_OPERATION_DURATION_SECONDS`] when it completes (not when
/// it is dropped before). Without the feature, `operation` itself.
#[cfg(feature = "metrics")]
#[inline]
pub(crate) fn timed<F: Future>(
    store: &dyn Store,
    operation: StoreOperation,
    future: F,
) -> impl Future<Output = F::Output> {
    let store = store.kind();
    async move {
        let started = Instant::now();
        let output = future.await;
        registry::histogram(Metric::StoreOperation, store, operation.as_str())
            .record(started.elapsed().as_secs_f64());
        output
    }
}

/// `operation`, timed into [`STORE_OPERATION_DURATION_SECONDS`] when it completes (not when
/// it is dropped before). Without the feature, `operation` itself.
#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn timed<F: Future>(_: &dyn Store, _: StoreOperation, future: F) -> F {
    future
}

/// The handles of the crate's metrics, from keys built once per thread.
///
/// `metrics::counter!(name, labels)` builds its [`Key`](metrics::Key) on every call: a vector
/// of labels and the key's hash, even when no recorder is installed (the facade cannot tell).
/// The label values here are static strings from a small set, so each thread keeps the keys
/// it built and asks the current recorder for a handle by reference; what is recorded, and
/// where, is the same as with the macros.
#[cfg(feature = "metrics")]
mod registry {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::hash::{BuildHasherDefault, Hasher};

    use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata};

    /// What the macros would give a metric recorded from this module.
    static METADATA: Metadata<'static> =
        Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

    /// Keys a thread keeps; past this many, further keys are built per use (a process with
    /// that many functions pays what the macros cost, and no more memory).
    const KEPT: usize = 1024;

    /// One of the crate's metrics, and its label names.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub(super) enum Metric {
        Calls,
        CallDuration,
        Wait,
        StoreOperation,
        InFlight,
    }

    impl Metric {
        fn name(self) -> &'static str {
            match self {
                Self::Calls => super::CALLS_TOTAL,
                Self::CallDuration => super::CALL_DURATION_SECONDS,
                Self::Wait => super::WAIT_DURATION_SECONDS,
                Self::StoreOperation => super::STORE_OPERATION_DURATION_SECONDS,
                Self::InFlight => super::CLAIMS_IN_FLIGHT,
            }
        }

        /// The key of this metric with these label values (the second unused by metrics
        /// with one label).
        fn key(self, first: &'static str, second: &'static str) -> Key {
            let labels = match self {
                Self::Calls | Self::CallDuration => vec![
                    Label::from_static_parts("function", first),
                    Label::from_static_parts("outcome", second),
                ],
                Self::Wait | Self::InFlight => vec![Label::from_static_parts("function", first)],
                Self::StoreOperation => vec![
                    Label::from_static_parts("store", first),
                    Label::from_static_parts("operation", second),
                ],
            };
            Key::from_parts(self.name(), labels)
        }
    }

    /// A kept key's metric and label values, by address and length: the values are static
    /// strings, so the same string is the same address (two equal strings at two addresses
    /// only keep one key more).
    type Labels = (Metric, usize, usize, usize, usize);

    fn labels(metric: Metric, first: &'static str, second: &'static str) -> Labels {
        (
            metric,
            first.as_ptr() as usize,
            first.len(),
            second.as_ptr() as usize,
            second.len(),
        )
    }

    /// Hashes the few words of [`Labels`] by multiplying and rotating (as rustc's `FxHasher`
    /// does): SipHash would cost more than the key's own hash this saves.
    #[derive(Default)]
    struct WordHasher(u64);

    impl WordHasher {
        fn add(&mut self, word: u64) {
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    impl Hasher for WordHasher {
        fn write(&mut self, bytes: &[u8]) {
            for &byte in bytes {
                self.add(u64::from(byte));
            }
        }

        fn write_usize(&mut self, word: usize) {
            self.add(word as u64);
        }

        fn finish(&self) -> u64 {
            self.0
        }
    }

    type Kept = HashMap<Labels, Key, BuildHasherDefault<WordHasher>>;

    thread_local! {
        static KEYS: RefCell<Kept> = RefCell::new(Kept::default());
    }

    /// `use_key` given the key of `metric` with these label values: this thread's kept key,
    /// or one built now (past [`KEPT`] keys, or while the thread's keys are unavailable).
    fn with_key<T>(
        metric: Metric,
        first: &'static str,
        second: &'static str,
        use_key: impl FnOnce(&Key) -> T,
    ) -> Option<T> {
        let mut use_key = Some(use_key);
        let answer = KEYS
            .try_with(|keys| {
                let use_key = use_key.take()?;
                let Ok(mut keys) = keys.try_borrow_mut() else {
                    return Some(use_key(&metric.key(first, second)));
                };
                let labels = labels(metric, first, second);
                if let Some(key) = keys.get(&labels) {
                    return Some(use_key(key));
                }
                let key = metric.key(first, second);
                if keys.len() >= KEPT {
                    return Some(use_key(&key));
                }
                Some(use_key(keys.entry(labels).or_insert(key)))
            })
            .ok()
            .flatten();
        // The thread's keys are gone (a thread-local destructor records a metric).
        answer.or_else(|| use_key.map(|use_key| use_key(&metric.key(first, second))))
    }

    pub(super) fn counter(metric: Metric, first: &'static str, second: &'static str) -> Counter {
        with_key(metric, first, second, |key| {
            metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA))
        })
        .unwrap_or_else(Counter::noop)
    }

    pub(super) fn histogram(
        metric: Metric,
        first: &'static str,
        second: &'static str,
    ) -> Histogram {
        with_key(metric, first, second, |key| {
            metrics::with_recorder(|recorder| recorder.register_histogram(key, &METADATA))
        })
        .unwrap_or_else(Histogram::noop)
    }

    pub(super) fn gauge(metric: Metric, function: &'static str) -> Gauge {
        with_key(metric, function, "", |key| {
            metrics::with_recorder(|recorder| recorder.register_gauge(key, &METADATA))
        })
        .unwrap_or_else(Gauge::noop)
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// More functions than a thread keeps keys for: each call is counted under its own
    /// function, whether its key was kept or built for the one use.
    #[test]
    fn every_function_is_counted_apart_past_the_keys_a_thread_keeps() {
        let functions: Vec<&'static str> = (0..1100)
            .map(|i| &*Box::leak(format!("jobs::run_{i}").into_boxed_str()))
            .collect();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            for round in 0..2 {
                for (i, function) in functions.iter().enumerate() {
                    let outcome = if i % 2 == 0 { "executed" } else { "replayed" };
                    call_ended(function, outcome, None);
                    if round == 0 {
                        call_ended(function, "conflict", None);
                    }
                }
            }
        });
        let mut counted = std::collections::BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|label| format!("{}={}", label.key(), label.value()))
                .collect();
            let DebugValue::Counter(count) = value else {
                panic!("{labels:?} is a counter");
            };
            counted.insert(labels.join(","), count);
        }
        assert_eq!(
            counted.len(),
            2 * functions.len(),
            "one series per function and outcome"
        );
        for (i, function) in functions.iter().enumerate() {
            let outcome = if i % 2 == 0 { "executed" } else { "replayed" };
            assert_eq!(
                counted[&format!("function={function},outcome={outcome}")],
                2
            );
            assert_eq!(counted[&format!("function={function},outcome=conflict")], 1);
        }
    }
}
