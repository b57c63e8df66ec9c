//! Recorded outputs that whoever reads the store cannot read, and cannot move or alter
//! unnoticed (feature `encryption`).
//!
//! [`EncryptedStore`] wraps any [`Store`]: every output is sealed before it is written
//! ([`Store::complete`]) and opened when a claim finds it ([`Claim::Completed`]). The AEAD is
//! XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`), with a fresh 192-bit nonce from the
//! operating system's CSPRNG per record: nonces that large can be drawn at random without
//! counting. The associated data is the record's storage key and the fingerprint of the
//! arguments it was recorded for, so a sealed output copied under another key, kept under its
//! key beside the fingerprint of other arguments, or with a single bit flipped (in the header,
//! the nonce, the ciphertext or the tag), is refused with [`StoreError::Corrupt`]: the call
//! fails and its body does not run, and it is never replayed.
//!
//! [`Store::complete`] is not given the arguments, so the wrapper keeps the fingerprint of each
//! claim it acquired, by key and fence, until that claim is completed or released (about 100
//! bytes per claim in flight). A claim left neither (its release failed) is dropped from
//! that table a minute after its lease ends, by which time the store fences its completion.
//!
//! The [`KeyRing`] holds the keys by id: the newest seals, every one opens, so keys rotate by
//! adding a new one in front and keeping the old ones until the records they sealed have
//! expired (the longest ttl in use). Key material is wiped when dropped and never printed.
//!
//! What it does not hide: the storage keys and the fingerprints, a record's size (to within the
//! header) and its timing. [`KeyedStore`] hides the first two: it derives both with a secret
//! (HMAC-SHA256), so the store's contents say nothing testable about keys or arguments. The two
//! wrap each other: `EncryptedStore::new(KeyedStore::new(store, secret), keys)`. The transactional
//! mode writes its records through the caller's transaction, not through a [`Store`]: its
//! outputs are not sealed by this wrapper.
//!
//! A record written without the wrapper (plaintext) is refused too, since a forger could write
//! one: turn encryption on with a fresh table or key prefix, or expect the keys already
//! recorded to fail until their records expire (or are forgotten).
//!
//! ```
//! use std::sync::Arc;
//! use idempotent_core::encryption::{EncryptedStore, KeyRing};
//! use idempotent_core::{Call, Fingerprint, Idempotency, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In production the keys come from a secret manager; 32 bytes each.
//! let keys = KeyRing::new("2026-12", [7; 32])?.with_old_key("2026-06", [3; 32])?;
//! let store = EncryptedStore::new(MemoryStore::new(), keys);
//! let engine = Idempotency::new(Arc::new(store));
//! let call = Call::new("payments::charge", Fingerprint::of(&4200)?).key("order-7");
//! let receipt = engine
//!     .run(call, async { Ok::<_, idempotent_core::Error>("ch_1".to_string()) })
//!     .await?;
//! assert_eq!(receipt.into_value(), "ch_1");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::StoreError;
use crate::fingerprint::{CanonicalArguments, Fingerprint};
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes, Claim, Fence, FencedWrite, Store};

/// The first byte of a sealed output: the format of what follows. Format 1 (an earlier
/// development version) did not bind the fingerprint, and is refused.
const FORMAT: u8 = 2;
/// XChaCha20-Poly1305's nonce and tag.
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// What the associated data starts with, before the storage key: the purpose, so a sealed
/// output cannot be taken for anything else sealed with the same keys.
const CONTEXT: &[u8] = b"idempotent-core output v2";

/// Why a key ring cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyRingError {
    /// A key id must be 1 to 255 bytes, so it fits the sealed output's header.
    #[error("a key id must be 1 to 255 bytes long, got {0} bytes")]
    InvalidId(usize),
    /// Two keys were given the same id: which one opens a record would be ambiguous.
    #[error("the key id {0:?} is in the key ring twice")]
    DuplicateId(String),
}

