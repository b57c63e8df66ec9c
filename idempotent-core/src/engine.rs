//! The engine: claim, then run or replay or wait, then record. The macro and
//! [`Idempotency::run`] both come here.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context;
use crate::error::{Error, JsonError};
use crate::fingerprint::CanonicalArguments;
use crate::fingerprint::Fingerprint;
use crate::holder::{Holder, PendingRecord, settle_recording};
use crate::idempotency_key::IdempotencyKey;
use crate::key::{KeyError, MAX_KEY_BYTES, StorageKey};
use crate::ledger::{Claimed, Keeping, Leased, Ledger, WaitBudget, Writes};
use crate::metrics::{InFlight, StoreOperation, timed};
use crate::options::{OnConflict, OnLeaseLoss, Options};
use crate::recorded::{OkAndErr, OkOnly, Recording};
use crate::store::{Bytes, Claim, Fence, FencedWrite, Store};
use crate::telemetry::{CallOutcome, CallTrace, Change, OpenCall, audit, audit_purged};

/// One call to make idempotent: which function, which key, which arguments.
///
/// ```
/// use idempotent_core::{Call, Fingerprint};
///
/// let call = Call::new("shop::checkout", Fingerprint::of(&("cart-7", 4200))?)
///     .key("order-42")
///     .scope("tenant-1");
/// # Ok::<(), idempotent_core::FingerprintError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    name: &'static str,
    scope: Option<KeyPart<'a>>,
    key: Option<KeyPart<'a>>,
    arguments: CallArguments<'a>,
}

/// A [`Call`]'s key or scope: its [`IdempotencyKey::key_bytes`], borrowed from the caller's
/// value when they borrow (strings, byte strings), else held by the call itself (a UUID's
/// text, an integer's decimal), so that a call stays `Copy` with no allocation of its own.
/// No key or scope longer than [`MAX_KEY_BYTES`] is valid, so a buffer of that many bytes
/// holds every valid one; of a longer one only its length is kept, for the error.
#[derive(Clone, Copy)]
#[allow(
    clippy::large_enum_variant,
    reason = "boxing the bytes would cost an allocation and `Copy`"
)]
enum KeyPart<'a> {
    Borrowed(&'a [u8]),
    Held { len: u8, bytes: [u8; MAX_KEY_BYTES] },
    TooLong(usize),
}

impl<'a> KeyPart<'a> {
    fn of(value: &'a (impl IdempotencyKey + ?Sized)) -> Self {
        match value.key_bytes() {
            Cow::Borrowed(bytes) => Self::Borrowed(bytes),
            Cow::Owned(owned) => match u8::try_from(owned.len()) {
                Ok(len) if usize::from(len) <= MAX_KEY_BYTES => {
                    let mut bytes = [0; MAX_KEY_BYTES];
                    bytes[..owned.len()].copy_from_slice(&owned);
                    Self::Held { len, bytes }
                }
                _ => Self::TooLong(owned.len()),
            },
        }
    }

    /// The bytes, or for one too long to hold the error [`StorageKey::derive`] gives for it.
    fn bytes(&self, part: &'static str) -> Result<&[u8], KeyError> {
        match self {
            Self::Borrowed(bytes) => Ok(bytes),
            Self::Held { len, bytes } => Ok(&bytes[..usize::from(*len)]),
            Self::TooLong(len) => Err(KeyError::TooLong {
                part,
                len: *len,
                max: MAX_KEY_BYTES,
            }),
        }
    }
}

/// The bytes, as a `&[u8]` prints them.
impl fmt::Debug for KeyPart<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bytes("") {
            Ok(bytes) => bytes.fmt(f),
            Err(_) => f.write_str("<too long>"),
        }
    }
}

/// A [`Call`]'s arguments, borrowed when they are [`CanonicalArguments`] so that a call stays
/// `Copy`.
#[derive(Debug, Clone, Copy)]
enum CallArguments<'a> {
    Fingerprint(Fingerprint),
    Canonical(&'a CanonicalArguments),
}

impl CallArguments<'_> {
    fn fingerprint(self) -> Fingerprint {
        match self {
            Self::Fingerprint(fingerprint) => fingerprint,
            Self::Canonical(arguments) => arguments.fingerprint(),
        }
    }

    fn to_owned(self) -> CanonicalArguments {
        match self {
            Self::Fingerprint(fingerprint) => CanonicalArguments::from(fingerprint),
            Self::Canonical(arguments) => arguments.clone(),
        }
    }
}

