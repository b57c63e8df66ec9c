//! Make any async function safe to retry.
//!
//! The first call with an idempotency key claims the key in a [`Store`], runs the body and
//! records its serialized `Ok` value; every retry with that key (and the same arguments) gets
//! the recorded value back without running the body again.
//!
//! ```
//! use idempotent_core::{Call, Fingerprint, Idempotency};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::Error> {
//! let engine = Idempotency::with_default_store();
//! let call = Call::new("mailer::welcome", Fingerprint::of("ada@example.com")?).key("user-1");
//! let sent = engine.run(call, async { Ok::<_, idempotent_core::Error>(true) }).await?;
//! let again = engine.run(call, async { Ok::<_, idempotent_core::Error>(false) }).await?;
//! assert_eq!(again.into_value(), true, "the second call replays the first one's result");
//! # Ok(()) }
//! ```
//!
//! # Telemetry
//!
//! Every call emits one `tracing` event, however it ends (a panic or a cancellation included),
//! with target `idempotent` and the fields `function`, `key` (the first 16 hex digits of the
//! storage key, never the raw key), `outcome`, `waited` and `elapsed_us`; the outcomes are
//! listed in [`metrics`], which counts the same calls (feature `metrics`).
//!
//! The audit trail is one `DEBUG` event per change of a record the engine makes, with target
//! `idempotent::audit` (enable it with a filter such as `idempotent::audit=debug`) and the
//! fields `function`, `key` (as above), `fence` and `outcome`: `claimed` (a call acquired the
//! key under `fence`), `completed` (its result was recorded), `released` (its claim was given
//! back: the body failed or was abandoned, or its output could not be recorded), `taken_over`
//! (a write under `fence` was refused: another caller took the key over after this lease ran
//! out; seen once, by the caller that lost the lease, as a claim that acquires cannot tell an
//! expired lease from an absent record), `forgotten` ([`Idempotency::forget`]; `fence` is `-`)
//! and `purged` ([`Idempotency::purge_expired`], with a `count`; `function`, `key` and `fence`
//! are `-`). Changes the engine does not make are not seen: expiry, a store's own sweep,
//! operations sent to a store directly.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
mod context;
mod default_store;
#[cfg(feature = "encryption")]
pub mod encryption;
mod engine;
mod error;
mod fingerprint;
mod hex;
mod holder;
#[doc(hidden)]
pub mod __hooks {
    //! For the project's fuzz targets and benchmarks; not part of the API.
    pub use crate::hooks::*;
}
mod hooks;
mod idempotency_key;
mod key;
mod ledger;
pub mod metrics;
mod options;
#[doc(hidden)]
pub mod __private {
    //! Used by the code `#[idempotent]` generates; not part of the API.
    pub use crate::private::*;
}
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "http")]
pub mod http;
mod private;
#[cfg(feature = "queue")]
pub mod queue;
mod recorded;
mod redact;
mod store;
pub mod stores;
mod telemetry;
#[cfg(feature = "postgres")]
mod transactional;

#[doc = include_str!("attribute_docs.md")]
pub use idempotent_macros::idempotent;

pub use context::CallContext;
pub use default_store::{DefaultStoreAlreadySet, default_store, set_default_store};
pub use engine::{Call, Idempotency, Outcome};
pub use error::{BoxError, Error, JsonError, StoreError};
pub use fingerprint::{
    CanonicalArguments, Fingerprint, FingerprintError, Fingerprinter, MAX_EXACT_ARGUMENTS,
};
pub use idempotency_key::IdempotencyKey;
pub use key::{KeyError, MAX_KEY_BYTES, StorageKey};
pub use options::{OnConflict, OnLeaseLoss, Options};
pub use store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, MAX_DURATION, Store, held_millis};
// The clocks belong to the memory store (the only store that reads one) and are re-exported
// here because tests of code built on any store move time with `ManualClock`.
pub use stores::memory::{Clock, ManualClock, MemoryStore, MemoryStoreBuilder, SystemClock};

#[cfg(feature = "conformance")]
pub mod conformance;