/// The keys an [`EncryptedStore`] seals and opens with, by id. The first (from
/// [`KeyRing::new`]) seals every new record; the others ([`KeyRing::with_old_key`]) only open
/// the records they sealed. `Debug` shows the ids, never the keys; the keys are wiped when the
/// ring is dropped.
///
/// ```
/// use idempotent_core::encryption::KeyRing;
///
/// let keys = KeyRing::new("k2", [2; 32])?.with_old_key("k1", [1; 32])?;
/// assert_eq!(keys.current_id(), "k2");
/// assert_eq!(format!("{keys:?}"), r#"KeyRing { current: "k2", old: ["k1"] }"#);
/// # Ok::<(), idempotent_core::encryption::KeyRingError>(())
/// ```
pub struct KeyRing {
    /// The sealing key's cipher first, each made once (XChaCha20-Poly1305 wipes its key when
    /// dropped). Boxed, so growing the ring moves pointers, not keys: a vector that grows frees
    /// its old buffer without wiping it.
    keys: Vec<(String, Box<XChaCha20Poly1305>)>,
}

impl KeyRing {
    /// A ring whose key `id` seals and opens records.
    pub fn new(id: impl Into<String>, key: [u8; 32]) -> Result<Self, KeyRingError> {
        let id = checked(id.into())?;
        Ok(Self {
            keys: vec![(id, cipher(key))],
        })
    }

    /// Adds a key that only opens records (one that sealed them before a rotation).
    pub fn with_old_key(
        mut self,
        id: impl Into<String>,
        key: [u8; 32],
    ) -> Result<Self, KeyRingError> {
        let id = checked(id.into())?;
        if self.keys.iter().any(|(known, _)| *known == id) {
            return Err(KeyRingError::DuplicateId(id));
        }
        self.keys.push((id, cipher(key)));
        Ok(self)
    }

    /// The id of the key that seals new records.
    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }

    fn cipher(&self, id: &[u8]) -> Option<&XChaCha20Poly1305> {
        self.keys
            .iter()
            .find(|(known, _)| known.as_bytes() == id)
            .map(|(_, cipher)| &**cipher)
    }
}

/// The cipher of `key`; the copy passed in is wiped once the cipher holds it.
fn cipher(key: [u8; 32]) -> Box<XChaCha20Poly1305> {
    let key = Zeroizing::new(key);
    let bytes: &[u8; 32] = &key;
    Box::new(XChaCha20Poly1305::new(bytes.into()))
}

fn checked(id: String) -> Result<String, KeyRingError> {
    if id.is_empty() || id.len() > 255 {
        return Err(KeyRingError::InvalidId(id.len()));
    }
    Ok(id)
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.keys[0].0)
            .field(
                "old",
                &self.keys[1..].iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The associated data of `key`'s sealed output for `arguments`, with `header` (format and
/// key id).
fn associated_data(key: &StorageKey, arguments: &Fingerprint, header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(CONTEXT.len() + 64 + header.len());
    aad.extend_from_slice(CONTEXT);
    aad.extend_from_slice(key.as_bytes());
    aad.extend_from_slice(arguments.as_bytes());
    aad.extend_from_slice(header);
    aad
}

/// Seals `output` for `key` and `arguments` with the ring's current key:
/// `[format][id length][id][nonce][ciphertext and tag]`.
fn seal(
    ring: &KeyRing,
    key: &StorageKey,
    arguments: &Fingerprint,
    output: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let (id, cipher) = &ring.keys[0];
    let mut header = Vec::with_capacity(2 + id.len());
    header.push(FORMAT);
    header.push(id.len() as u8);
    header.extend_from_slice(id.as_bytes());
    let nonce = XNonce::try_generate().map_err(|error| StoreError::Backend {
        message: format!(
            "the operating system's random source failed, so no output was sealed: {error}"
        ),
        source: None,
    })?;
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: output,
                aad: &associated_data(key, arguments, &header),
            },
        )
        .map_err(|_| StoreError::Backend {
            message: "the output could not be sealed (too long for the cipher)".to_string(),
            source: None,
        })?;
    let mut record = header;
    record.extend_from_slice(&nonce);
    record.extend_from_slice(&sealed);
    Ok(record)
}

