//! The layer's own answers: `application/problem+json` (RFC 9457), as the Idempotency-Key
//! draft's examples give them, with the idempotency documentation in `type` and in a
//! `Link: <..>; rel="describedby"` field.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;

use super::key::KeyProblem;
use crate::Error;

/// Why the layer answered a request itself.
#[derive(Debug)]
pub(crate) enum Problem {
    Key(KeyProblem),
    /// The request body is over the layer's limit.
    BodyTooLarge {
        limit: usize,
    },
    /// The request body could not be read.
    BodyUnreadable(String),
    /// The response body failed while the layer buffered it.
    ResponseFailed(String),
    /// The engine refused the call.
    Engine(Error),
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl Problem {
    fn describe(&self) -> (StatusCode, &'static str, String) {
        use KeyProblem as K;
        match self {
            Self::Key(K::Missing) => (
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is missing",
                "this operation is idempotent and requires an Idempotency-Key header: send a \
                 new unique value (e.g. a UUID v4) as a quoted string, and the same value on \
                 every retry"
                    .to_owned(),
            ),
            Self::Key(K::Repeated) => (
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is malformed",
                "the request has more than one Idempotency-Key value: send exactly one".to_owned(),
            ),
            Self::Key(K::Malformed(why)) => (
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is malformed",
                why.clone(),
            ),
            Self::Key(K::Length(length)) => (
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is malformed",
                format!("the key is {length} bytes long; a key is 1 to 255 bytes"),
            ),
            Self::BodyTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body is too large",
                format!(
                    "an idempotent request's body is buffered to fingerprint it, up to {limit} \
                     bytes; this one is larger"
                ),
            ),
            Self::BodyUnreadable(why) => (
                StatusCode::BAD_REQUEST,
                "Request body could not be read",
                format!("{why}; the request was not processed, retry it with the same key"),
            ),
            Self::ResponseFailed(why) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Response could not be recorded",
                format!(
                    "the response body failed ({why}); nothing was recorded and the key was \
                     released"
                ),
            ),
            Self::Engine(error) => engine(error),
        }
    }

    /// The response, with `docs` (the idempotency policy's documentation) as its type.
    pub(crate) fn into_response(self, docs: Option<&HeaderValue>) -> Response<Bytes> {
        let (status, title, detail) = self.describe();
        let kind = docs
            .and_then(|docs| docs.to_str().ok())
            .unwrap_or("about:blank");
        let body = serde_json::to_vec(&Body {
            kind,
            title,
            status: status.as_u16(),
            detail: &detail,
        })
        .unwrap_or_default();
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(docs) = docs.and_then(|docs| docs.to_str().ok())
            && let Ok(link) = HeaderValue::from_str(&format!("<{docs}>; rel=\"describedby\""))
        {
            headers.insert(header::LINK, link);
        }
        if let Self::Engine(Error::Conflict { retry_after }) = self {
            // The other request's lease left is when its key is surely free, should its server
            // have died; a live request usually ends well before. Ask again within a second.
            let retry_after = retry_after.min(MAX_RETRY_AFTER);
            headers.insert(header::RETRY_AFTER, retry_after_seconds(retry_after));
        }
        if let Self::Engine(Error::Store(_)) = self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The longest `Retry-After` a 409 asks for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Whole seconds, rounded up and at least one: `Retry-After: 0` would invite a busy loop.
fn retry_after_seconds(retry_after: Duration) -> HeaderValue {
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

fn engine(error: &Error) -> (StatusCode, &'static str, String) {
    match error {
        Error::Conflict { .. } => (
            StatusCode::CONFLICT,
            "A request is outstanding for this Idempotency-Key",
            "a request with this key is still being processed: retry after the time in \
             Retry-After to get its response"
                .to_owned(),
        ),
        Error::KeyReused => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key is already used",
            "this key was already used with a different request (method, path, query or \
             body): use a new key for a new request"
                .to_owned(),
        ),
        Error::InvalidKey(error) => (
            StatusCode::BAD_REQUEST,
            "Idempotency-Key is malformed",
            error.to_string(),
        ),
        Error::Store(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Idempotency store unavailable",
            "the idempotency store could not be reached, so the request was not processed: \
             retry with the same key"
                .to_owned(),
        ),
        Error::LeaseLost => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Request interrupted",
            "the request's claim on its key could not be renewed, so its processing was \
             stopped and nothing was recorded: retry with the same key"
                .to_owned(),
        ),
        Error::Decode(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "Recorded response unreadable",
            "the response recorded for this key could not be read back; the request was not \
             processed again"
                .to_owned(),
        ),
        other => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "Idempotency error",
            other.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(response: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(response.body()).unwrap()
    }

    #[test]
    fn a_problem_names_its_documentation_in_type_and_link() {
        let docs = HeaderValue::from_static("https://example.com/docs/idempotency");
        let response = Problem::Engine(Error::KeyReused).into_response(Some(&docs));
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(
            response.headers()[header::LINK],
            "<https://example.com/docs/idempotency>; rel=\"describedby\""
        );
        let body = json(&response);
        assert_eq!(body["type"], "https://example.com/docs/idempotency");
        assert_eq!(body["status"], 422);
        assert_eq!(body["title"], "Idempotency-Key is already used");
        assert!(body["detail"].as_str().unwrap().contains("new key"));
    }

    #[test]
    fn without_documentation_the_type_is_about_blank() {
        let response = Problem::Key(KeyProblem::Missing).into_response(None);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.headers().get(header::LINK).is_none());
        assert_eq!(json(&response)["type"], "about:blank");
    }

    #[test]
    fn a_conflict_says_when_to_retry_in_whole_seconds() {
        let conflict = |retry_after| {
            Problem::Engine(Error::Conflict { retry_after })
                .into_response(None)
                .headers()[header::RETRY_AFTER]
                .clone()
        };
        assert_eq!(conflict(Duration::from_millis(300)), "1");
        assert_eq!(
            conflict(Duration::ZERO),
            "1",
            "never 0, which invites a busy loop"
        );
        assert_eq!(
            conflict(Duration::from_secs(30)),
            "1",
            "a lease left is not a wait"
        );
    }
}
