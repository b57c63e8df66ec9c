//! What the caller is told: [`Keyed`] in the response's extensions, and [`is_replayed`].

use http::HeaderValue;
use reqwest::Response;

/// The header a server answers a replay with (`Idempotent-Replayed: true`).
pub(super) const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// What [`IdempotencyKeys`](super::IdempotencyKeys) did for a keyed request: the key it sent,
/// how many attempts it made, and whether the server answered with a replay.
///
/// The middleware puts it in the extensions of the response it returns
/// ([`Response::extensions`]), and in the request's extensions too, so a caller who passes
/// their own with
/// [`execute_with_extensions`](reqwest_middleware::ClientWithMiddleware::execute_with_extensions)
/// still learns the key when every attempt failed, and can send the request again later with
/// that key. Requests whose method is not keyed (GET, by default) get none.
///
/// ```
/// use idempotent_core::client::Keyed;
///
/// fn log(response: &reqwest::Response) {
///     if let Some(keyed) = response.extensions().get::<Keyed>() {
///         println!(
///             "key {} after {} attempt(s), replayed: {}",
///             keyed.key(),
///             keyed.attempts(),
///             keyed.replayed(),
///         );
///     }
/// }
/// # log(&reqwest::Response::from(http::Response::new("")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    pub(super) key: String,
    pub(super) generated: bool,
    pub(super) attempts: u32,
    pub(super) replayed: bool,
}

impl Keyed {
    /// The idempotency key, without the quotes of its sf-string form: a UUID v4 in lowercase
    /// hyphenated text when the middleware made it, else the caller's own key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the middleware made the key (`false`: the request came with its own
    /// `Idempotency-Key`, which was kept).
    pub fn generated(&self) -> bool {
        self.generated
    }

    /// How many times the request was sent, all with the same key (1 when it was not
    /// retried).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the last response said it was a replay (`Idempotent-Replayed: true`): the
    /// server had already done the work for this key, and answered with what it recorded then.
    pub fn replayed(&self) -> bool {
        self.replayed
    }
}

/// Whether a response is a replay: it has `Idempotent-Replayed: true` (or `?1`, the RFC 9651
/// boolean). Works on any response, with or without the middleware.
///
/// ```
/// use idempotent_core::client::is_replayed;
///
/// let first = reqwest::Response::from(http::Response::new(""));
/// let replay = reqwest::Response::from(
///     http::Response::builder()
///         .header("Idempotent-Replayed", "true")
///         .body("")
///         .unwrap(),
/// );
/// assert!(!is_replayed(&first));
/// assert!(is_replayed(&replay));
/// ```
pub fn is_replayed(response: &Response) -> bool {
    response
        .headers()
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|value| says_true(value.as_bytes()))
}

fn says_true(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    value.eq_ignore_ascii_case(b"true") || value == b"?1"
}

/// A key field's value as the key it carries: an sf-string's quotes and escapes removed, a bare
/// token as it is. Bytes that are not UTF-8 (which no valid key has) are replaced.
pub(super) fn key_of(value: &HeaderValue) -> String {
    let text = String::from_utf8_lossy(value.as_bytes());
    let text = text.trim();
    let Some(inner) = text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    else {
        return text.to_owned();
    };
    let mut key = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(char) = chars.next() {
        match char {
            '\\' => key.extend(chars.next()),
            other => key.push(other),
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_loses_its_quotes_and_escapes() {
        let key = |text: &'static str| key_of(&HeaderValue::from_static(text));
        assert_eq!(key("\"abc\""), "abc");
        assert_eq!(key("abc"), "abc");
        assert_eq!(key(" \"a\\\"b\\\\c\" "), "a\"b\\c");
        assert_eq!(key("\""), "\"");
        assert_eq!(key("\"\""), "");
    }

    #[test]
    fn true_and_sf_true_are_replays() {
        assert!(says_true(b"true"));
        assert!(says_true(b" TRUE "));
        assert!(says_true(b"?1"));
        assert!(!says_true(b"false"));
        assert!(!says_true(b"?0"));
        assert!(!says_true(b""));
    }
}