impl<'a> Call<'a> {
    /// A call of the function `name` with arguments fingerprinted as `fingerprint`.
    ///
    /// `name` is the namespace of its keys: calls of different names never share records.
    /// Without [`Call::key`], the fingerprint is the key, so equal arguments are one operation.
    ///
    /// ```
    /// # use idempotent_core::{Call, Fingerprint};
    /// let call = Call::new("mailer::send_welcome", Fingerprint::of("user-7")?);
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn new(name: &'static str, fingerprint: Fingerprint) -> Self {
        Self::with(name, CallArguments::Fingerprint(fingerprint))
    }

    /// [`Call::new`] with the arguments in canonical form: the same call (same key, same
    /// records), which spares the in-memory store hashing short arguments.
    ///
    /// ```
    /// # use idempotent_core::{Call, CanonicalArguments, Fingerprint};
    /// let arguments = CanonicalArguments::of("user-7")?;
    /// let call = Call::with_arguments("mailer::send_welcome", &arguments);
    /// let same = Call::new("mailer::send_welcome", Fingerprint::of("user-7")?);
    /// assert_eq!(call.storage_key(), same.storage_key());
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn with_arguments(name: &'static str, arguments: &'a CanonicalArguments) -> Self {
        Self::with(name, CallArguments::Canonical(arguments))
    }

    fn with(name: &'static str, arguments: CallArguments<'a>) -> Self {
        Self {
            name,
            scope: None,
            key: None,
            arguments,
        }
    }

    /// The idempotency key: 1 to 255 bytes that name the operation (an order id, a client's
    /// `Idempotency-Key` header), in its [`IdempotencyKey`] form, as the attribute's `key = ..`
    /// takes it: an integer by its decimal text, a `uuid::Uuid` (feature `uuid`) by its
    /// hyphenated lowercase text. A string key is borrowed, not copied.
    ///
    /// ```
    /// # use idempotent_core::{Call, Fingerprint};
    /// let header = String::from("3f1c7a52-0b44-4b8e-9b43-1d2f3d9b8d10");
    /// let call = Call::new("api::create_order", Fingerprint::of(&1)?).key(&header);
    ///
    /// let order_id = 42u64;
    /// let by_id = Call::new("api::create_order", Fingerprint::of(&1)?).key(&order_id);
    /// let by_text = Call::new("api::create_order", Fingerprint::of(&1)?).key("42");
    /// assert_eq!(by_id.storage_key(), by_text.storage_key());
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    ///
    /// A UUID names the same operation whether it arrives as text or parsed; its raw bytes
    /// (`Uuid::as_bytes`) are another key:
    ///
    /// ```
    /// # #[cfg(feature = "uuid")] {
    /// # use idempotent_core::{Call, Fingerprint};
    /// let header = "3f1c7a52-0b44-4b8e-9b43-1d2f3d9b8d10";
    /// let id = uuid::Uuid::parse_str(header).unwrap();
    /// let new = || Call::new("api::create_order", Fingerprint::of(&1).unwrap());
    /// assert_eq!(new().key(&id).storage_key(), new().key(header).storage_key());
    /// assert_ne!(new().key(&id).storage_key(), new().key(id.as_bytes()).storage_key());
    /// # }
    /// ```
    pub fn key(mut self, key: &'a (impl IdempotencyKey + ?Sized)) -> Self {
        self.key = Some(KeyPart::of(key));
        self
    }

    /// The tenancy scope: the same key in two scopes is two operations. Taken in its
    /// [`IdempotencyKey`] form, as [`Call::key`] takes the key.
    ///
    /// ```
    /// # use idempotent_core::{Call, Fingerprint};
    /// let call = Call::new("api::create_order", Fingerprint::of(&1)?).key("k").scope("acme");
    /// let tenant = 7u32;
    /// let by_id = Call::new("api::create_order", Fingerprint::of(&1)?).key("k").scope(&tenant);
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn scope(mut self, scope: &'a (impl IdempotencyKey + ?Sized)) -> Self {
        self.scope = Some(KeyPart::of(scope));
        self
    }

