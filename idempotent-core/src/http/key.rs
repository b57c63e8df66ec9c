//! The `Idempotency-Key` field: an RFC 9651 sf-string of 1 to 255 bytes, one field line.

use http::HeaderMap;
use http::header::HeaderName;

use crate::key::MAX_KEY_BYTES;

/// The field's name, `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Why a request's `Idempotency-Key` field was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyProblem {
    /// The field is absent and the layer requires it.
    Missing,
    /// More than one field line (or a comma-joined list of values).
    Repeated,
    /// The value is not an sf-string (nor, in lenient mode, a bare token).
    Malformed(String),
    /// The value is empty or longer than [`MAX_KEY_BYTES`].
    Length(usize),
}

/// The request's key: `Ok(None)` when the field is absent.
pub(crate) fn read(headers: &HeaderMap, lenient: bool) -> Result<Option<String>, KeyProblem> {
    let mut lines = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = lines.next() else {
        return Ok(None);
    };
    if lines.next().is_some() {
        return Err(KeyProblem::Repeated);
    }
    let key = parse(value.as_bytes(), lenient)?;
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(KeyProblem::Length(key.len()));
    }
    Ok(Some(key))
}

fn parse(value: &[u8], lenient: bool) -> Result<String, KeyProblem> {
    let quoted = value.trim_ascii_start().first() == Some(&b'"');
    if lenient && !quoted {
        return bare_token(value);
    }
    match sfv::Parser::new(value).parse_item::<sfv::Item>() {
        Ok(sfv::Item {
            bare_item: sfv::BareItem::String(key),
            ..
        }) => Ok(key.as_str().to_owned()),
        // A comma makes a list, which one field line of a single item cannot hold: the
        // value was two keys joined (by a proxy, or a client that sent the field twice).
        Err(_) if quoted && value.contains(&b',') => Err(KeyProblem::Repeated),
        Ok(_) if lenient => bare_token(value),
        Ok(_) => Err(KeyProblem::Malformed(
            "the value is not a quoted string: send the key in double quotes, e.g. \
             Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\""
                .to_owned(),
        )),
        Err(error) => Err(KeyProblem::Malformed(format!(
            "the value is not a valid structured-field string ({error}): send the key in \
             double quotes, e.g. Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\""
        ))),
    }
}

/// Lenient mode: a bare key as many clients send it (`Idempotency-Key: 8e03978e-...`):
/// visible ASCII, no spaces, quotes, backslashes or commas.
fn bare_token(value: &[u8]) -> Result<String, KeyProblem> {
    let value = value.trim_ascii();
    if value.contains(&b',') {
        return Err(KeyProblem::Repeated);
    }
    match value
        .iter()
        .find(|&&byte| !(0x21..=0x7e).contains(&byte) || byte == b'"' || byte == b'\\')
    {
        Some(&byte) => Err(KeyProblem::Malformed(format!(
            "the key holds the byte 0x{byte:02x}: a bare key is visible ASCII without \
             spaces, quotes, backslashes or commas (send it as a quoted string otherwise)"
        ))),
        // Visible ASCII throughout, so the bytes are UTF-8.
        None => Ok(String::from_utf8_lossy(value).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_bytes(value).unwrap());
        }
        headers
    }

    fn strict(value: &[u8]) -> Result<Option<String>, KeyProblem> {
        read(&headers(&[value]), false)
    }

    fn lenient(value: &[u8]) -> Result<Option<String>, KeyProblem> {
        read(&headers(&[value]), true)
    }

    #[test]
    fn a_quoted_string_is_the_key() {
        let key = Some("8e03978e-40d5-43e8-bc93-6894a57f9324".to_owned());
        assert_eq!(
            strict(br#""8e03978e-40d5-43e8-bc93-6894a57f9324""#),
            Ok(key.clone())
        );
        assert_eq!(
            lenient(br#""8e03978e-40d5-43e8-bc93-6894a57f9324""#),
            Ok(key)
        );
        assert_eq!(
            strict(br#""a \"quoted\" \\ key""#),
            Ok(Some(r#"a "quoted" \ key"#.into()))
        );
        assert_eq!(
            strict(br#""k";v=1"#),
            Ok(Some("k".into())),
            "parameters are allowed"
        );
        assert_eq!(strict(br#"  "k"  "#), Ok(Some("k".into())));
        assert_eq!(read(&HeaderMap::new(), false), Ok(None));
    }

    #[test]
    fn a_bare_token_is_a_key_only_when_lenient() {
        assert!(matches!(strict(b"abc-123"), Err(KeyProblem::Malformed(_))));
        assert!(matches!(
            strict(b"8e03978e-40d5"),
            Err(KeyProblem::Malformed(_))
        ));
        assert_eq!(lenient(b"abc-123"), Ok(Some("abc-123".into())));
        assert_eq!(lenient(b"8e03978e-40d5"), Ok(Some("8e03978e-40d5".into())));
        assert_eq!(lenient(b"42"), Ok(Some("42".into())));
        assert!(matches!(
            lenient(b"two words"),
            Err(KeyProblem::Malformed(_))
        ));
        assert!(matches!(lenient(b"ab\"c"), Err(KeyProblem::Malformed(_))));
        assert!(matches!(
            lenient(&[b'a', 0xe9]),
            Err(KeyProblem::Malformed(_))
        ));
    }

    #[test]
    fn malformed_values_are_refused() {
        for value in [
            &b"\"unterminated"[..],
            b"\"tab\there\"",
            b"?1",
            b"\"a\" \"b\"",
            b"",
        ] {
            assert!(
                matches!(strict(value), Err(KeyProblem::Malformed(_))),
                "{value:?}"
            );
        }
        assert!(matches!(
            strict(&[b'"', 0xe9, b'"']),
            Err(KeyProblem::Malformed(_))
        ));
    }

    #[test]
    fn one_field_line_only() {
        assert_eq!(
            read(&headers(&[b"\"a\"", b"\"a\""]), false),
            Err(KeyProblem::Repeated)
        );
        assert_eq!(
            read(&headers(&[b"a", b"b"]), true),
            Err(KeyProblem::Repeated)
        );
        assert_eq!(strict(br#""a", "b""#), Err(KeyProblem::Repeated));
        assert_eq!(lenient(b"a,b"), Err(KeyProblem::Repeated));
    }

    #[test]
    fn one_to_255_bytes() {
        assert_eq!(strict(br#""""#), Err(KeyProblem::Length(0)));
        let longest = format!("\"{}\"", "k".repeat(MAX_KEY_BYTES));
        assert_eq!(
            strict(longest.as_bytes()).unwrap().unwrap().len(),
            MAX_KEY_BYTES
        );
        let over = format!("\"{}\"", "k".repeat(MAX_KEY_BYTES + 1));
        assert_eq!(
            strict(over.as_bytes()),
            Err(KeyProblem::Length(MAX_KEY_BYTES + 1))
        );
        assert_eq!(
            lenient("k".repeat(256).as_bytes()),
            Err(KeyProblem::Length(256))
        );
    }
}
