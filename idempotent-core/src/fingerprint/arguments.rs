//! A call's arguments as a store compares them: the canonical encoding itself while it is
//! short, its SHA-256 fingerprint otherwise.
//!
//! Networked stores keep fingerprints, so they hash either way. The in-memory store can
//! compare short encodings byte for byte instead: it skips the two or three SHA-256
//! compressions that arguments of up to [`MAX_EXACT_ARGUMENTS`] bytes take (about 80 ns for a
//! typical call's two, a sixth of a replay from memory), and an exact comparison cannot
//! collide.

use std::fmt;

use serde::Serialize;

use super::{Fingerprint, FingerprintError, Fingerprinter, fingerprint_of_stream};

/// The longest canonical encoding (every argument's item and the end marker) kept as is.
/// Longer ones are hashed as they are written. Two cache lines: room for a few
/// identifiers, amounts and flags, which is what most idempotent calls take.
pub const MAX_EXACT_ARGUMENTS: usize = 128;

/// A call's arguments in the form a [`Store`](crate::Store) compares: the canonical
/// encoding when it is at most [`MAX_EXACT_ARGUMENTS`] bytes, else its [`Fingerprint`].
///
/// Both forms of the same arguments are the same arguments: the fingerprint is always
/// available ([`fingerprint`](Self::fingerprint)), and a store that keeps fingerprints
/// compares those. Equality follows the fingerprint, as the module docs of
/// [`Fingerprint`] describe.
///
/// ```
/// use idempotent_core::{CanonicalArguments, Fingerprint, Fingerprinter};
///
/// let short = CanonicalArguments::of(&("order-7", 4200))?;
/// assert!(short.exact().is_some(), "short arguments are kept as they are");
/// assert_eq!(short.fingerprint(), Fingerprint::of(&("order-7", 4200))?);
///
/// // A fingerprint computed elsewhere is the same arguments, in the other form.
/// assert_eq!(CanonicalArguments::from(short.fingerprint()), short);
///
/// let mut long = Fingerprinter::new();
/// long.push(&"x".repeat(500))?;
/// assert!(long.arguments().exact().is_none(), "long arguments are hashed");
/// # Ok::<(), idempotent_core::FingerprintError>(())
/// ```
#[derive(Clone)]
pub struct CanonicalArguments {
    form: Form,
}

#[derive(Clone)]
enum Form {
    /// The whole stream hashed after the domain block, in the allocation the fingerprinter
    /// wrote it to: an allocator's small-size cache costs less than moving the bytes through
    /// every step of a call.
    Exact(Vec<u8>),
    Digest(Fingerprint),
}

impl CanonicalArguments {
    /// The arguments of a one-argument call; the same as
    /// `Fingerprinter::new().push(value)?.arguments()`.
    ///
    /// # Errors
    ///
    /// Returns [`FingerprintError`] if the value's `Serialize` impl fails.
    ///
    /// ```
    /// use idempotent_core::CanonicalArguments;
    ///
    /// assert_eq!(CanonicalArguments::of(&1u8)?, CanonicalArguments::of(&1u64)?);
    /// assert_ne!(CanonicalArguments::of(&1)?, CanonicalArguments::of(&"1")?);
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Self, FingerprintError> {
        Ok(Fingerprinter::new().push(value)?.arguments())
    }

    /// Keeps `stream`, which is at most [`MAX_EXACT_ARGUMENTS`] bytes, as is.
    pub(crate) fn exact_stream(stream: Vec<u8>) -> Self {
        debug_assert!(stream.len() <= MAX_EXACT_ARGUMENTS);
        Self {
            form: Form::Exact(stream),
        }
    }

    /// The canonical encoding, if it is short enough to be kept: what the in-memory store
    /// compares byte for byte. Not a stable format to store elsewhere: store the
    /// [`fingerprint`](Self::fingerprint), which is versioned.
    ///
    /// ```
    /// use idempotent_core::{CanonicalArguments, Fingerprint};
    ///
    /// let arguments = CanonicalArguments::of("cart-7")?;
    /// assert!(arguments.exact().is_some_and(|bytes| bytes.len() < 16));
    /// assert_eq!(CanonicalArguments::from(Fingerprint::of("cart-7")?).exact(), None);
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn exact(&self) -> Option<&[u8]> {
        match &self.form {
            Form::Exact(stream) => Some(stream),
            Form::Digest(_) => None,
        }
    }

    /// The SHA-256 fingerprint of the arguments: hashed now if they are kept exact.
    ///
    /// ```
    /// use idempotent_core::{CanonicalArguments, Fingerprint};
    ///
    /// let arguments = CanonicalArguments::of(&[1, 2, 3])?;
    /// assert_eq!(arguments.fingerprint(), Fingerprint::of(&[1, 2, 3])?);
    /// # Ok::<(), idempotent_core::FingerprintError>(())
    /// ```
    pub fn fingerprint(&self) -> Fingerprint {
        match &self.form {
            Form::Exact(stream) => fingerprint_of_stream(stream),
            Form::Digest(fingerprint) => *fingerprint,
        }
    }

    /// Whether `exact`, a canonical encoding kept by a store, is these arguments. Hashes only
    /// when one side is a fingerprint.
    pub(crate) fn matches_exact(&self, exact: &[u8]) -> bool {
        match self.exact() {
            Some(mine) => mine == exact,
            None => self.fingerprint() == fingerprint_of_stream(exact),
        }
    }
}

impl From<Fingerprint> for CanonicalArguments {
    /// Arguments known only by their fingerprint, e.g. one computed over a request body.
    fn from(fingerprint: Fingerprint) -> Self {
        Self {
            form: Form::Digest(fingerprint),
        }
    }
}

impl PartialEq for CanonicalArguments {
    /// Equal when they are the same arguments, whichever form each is in.
    fn eq(&self, other: &Self) -> bool {
        match other.exact() {
            Some(theirs) => self.matches_exact(theirs),
            None => self.fingerprint() == other.fingerprint(),
        }
    }
}

impl Eq for CanonicalArguments {}

impl fmt::Debug for CanonicalArguments {
    /// The fingerprint, abbreviated, and which form the arguments are in.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form = if self.exact().is_some() {
            "exact"
        } else {
            "digest"
        };
        f.debug_struct("CanonicalArguments")
            .field("form", &form)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}
