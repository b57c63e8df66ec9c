//! Storage keys: what a store files a record under.
//!
//! The raw idempotency key is never stored. The storage key is SHA-256 over the namespace (which
//! function), the scope (which tenant) and the key, each framed with its length, so that
//! keys of different functions or tenants can never meet and every store key is 32 bytes.
//!
//! The namespace comes first, zero-padded to whole 64-byte SHA-256 blocks: a [`Namespace`]
//! compresses those blocks once, and deriving a key pads its scope and key onto a copy of that
//! state and compresses only their block(s): one when they total at most 52 bytes.
use std::fmt;
use std::sync::OnceLock;

use sha2::block_api::compress256;

use crate::hex::write_hex32;

/// The longest idempotency key (and scope) accepted, in bytes.
///
/// Keys are identifiers (an order id, a UUID, a client-sent `Idempotency-Key` header), not
/// payloads; a longer key is almost always a request body passed by mistake.
pub const MAX_KEY_BYTES: usize = 255;

/// Domain tag: a later key derivation can change it without colliding with this one.
const DERIVATION_TAG: &[u8] = b"idempotent.storage-key.v2\0";

/// SHA-256's block size: the namespace's part of the message is padded to a multiple of it.
const BLOCK: usize = 64;

/// Why an idempotency key or scope was refused.
///
/// ```
/// use idempotent_core::{KeyError, StorageKey};
///
/// let err = StorageKey::derive("checkout", None, b"").unwrap_err();
/// assert_eq!(err, KeyError::Empty);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key has no bytes: every caller would share one record.
    #[error(
        "the idempotency key is empty: pass a value that identifies the operation, such as an order id or the client's Idempotency-Key header"
    )]
    Empty,
    /// The key or the scope is longer than [`MAX_KEY_BYTES`].
    #[error(
        "the idempotency {part} is {len} bytes, longer than the {max}-byte limit: use an identifier (an id or a UUID), not a whole request"
    )]
    TooLong {
        /// `"key"` or `"scope"`.
        part: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit, [`MAX_KEY_BYTES`].
        max: usize,
    },
}

/// The fixed-size key a store files a record under: SHA-256 of (namespace, scope, key).
///
/// ```
/// use idempotent_core::StorageKey;
///
/// let a = StorageKey::derive("shop::checkout", Some(b"tenant-1"), b"order-42")?;
/// let b = StorageKey::derive("shop::checkout", Some(b"tenant-2"), b"order-42")?;
/// assert_ne!(a, b, "tenants never share records");
/// assert_eq!(a.to_hex().len(), 64);
/// # Ok::<(), idempotent_core::KeyError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey([u8; 32]);

impl StorageKey {
    /// Derives the storage key of `key` for the function `namespace`, within `scope`.
    ///
    /// `None` and `Some(b"")` are different scopes. Fails if `key` is empty or if `key` or
    /// `scope` is longer than [`MAX_KEY_BYTES`].
    ///
    /// ```
    /// use idempotent_core::StorageKey;
    ///
    /// // Length framing keeps the parts apart: "ab"+"c" is not "a"+"bc".
    /// let ab_c = StorageKey::derive("ab", None, b"c")?;
    /// let a_bc = StorageKey::derive("a", None, b"bc")?;
    /// assert_ne!(ab_c, a_bc);
    /// # Ok::<(), idempotent_core::KeyError>(())
    /// ```
    pub fn derive(namespace: &str, scope: Option<&[u8]>, key: &[u8]) -> Result<Self, KeyError> {
        Self::derive_after(&namespace_prefix(namespace), scope, key)
    }

    /// [`StorageKey::derive`] from a namespace's hashed prefix.
    pub(crate) fn derive_after(
        prefix: &Midstate,
        scope: Option<&[u8]>,
        key: &[u8],
    ) -> Result<Self, KeyError> {
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        let key_len = short_len("key", key)?;
        let scope_len;
        let (scope_frame, scope): (&[u8], &[u8]) = match scope {
            None => (&[0], &[]),
            Some(scope) => {
                scope_len = [1, short_len("scope", scope)?];
                (&scope_len, scope)
            }
        };
        Ok(Self(prefix.digest_with(&[
            scope_frame,
            scope,
            &[key_len],
            key,
        ])))
    }

