//! Canonical SHA-256 fingerprints of a call's arguments.
//!
//! A [`Fingerprint`] identifies "the same call" across retries, processes and
//! machines. Each argument goes through a custom serde `Serializer` that writes
//! a compact tagged encoding (see `canonical.rs`) onto the call's stream, hashed
//! with SHA-256 in one pass: no JSON text or `serde_json::Value` is built. A
//! stream of at most [`MAX_EXACT_ARGUMENTS`] bytes is kept as it is until a
//! fingerprint is asked for, so that a store which can compare it directly (see
//! [`CanonicalArguments`]) never hashes it.
//!
//! # What counts as equal
//!
//! Two values get the same fingerprint iff their JSON representations (as
//! `serde_json` would write them) are equal, ignoring the order of map entries
//! and of the elements of the hash sets the serializer recognises (see *Hash
//! sets*), with the exceptions listed under *Deviations*.
//!
//! - **Integers** of every width are one kind: `1u8`, `1i64` and `1u128` are
//!   equal. Integers and floats differ (`1` vs `1.0`), as JSON writes them
//!   differently.
//! - **Floats**: `f32` is widened to `f64`. `0.0` and `-0.0` differ (JSON
//!   writes `0.0` vs `-0.0`). Every NaN is one canonical NaN.
//! - **Strings**: a `char` is a one-character string. A string never equals a
//!   number (`"1"` vs `1`).
//! - **Bytes** (`serialize_bytes`) are a sequence of integers, equal to the
//!   same `Vec<u8>`.
//! - **Null**: `None`, `()` and unit structs are all null; `Some(v)` is `v`
//!   (so `Some(None::<u8>)` equals `None::<u8>`, as in JSON).
//! - **Enums** (externally tagged, serde's default): a unit variant is the
//!   string of its name; `V(x)` is `{"V": x}`; `V(a, b)` is `{"V": [a, b]}`;
//!   `V { a }` is `{"V": {"a": a}}`.
//! - **Structs** are the map of field name to value, so a struct equals a map
//!   with the same string keys and values. The struct's name is ignored.
//!   Fields skipped by `skip_serializing_if` are simply absent. Newtype
//!   structs are their inner value; tuples and tuple structs are sequences.
//! - **Maps** are order-independent: each entry is encoded on its own, and the
//!   entries are hashed sorted by their bytes. Non-string keys are allowed (unlike
//!   JSON); duplicate keys count as two entries.
//! - **Sequences** are ordered (`[1, 2]` differs from `[2, 1]`), except hash
//!   sets, see below.
//!
//! # Hash sets
//!
//! Serde cannot tell a `HashSet` from a `Vec`: both call `serialize_seq`. The
//! serializer therefore looks at [`std::any::type_name`] of every value it is
//! handed through a generic entry point (struct fields, sequence elements, map
//! keys and values, `Some`, newtype structs and variants, and
//! [`Fingerprinter::push`] itself). After stripping `&`, `&mut`, `Box`, `Arc`
//! and `Rc`, a `std::collections::HashSet` or `hashbrown::HashSet`, whatever its
//! hasher (so aliases such as `FxHashSet` too), is hashed as a multiset: its
//! elements are encoded separately and sorted.
//!
//! - **A hash set never equals a sequence**, not even a `Vec` or `BTreeSet`
//!   with the same elements in the same order, although JSON writes them the
//!   same. A multiset hash cannot equal an order-dependent one, and marking it
//!   with its own tag keeps the encoding unambiguous.
//! - `type_name` output is not guaranteed stable by Rust. A unit test pins the
//!   spellings relied on, so a compiler change fails the test suite instead of
//!   silently making hash sets ordered.
//! - Only those two set types are recognised, by their type name at those entry
//!   points. A hash set the serializer is never handed by its own type is an
//!   ordinary sequence, hashed in iteration order: one behind a `Serialize`
//!   impl that forwards to the inner set (`#[serde(transparent)]`, `Cow`, a
//!   hand-written impl, `ahash::AHashSet`) and any other set type
//!   (`dashmap::DashSet`). A derived newtype struct (`struct Tags(HashSet<u32>)`
//!   without `transparent`) is recognised, as are the wrappers above.
//! - What an unrecognised set costs: its iteration order differs between
//!   processes and runs, so a retry with the same elements can get another
//!   fingerprint. With an explicit key, that retry is refused with
//!   `Error::KeyReused`; without one the fingerprint *is* the key, so the retry
//!   gets another key and runs the body again. Use a `BTreeSet` there, or skip
//!   the argument.
//!
//! # Arguments
//!
//! [`Fingerprinter::push`] frames each argument on its own, so pushing `a` then
//! `b` differs from pushing the tuple `(a, b)` and from
//! [`Fingerprint::of(&(a, b))`](Fingerprint::of); `push("ab"), push("c")`
//! differs from `push("a"), push("bc")`. `Fingerprint::of(&x)` is exactly
//! `Fingerprinter::new().push(&x)?.finish()`, so it is a one-argument call.
//!
//! # Deviations from JSON
//!
//! - Hash sets versus sequences, as above.
//! - JSON writes NaN and the infinities as `null`; here they are floats, so
//!   they differ from `null` (and infinities from NaN).
//! - Map keys keep their kind: `serde_json` writes the integer key `1` as the
//!   string `"1"`, here `{1: x}` and `{"1": x}` differ.
//! - `f32` values are widened exactly, so `0.1f32` differs from `0.1f64` even
//!   though `serde_json` prints both as `0.1`.
//!
//! # Stability
//!
//! The encoding is part of stored data: records keep fingerprints. It is
//! versioned by the domain tag `idempotent.fingerprint.v3`, which fills the
//! first 64-byte SHA-256 block (zero-padded) so that block is compressed once per
//! process; any change to the encoding must bump that tag, and a test pins
//! known fingerprints.

