//! Make any async function safe to retry.
//!
//! The first call with an idempotency key claims the key in a [`Store`], runs the body and
//! records its serialized `Ok` value; every retry with that key (and the same arguments) gets
//! the recorded value back without running the body again.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod clock;
mod error;
mod fingerprint;
mod key;
mod store;
pub mod stores;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{BoxError, Error, StoreError};
pub use fingerprint::{Fingerprint, FingerprintError};
pub use key::{KeyError, MAX_KEY_BYTES, StorageKey};
pub use store::{BoxFuture, Claim, Fence, FencedWrite, Store};
pub use stores::memory::{MemoryStore, MemoryStoreBuilder};

#[cfg(feature = "conformance")]
pub mod conformance;