    /// The key's storage key, as the store files it.
    ///
    /// ```
    /// # use idempotent_core::{Call, Fingerprint, KeyError};
    /// let call = Call::new("f", Fingerprint::of(&1).unwrap()).key("");
    /// assert_eq!(call.storage_key(), Err(KeyError::Empty));
    /// ```
    pub fn storage_key(&self) -> Result<StorageKey, KeyError> {
        match self.key_bytes()? {
            Some(key) => self.derive(key),
            None => self.derive(self.arguments.fingerprint().as_bytes()),
        }
    }

    /// Everything the engine needs, owning nothing borrowed from the caller's arguments, so
    /// that the body may take them by value.
    pub(crate) fn prepare(self) -> Prepared {
        Prepared {
            name: self.name,
            keyed: match self.key_bytes() {
                Ok(key) => {
                    KeyedArguments::new(key, self.arguments.to_owned(), |key| self.derive(key))
                }
                Err(error) => Err(error.into()),
            },
        }
    }

    /// The key's bytes, if one was given.
    fn key_bytes(&self) -> Result<Option<&[u8]>, KeyError> {
        self.key.as_ref().map(|key| key.bytes("key")).transpose()
    }

    /// The storage key of `key` in this call's scope, refused as [`StorageKey::derive`]
    /// refuses it: an empty key before a scope too long.
    fn derive(&self, key: &[u8]) -> Result<StorageKey, KeyError> {
        let scope = match &self.scope {
            Some(scope) => match scope.bytes("scope") {
                Ok(scope) => Some(scope),
                Err(_) if key.is_empty() => return Err(KeyError::Empty),
                Err(too_long) => return Err(too_long),
            },
            None => None,
        };
        StorageKey::derive(self.name, scope, key)
    }
}

/// A call's storage key and the arguments its store compares.
#[derive(Debug)]
pub(crate) struct KeyedArguments {
    pub(crate) key: StorageKey,
    pub(crate) arguments: CanonicalArguments,
}

impl KeyedArguments {
    /// The storage key `derive` gives for `key`, and the arguments. Without a key the
    /// fingerprint is the key; computed for it, it is also what the store compares, so no
    /// store hashes the arguments a second time.
    pub(crate) fn new(
        key: Option<&[u8]>,
        arguments: CanonicalArguments,
        derive: impl FnOnce(&[u8]) -> Result<StorageKey, crate::KeyError>,
    ) -> Result<Self, Error> {
        Ok(match key {
            Some(key) => Self {
                key: derive(key)?,
                arguments,
            },
            None => {
                let fingerprint = arguments.fingerprint();
                Self {
                    key: derive(fingerprint.as_bytes())?,
                    arguments: CanonicalArguments::from(fingerprint),
                }
            }
        })
    }
}

/// A call ready to run: its name, and its storage key and arguments, or why there are none.
#[doc(hidden)]
#[derive(Debug)]
pub struct Prepared {
    pub(crate) name: &'static str,
    pub(crate) keyed: Result<KeyedArguments, Error>,
}

/// What a call returned, and whether the body ran for it.
///
/// ```
/// use idempotent_core::Outcome;
///
/// let outcome = Outcome::Replayed(7);
/// assert!(outcome.is_replayed());
/// assert_eq!(outcome.into_value(), 7);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The body ran now and its value was recorded.
    Executed(T),
    /// The value recorded by an earlier call; the body did not run.
    Replayed(T),
    /// The body ran now, but its value could not be recorded: the store failed, or the lease
    /// was lost to another caller while the body ran. A retry may run the body again.
    Unrecorded(T),
}

impl<T> Outcome<T> {
    /// The value, however it was obtained.
    ///
    /// ```
    /// # use idempotent_core::Outcome;
    /// assert_eq!(Outcome::Executed("receipt").into_value(), "receipt");
    /// ```
    pub fn into_value(self) -> T {
        match self {
            Self::Executed(value) | Self::Replayed(value) | Self::Unrecorded(value) => value,
        }
    }

    /// The value, borrowed.
    ///
    /// ```
    /// # use idempotent_core::Outcome;
    /// assert_eq!(Outcome::Executed(3).value(), &3);
    /// ```
    pub fn value(&self) -> &T {
        match self {
            Self::Executed(value) | Self::Replayed(value) | Self::Unrecorded(value) => value,
        }
    }

    /// `true` when the value was replayed from the store: an HTTP layer may say so, e.g. with
    /// an `Idempotent-Replayed: true` header.
    ///
    /// ```
    /// # use idempotent_core::Outcome;
    /// assert!(!Outcome::Executed(1).is_replayed());
    /// ```
    pub fn is_replayed(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }
}