mod arguments;
mod canonical;

pub use arguments::{CanonicalArguments, MAX_EXACT_ARGUMENTS};

use std::cell::Cell;
use std::fmt;
use std::sync::LazyLock;

use serde::Serialize;
use sha2::{Digest, Sha256};

use canonical::{Buffer, tag};

use crate::hex::write_hex32;

/// Separates these hashes from any other SHA-256 use and versions the
/// encoding: bump it whenever the encoding changes. Zero-padded to one
/// SHA-256 block, so every fingerprint starts from [`AFTER_DOMAIN`].
const DOMAIN: [u8; 64] = pad_to_block(b"idempotent.fingerprint.v3");

/// The hasher after the domain block: every fingerprint clones it instead of
/// compressing that block again (a third of a typical argument's hashing).
static AFTER_DOMAIN: LazyLock<Sha256> = LazyLock::new(|| Sha256::new_with_prefix(DOMAIN));

/// `tag` followed by zeros, as one 64-byte block.
const fn pad_to_block(tag: &[u8]) -> [u8; 64] {
    assert!(tag.len() < 64, "a domain tag fits in one block");
    let mut block = [0u8; 64];
    let mut i = 0;
    while i < tag.len() {
        block[i] = tag[i];
        i += 1;
    }
    block
}

