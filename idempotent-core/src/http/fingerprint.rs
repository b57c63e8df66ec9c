//! A request's fingerprint: what makes a retry the same request.

use http::header::HeaderName;
use http::request;
use sha2::{Digest, Sha256};

use crate::Fingerprint;

/// SHA-256 over the method, the path, the query, the chosen headers' values and the body, each
/// length-prefixed so that no two requests share an encoding. A header absent and a header
/// present but empty differ; so do `/a?` and `/a`.
pub(crate) fn of_request(
    parts: &request::Parts,
    headers: &[HeaderName],
    body: &[u8],
) -> Fingerprint {
    let mut hash = Sha256::new();
    hash.update(b"idempotent-http-request-v1");
    field(&mut hash, parts.method.as_str().as_bytes());
    field(&mut hash, parts.uri.path().as_bytes());
    match parts.uri.query() {
        Some(query) => {
            hash.update([1]);
            field(&mut hash, query.as_bytes());
        }
        None => hash.update([0]),
    }
    for name in headers {
        field(&mut hash, name.as_str().as_bytes());
        let values = parts.headers.get_all(name);
        hash.update((values.iter().count() as u64).to_le_bytes());
        for value in values {
            field(&mut hash, value.as_bytes());
        }
    }
    field(&mut hash, body);
    Fingerprint::from_bytes(hash.finalize().into())
}

fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_le_bytes());
    hash.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn fingerprint(request: Request<()>, headers: &[&'static str], body: &[u8]) -> Fingerprint {
        let headers: Vec<_> = headers
            .iter()
            .map(|name| HeaderName::from_static(name))
            .collect();
        of_request(&request.into_parts().0, &headers, body)
    }

    fn post(uri: &str) -> Request<()> {
        Request::post(uri).body(()).unwrap()
    }

    #[test]
    fn each_part_of_the_request_counts() {
        let base = fingerprint(post("/orders?x=1"), &[], b"{}");
        assert_eq!(base, fingerprint(post("/orders?x=1"), &[], b"{}"));
        assert_ne!(
            base,
            fingerprint(Request::patch("/orders?x=1").body(()).unwrap(), &[], b"{}")
        );
        assert_ne!(base, fingerprint(post("/orders/?x=1"), &[], b"{}"));
        assert_ne!(base, fingerprint(post("/orders?x=2"), &[], b"{}"));
        assert_ne!(base, fingerprint(post("/orders?x=1"), &[], b"{ }"));
        assert_ne!(
            fingerprint(post("/a"), &[], b""),
            fingerprint(post("/a?"), &[], b"")
        );
    }

    #[test]
    fn only_the_chosen_headers_count() {
        let with = |value: &str| {
            Request::post("/orders")
                .header("x-tenant", value)
                .header("user-agent", value)
                .body(())
                .unwrap()
        };
        assert_eq!(
            fingerprint(with("a"), &[], b""),
            fingerprint(with("b"), &[], b"")
        );
        assert_ne!(
            fingerprint(with("a"), &["x-tenant"], b""),
            fingerprint(with("b"), &["x-tenant"], b"")
        );
        assert_ne!(
            fingerprint(with(""), &["x-tenant"], b""),
            fingerprint(post("/orders"), &["x-tenant"], b"")
        );
    }
}