    /// Wraps 32 bytes read back from a store.
    ///
    /// ```
    /// use idempotent_core::StorageKey;
    ///
    /// let key = StorageKey::from_bytes([7; 32]);
    /// assert_eq!(key.as_bytes(), &[7; 32]);
    /// ```
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    ///
    /// ```
    /// use idempotent_core::StorageKey;
    ///
    /// let key = StorageKey::derive("f", None, b"k")?;
    /// assert_eq!(key.as_bytes().len(), 32);
    /// # Ok::<(), idempotent_core::KeyError>(())
    /// ```
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters: the form stores and logs use.
    ///
    /// ```
    /// use idempotent_core::StorageKey;
    ///
    /// assert_eq!(StorageKey::from_bytes([0xab; 32]).to_hex(), "ab".repeat(32));
    /// ```
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({})", self)
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex32(f, &self.0, 64)
    }
}

/// The length of a key or scope as its one-byte frame, or why it is too long.
fn short_len(part: &'static str, bytes: &[u8]) -> Result<u8, KeyError> {
    match u8::try_from(bytes.len()) {
        Ok(len) if usize::from(len) <= MAX_KEY_BYTES => Ok(len),
        _ => Err(KeyError::TooLong {
            part,
            len: bytes.len(),
            max: MAX_KEY_BYTES,
        }),
    }
}

/// The SHA-256 state after the tag and the length-framed namespace, zero-padded to whole
/// blocks.
fn namespace_prefix(namespace: &str) -> Midstate {
    let mut prefix = Vec::with_capacity(DERIVATION_TAG.len() + 8 + namespace.len() + BLOCK);
    prefix.extend_from_slice(DERIVATION_TAG);
    prefix.extend_from_slice(&(namespace.len() as u64).to_be_bytes());
    prefix.extend_from_slice(namespace.as_bytes());
    prefix.resize(prefix.len().next_multiple_of(BLOCK), 0);
    let (blocks, rest) = prefix.as_chunks::<BLOCK>();
    debug_assert!(rest.is_empty());
    let mut state = SHA256_IV;
    compress256(&mut state, blocks);
    Midstate {
        state,
        blocks: blocks.len() as u64,
    }
}

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The longest tail a key adds after the prefix: scope frame and scope, key frame and key.
const MAX_TAIL: usize = 2 + MAX_KEY_BYTES + 1 + MAX_KEY_BYTES;

/// SHA-256 after whole blocks: its state, and how many blocks it has taken. A key's own bytes
/// are then padded here and compressed directly; the general hasher's buffering and
/// finalisation were a noticeable share of a replay from memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Midstate {
    state: [u32; 8],
    blocks: u64,
}

impl Midstate {
    /// The digest of the message so far followed by `parts`, which total at most `MAX_TAIL`
    /// bytes.
    fn digest_with(&self, parts: &[&[u8]]) -> [u8; 32] {
        let tail: usize = parts.iter().map(|part| part.len()).sum();
        // The tail, 0x80, zeros, and the message's length in bits: one block for most keys.
        if tail + 9 <= BLOCK {
            let mut block = [0u8; BLOCK];
            self.finish_into(&mut block, parts, tail)
        } else {
            let mut blocks = [0u8; (MAX_TAIL + 9).next_multiple_of(BLOCK)];
            let len = (tail + 9).next_multiple_of(BLOCK);
            self.finish_into(&mut blocks[..len], parts, tail)
        }
    }