/// Opens what [`seal`] wrote for `key` and `arguments`.
fn open(
    ring: &KeyRing,
    key: &StorageKey,
    arguments: &Fingerprint,
    record: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        key: key.to_hex(),
        message,
    };
    let Some((&format, rest)) = record.split_first() else {
        return Err(corrupt(
            "the recorded output is empty, not a sealed one".to_string(),
        ));
    };
    if format != FORMAT {
        return Err(corrupt(format!(
            "the recorded output is not sealed by this release (format byte {format}): written without encryption, or altered"
        )));
    }
    let id_len = usize::from(*rest.first().unwrap_or(&0));
    if id_len == 0 || rest.len() < 1 + id_len + NONCE_LEN + TAG_LEN {
        return Err(corrupt("the sealed output is truncated".to_string()));
    }
    let id = &rest[1..1 + id_len];
    let header = &record[..2 + id_len];
    let nonce = XNonce::try_from(&rest[1 + id_len..1 + id_len + NONCE_LEN])
        .map_err(|_| corrupt("the sealed output's nonce is truncated".to_string()))?;
    let sealed = &rest[1 + id_len + NONCE_LEN..];
    let Some(cipher) = ring.cipher(id) else {
        return Err(corrupt(format!(
            "the output was sealed with the key {:?}, which is not in the key ring: add it with KeyRing::with_old_key",
            String::from_utf8_lossy(id)
        )));
    };
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: sealed,
                aad: &associated_data(key, arguments, header),
            },
        )
        .map_err(|_| {
            corrupt(format!(
                "the sealed output does not authenticate under the key {:?}: it was altered, copied from another key or other arguments, or sealed with another key of that id; it is not replayed",
                String::from_utf8_lossy(id)
            ))
        })
}

/// A [`Store`] whose recorded outputs are sealed: see the [module docs](self).
pub struct EncryptedStore<S> {
    inner: S,
    keys: KeyRing,
    claims: Mutex<Claims>,
}

/// The arguments of the claims an [`EncryptedStore`] acquired and has not seen completed or
/// released, which it seals their outputs for.
struct Claims {
    held: HashMap<(StorageKey, Fence), Held>,
    /// The size at which the claims whose leases ended long ago are dropped.
    sweep_at: usize,
}

struct Held {
    arguments: Fingerprint,
    lease_ends: Instant,
}

/// How long after its lease ends a claim's arguments are kept: past it, the store fences the
/// claim's completion (a lease is timed by the store's clock, close to this one).
const KEPT_PAST_LEASE: Duration = Duration::from_secs(60);
/// The fewest claims in the table before any are dropped.
const SWEEP_AT_LEAST: usize = 1024;

impl Claims {
    fn hold(&mut self, key: StorageKey, fence: Fence, arguments: Fingerprint, lease: Duration) {
        let now = Instant::now();
        if self.held.len() >= self.sweep_at {
            self.held
                .retain(|_, held| held.lease_ends + KEPT_PAST_LEASE > now);
            self.sweep_at = SWEEP_AT_LEAST.max(2 * self.held.len());
        }
        let lease_ends = now.checked_add(lease).unwrap_or(now + KEPT_PAST_LEASE);
        self.held.insert(
            (key, fence),
            Held {
                arguments,
                lease_ends,
            },
        );
    }
}

impl<S: Store> EncryptedStore<S> {
    /// `inner`, with its outputs sealed under `keys`.
    pub fn new(inner: S, keys: KeyRing) -> Self {
        Self {
            inner,
            keys,
            claims: Mutex::new(Claims {
                held: HashMap::new(),
                sweep_at: SWEEP_AT_LEAST,
            }),
        }
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        // A panic elsewhere cannot leave the table half-changed: every change is one call.
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for EncryptedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedStore")
            .field("inner", &self.inner)
            .field("keys", &self.keys)
            .finish()
    }
}

