//! A response as the layer records it: a line of JSON with the status and the headers a replay
//! repeats, then the body's bytes as they are.
//!
//! ```text
//! {"response":{"status":201,"headers":[["content-type","application/json"]],"body_bytes":14}}
//! {"order":"o-7"}
//! ```
//!
//! An operator reading the store sees the status and headers, and a text body as text; a body
//! costs its own length, not the three- to four-fold of a JSON array of numbers. The tag keeps
//! such a record from decoding as a function's `{"ok": ..}` and the other way round.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, response};
use serde::de::Error as _;
use serde::{Deserialize, Serialize};

use crate::recorded::Recording;

/// A handler's response, buffered: everything the caller gets, and what is recorded of it.
pub(crate) struct BufferedResponse {
    /// The whole head, for the response this call returns (`None` on a replay).
    pub(crate) parts: Option<response::Parts>,
    pub(crate) status: StatusCode,
    /// The recorded headers (the allow-list's).
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The record's first line, encoded once: its length decides whether the record fits.
    /// Empty in a response read back from its record, which is never recorded again.
    pub(crate) head: Vec<u8>,
}

impl BufferedResponse {
    /// A response to record: `recorded` are the headers a replay repeats.
    pub(crate) fn new(parts: response::Parts, recorded: HeaderMap, body: Bytes) -> Self {
        let head = encode_head(parts.status, &recorded, body.len());
        Self {
            status: parts.status,
            parts: Some(parts),
            headers: recorded,
            body,
            head,
        }
    }

    /// The size of the record.
    pub(crate) fn record_len(&self) -> usize {
        self.head.len() + 1 + self.body.len()
    }
}

#[derive(Serialize)]
struct Record<'a> {
    response: Head<'a>,
}

#[derive(Serialize)]
struct Head<'a> {
    status: u16,
    headers: Vec<(&'a str, Value<'a>)>,
    body_bytes: usize,
}

/// A header value: text when it is visible ASCII (almost always), its bytes otherwise.
#[derive(Serialize)]
#[serde(untagged)]
enum Value<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// [`Record`], read back: owned, since escaped strings (an `ETag`'s quotes) cannot be borrowed.
#[derive(Deserialize)]
struct ReadRecord {
    response: ReadHead,
}

#[derive(Deserialize)]
struct ReadHead {
    status: u16,
    headers: Vec<(String, ReadValue)>,
    body_bytes: usize,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ReadValue {
    Text(String),
    Bytes(Vec<u8>),
}

fn encode_head(status: StatusCode, headers: &HeaderMap, body_bytes: usize) -> Vec<u8> {
    let head = Record {
        response: Head {
            status: status.as_u16(),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    let value = match value.to_str() {
                        Ok(text) => Value::Text(text),
                        Err(_) => Value::Bytes(value.as_bytes()),
                    };
                    (name.as_str(), value)
                })
                .collect(),
            body_bytes,
        },
    };
    // Strings, numbers and byte arrays: serializing cannot fail.
    serde_json::to_vec(&head).unwrap_or_default()
}

/// How the layer's records are written and read.
pub(crate) struct ResponseRecording;

impl<E> Recording<BufferedResponse, E> for ResponseRecording {
    fn encode_ok(value: &BufferedResponse) -> serde_json::Result<Vec<u8>> {
        let mut record = Vec::with_capacity(value.record_len());
        record.extend_from_slice(&value.head);
        record.push(b'\n');
        record.extend_from_slice(&value.body);
        Ok(record)
    }

    fn encode_err(_: &E) -> Option<serde_json::Result<Vec<u8>>> {
        None
    }

