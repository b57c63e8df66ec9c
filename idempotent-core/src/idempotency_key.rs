//! What can be an idempotency key or scope: anything with a stable byte form.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;

/// A value usable as an idempotency key (or scope): strings, byte strings, integers and, with
/// the `uuid` feature, `uuid::Uuid`.
///
/// A key's bytes are what names the operation, so one value has one byte form wherever it is
/// used: the attribute (`key = ..`, `scope = ..`), [`Call::key`](crate::Call::key) and
/// [`Call::scope`](crate::Call::scope) all key by [`key_bytes`](IdempotencyKey::key_bytes).
///
/// - Integers are keyed by their decimal text, so the order id `42` and the header value
///   `"42"` name the same operation.
/// - A `uuid::Uuid` (feature `uuid`) is keyed by its hyphenated lowercase text, the 36 bytes
///   `Uuid::to_string()` gives and an `Idempotency-Key` header carries
///   (`3f1c7a52-0b44-4b8e-9b43-1d2f3d9b8d10`), never by its 16 raw bytes: the UUID a client
///   sends as text and the same UUID parsed into a `Uuid` name the same operation.
///
/// ```
/// use idempotent_core::IdempotencyKey;
///
/// assert_eq!(&*"order-42".key_bytes(), b"order-42");
/// assert_eq!(&*42u64.key_bytes(), b"42");
/// assert_eq!(&*String::from("42").key_bytes(), &*(-0i32 + 42).key_bytes());
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an idempotency key or scope",
    label = "not a string, byte string, integer or UUID",
    note = "pass a stable string form of it (for example `.to_string()`), or implement `idempotent_core::IdempotencyKey` for it; a `uuid::Uuid` is a key with idempotent-core's `uuid` feature"
)]
pub trait IdempotencyKey {
    /// The key's bytes.
    ///
    /// ```
    /// use idempotent_core::IdempotencyKey;
    /// assert_eq!(&*b"raw".key_bytes(), b"raw");
    /// ```
    fn key_bytes(&self) -> Cow<'_, [u8]>;
}

impl IdempotencyKey for str {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_bytes())
    }
}

impl IdempotencyKey for [u8] {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self)
    }
}

impl<const N: usize> IdempotencyKey for [u8; N] {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self)
    }
}

macro_rules! forward {
    ($($ty:ty),*) => {$(
        impl IdempotencyKey for $ty {
            fn key_bytes(&self) -> Cow<'_, [u8]> {
                Cow::Borrowed(AsRef::<[u8]>::as_ref(&**self))
            }
        }
    )*};
}

forward!(String, Vec<u8>, Box<str>, Arc<str>, Rc<str>, Cow<'_, str>);

macro_rules! decimal {
    ($($ty:ty),*) => {$(
        impl IdempotencyKey for $ty {
            fn key_bytes(&self) -> Cow<'_, [u8]> {
                Cow::Owned(self.to_string().into_bytes())
            }
        }
    )*};
}

decimal!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

/// The hyphenated lowercase text, as `Uuid::to_string()` writes it and an `Idempotency-Key`
/// header carries it: 36 bytes, written from a stack buffer.
///
/// ```
/// use idempotent_core::IdempotencyKey;
/// use uuid::Uuid;
///
/// let id = Uuid::parse_str("3F1C7A52-0B44-4B8E-9B43-1D2F3D9B8D10").unwrap();
/// assert_eq!(&*id.key_bytes(), b"3f1c7a52-0b44-4b8e-9b43-1d2f3d9b8d10");
/// assert_eq!(&*id.key_bytes(), id.to_string().as_bytes());
/// assert_ne!(&*id.key_bytes(), id.as_bytes(), "not the 16 raw bytes");
/// ```
#[cfg(feature = "uuid")]
impl IdempotencyKey for uuid::Uuid {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        let text = self.hyphenated().encode_lower(&mut text);
        Cow::Owned(text.as_bytes().to_vec())
    }
}

impl<T: IdempotencyKey + ?Sized> IdempotencyKey for &T {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        (**self).key_bytes()
    }
}

impl<T: IdempotencyKey + ?Sized> IdempotencyKey for &mut T {
    fn key_bytes(&self) -> Cow<'_, [u8]> {
        (**self).key_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_bytes_and_integers() {
        let owned = String::from("k");
        assert_eq!(&*owned.key_bytes(), b"k");
        assert_eq!(&*(&&owned).key_bytes(), b"k");
        assert_eq!(&*Arc::<str>::from("k").key_bytes(), b"k");
        assert_eq!(&*vec![1u8, 2].key_bytes(), &[1, 2]);
        assert_eq!(&*(-7i64).key_bytes(), b"-7");
        assert_eq!(&*u128::MAX.key_bytes(), u128::MAX.to_string().as_bytes());
        assert!(
            matches!("k".key_bytes(), Cow::Borrowed(_)),
            "string keys are not copied"
        );
    }

    #[cfg(feature = "uuid")]
    #[test]
    fn a_uuid_is_its_hyphenated_lowercase_text() {
        let id = uuid::Uuid::from_u128(0x3F1C_7A52_0B44_4B8E_9B43_1D2F_3D9B_8D10);
        let bytes = id.key_bytes();
        assert_eq!(&*bytes, b"3f1c7a52-0b44-4b8e-9b43-1d2f3d9b8d10");
        assert_eq!(&*bytes, id.to_string().as_bytes());
        assert_eq!(bytes.len(), uuid::fmt::Hyphenated::LENGTH);
        assert_ne!(&*bytes, id.as_bytes(), "not the 16 raw bytes");
        assert_eq!(
            &*<&uuid::Uuid as IdempotencyKey>::key_bytes(&&id),
            &*bytes,
            "a reference keys as its UUID"
        );
        assert_eq!(
            &*uuid::Uuid::nil().key_bytes(),
            b"00000000-0000-0000-0000-000000000000"
        );
    }
}