/// SHA-256 fingerprint of a call's arguments.
///
/// Equal arguments (in the JSON sense: the rules are the module docs of
/// `fingerprint.rs`) give equal fingerprints in every process, whatever the
/// iteration order of their maps and of their hash sets, with one exception.
///
/// A hash set is recognised by its type name where the serializer is handed a
/// value (an argument, a field, an element, a map key or value, `Some`, a
/// newtype): a `std::collections::HashSet` or `hashbrown::HashSet`, with any
/// hasher, also behind `&`, `&mut`, `Box`, `Arc` or `Rc`. A set it is never
/// handed by its own type (behind a forwarding `Serialize` impl such as
/// `#[serde(transparent)]`, `Cow` or `ahash::AHashSet`, or of another set type
/// such as `dashmap::DashSet`) is fingerprinted in iteration order, which
/// differs between processes. A retry with the same elements can then get
/// another fingerprint: with an explicit key it is refused with
/// [`Error::KeyReused`](crate::Error::KeyReused); without one, the fingerprint being the key, it gets
/// another key and runs again. Use a `BTreeSet` there.
///
/// ```
/// use std::collections::HashMap;
/// use idempotent_core::Fingerprint;
///
/// let a = HashMap::from([("x", 1), ("y", 2)]);
/// let b = HashMap::from([("y", 2u64), ("x", 1)]);
/// assert_eq!(Fingerprint::of(&a)?, Fingerprint::of(&b)?);
/// assert_ne!(Fingerprint::of(&a)?, Fingerprint::of(&[1, 2])?);
/// # Ok::<(), idempotent_core::FingerprintError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Rebuilds a fingerprint from its raw bytes, e.g. as read from storage.
    ///
    /// ```
    /// use idempotent_core::Fingerprint;
    ///
    /// let fingerprint = Fingerprint::of("hello")?;
    /// assert_eq!(Fingerprint::from_bytes(*fingerprint.as_bytes()), fingerprint);
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw SHA-256 digest, e.g. to store it.
    ///
    /// ```
    /// use idempotent_core::Fingerprint;
    ///
    /// let fingerprint = Fingerprint::from_bytes([7; 32]);
    /// assert_eq!(fingerprint.as_bytes(), &[7; 32]);
    /// ```
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex characters (the same as `Display`).
    ///
    /// ```
    /// use idempotent_core::Fingerprint;
    ///
    /// let fingerprint = Fingerprint::from_bytes([0xab; 32]);
    /// assert_eq!(fingerprint.to_hex(), "ab".repeat(32));
    /// assert_eq!(fingerprint.to_string(), fingerprint.to_hex());
    /// ```
    pub fn to_hex(&self) -> String {
        self.to_string()
    }

    /// Fingerprints a single value as a one-argument call; the same as
    /// `Fingerprinter::new().push(value)?.finish()`.
    ///
    /// # Errors
    ///
    /// Returns [`FingerprintError`] if the value's `Serialize` impl fails.
    ///
    /// ```
    /// use idempotent_core::{Fingerprint, Fingerprinter};
    ///
    /// #[derive(serde::Serialize)]
    /// struct Transfer { from: String, to: String, cents: u64 }
    ///
    /// let transfer = Transfer { from: "alice".into(), to: "bob".into(), cents: 500 };
    /// let fingerprint = Fingerprint::of(&transfer)?;
    /// assert_eq!(fingerprint, Fingerprinter::new().push(&transfer)?.finish());
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Self, FingerprintError> {
        Ok(Fingerprinter::new().push(value)?.finish())
    }
}

impl fmt::Debug for Fingerprint {
    /// Abbreviated, because full digests drown log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        write_hex32(f, &self.0, 16)?;
        f.write_str("…)")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex32(f, &self.0, 64)
    }
}

/// Builds a fingerprint from a function's arguments, one at a time,
/// positionally.
///
/// Each argument is framed on its own: pushing `a` then `b` differs from
/// pushing the tuple `(a, b)`. If a push fails, the fingerprinter is poisoned:
/// later pushes fail too and [`finish`](Self::finish) returns a fingerprint
/// that no successful sequence of pushes produces, so drop it.
///
/// ```
/// use idempotent_core::Fingerprinter;
///
/// let mut first = Fingerprinter::new();
/// first.push("alice")?.push(&500u32)?;
/// let mut second = Fingerprinter::default();
/// second.push("alice")?.push(&500u64)?;
/// assert_eq!(first.finish(), second.finish());
/// # Ok::<(), idempotent_core::FingerprintError>(())
/// ```
#[derive(Clone)]
pub struct Fingerprinter {
    /// The stream hashed after the domain block, as it is while it is at most
    /// [`MAX_EXACT_ARGUMENTS`] bytes; once `hasher` is set, only the argument being written.
    stream: Vec<u8>,
    /// Set when the stream outgrew [`MAX_EXACT_ARGUMENTS`]: it holds everything written
    /// before the current argument. Boxed, as most calls never need it.
    hasher: Option<Box<Sha256>>,
    arguments: usize,
    poisoned: bool,
}

