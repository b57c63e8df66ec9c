//! What can be an idempotency key or scope: anything with a stable byte form.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;

/// A value usable as an idempotency key (or scope): strings, byte strings and integers.
///
/// Integers are keyed by their decimal text, so the order id `42` and the header value `"42"`
/// name the same operation.
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
    label = "not a string, byte string or integer",
    note = "pass a stable string form of it (for example `.to_string()`), or implement `idempotent_core::IdempotencyKey` for it"
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
}
