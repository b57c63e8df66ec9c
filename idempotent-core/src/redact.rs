//! Secrets out of messages: connection strings with their passwords masked, and JSON errors
//! without the values they quote.

// Only the networked stores hold connection strings; without them the URL half is unused.
#![cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]

use std::fmt;

/// `url` with any password replaced by `***`, for errors, logs and `Debug` output.
///
/// Handles `scheme://user:password@host/...` (the password ends at the last `@` of the
/// string, so a password with unescaped `@`, `/`, `:` or `#` is masked whole), a `password=`
/// query parameter, and libpq's `key=value` form (`password=secret` or `password='s e c'`).
/// When in doubt it masks more, never less.
pub(crate) fn redact_url(url: &str) -> String {
    let masked = match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            match rest.rfind('@') {
                Some(at) => {
                    let userinfo = &rest[..at];
                    let user = userinfo.split(':').next().unwrap_or_default();
                    let password = if userinfo.contains(':') { ":***" } else { "" };
                    format!("{}{user}{password}{}", &url[..scheme_end + 3], &rest[at..])
                }
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    };
    mask_password_values(&masked)
}

/// Masks the value of every `password=` (any case): up to `&` or white space, or the closing
/// quote of a quoted value.
fn mask_password_values(text: &str) -> String {
    const NAME: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.to_ascii_lowercase().find(NAME) {
        let value_start = at + NAME.len();
        out.push_str(&rest[..value_start]);
        out.push_str("***");
        let value = &rest[value_start..];
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            // libpq: a quoted value ends at the first quote not escaped by a backslash.
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let ends = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    ends
                })
                .map_or(value.len(), |(i, _)| i + 2)
        } else {
            value
                .find(|c: char| c == '&' || c.is_whitespace())
                .unwrap_or(value.len())
        };
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

/// A connection string that prints with its password masked (see [`redact_url`]).
pub(crate) struct RedactedUrl<'a>(pub(crate) &'a str);

impl fmt::Debug for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(self.0), f)
    }
}

/// A JSON error for a message, without the value it may quote (serde_json writes
/// `invalid type: string "4111 1111 1111 1111", expected u64`): what kind of error, and where.
pub(crate) fn json_error_summary(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match error.classify() {
        Category::Io => "an I/O error",
        Category::Syntax => "malformed JSON",
        Category::Eof => "JSON that ends too soon",
        Category::Data => "a value of another type or shape than expected",
    };
    if error.line() == 0 {
        kind.to_owned()
    } else {
        format!("{kind} at line {} column {}", error.line(), error.column())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_in_every_form() {
        let cases = [
            (
                "redis://admin:s3cret@127.0.0.1:6379/0",
                "redis://admin:***@127.0.0.1:6379/0",
            ),
            // Unescaped URL-special characters in the password.
            (
                "redis://admin:p@ss:w/rd#?&=@127.0.0.1:6379/",
                "redis://admin:***@127.0.0.1:6379/",
            ),
            (
                "postgres://app:p%40ss%2Fw@db:5432/shop?sslmode=require",
                "postgres://app:***@db:5432/shop?sslmode=require",
            ),
            ("redis://:onlypass@host/", "redis://:***@host/"),
            ("redis://user@host/", "redis://user@host/"),
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            (
                "postgres://db/shop?user=app&password=s3cr&t&sslmode=disable",
                "postgres://db/shop?user=app&password=***&t&sslmode=disable",
            ),
            (
                "host=db user=app PASSWORD=s3cret port=5432",
                "host=db user=app PASSWORD=*** port=5432",
            ),
            (
                r"host=db password='s3 c\'r=t' port=5432",
                "host=db password=*** port=5432",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn json_summaries_quote_no_value() {
        let error = serde_json::from_str::<u64>(r#""4111111111111111""#).unwrap_err();
        assert!(
            error.to_string().contains("4111111111111111"),
            "the premise"
        );
        let summary = json_error_summary(&error);
        assert!(!summary.contains("4111"), "{summary}");
        assert!(summary.contains("line 1"), "{summary}");
    }
}