/// Runs futures under idempotency keys: the engine behind `#[idempotent]`, for code that
/// wants it without the attribute (an HTTP middleware, a queue consumer).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use idempotent_core::{Call, Fingerprint, Idempotency, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::Error> {
/// let engine = Idempotency::new(Arc::new(MemoryStore::new()));
/// let charges = AtomicU32::new(0);
/// let charge = || async {
///     charges.fetch_add(1, Ordering::SeqCst);
///     Ok::<_, idempotent_core::Error>(format!("receipt for 42.00"))
/// };
///
/// let call = Call::new("billing::charge", Fingerprint::of(&4200)?).key("order-42");
/// let first = engine.run(call, charge()).await?;
/// let retry = engine.run(call, charge()).await?;
///
/// assert!(!first.is_replayed() && retry.is_replayed());
/// assert_eq!(retry.into_value(), "receipt for 42.00");
/// assert_eq!(charges.load(Ordering::SeqCst), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Idempotency {
    store: Arc<dyn Store>,
    options: Options,
}

impl Idempotency {
    /// An engine over `store` with [`Options::default`].
    ///
    /// ```
    /// # use std::sync::Arc;
    /// let engine = idempotent_core::Idempotency::new(Arc::new(idempotent_core::MemoryStore::new()));
    /// ```
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            options: Options::new(),
        }
    }

    /// The same engine with other options.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use idempotent_core::{Idempotency, Options};
    /// let engine = Idempotency::with_default_store()
    ///     .with_options(Options::new().with_ttl(Duration::from_secs(600)));
    /// assert_eq!(engine.options().ttl(), Duration::from_secs(600));
    /// ```
    pub fn with_options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// The options in force.
    ///
    /// ```
    /// # use idempotent_core::{Idempotency, Options};
    /// assert_eq!(Idempotency::with_default_store().options(), &Options::default());
    /// ```
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The store.
    ///
    /// ```
    /// # use idempotent_core::Idempotency;
    /// let store = Idempotency::with_default_store().store().clone();
    /// ```
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Deletes the record of `call`'s key, whatever it holds; returns whether there was one.
    /// For operators: a record that fails to decode (corrupt, or written when the return type
    /// was another) is purged this way, and the next call runs. See [`Store::remove`].
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use idempotent_core::{Call, Fingerprint, Idempotency, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::Error> {
    /// let engine = Idempotency::new(Arc::new(MemoryStore::new()));
    /// let call = Call::new("reports::build", Fingerprint::of(&7)?).key("report-7");
    /// engine.run(call, async { Ok::<_, idempotent_core::Error>(1u32) }).await?;
    /// assert!(engine.forget(call).await?);
    /// let again = engine.run(call, async { Ok::<_, idempotent_core::Error>(2u32) }).await?;
    /// assert_eq!(again.into_value(), 2, "forgotten: the body ran again");
    /// # Ok(()) }
    /// ```
    pub async fn forget(&self, call: Call<'_>) -> Result<bool, Error> {
        let key = call.storage_key()?;
        let removed = timed(
            &*self.store,
            StoreOperation::Remove,
            self.store.remove(&key),
        )
        .await?;
        if removed {
            audit(call.name, &key, None, Change::Forgotten);
        }
        Ok(removed)
    }

    /// Deletes the store's expired records and returns how many there were
    /// ([`Store::purge_expired`]), with the audit trail's `purged` event and the store
    /// metrics' timing, which a purge sent to the store itself has not.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use idempotent_core::{Idempotency, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idempotent_core::Error> {
    /// let engine = Idempotency::new(Arc::new(MemoryStore::new()));
    /// assert_eq!(engine.purge_expired().await?, 0, "nothing has expired yet");
    /// # Ok(()) }
    /// ```
    pub async fn purge_expired(&self) -> Result<u64, Error> {
        let purged = timed(
            &*self.store,
            StoreOperation::PurgeExpired,
            self.store.purge_expired(),
        )
        .await?;
        audit_purged(purged);
        Ok(purged)
    }

    /// Runs `body` under `call`'s key unless a result is recorded; `Err` results are not
    /// recorded (the key is released, so a retry runs again).
    ///
    /// `body` is not polled unless this call acquires the key. See the type's example.
    pub async fn run<T, E, F>(&self, call: Call<'_>, body: F) -> Result<Outcome<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: Future<Output = Result<T, E>>,
    {
        let ledger = Leased::new(&self.store);
        execute::<OkOnly, T, E, F>(&ledger, &self.options, call.prepare(), body).await
    }

    /// Like [`Idempotency::run`], but an `Err` is recorded and replayed too: for errors that a
    /// retry would only repeat (a declined card), so the retry gets the same answer.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use idempotent_core::{Call, Fingerprint, Idempotency, MemoryStore};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Debug, PartialEq, Serialize, Deserialize)]
    /// enum PayError { Declined, Idempotency(String) }
    /// impl From<idempotent_core::Error> for PayError {
    ///     fn from(e: idempotent_core::Error) -> Self { PayError::Idempotency(e.to_string()) }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let engine = Idempotency::new(Arc::new(MemoryStore::new()));
    /// let call = Call::new("pay", Fingerprint::of(&1).unwrap()).key("order-1");
    /// let first = engine.run_caching_errors(call, async { Err::<u32, _>(PayError::Declined) }).await;
    /// let retry = engine.run_caching_errors(call, async { Ok::<u32, PayError>(1) }).await;
    /// assert_eq!(first, Err(PayError::Declined));
    /// assert_eq!(retry, Err(PayError::Declined), "the recorded error is replayed");
    /// # }
    /// ```
    pub async fn run_caching_errors<T, E, F>(
        &self,
        call: Call<'_>,
        body: F,
    ) -> Result<Outcome<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: Serialize + DeserializeOwned + From<Error>,
        F: Future<Output = Result<T, E>>,
    {
        let ledger = Leased::new(&self.store);
        execute::<OkAndErr, T, E, F>(&ledger, &self.options, call.prepare(), body).await
    }
}

impl Idempotency {
    /// [`Idempotency::run`] with the result recorded by `R` rather than as JSON: the HTTP
    /// layer's responses, whose bodies are stored as bytes.
    #[cfg(feature = "http")]
    pub(crate) async fn run_recorded<R, T, E, F>(
        &self,
        call: Call<'_>,
        body: F,
    ) -> Result<Outcome<T>, E>
    where
        R: Recording<T, E>,
        E: From<Error>,
        F: Future<Output = Result<T, E>>,
    {
        let ledger = Leased::new(&self.store);
        execute::<R, T, E, F>(&ledger, &self.options, call.prepare(), body).await
    }
}

/// The whole protocol for one call, with its records written where `ledger` writes them.
pub(crate) async fn execute<R, T, E, F>(
    ledger: &impl Ledger,
    options: &Options,
    call: Prepared,
    body: F,
) -> Result<Outcome<T>, E>
where
    R: Recording<T, E>,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    let (trace, KeyedArguments { key, arguments }) = start_call(call, options)?;
    // From here until the claim is settled, a dropped call still emits its event.
    let mut open = OpenCall::new(trace);
    let acquisition = acquire::<R, T, E>(ledger, &key, &arguments, options, &mut open).await;
    open.stop_waiting();
    let (fence, claimed_at) = match acquisition {
        Acquisition::Held { fence, claimed_at } => (fence, claimed_at),
        Acquisition::Answered(outcome, answer) => {
            open.emit(outcome);
            return answer;
        }
    };
    open.audit(fence, Change::Claimed);
    match ledger.keeping() {
        Keeping::Lease(store) => {
            let body = context::hold(store.as_store(), key, fence, body);
            // The holder owes the event from here: it emits `abandoned` if dropped unsettled.
            let trace = open.hand_over();
            let holder = Holder::new(store.to_store(), key, fence, trace.clone());
            run_leased::<R, T, E, _>(holder, options, claimed_at, trace, body).await
        }
        Keeping::Writes(writes) => {
            run_unleased::<R, T, E, _>(writes, key, fence, options, open, body).await
        }
    }
}

/// Validates the call and starts its trace; an invalid call is traced and refused.
fn start_call(call: Prepared, options: &Options) -> Result<(CallTrace, KeyedArguments), Error> {
    let mut trace = CallTrace::start(call.name);
    match options.validate().and(call.keyed) {
        Ok(keyed) => {
            trace.set_key(keyed.key);
            Ok((trace, keyed))
        }
        Err(error) => {
            trace.emit(CallOutcome::InvalidInput);
            Err(error)
        }
    }
}

/// How a call's claim ended.
enum Acquisition<T, E> {
    /// The key is this call's, under `fence`. `claimed_at`: when the claim that acquired was
    /// sent, read only for [`OnLeaseLoss::Cancel`].
    Held {
        fence: Fence,
        claimed_at: Option<tokio::time::Instant>,
    },
    /// The call is answered without running its body: the replay, or why not, and the
    /// outcome its event says.
    Answered(CallOutcome, Result<Outcome<T>, E>),
}

/// Claims until the key is this call's or the call has its answer, waiting for another holder
/// between claims while `on_conflict` allows.
async fn acquire<R, T, E>(
    ledger: &impl Ledger,
    key: &StorageKey,
    arguments: &CanonicalArguments,
    options: &Options,
    trace: &mut CallTrace,
) -> Acquisition<T, E>
where
    R: Recording<T, E>,
    E: From<Error>,
{
    let answered = |outcome, error: Error| Acquisition::Answered(outcome, Err(error.into()));
    // A clock read is a noticeable share of a replay from memory: only this mode needs one.
    let cancels = options.on_lease_loss() == OnLeaseLoss::Cancel;
    let mut wait = WaitBudget::new(match options.on_conflict() {
        OnConflict::Wait { timeout } => Some(timeout),
        OnConflict::Reject => None,
    });
    loop {
        let claimed_at = cancels.then(tokio::time::Instant::now);
        let claimed = ledger
            .claim(key, arguments, options.lease(), &mut wait)
            .await;
        let retry_after = match claimed {
            Ok(Claimed::Claim(Claim::Acquired { fence })) => {
                return Acquisition::Held { fence, claimed_at };
            }
            Ok(Claimed::Claim(Claim::Completed { output })) => {
                return match R::decode(&output) {
                    Ok(result) => Acquisition::Answered(
                        if trace.waited {
                            CallOutcome::Waited
                        } else {
                            CallOutcome::Replayed
                        },
                        result.map(Outcome::Replayed),
                    ),
                    Err(error) => Acquisition::Answered(
                        CallOutcome::DecodeError,
                        Err(Error::Decode(JsonError::new(error)).into()),
                    ),
                };
            }
            Ok(Claimed::Claim(Claim::Mismatch)) => {
                return answered(CallOutcome::Mismatch, Error::KeyReused);
            }
            Ok(Claimed::Refused(error)) => {
                let outcome = match error {
                    Error::Reentered => CallOutcome::Reentered,
                    _ => CallOutcome::Conflict,
                };
                return answered(outcome, error);
            }
            Ok(Claimed::Claim(Claim::InProgress { retry_after })) => retry_after,
            Err(error) => return answered(CallOutcome::StoreError, Error::Store(error)),
        };
        let left = wait.left();
        if left.is_zero() {
            return answered(CallOutcome::Conflict, Error::Conflict { retry_after });
        }
        trace.start_waiting();
        if let Err(error) = ledger.wait(key, left).await {
            return answered(CallOutcome::StoreError, Error::Store(error));
        }
    }
}

/// The key is ours under a lease: run the body and settle the claim whatever happens.
async fn run_leased<R, T, E, F>(
    holder: Holder,
    options: &Options,
    claimed_at: Option<tokio::time::Instant>,
    mut trace: CallTrace,
    body: F,
) -> Result<Outcome<T>, E>
where
    R: Recording<T, E>,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    let lease = options.lease();
    let run = holder.run_with_heartbeat(lease, options.on_lease_loss(), claimed_at, body);
    let Ok(result) = run.await else {
        holder.lost();
        trace.emit(CallOutcome::LeaseLost);
        return Err(Error::LeaseLost.into());
    };
    let (bytes, recorded) = match encode_result::<R, T, E>(&result, options) {
        ToRecord::Bytes(bytes, recorded) => (bytes, recorded),
        ToRecord::Nothing(outcome, answer) => {
            // An error we do not record, or an output we cannot: give the key back so a retry
            // runs again.
            holder.release().await;
            trace.emit(outcome);
            return answer.map_or_else(
                |error| Err(error.into()),
                |()| result.map(Outcome::Executed),
            );
        }
    };
    let fence = holder.fence();
    let write = holder
        .record(PendingRecord {
            output: bytes,
            ttl: options.ttl(),
            // Half a lease after the body ended: the rest is the margin before a retry may
            // find the claim dead.
            give_up: tokio::time::Instant::now() + options.lease() / 2,
            recorded,
        })
        .await;
    if settle_recording(&mut trace, fence, write, recorded) == recorded {
        result.map(Outcome::Executed)
    } else {
        result.map(Outcome::Unrecorded)
    }
}