/// The fingerprint of a whole stream (every argument's item and the end marker), as kept by
/// [`CanonicalArguments`].
pub(crate) fn fingerprint_of_stream(stream: &[u8]) -> Fingerprint {
    Fingerprint(AFTER_DOMAIN.clone().chain_update(stream).finalize().into())
}

impl Default for Fingerprinter {
    /// The same as [`Fingerprinter::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprinter {
    /// Starts a fingerprint with no arguments.
    ///
    /// ```
    /// use idempotent_core::{Fingerprint, Fingerprinter};
    ///
    /// // No arguments is not the same as one `()` argument.
    /// assert_ne!(Fingerprinter::new().finish(), Fingerprint::of(&())?);
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn new() -> Self {
        Self {
            stream: Vec::new(),
            hasher: None,
            arguments: 0,
            poisoned: false,
        }
    }

    /// Adds the next positional argument.
    ///
    /// # Errors
    ///
    /// Returns [`FingerprintError`] if the argument's `Serialize` impl fails,
    /// or if an earlier push failed.
    ///
    /// ```
    /// use idempotent_core::Fingerprinter;
    ///
    /// let mut split = Fingerprinter::new();
    /// split.push("ab")?.push("c")?;
    /// let mut other = Fingerprinter::new();
    /// other.push("a")?.push("bc")?;
    /// assert_ne!(split.finish(), other.finish());
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn push<T: Serialize + ?Sized>(
        &mut self,
        argument: &T,
    ) -> Result<&mut Self, FingerprintError> {
        if self.poisoned {
            return Err(FingerprintError::new(
                "an earlier argument already failed".to_owned(),
            ));
        }
        if self.stream.capacity() == 0 {
            // One allocation for a typical call's arguments, which the call's
            // `CanonicalArguments` then keep.
            self.stream.reserve_exact(MAX_EXACT_ARGUMENTS);
        }
        let start = self.stream.len();
        // The argument is encoded straight onto the stream: the thread's buffer lends only its
        // stack of map entries.
        let written = with_buffer(|buffer| {
            std::mem::swap(&mut buffer.bytes, &mut self.stream);
            buffer.bytes.push(tag::ARG);
            let written = canonical::write_value(buffer, argument);
            std::mem::swap(&mut buffer.bytes, &mut self.stream);
            written
        });
        match written {
            Ok(()) => self.arguments = self.arguments.saturating_add(1),
            Err(error) => {
                self.poisoned = true;
                self.stream.truncate(start);
                self.stream.extend_from_slice(&[tag::ARG, tag::POISON]);
                self.hash_if_long();
                return Err(error);
            }
        }
        self.hash_if_long();
        Ok(self)
    }

    /// Once the stream outgrows [`MAX_EXACT_ARGUMENTS`], hashes what was written and keeps
    /// only the hash, so a large argument is not kept for the fingerprinter's lifetime.
    fn hash_if_long(&mut self) {
        if self.hasher.is_none() && self.stream.len() <= MAX_EXACT_ARGUMENTS {
            return;
        }
        self.hasher
            .get_or_insert_with(|| Box::new(AFTER_DOMAIN.clone()))
            .update(&self.stream);
        self.stream.clear();
    }