impl<S: Store> Store for EncryptedStore<S> {
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            match self.inner.claim(key, arguments, lease).await? {
                Claim::Completed { output } => Ok(Claim::Completed {
                    output: Bytes::from(open(&self.keys, key, &arguments.fingerprint(), &output)?),
                }),
                Claim::Acquired { fence } => {
                    self.claims()
                        .hold(*key, fence, arguments.fingerprint(), lease);
                    Ok(Claim::Acquired { fence })
                }
                other => Ok(other),
            }
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let arguments = self
                .claims()
                .held
                .get(&(*key, fence))
                .map(|held| held.arguments);
            let Some(arguments) = arguments else {
                return Err(StoreError::Backend {
                    message: "this EncryptedStore did not acquire the claim it is asked to complete (or its lease ended over a minute ago), so it does not know the arguments to seal the output for: the output is not recorded".to_string(),
                    source: None,
                });
            };
            let sealed = seal(&self.keys, key, &arguments, &output)?;
            let write = self
                .inner
                .complete(key, fence, Bytes::from(sealed), ttl)
                .await?;
            // Kept until the store answers: the engine tries a failed completion again.
            self.claims().held.remove(&(*key, fence));
            Ok(write)
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let write = self.inner.release(key, fence).await?;
            self.claims().held.remove(&(*key, fence));
            Ok(write)
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let write = self.inner.extend(key, fence, lease).await?;
            if write == FencedWrite::Applied
                && let Some(held) = self.claims().held.get_mut(&(*key, fence))
            {
                held.lease_ends = Instant::now().checked_add(lease).unwrap_or(held.lease_ends);
            }
            Ok(write)
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.wait(key, max)
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.purge_expired()
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.remove(key)
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

/// A [`Store`] that sees storage keys and fingerprints only as HMAC-SHA256 under a secret.
///
/// A storage key is SHA-256 over the function's name, the scope and the key, and a
/// fingerprint SHA-256 over the arguments: anyone who can read the store can hash guesses of a
/// low-entropy key or argument (an order number, an amount) and look for them. Through this
/// wrapper the store holds `HMAC(secret, storage key)` and `HMAC(secret, fingerprint)` instead
/// (each with its own label), which cannot be tested without the secret. Nothing else changes:
/// one key still has one record, and other arguments are still a mismatch.
///
/// Records written before the secret was set (or under another secret) are not found: a call
/// with their key runs as a first call, and the old record is left alone until it expires.
/// Keep the secret for as long as the records it wrote should replay. Operators who look up a
/// record by its key (`idempotent inspect`) need the same secret; logs show the unkeyed storage
/// key's first 8 bytes, as always.
///
/// ```
/// use std::sync::Arc;
/// use idempotent_core::encryption::KeyedStore;
/// use idempotent_core::{Call, Fingerprint, Idempotency, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = KeyedStore::new(MemoryStore::new(), [42; 32]);
/// let engine = Idempotency::new(Arc::new(store));
/// let call = Call::new("orders::create", Fingerprint::of(&7)?).key("order-7");
/// let created = engine.run(call, async { Ok::<_, idempotent_core::Error>(7) }).await?;
/// assert!(!created.is_replayed());
/// # Ok(()) }
/// ```
pub struct KeyedStore<S> {
    inner: S,
    secret: Zeroizing<[u8; 32]>,
}

impl<S: Store> KeyedStore<S> {
    /// `inner`, seeing keys and fingerprints under `secret` (32 random bytes, kept secret).
    pub fn new(inner: S, secret: [u8; 32]) -> Self {
        Self {
            inner,
            secret: Zeroizing::new(secret),
        }
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn mac(&self, label: &[u8], bytes: &[u8; 32]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(self.secret.as_ref())
            .expect("HMAC takes a key of any length");
        mac.update(label);
        mac.update(bytes);
        mac.finalize().into_bytes().into()
    }

    /// The storage key the inner store sees for `key`.
    pub fn keyed(&self, key: &StorageKey) -> StorageKey {
        StorageKey::from_bytes(self.mac(b"idempotent-core storage key v1", key.as_bytes()))
    }

    fn arguments(&self, arguments: &CanonicalArguments) -> CanonicalArguments {
        let fingerprint = arguments.fingerprint();
        CanonicalArguments::from(Fingerprint::from_bytes(
            self.mac(b"idempotent-core fingerprint v1", fingerprint.as_bytes()),
        ))
    }
}

impl<S: fmt::Debug> fmt::Debug for KeyedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S: Store> Store for KeyedStore<S> {
    fn claim<'a>(
        &'a self,
        key: &'a StorageKey,
        arguments: &'a CanonicalArguments,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let (key, arguments) = (self.keyed(key), self.arguments(arguments));
            self.inner.claim(&key, &arguments, lease).await
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        output: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let key = self.keyed(key);
            self.inner.complete(&key, fence, output, ttl).await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let key = self.keyed(key);
            self.inner.release(&key, fence).await
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a StorageKey,
        fence: Fence,
        lease: Duration,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        Box::pin(async move {
            let key = self.keyed(key);
            self.inner.extend(&key, fence, lease).await
        })
    }