/// The key is ours in something that settles the claim when it ends (a transaction): run the
/// body, then record its result or give the key back, once each. A body that panics, or a
/// call dropped before this returns, emits `abandoned` (`trace` is dropped open); the
/// transaction's end settles the claim.
async fn run_unleased<R, T, E, F>(
    writes: &impl Writes,
    key: StorageKey,
    fence: Fence,
    options: &Options,
    trace: OpenCall,
    body: F,
) -> Result<Outcome<T>, E>
where
    R: Recording<T, E>,
    E: From<Error>,
    F: Future<Output = Result<T, E>>,
{
    let _in_flight = InFlight::start(trace.function());
    let result = body.await;
    let (bytes, recorded) = match encode_result::<R, T, E>(&result, options) {
        ToRecord::Bytes(bytes, recorded) => (bytes, recorded),
        ToRecord::Nothing(outcome, answer) => {
            writes.release(&key, fence).await;
            trace.audit(fence, Change::Released);
            trace.emit(outcome);
            return answer.map_or_else(
                |error| Err(error.into()),
                |()| result.map(Outcome::Executed),
            );
        }
    };
    match writes.complete(&key, fence, bytes, options.ttl()).await {
        Ok(FencedWrite::Applied) => {
            trace.audit(fence, Change::Completed);
            trace.emit(recorded);
            result.map(Outcome::Executed)
        }
        Ok(FencedWrite::Fenced) => {
            trace.audit(fence, Change::TakenOver);
            trace.emit(CallOutcome::Fenced);
            result.map(Outcome::Unrecorded)
        }
        // What holds the claim is unusable now (a transaction that will not commit, nor will
        // the body's writes in it): say so rather than hand back a value whose effects will be
        // rolled back.
        Err(error) => {
            trace.emit(CallOutcome::StoreError);
            Err(Error::Store(error).into())
        }
    }
}