    /// The fingerprint of the arguments pushed so far. Does not consume the
    /// fingerprinter, so more arguments may be pushed afterwards.
    ///
    /// ```
    /// use idempotent_core::Fingerprinter;
    ///
    /// let mut args = Fingerprinter::new();
    /// args.push(&1)?;
    /// let one = args.finish();
    /// args.push(&2)?;
    /// assert_ne!(one, args.finish());
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn finish(&self) -> Fingerprint {
        with_buffer(|end| {
            canonical::write_header(&mut end.bytes, tag::ARGS_END, self.arguments);
            self.digest_with(&end.bytes)
        })
    }

    /// The fingerprint of the stream so far followed by `end`.
    fn digest_with(&self, end: &[u8]) -> Fingerprint {
        let mut hasher = match &self.hasher {
            Some(hasher) => (**hasher).clone(),
            None => AFTER_DOMAIN.clone(),
        };
        hasher.update(&self.stream);
        hasher.update(end);
        Fingerprint(hasher.finalize().into())
    }

    /// The arguments pushed so far, as a store compares them: kept as they are if their
    /// encoding is short, else fingerprinted (see [`CanonicalArguments`]). Like
    /// [`finish`](Self::finish), it does not consume the fingerprinter.
    ///
    /// ```
    /// use idempotent_core::Fingerprinter;
    ///
    /// let mut args = Fingerprinter::new();
    /// args.push("order-7")?.push(&4200)?;
    /// assert_eq!(args.arguments().fingerprint(), args.finish());
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn arguments(&self) -> CanonicalArguments {
        self.clone().into_arguments()
    }

    /// [`arguments`](Self::arguments), keeping the stream rather than copying it.
    pub(crate) fn into_arguments(mut self) -> CanonicalArguments {
        canonical::write_header(&mut self.stream, tag::ARGS_END, self.arguments);
        if self.hasher.is_none() && self.stream.len() <= MAX_EXACT_ARGUMENTS {
            return CanonicalArguments::exact_stream(self.stream);
        }
        // The stream now ends with its marker.
        CanonicalArguments::from(self.digest_with(&[]))
    }
}

thread_local! {
    /// The map-entry stack and sorting room of this thread's pushes: fingerprints are taken on
    /// every call, and reusing them saves allocations each time.
    static BUFFER: Cell<Buffer> = const { Cell::new(Buffer::new()) };
}

/// Buffers larger than this are dropped after use rather than kept for the thread's lifetime.
const MAX_KEPT_BUFFER: usize = 64 * 1024;

/// Runs `write` with an empty buffer: this thread's reused one, or a new one if it is in use
/// (an argument's `Serialize` impl that fingerprints something itself) or gone (thread exit).
fn with_buffer<R>(write: impl FnOnce(&mut Buffer) -> R) -> R {
    let mut buffer = BUFFER.try_with(Cell::take).unwrap_or_default();
    buffer.clear();
    let result = write(&mut buffer);
    if buffer.capacity() <= MAX_KEPT_BUFFER {
        let _ = BUFFER.try_with(|kept| kept.set(buffer));
    }
    result
}

/// An argument could not be fingerprinted: its `Serialize` impl failed (it
/// called `serde::ser::Error::custom`, or broke serde's key/value protocol).
///
/// ```
/// use idempotent_core::Fingerprint;
///
/// struct Secret;
/// impl serde::Serialize for Secret {
///     fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
///         Err(serde::ser::Error::custom("secrets are not serializable"))
///     }
/// }
///
/// let error = Fingerprint::of(&Secret).unwrap_err();
/// assert!(error.to_string().contains("secrets are not serializable"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintError {
    message: String,
}

impl FingerprintError {
    fn new(message: String) -> Self {
        Self { message }
    }
}

impl fmt::Display for FingerprintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot fingerprint the arguments: {}; skip this argument from the \
             fingerprint or fix its Serialize impl",
            self.message
        )
    }
}