    fn wait<'a>(
        &'a self,
        key: &'a StorageKey,
        max: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let key = self.keyed(key);
            self.inner.wait(&key, max).await
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.purge_expired()
    }

    fn remove<'a>(&'a self, key: &'a StorageKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let key = self.keyed(key);
            self.inner.remove(&key).await
        })
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> StorageKey {
        StorageKey::derive("encryption::tests", None, name.as_bytes()).unwrap()
    }

    fn args(value: u32) -> Fingerprint {
        Fingerprint::of(&value).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_sealed_output_opens_only_under_its_key_with_its_key_id() {
        let ring = KeyRing::new("k1", [1; 32]).unwrap();
        let sealed = seal(&ring, &key("a"), &args(1), b"{\"ok\":42}").unwrap();
        assert_eq!(
            open(&ring, &key("a"), &args(1), &sealed).unwrap(),
            b"{\"ok\":42}"
        );
        assert!(!sealed.windows(4).any(|w| w == b"\"ok\""), "no plaintext");
        assert!(matches!(
            open(&ring, &key("b"), &args(1), &sealed),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            open(&ring, &key("a"), &args(2), &sealed),
            Err(StoreError::Corrupt { .. })
        ));
        // Every byte flipped, one at a time: the format, the id, the nonce, the ciphertext, the tag.
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 1;
            assert!(
                open(&ring, &key("a"), &args(1), &altered).is_err(),
                "byte {i} flipped"
            );
        }
        // Cut anywhere: shorter than the header, nonce and tag, it is refused as truncated
        // before any decryption; longer, the tag fails.
        let shortest = 2 + "k1".len() + NONCE_LEN + TAG_LEN;
        for len in 0..sealed.len() {
            let error = open(&ring, &key("a"), &args(1), &sealed[..len]).unwrap_err();
            assert_eq!(
                error.to_string().contains("truncated"),
                (1..shortest).contains(&len),
                "cut at {len}: {error}"
            );
        }
        let other = KeyRing::new("k1", [9; 32]).unwrap();
        assert!(
            open(&other, &key("a"), &args(1), &sealed).is_err(),
            "another key of the same id"
        );
        let rotated = KeyRing::new("k2", [2; 32]).unwrap();
        let error = open(&rotated, &key("a"), &args(1), &sealed).unwrap_err();
        assert!(error.to_string().contains("\"k1\""), "{error}");
    }

    /// The edges: an empty output (a sealed record of header, nonce and tag only), and a key
    /// id of 255 bytes, the longest the header's length byte holds.
    #[test]
    fn an_empty_output_and_the_longest_key_id_seal_and_open() {
        let longest = "x".repeat(255);
        let ring = KeyRing::new(longest.clone(), [3; 32]).unwrap();
        assert_eq!(ring.current_id(), longest);
        for output in [&b""[..], b"{\"ok\":1}"] {
            let sealed = seal(&ring, &key("a"), &args(1), output).unwrap();
            assert_eq!(sealed.len(), 2 + 255 + NONCE_LEN + output.len() + TAG_LEN);
            assert_eq!(open(&ring, &key("a"), &args(1), &sealed).unwrap(), output);
        }
        let rotated = KeyRing::new("new", [4; 32])
            .unwrap()
            .with_old_key(longest, [3; 32])
            .unwrap();
        assert_eq!(rotated.current_id(), "new", "the first key seals");
    }

    #[test]
    fn key_rings_refuse_bad_ids_and_never_print_keys() {
        assert_eq!(
            KeyRing::new("", [0; 32]).unwrap_err(),
            KeyRingError::InvalidId(0)
        );
        assert_eq!(
            KeyRing::new("x".repeat(256), [0; 32]).unwrap_err(),
            KeyRingError::InvalidId(256)
        );
        assert_eq!(
            KeyRing::new("a", [1; 32])
                .unwrap()
                .with_old_key("a", [2; 32])
                .unwrap_err(),
            KeyRingError::DuplicateId("a".to_string())
        );
        let ring = KeyRing::new("a", [0xAB; 32]).unwrap();
        let printed = format!("{ring:?}");
        let store = EncryptedStore::new(crate::MemoryStore::new(), ring);
        let keyed = KeyedStore::new(crate::MemoryStore::new(), [0xAB; 32]);
        let (store, keyed) = (format!("{store:?}"), format!("{keyed:?}"));
        assert!(
            store.starts_with("EncryptedStore") && store.contains("current: \"a\""),
            "{store}"
        );
        assert!(keyed.starts_with("KeyedStore"), "{keyed}");
        let printed = format!("{printed} {store} {keyed}");
        assert!(printed.contains("current: \"a\""), "{printed}");
        assert!(!printed.contains("171"), "{printed}");
        assert!(!printed.to_lowercase().contains("ab, "), "{printed}");
    }

    /// What holds key material wipes it when dropped: the ciphers of the ring, the copy of a
    /// key passed in, the keyed store's secret, and the HMAC state derived from it (with the
    /// `zeroize` features of `hmac` and `sha2`, which `encryption` turns on). Checked by the
    /// types: this does not compile if one of them stops wiping.
    #[test]
    fn key_material_is_of_types_that_wipe_it_when_dropped() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop + ?Sized>() {}
        wiped_on_drop::<XChaCha20Poly1305>();
        wiped_on_drop::<Zeroizing<[u8; 32]>>();
        // An HMAC's state is two SHA-256 states (inner and outer) keyed by the secret.
        wiped_on_drop::<<Sha256 as hmac::EagerHash>::Core>();
    }

    /// The keyed store's derivations are HMAC-SHA256 under the secret, each with its label:
    /// values computed apart from this crate (Python's `hmac` module).
    #[test]
    fn keyed_keys_and_fingerprints_are_hmac_sha256_of_their_label_and_bytes() {
        let store = KeyedStore::new(crate::MemoryStore::new(), [42; 32]);
        let bytes: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            store.keyed(&StorageKey::from_bytes(bytes)).to_hex(),
            "4034149228f9f7a134d78715dc78c5a1adfc6f9ee27b26b17b53826914b66661"
        );
        let arguments = CanonicalArguments::from(Fingerprint::from_bytes(bytes));
        assert_eq!(
            store.arguments(&arguments).fingerprint().to_hex(),
            "ba99901eeee3c1f2367a4e5c677e238964f209bf9a6665cc8bcb049d5c982549"
        );
    }

    #[test]
    fn claims_whose_leases_ended_long_ago_are_dropped_once_the_table_grows() {
        let mut claims = Claims {
            held: HashMap::new(),
            sweep_at: SWEEP_AT_LEAST,
        };
        let long_ago = Instant::now() - (KEPT_PAST_LEASE + Duration::from_secs(1));
        let lately = Instant::now() - (KEPT_PAST_LEASE - Duration::from_secs(5));
        for i in 0..SWEEP_AT_LEAST as u64 {
            let lease_ends = if i == 0 { lately } else { long_ago };
            let held = Held {
                arguments: args(1),
                lease_ends,
            };
            claims
                .held
                .insert((key(&i.to_string()), Fence::new(i)), held);
        }
        claims.hold(key("live"), Fence::new(7), args(2), Duration::from_secs(30));
        // The claim whose lease ended less than a minute ago, and the new one.
        assert_eq!(claims.held.len(), 2);
        assert!(claims.held.contains_key(&(key("0"), Fence::new(0))));
        // Live claims are all kept, however many; a sweep that keeps them all doubles the
        // size at which the next one runs, so sweeping stays a constant cost per claim.
        for i in 0..2 * SWEEP_AT_LEAST as u64 {
            let name = format!("live-{i}");
            claims.hold(key(&name), Fence::new(i), args(2), Duration::from_secs(30));
        }
        assert_eq!(claims.held.len(), 2 + 2 * SWEEP_AT_LEAST);
        assert_eq!(claims.sweep_at, 4 * SWEEP_AT_LEAST);
        // A lease too long for the clock is kept as if it ended a minute from now at the least.
        claims.hold(key("forever"), Fence::new(1), args(3), Duration::MAX);
        let forever = &claims.held[&(key("forever"), Fence::new(1))];
        assert!(
            forever.lease_ends > Instant::now(),
            "kept, not swept at once"
        );
    }

    /// An applied renewal moves the kept claim's end with the lease; a fenced one changes
    /// nothing. The wrappers name their inner store's kind (the metrics' `store` label).
    #[tokio::test]
    async fn an_applied_renewal_moves_the_kept_claims_end() {
        let store = EncryptedStore::new(
            crate::MemoryStore::new(),
            KeyRing::new("k", [5; 32]).unwrap(),
        );
        let arguments = CanonicalArguments::from(args(1));
        let Claim::Acquired { fence } = store
            .claim(&key("a"), &arguments, Duration::from_millis(200))
            .await
            .unwrap()
        else {
            panic!("a new key is acquired");
        };
        let ends = |store: &EncryptedStore<crate::MemoryStore>| {
            store.claims().held[&(key("a"), fence)].lease_ends
        };
        let before = ends(&store);
        let other = Fence::new(fence.get() + 1);
        assert_eq!(
            store.extend(&key("a"), other, HOUR).await.unwrap(),
            FencedWrite::Fenced
        );
        assert_eq!(ends(&store), before, "a fenced renewal moves nothing");
        assert_eq!(
            store.extend(&key("a"), fence, HOUR).await.unwrap(),
            FencedWrite::Applied
        );
        assert!(
            ends(&store) > before + Duration::from_secs(1800),
            "renewed for an hour"
        );
        assert_eq!(store.kind(), "memory");
        assert_eq!(
            KeyedStore::new(crate::MemoryStore::new(), [1; 32]).kind(),
            "memory"
        );
    }

    #[test]
    fn every_seal_draws_a_new_nonce() {
        let ring = KeyRing::new("k", [5; 32]).unwrap();
        let first = seal(&ring, &key("a"), &args(1), b"same").unwrap();
        let second = seal(&ring, &key("a"), &args(1), b"same").unwrap();
        assert_ne!(first, second);
        assert_ne!(first[3..3 + NONCE_LEN], second[3..3 + NONCE_LEN]);
    }
}