    fn decode(bytes: &[u8]) -> serde_json::Result<Result<BufferedResponse, E>> {
        let line = bytes
            .iter()
            .position(|&byte| byte == b'\n')
            .ok_or_else(|| {
                serde_json::Error::custom("not a recorded HTTP response (no line of JSON first)")
            })?;
        let ReadRecord { response: head } = serde_json::from_slice(&bytes[..line])?;
        let body = &bytes[line + 1..];
        if body.len() != head.body_bytes {
            return Err(serde_json::Error::custom(format!(
                "the recorded body is {} bytes, its head says {}: the record is truncated or corrupt",
                body.len(),
                head.body_bytes
            )));
        }
        let status = StatusCode::from_u16(head.status).map_err(serde_json::Error::custom)?;
        let mut headers = HeaderMap::with_capacity(head.headers.len());
        for (name, value) in head.headers {
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(serde_json::Error::custom)?;
            let value = match value {
                ReadValue::Text(text) => HeaderValue::from_str(&text),
                ReadValue::Bytes(bytes) => HeaderValue::from_bytes(&bytes),
            }
            .map_err(serde_json::Error::custom)?;
            headers.append(name, value);
        }
        Ok(Ok(BufferedResponse {
            parts: None,
            status,
            headers,
            body: Bytes::copy_from_slice(body),
            // Only a response about to be recorded needs its head encoded.
            head: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorded::OkOnly;

    fn response(status: u16, headers: &[(&str, &[u8])], body: &[u8]) -> BufferedResponse {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = StatusCode::from_u16(status).unwrap();
        BufferedResponse::new(parts, map, Bytes::copy_from_slice(body))
    }

    fn round_trip(value: &BufferedResponse) -> (Vec<u8>, BufferedResponse) {
        let bytes = <ResponseRecording as Recording<_, ()>>::encode_ok(value).unwrap();
        assert_eq!(bytes.len(), value.record_len());
        let back = <ResponseRecording as Recording<BufferedResponse, ()>>::decode(&bytes)
            .unwrap()
            .unwrap();
        (bytes, back)
    }

    #[test]
    fn a_response_is_a_line_of_json_then_its_body_bytes() {
        let value = response(
            201,
            &[
                ("content-type", b"application/json"),
                ("location", b"/orders/7"),
                ("etag", b"\"o-7\""),
            ],
            br#"{"order":"o-7"}"#,
        );
        let (bytes, back) = round_trip(&value);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "{\"response\":{\"status\":201,\"headers\":[[\"content-type\",\"application/json\"],\
             [\"location\",\"/orders/7\"],[\"etag\",\"\\\"o-7\\\"\"]],\"body_bytes\":15}}\n\
             {\"order\":\"o-7\"}"
        );
        assert_eq!(back.status, StatusCode::CREATED);
        assert_eq!(back.headers, value.headers);
        assert_eq!(back.body, value.body);
    }

    #[test]
    fn binary_bodies_and_header_values_are_kept_byte_for_byte() {
        let body: Vec<u8> = (0..=255).chain(b"\n\n".iter().copied()).collect();
        let value = response(
            200,
            &[
                ("x-raw", &[b'a', 0xe9, b'b']),
                ("vary", b"a"),
                ("vary", b"b"),
            ],
            &body,
        );
        let (bytes, back) = round_trip(&value);
        assert_eq!(
            bytes.len(),
            value.head.len() + 1 + body.len(),
            "the body is stored as is"
        );
        assert_eq!(back.body, body);
        assert_eq!(back.headers, value.headers);
        assert_eq!(back.headers.get_all("vary").iter().count(), 2);
    }

    #[test]
    fn other_records_do_not_decode_as_responses() {
        let decode = |bytes: &[u8]| {
            <ResponseRecording as Recording<BufferedResponse, ()>>::decode(bytes).is_err()
        };
        assert!(decode(br#"{"ok":7}"#));
        assert!(decode(b"{\"ok\":7}\nbody"));
        assert!(decode(b""));
        let (mut bytes, _) = round_trip(&response(200, &[], b"body"));
        bytes.pop();
        assert!(decode(&bytes), "a truncated body is refused");
        // And a function's replay does not take a response for its value.
        let (bytes, _) = round_trip(&response(200, &[], b"7"));
        assert!(<OkOnly as Recording<u32, ()>>::decode(&bytes).is_err());
    }
}