impl std::error::Error for FingerprintError {}

impl serde::ser::Error for FingerprintError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::new(msg.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// What this thread's buffer holds for reuse now.
    fn kept_buffer() -> usize {
        BUFFER.with(|kept| {
            let buffer = kept.take();
            let capacity = buffer.capacity();
            kept.set(buffer);
            capacity
        })
    }

    fn map(entries: u32) -> HashMap<u32, u32> {
        (0..entries).map(|n| (n, n)).collect()
    }

    /// The thread's buffer is kept for the next fingerprint, up to `MAX_KEPT_BUFFER`: one that
    /// grew past it (a huge map) is dropped rather than held for the thread's lifetime.
    #[test]
    fn the_threads_buffer_is_kept_unless_it_grew_too_large() {
        Fingerprint::of(&map(10)).unwrap();
        assert!(kept_buffer() > 0, "a small buffer is kept");
        Fingerprint::of(&map(300)).unwrap();
        let kept = kept_buffer();
        assert!(
            (2048..=MAX_KEPT_BUFFER).contains(&kept),
            "a buffer of a few KiB is kept: {kept} bytes"
        );
        Fingerprint::of(&map(100_000)).unwrap();
        assert!(
            kept_buffer() <= MAX_KEPT_BUFFER,
            "a buffer of {} bytes was kept",
            kept_buffer()
        );
    }

    /// A large argument is hashed as soon as it is pushed, not kept until `finish`: the
    /// stream is emptied once it outgrows `MAX_EXACT_ARGUMENTS`, short ones stay in it.
    #[test]
    fn a_long_argument_is_hashed_at_once_not_kept() {
        let mut fingerprinter = Fingerprinter::new();
        fingerprinter.push("short").unwrap();
        assert!(fingerprinter.hasher.is_none());
        assert!(!fingerprinter.stream.is_empty());
        fingerprinter.push(&"x".repeat(100_000)).unwrap();
        assert!(fingerprinter.hasher.is_some());
        assert!(
            fingerprinter.stream.is_empty(),
            "{} bytes kept",
            fingerprinter.stream.len()
        );
        // Once hashing, short arguments are hashed as they come too.
        fingerprinter.push("short").unwrap();
        assert!(fingerprinter.stream.is_empty());
    }

    #[test]
    fn hex_and_debug_formats() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0x01;
        bytes[7] = 0xfe;
        bytes[31] = 0xa0;
        let fingerprint = Fingerprint::from_bytes(bytes);
        let hex = fingerprint.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("01000000000000fe"));
        assert!(hex.ends_with("a0"));
        assert_eq!(fingerprint.to_string(), hex);
        assert_eq!(format!("{fingerprint:?}"), "Fingerprint(01000000000000fe…)");
    }

    #[test]
    fn default_is_new() {
        assert_eq!(
            Fingerprinter::default().finish(),
            Fingerprinter::new().finish()
        );
    }

    #[test]
    fn poisoned_fingerprinter_keeps_failing() {
        struct Fails;
        impl Serialize for Fails {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("nope"))
            }
        }
        let mut args = Fingerprinter::new();
        assert!(args.push(&Fails).is_err());
        assert!(args.push(&1).is_err());
        // The failed argument wrote nothing but its ARG tag; without the
        // poison marker this would equal a zero-argument call plus that tag.
        assert_ne!(args.finish(), Fingerprinter::new().finish());
        let mut unit = Fingerprinter::new();
        assert!(unit.push(&()).is_ok());
        assert_ne!(args.finish(), unit.finish());
    }

    #[test]
    fn error_message_says_what_to_do() {
        let error = <FingerprintError as serde::ser::Error>::custom("boom");
        let message = error.to_string();
        assert!(message.starts_with("cannot fingerprint the arguments: boom;"));
        assert!(message.contains("Serialize impl"));
    }
}
