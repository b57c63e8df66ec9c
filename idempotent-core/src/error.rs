//! What can go wrong, as types: the engine's [`Error`] and the stores' [`StoreError`].

use std::fmt;
use std::time::Duration;

use crate::fingerprint::FingerprintError;
use crate::key::KeyError;

/// A boxed error from a store's driver.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An idempotent call could not run or replay.
///
/// The annotated function's error type must implement `From<Error>`, so these reach the caller
/// through the function's own `Result`.
///
/// ```
/// use idempotent_core::Error;
/// use std::time::Duration;
///
/// let err = Error::Conflict { retry_after: Duration::from_secs(2) };
/// assert!(err.to_string().contains("in progress"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The idempotency key (or scope) was refused.
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    /// The call's [`Options`](crate::Options) do not hold together.
    #[error("invalid idempotency options: {problem}")]
    InvalidOptions {
        /// What is wrong.
        problem: &'static str,
    },
    /// The arguments could not be fingerprinted.
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    /// Another call with this key is running (and waiting was off, or timed out).
    #[error(
        "another call with this idempotency key is in progress; retry after {retry_after:?} (or let the call wait: on_conflict = \"wait\")"
    )]
    Conflict {
        /// How long the other call's lease still runs.
        retry_after: Duration,
    },
    /// The key was used before with other arguments.
    #[error(
        "this idempotency key was already used with different arguments; use a new key for a new request"
    )]
    KeyReused,
    /// The store failed; the body did not run (or ran and its output was not recorded; see
    /// [`Outcome::Unrecorded`](crate::Outcome::Unrecorded)).
    #[error("the idempotency store failed, so the call was not run: {0}")]
    Store(#[from] StoreError),
    /// The body's output could not be serialized as JSON, or its JSON does not decode back
    /// (NaN or an infinity, which JSON writes as `null`); the key was released.
    #[error(
        "the output could not be recorded as JSON that decodes back to it (NaN and infinities cannot), so the key was released: {0}"
    )]
    Encode(#[source] JsonError),
    /// The body's output is larger than the limit (the attribute's `max_output_bytes = N`, or
    /// [`Options::with_max_output_bytes`](crate::Options::with_max_output_bytes)); the key was
    /// released.
    #[error(
        "the output is {size} bytes, over the {limit}-byte limit for recorded outputs; the key was released (raise max_output_bytes or return less)"
    )]
    OutputTooLarge {
        /// The serialized output's size.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The recorded output does not decode as the function's return type (its type changed, or
    /// the record is corrupt). The body was not run again.
    #[error(
        "the recorded output for this key does not decode as the return type ({0}); the body was not run again: purge the record or use a new name/key if the type changed"
    )]
    Decode(#[source] JsonError),
    /// The key is held by a call that encloses this one on the same task: a body that calls
    /// its own function (or another way to the same name and key) with its own key. Waiting
    /// would wait for itself, so the call is refused at once.
    ///
    /// ```
    /// let error = idempotent_core::Error::Reentered;
    /// assert!(error.to_string().contains("encloses this one"));
    /// ```
    #[error(
        "this idempotency key is held by a call that encloses this one on the same task (a body that calls itself with its own key); waiting would wait for itself: give the inner call its own key or name"
    )]
    Reentered,
    /// The lease could not be renewed (the store was unreachable, or another caller took the
    /// key over), so the body was cancelled before the lease ran out, as
    /// [`OnLeaseLoss::Cancel`](crate::OnLeaseLoss::Cancel) asks. The body may have done part
    /// of its work; nothing was recorded.
    ///
    /// ```
    /// let error = idempotent_core::Error::LeaseLost;
    /// assert!(error.to_string().contains("cancelled"));
    /// ```
    #[error(
        "the call's lease could not be renewed (the store was unreachable, or another caller took the key over), so its body was cancelled before the lease ran out; it may have done part of its work and nothing was recorded: retry with the same key"
    )]
    LeaseLost,
    /// PostgreSQL transactional mode: the caller's transaction itself holds this key, claimed
    /// by an earlier call in it that was cancelled (or is still running). That call's writes
    /// may be in the transaction, so the body is not run again in it.
    #[error(
        "this transaction already holds this idempotency key: an earlier call with it in the same transaction was cancelled or is still running, and its writes may be in the transaction; roll the transaction back and retry in a new one"
    )]
    HeldByThisTransaction,
}