    /// Writes `parts` and the padding into `out` (zeroed, exactly the padded length) and
    /// compresses it.
    fn finish_into(&self, out: &mut [u8], parts: &[&[u8]], tail: usize) -> [u8; 32] {
        let mut at = 0;
        for part in parts {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        out[tail] = 0x80;
        let bits = (self.blocks * BLOCK as u64 + tail as u64) * 8;
        let end = out.len();
        out[end - 8..].copy_from_slice(&bits.to_be_bytes());
        let (blocks, _) = out.as_chunks::<BLOCK>();
        let mut state = self.state;
        compress256(&mut state, blocks);
        let mut digest = [0u8; 32];
        for (bytes, word) in digest.chunks_exact_mut(4).zip(state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }
}

/// A function's namespace, with the hash of its part of every storage key computed once.
///
/// `#[idempotent]` keeps one in a `static` per function; [`Call::new`](crate::Call::new)
/// derives the same keys from the bare name, hashing the prefix on every call.
///
/// ```
/// use idempotent_core::StorageKey;
/// use idempotent_core::__private::Namespace;
///
/// static CHECKOUT: Namespace = Namespace::new("shop::checkout");
/// assert_eq!(
///     CHECKOUT.storage_key(Some(b"tenant-1"), b"order-42")?,
///     StorageKey::derive("shop::checkout", Some(b"tenant-1"), b"order-42")?,
/// );
/// # Ok::<(), idempotent_core::KeyError>(())
/// ```
#[derive(Debug)]
pub struct Namespace {
    name: &'static str,
    prefix: OnceLock<Midstate>,
}

impl Namespace {
    /// The namespace `name`; nothing is hashed until its first key.
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            prefix: OnceLock::new(),
        }
    }