/// What to record for a body's result.
enum ToRecord {
    /// These bytes, and the event once they are recorded.
    Bytes(Bytes, CallOutcome),
    /// Nothing: the event, and `Ok` to return the body's own result (an `Err` that is not
    /// recorded) or the error that refused it (an output that does not serialize, does not
    /// decode back or is over the size limit).
    Nothing(CallOutcome, Result<(), Error>),
}

fn encode_result<R: Recording<T, E>, T, E>(result: &Result<T, E>, options: &Options) -> ToRecord {
    let (encoded, recorded) = match result {
        Ok(value) => (R::encode_ok(value), CallOutcome::Executed),
        Err(error) => match R::encode_err(error) {
            Some(encoded) => (encoded, CallOutcome::Failed),
            None => return ToRecord::Nothing(CallOutcome::Failed, Ok(())),
        },
    };
    let refused = |error| ToRecord::Nothing(CallOutcome::EncodeError, Err(error));
    match encoded {
        Ok(bytes) if bytes.len() > options.max_output_bytes() => refused(Error::OutputTooLarge {
            size: bytes.len(),
            limit: options.max_output_bytes(),
        }),
        // What is recorded must replay: serde_json writes NaN and infinities as `null`, which
        // no float decodes from, and a hand-written impl can be lopsided. Finding out now
        // releases the key; finding out on replay would fail every retry for the whole ttl.
        Ok(bytes) => match R::decode(&bytes) {
            Ok(_) => ToRecord::Bytes(Bytes::from(bytes), recorded),
            Err(error) => refused(Error::Encode(JsonError::new(error))),
        },
        Err(error) => refused(Error::Encode(JsonError::new(error))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a key, short arguments reach the store as they are; without one, their fingerprint
    /// is the key and the store gets it too rather than hashing them again.
    #[test]
    fn a_keyless_call_hands_the_store_the_fingerprint_it_keyed_by() {
        let arguments = CanonicalArguments::of(&("order-7", 4200)).unwrap();
        let keyed = Call::with_arguments("shop::checkout", &arguments)
            .key("order-7")
            .prepare();
        let compared = keyed.keyed.unwrap().arguments;
        assert_eq!(compared.exact(), arguments.exact());

        let keyless = Call::with_arguments("shop::checkout", &arguments);
        let expected_key = keyless.storage_key().unwrap();
        let KeyedArguments {
            key,
            arguments: compared,
        } = keyless.prepare().keyed.unwrap();
        assert_eq!(key, expected_key);
        assert_eq!(compared.exact(), None);
        assert_eq!(compared, arguments);
    }

    /// A key whose bytes are computed, as an integer's or a UUID's are.
    struct Computed(Vec<u8>);

    impl IdempotencyKey for Computed {
        fn key_bytes(&self) -> Cow<'_, [u8]> {
            Cow::Owned(self.0.clone())
        }
    }

    fn call() -> Call<'static> {
        Call::new("shop::checkout", Fingerprint::of(&1).unwrap())
    }

    #[test]
    fn a_call_stays_copy() {
        fn copy<T: Copy>(_: &T) {}
        let id = 42u64;
        copy(&call().key(&id).scope(&Computed(b"tenant".to_vec())));
    }

    /// The key and scope are their `IdempotencyKey` bytes, as the attribute takes them.
    #[test]
    fn integers_key_and_scope_by_their_decimal_text() {
        let (order, tenant) = (42u64, -7i32);
        assert_eq!(
            call().key(&order).scope(&tenant).storage_key(),
            call().key("42").scope("-7").storage_key()
        );
        assert_ne!(
            call().key(&order).storage_key(),
            call().key(&order.to_le_bytes()).storage_key()
        );
    }

    /// Computed bytes are held by the call up to the longest valid key, and refused past it
    /// with the error (and the order of errors) `StorageKey::derive` gives for them.
    #[test]
    fn computed_keys_are_held_up_to_the_limit_and_refused_past_it() {
        let longest = vec![b'k'; MAX_KEY_BYTES];
        let held = Computed(longest.clone());
        assert_eq!(
            call().key(&held).scope(&held).storage_key(),
            call().key(&longest).scope(&longest).storage_key()
        );
        assert!(call().key(&held).storage_key().is_ok());

        let too_long = Computed(vec![b'k'; 1 << 16]);
        let refused = |part| KeyError::TooLong {
            part,
            len: 1 << 16,
            max: MAX_KEY_BYTES,
        };
        assert_eq!(call().key(&too_long).storage_key(), Err(refused("key")));
        assert_eq!(
            call().key("k").scope(&too_long).storage_key(),
            Err(refused("scope"))
        );
        assert_eq!(
            call().scope(&too_long).storage_key(),
            Err(refused("scope")),
            "keyed by the fingerprint, the scope is still checked"
        );
        assert_eq!(
            call().key("").scope(&too_long).storage_key(),
            StorageKey::derive("shop::checkout", Some(&[b's'; 1 << 16]), b""),
            "an empty key is reported first, as derive reports it"
        );
        assert!(matches!(
            call().key(&too_long).prepare().keyed,
            Err(Error::InvalidKey(KeyError::TooLong { part: "key", .. }))
        ));
        assert!(matches!(
            call().key("k").scope(&too_long).prepare().keyed,
            Err(Error::InvalidKey(KeyError::TooLong { part: "scope", .. }))
        ));
        assert_eq!(
            call().key(&held).prepare().keyed.unwrap().key,
            call().key(&longest).storage_key().unwrap(),
            "the engine keys a call by its storage key"
        );
    }

    #[test]
    fn a_held_key_prints_as_a_borrowed_one() {
        let (held, borrowed) = (call().key(&42u8), call().key("42"));
        assert_eq!(format!("{held:?}"), format!("{borrowed:?}"));
        let too_long = Computed(vec![0; MAX_KEY_BYTES + 1]);
        assert!(format!("{:?}", call().key(&too_long)).contains("<too long>"));
    }

    /// A UUID is its hyphenated lowercase text through `Call` too, not its 16 raw bytes.
    #[cfg(feature = "uuid")]
    #[test]
    fn a_uuid_keys_and_scopes_a_call_by_its_text() {
        let id = uuid::Uuid::from_u128(0x3f1c_7a52_0b44_4b8e_9b43_1d2f_3d9b_8d10);
        let tenant = uuid::Uuid::from_u128(7);
        let text = (id.to_string(), tenant.to_string());
        assert_eq!(
            call().key(&id).scope(&tenant).storage_key(),
            call().key(&text.0).scope(&text.1).storage_key()
        );
        assert_ne!(
            call().key(&id).storage_key(),
            call().key(id.as_bytes()).storage_key()
        );
        assert_ne!(
            call().key("k").scope(&tenant).storage_key(),
            call().key("k").scope(tenant.as_bytes()).storage_key()
        );
    }
}
