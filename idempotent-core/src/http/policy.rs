//! What the layer records: which statuses, and which of a response's headers a replay repeats.

use std::fmt;

use http::StatusCode;
use http::header::{self, HeaderName};

/// Which responses are recorded (and replayed to every retry with the key); the others release
/// the key, so a retry runs the handler again.
///
/// The default records 2xx, 3xx and 4xx except 408, 409 and 429: the answers a retry would only
/// repeat. 408, 409 and 429 say "try again", so they release the key, as 5xx do: a server
/// error is taken to mean the handler did not complete its effects. A service whose handlers
/// may fail after an effect (Stripe's API, say) records 5xx too:
/// [`RecordPolicy::including_server_errors`].
///
/// ```
/// use http::StatusCode;
/// use idempotent_core::http::RecordPolicy;
///
/// let default = RecordPolicy::default();
/// assert!(default.records(StatusCode::CREATED));
/// assert!(default.records(StatusCode::UNPROCESSABLE_ENTITY));
/// assert!(!default.records(StatusCode::TOO_MANY_REQUESTS));
/// assert!(!default.records(StatusCode::INTERNAL_SERVER_ERROR));
///
/// assert!(RecordPolicy::including_server_errors().records(StatusCode::INTERNAL_SERVER_ERROR));
///
/// let only_created = RecordPolicy::new(|status| status == StatusCode::CREATED);
/// assert!(!only_created.records(StatusCode::OK));
/// ```
#[derive(Clone, Copy)]
pub struct RecordPolicy {
    records: fn(StatusCode) -> bool,
}

impl RecordPolicy {
    /// A policy that records the statuses for which `records` is `true`.
    ///
    /// ```
    /// # use idempotent_core::http::RecordPolicy;
    /// let success_only = RecordPolicy::new(|status| status.is_success());
    /// ```
    pub const fn new(records: fn(StatusCode) -> bool) -> Self {
        Self { records }
    }

    /// The default policy, and 5xx too (Stripe's convention): a retry after a server error
    /// gets the same error back rather than running the handler again.
    ///
    /// ```
    /// # use idempotent_core::http::RecordPolicy;
    /// # use http::StatusCode;
    /// assert!(RecordPolicy::including_server_errors().records(StatusCode::BAD_GATEWAY));
    /// assert!(!RecordPolicy::including_server_errors().records(StatusCode::CONFLICT));
    /// ```
    pub const fn including_server_errors() -> Self {
        Self::new(|status| default_records(status) || status.is_server_error())
    }

    /// Whether a response with `status` is recorded.
    ///
    /// ```
    /// # use idempotent_core::http::RecordPolicy;
    /// # use http::StatusCode;
    /// assert!(RecordPolicy::default().records(StatusCode::SEE_OTHER));
    /// ```
    pub fn records(&self, status: StatusCode) -> bool {
        (self.records)(status)
    }
}

fn default_records(status: StatusCode) -> bool {
    (status.is_success() || status.is_redirection() || status.is_client_error())
        && !matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS
        )
}

impl Default for RecordPolicy {
    fn default() -> Self {
        Self::new(default_records)
    }
}

impl fmt::Debug for RecordPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordPolicy").finish_non_exhaustive()
    }
}

/// The headers a replay repeats by default: those that describe the body or the resource the
/// request made. Everything else is returned by the first response only.
pub(crate) const REPLAYED_HEADERS: [HeaderName; 11] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LOCATION,
    header::LOCATION,
    header::ETAG,
    header::LAST_MODIFIED,
    header::CACHE_CONTROL,
    header::EXPIRES,
    header::VARY,
    header::LINK,
];

/// Headers never recorded, whatever the allow-list says: cookies belong to one client's
/// session, `Date` is the time of sending, the length is the body's own, and hop-by-hop headers
/// belong to one connection.
pub(crate) fn never_replayed(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::SET_COOKIE
            | header::DATE
            | header::CONTENT_LENGTH
            | header::CONNECTION
            | header::TRANSFER_ENCODING
            | header::TE
            | header::TRAILER
            | header::UPGRADE
            | header::PROXY_AUTHENTICATE
            | header::PROXY_AUTHORIZATION
    ) || name == "keep-alive"
        || name == "proxy-connection"
        || name == "set-cookie2"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_records_what_a_retry_would_repeat() {
        let policy = RecordPolicy::default();
        for code in [200, 201, 204, 303, 400, 401, 403, 404, 410, 422] {
            assert!(
                policy.records(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        for code in [408, 409, 429, 500, 502, 503, 504, 101] {
            assert!(
                !policy.records(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
    }

    #[test]
    fn the_allow_list_holds_no_forbidden_header() {
        assert!(REPLAYED_HEADERS.iter().all(|name| !never_replayed(name)));
        assert!(never_replayed(&header::SET_COOKIE));
        assert!(never_replayed(&HeaderName::from_static("keep-alive")));
    }
}