/// A JSON error from recording or replaying an output, shown without the value it concerns:
/// serde_json's own messages quote values (`invalid type: string "4111 1111 1111 1111"`),
/// and a recorded output is the application's data. Its `Display` and `Debug` say what kind
/// of error and where; [`JsonError::into_inner`] gives the full error to code that must see it.
///
/// ```
/// # use std::sync::Arc;
/// use idempotent_core::{Call, Error, Fingerprint, Idempotency, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let engine = Idempotency::new(Arc::new(MemoryStore::new()));
/// let call = Call::new("cards::tokenize", Fingerprint::of(&1).unwrap()).key("k");
/// engine.run(call, async { Ok::<_, Error>("4111111111111111".to_string()) }).await.unwrap();
/// // The same key read as a number: the record does not decode.
/// let Err(Error::Decode(error)) = engine.run(call, async { Ok::<u64, Error>(0) }).await else {
///     panic!("a decode error");
/// };
/// assert!(!error.to_string().contains("4111"));
/// assert!(error.into_inner().to_string().contains("4111"), "the full error, for code only");
/// # }
/// ```
pub struct JsonError(serde_json::Error);

impl From<Error> for std::io::Error {
    /// An [`Error`] as an `io::Error` of kind [`Other`](std::io::ErrorKind::Other) that keeps
    /// it as its source, so a function returning `std::io::Result<T>` can be idempotent.
    ///
    /// ```
    /// use idempotent_core::{Error, KeyError};
    ///
    /// let error = std::io::Error::from(Error::InvalidKey(KeyError::Empty));
    /// assert_eq!(error.kind(), std::io::ErrorKind::Other);
    /// assert!(error.get_ref().is_some_and(|inner| inner.is::<Error>()));
    /// ```
    fn from(error: Error) -> Self {
        std::io::Error::other(error)
    }
}

impl JsonError {
    pub(crate) fn new(error: serde_json::Error) -> Self {
        Self(error)
    }

    /// The full serde_json error, which may quote the value: keep it out of logs.
    pub fn into_inner(self) -> serde_json::Error {
        self.0
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::json_error_summary(&self.0))
    }
}

impl fmt::Debug for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonError({self})")
    }
}

impl std::error::Error for JsonError {}

/// A store could not do what was asked.
///
/// ```
/// use idempotent_core::StoreError;
///
/// let err = StoreError::Full { capacity: 10 };
/// assert!(err.to_string().contains("10 records"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store holds as many records as it may, and a bounded search found no dead one to
    /// make room (a few dead records may remain, which later claims remove); it never evicts
    /// a live one.
    #[error(
        "the store is full: it holds {capacity} records and a bounded search found no expired one to remove (evicting a live record would allow a duplicate execution); raise the capacity or shorten the ttl"
    )]
    Full {
        /// The store's capacity.
        capacity: usize,
    },
    /// The store could not be reached or did not answer in time.
    #[error("the store is unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
    /// A stored record could not be read: corrupt, or written by an incompatible version.
    #[error("the record under key {key} is unreadable: {message}; purge it to reuse the key")]
    Corrupt {
        /// The storage key, in hex.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// Any other failure of the store's backend.
    #[error("the store failed: {message}")]
    Backend {
        /// What failed.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The in-memory store holds as many bytes of records as it may; it never evicts a live
    /// one.
    #[error(
        "the store is full: its records take its whole {max_bytes}-byte budget, and evicting a live one would allow a duplicate execution; raise the budget (MemoryStoreBuilder::max_bytes), shorten the ttl or record smaller outputs"
    )]
    ByteBudgetFull {
        /// The store's byte budget.
        max_bytes: usize,
    },
}