    /// Its name, as [`Call::new`](crate::Call::new) takes it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The storage key of `key` within `scope` in this namespace: [`StorageKey::derive`].
    pub fn storage_key(&self, scope: Option<&[u8]>, key: &[u8]) -> Result<StorageKey, KeyError> {
        let prefix = self.prefix.get_or_init(|| namespace_prefix(self.name));
        StorageKey::derive_after(prefix, scope, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_keeps_parts_apart() {
        let cases = [
            (("ab", None, &b"c"[..]), ("a", None, &b"bc"[..])),
            (
                ("f", Some(&b"ab"[..]), &b"c"[..]),
                ("f", Some(&b"a"[..]), &b"bc"[..]),
            ),
            (("f", Some(&b""[..]), &b"k"[..]), ("f", None, &b"k"[..])),
            (("fk", None, &b"k"[..]), ("f", Some(&b"k"[..]), &b"k"[..])),
        ];
        for ((n1, s1, k1), (n2, s2, k2)) in cases {
            assert_ne!(
                StorageKey::derive(n1, s1, k1).unwrap(),
                StorageKey::derive(n2, s2, k2).unwrap(),
                "{n1:?}/{s1:?}/{k1:?} vs {n2:?}/{s2:?}/{k2:?}"
            );
        }
    }

    /// The key depends on the parts' bytes only: parts built at run time, in buffers of their
    /// own, give the independently computed key of equal literal parts.
    #[test]
    fn same_parts_same_key() {
        let namespace: String = ["shop", "::", "checkout"].concat();
        let scope = b"ten".iter().chain(b"ant").copied().collect::<Vec<u8>>();
        let key = format!("order-{}", 1).into_bytes();
        let derived = StorageKey::derive(&namespace, Some(&scope), &key).unwrap();
        assert_eq!(derived.to_hex(), PINNED);
    }

    #[test]
    fn key_lengths_at_the_limits() {
        assert_eq!(StorageKey::derive("f", None, b""), Err(KeyError::Empty));
        assert!(StorageKey::derive("f", None, b"k").is_ok());
        assert!(StorageKey::derive("f", None, &[b'k'; MAX_KEY_BYTES]).is_ok());
        assert_eq!(
            StorageKey::derive("f", None, &[b'k'; MAX_KEY_BYTES + 1]),
            Err(KeyError::TooLong {
                part: "key",
                len: 256,
                max: 255
            })
        );
        let huge = vec![0u8; 1 << 20];
        assert!(matches!(
            StorageKey::derive("f", None, &huge),
            Err(KeyError::TooLong { len, .. }) if len == 1 << 20
        ));
        assert!(matches!(
            StorageKey::derive("f", Some(&[b's'; 256]), b"k"),
            Err(KeyError::TooLong { part: "scope", .. })
        ));
    }

    #[test]
    fn debug_shows_the_whole_hex() {
        let key = StorageKey::derive("shop::checkout", Some(b"tenant"), b"order-1").unwrap();
        assert_eq!(format!("{key:?}"), format!("StorageKey({PINNED})"));
    }

    #[test]
    fn a_namespace_keeps_its_name_and_derives_as_derive_does() {
        let namespace = Namespace::new("shop::checkout");
        assert_eq!(namespace.name(), "shop::checkout");
        let key = namespace.storage_key(Some(b"tenant"), b"order-1").unwrap();
        assert_eq!(key.to_hex(), PINNED);
    }

    #[test]
    fn pinned_derivation() {
        // Changing the derivation orphans every stored record: bump DERIVATION_TAG instead.
        let key = StorageKey::derive("shop::checkout", Some(b"tenant"), b"order-1").unwrap();
        assert_eq!(key.to_string(), key.to_hex());
        assert_eq!(key.to_hex(), PINNED);
    }

    // Computed independently: Python hashlib over the same framing (which also reproduces
    // version 1's pinned key).
    const PINNED: &str = "eb4c5b03a4fde8028e55cf67e3c2ea960fffde2c4143d851f1adf89272de516d";

    #[test]
    fn pinned_derivations_around_block_boundaries() {
        // The prefix (26-byte tag, 8-byte length, namespace) is padded to whole blocks: 100
        // bytes of namespace need a second block; 30 and 94 fill one and two exactly (no
        // padding); a 53-byte key is the longest that fits one block after the prefix.
        let check = |expected: &str, namespace: &str, scope: Option<&[u8]>, key: &[u8]| {
            let derived = StorageKey::derive(namespace, scope, key).unwrap();
            assert_eq!(
                derived.to_hex(),
                expected,
                "a {}-byte namespace",
                namespace.len()
            );
        };
        check(
            "2056107e9aa24aa1217659bd3af0bb0b9e9541dda0a6284bf1d1c2b580268233",
            &"a".repeat(100),
            None,
            b"k",
        );
        check(
            "3157951c04e2dad2016385107bec2fcfa6a2f54025bcb339e1279c4b01791b78",
            &"n".repeat(30),
            Some(b"t"),
            b"k",
        );
        check(
            "1edee2fbef8e7a1dfe530c8aa38e6481607039feaa50626575e7853cffe8815e",
            &"n".repeat(94),
            None,
            &[b'k'; 53],
        );
        // After the prefix, the key's own bytes are padded by hand: a 54-byte key is the first
        // to need a second block, and the longest scope and key need nine.
        check(
            "5942b82573492c2db6278ef189b03cd89412ad3a94cc886a2fafdf982e560bd2",
            "shop::checkout",
            None,
            &[b'k'; 54],
        );
        check(
            "7c26cda587b9b5007259ba67932d03acabdf8a653a0811e2baab0c46b45f352a",
            "shop::checkout",
            Some(&[b's'; MAX_KEY_BYTES]),
            &[b'k'; MAX_KEY_BYTES],
        );
    }

    #[test]
    fn a_namespace_derives_what_its_name_derives() {
        static NAMESPACE: Namespace = Namespace::new("shop::checkout");
        let scopes: [Option<&[u8]>; 3] = [None, Some(b""), Some(b"tenant")];
        for scope in scopes {
            for key in [&b"k"[..], &[b'x'; 52], &[b'y'; 53], &[b'z'; MAX_KEY_BYTES]] {
                assert_eq!(
                    NAMESPACE.storage_key(scope, key),
                    StorageKey::derive("shop::checkout", scope, key),
                    "{scope:?} {}",
                    key.len()
                );
            }
        }
        assert_eq!(
            NAMESPACE.storage_key(None, b""),
            Err(KeyError::Empty),
            "a namespace checks keys too"
        );
    }

    #[test]
    fn errors_say_what_to_do() {
        let message = KeyError::Empty.to_string();
        assert!(
            message.contains("empty") && message.contains("order id"),
            "{message}"
        );
        let message = StorageKey::derive("f", None, &[0; 300])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("300 bytes") && message.contains("255"),
            "{message}"
        );
    }
}
