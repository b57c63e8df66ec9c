//! Shared pieces of the engine tests.
#![allow(dead_code)]

pub mod model;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotent_core::conformance::{Claiming, Completing, Forwarding, Hooks};
use idempotent_core::{
    BoxFuture, Bytes, CanonicalArguments, Claim, Clock, Error, Fence, FencedWrite, Fingerprint,
    StorageKey, Store, StoreError,
};

/// The fingerprint `n` repeated: distinct `n`s are distinct arguments.
pub fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// Arguments known by their fingerprint, [`fingerprint(n)`](fingerprint).
pub fn args(n: u8) -> CanonicalArguments {
    CanonicalArguments::from(fingerprint(n))
}

/// Key number `i` of `label`: distinct labels or numbers are distinct keys.
pub fn key(label: &str, i: usize) -> StorageKey {
    StorageKey::derive("tests", Some(label.as_bytes()), format!("k{i}").as_bytes())
        .expect("a short, non-empty key is valid")
}

/// Claims `key`, which must be free, with `arguments` and `lease`; returns the fence.
pub async fn acquire(
    store: &dyn Store,
    key: &StorageKey,
    arguments: &CanonicalArguments,
    lease: Duration,
) -> Fence {
    match store
        .claim(key, arguments, lease)
        .await
        .unwrap_or_else(|err| panic!("claim({key}) failed with a store error: {err}"))
    {
        Claim::Acquired { fence } => fence,
        other => panic!("expected to acquire the free key {key}, got {other:?}"),
    }
}

/// The error type of the functions under test.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub enum AppError {
    Declined(String),
    Idempotency(String),
}

impl From<Error> for AppError {
    fn from(error: Error) -> Self {
        AppError::Idempotency(format!("{error:?}"))
    }
}

impl AppError {
    pub fn idempotency(&self) -> &str {
        match self {
            AppError::Idempotency(message) => message,
            AppError::Declined(reason) => {
                panic!("expected an idempotency error, got Declined({reason})")
            }
        }
    }
}

/// Counts how many times a body really ran.
#[derive(Debug, Default, Clone)]
pub struct Runs(Arc<AtomicU32>);

impl Runs {
    pub fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn count(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The memory store's clock read from Tokio's clock, so `start_paused` tests move both.
#[derive(Debug)]
pub struct TokioClock(tokio::time::Instant);

impl TokioClock {
    pub fn new() -> Self {
        Self(tokio::time::Instant::now())
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A store whose backend is down: every operation fails as a real one does when its server
/// cannot be reached.
#[derive(Debug, Default)]
pub struct DownStore;

fn down<T: Send + 'static>() -> BoxFuture<'static, Result<T, StoreError>> {
    Box::pin(async {
        Err(StoreError::Unavailable {
            message: "connection refused".into(),
            source: None,
        })
    })
}

impl Store for DownStore {
    fn claim<'a>(
        &'a self,
        _: &'a StorageKey,
        _: &'a CanonicalArguments,
        _: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        down()
    }
    fn complete<'a>(
        &'a self,
        _: &'a StorageKey,
        _: Fence,
        _: Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        down()
    }
    fn release<'a>(
        &'a self,
        _: &'a StorageKey,
        _: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        down()
    }
    fn extend<'a>(
        &'a self,
        _: &'a StorageKey,
        _: Fence,
        _: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        down()
    }
    fn wait<'a>(&'a self, _: &'a StorageKey, _: Duration) -> BoxFuture<'a, Result<(), StoreError>> {
        down()
    }
    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        down()
    }
    fn remove<'a>(&'a self, _: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        down()
    }
}

/// A value whose serialization always fails, as serde_json does for maps with non-string keys.
pub struct Unserializable;

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this value cannot be serialized"))
    }
}

impl<'de> serde::Deserialize<'de> for Unserializable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| Unserializable)
    }
}

impl fmt::Debug for Unserializable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Unserializable")
    }
}

/// Hooks whose first `failures` completes fail as if the connection dropped: before the
/// write, or, with `lost_after_write`, after it was applied (only the answer is lost).
#[derive(Debug)]
pub struct FlakyComplete {
    pub failures: AtomicU32,
    pub lost_after_write: bool,
}

impl FlakyComplete {
    /// `inner` behind these hooks.
    pub fn around(
        inner: impl Store + 'static,
        failures: u32,
        lost_after_write: bool,
    ) -> Arc<Forwarding<Self>> {
        Arc::new(Forwarding::new(
            Arc::new(inner),
            FlakyComplete {
                failures: AtomicU32::new(failures),
                lost_after_write,
            },
        ))
    }
}

impl Hooks for FlakyComplete {
    fn complete<'a>(
        &'a self,
        op: Completing<'a>,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail && self.lost_after_write {
            return Box::pin(async move {
                op.send().await?;
                down().await
            });
        }
        if fail {
            return down();
        }
        op.send()
    }
}

/// Two transactional calls on the SQLite store that never return: the first cancelled (its
/// future dropped while the body runs), the second with a body that panics, each in a
/// `BEGIN IMMEDIATE` transaction of `connection` that is then rolled back. `keys` are their
/// idempotency keys under `function`.
#[cfg(feature = "sqlite")]
pub fn abandon_two_transactional_calls(
    store: &idempotent_core::stores::sqlite::SqliteStore,
    connection: &mut rusqlite::Connection,
    function: &'static str,
    keys: [&'static str; 2],
) {
    use idempotent_core::{Call, Options};
    use rusqlite::TransactionBehavior;

    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let call = |key: &'static str| Call::new(function, Fingerprint::of(&1).unwrap()).key(key);
    let options = Options::new();

    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    runtime().block_on(async {
        let running = store.run_in_transaction(
            &tx,
            &options,
            call(keys[0]),
            std::future::pending::<Result<u32, AppError>>(),
        );
        tokio::time::timeout(Duration::from_millis(1), running)
            .await
            .unwrap_err();
    });
    drop(tx);

    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime().block_on(
            store.run_in_transaction(&tx, &options, call(keys[1]), async {
                if tx.is_autocommit() {
                    return Ok::<u32, AppError>(0);
                }
                panic!("the body panics");
            }),
        )
    }));
    assert!(panicked.is_err(), "the body's panic reaches the caller");
    drop(tx);
}

/// A store whose claims never answer, as one behind a stalled connection.
#[derive(Debug)]
pub struct StalledClaims;

impl Hooks for StalledClaims {
    fn claim<'a>(&'a self, _: Claiming<'a>) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(std::future::pending())
    }
}

/// A store that refuses every `complete` (`disk full`), or, with `fenced`, answers that the
/// claim no longer holds its key.
#[derive(Debug)]
pub struct RefusedCompletes {
    pub fenced: bool,
}

impl Hooks for RefusedCompletes {
    fn complete<'a>(&'a self, _: Completing<'a>) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        let fenced = self.fenced;
        Box::pin(async move {
            if fenced {
                return Ok(FencedWrite::Fenced);
            }
            Err(StoreError::Backend {
                message: "disk full".into(),
                source: None,
            })
        })
    }
}
