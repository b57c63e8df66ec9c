//! The answers of the scripts and of the native claim, decoded. The records are written by the
//! native claim and the scripts (their layout is in the module docs and `prelude.lua`); a
//! script answers with a scalar or a tagged array, the native claim with the record it found.

use std::time::Duration;

use bytes::Buf as _;
use redis::Value;

use crate::error::StoreError;
use crate::key::StorageKey;
use crate::store::Bytes;
use crate::stores::millis;

/// A script's answer. The common answers are scalars (see `redis/claim.lua`): what an
/// integer means depends on the script.
pub(super) enum Reply {
    /// A claim's new fence; a fenced write's 1 (applied) or 0 (fenced).
    Int(i64),
    InProgress(Duration),
    Completed(Vec<u8>),
    Mismatch,
    NotInProgress,
}

/// Where the fence starts (0-based) in a record with a fingerprint: after '2', the state, 64
/// hex digits and '|' (`prelude.lua`'s `FENCE_AT`, which counts from 1).
pub(super) const FENCE_AT: usize = 67;

/// What the native claim (`SET key <claim> NX PX <lease> GET`) found under the key, when it
/// answers the call by itself.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// A completed record with the call's fingerprint: its output (a slice of the reply, not
    /// a copy).
    Completed(Bytes),
    /// A completed record with another fingerprint.
    Mismatch,
}

/// The record a native claim found present (`stored`), if it is a completed record as
/// `prelude.lua`'s `parse` would accept it; `None` for everything else (in progress, a
/// tombstone, anything malformed), which the claim script then answers.
///
/// The layout is `2c<fingerprint hex>|<fence>|<output>` (`prelude.lua`).
pub(super) fn completed(stored: Vec<u8>, fingerprint: &[u8; 64]) -> Option<Found> {
    let header = stored.get(..FENCE_AT)?;
    if &header[..2] != b"2c" || header[FENCE_AT - 1] != b'|' {
        return None;
    }
    let fence_len = stored[FENCE_AT..].iter().position(|&byte| byte == b'|')?;
    let fence = &stored[FENCE_AT..FENCE_AT + fence_len];
    if fence.is_empty() || !fence.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if header[2..FENCE_AT - 1] != fingerprint[..] {
        // Read as `parse` does: a malformed fingerprint is not another call's.
        if !header[2..FENCE_AT - 1]
            .iter()
            .all(|byte| byte.is_ascii_hexdigit())
        {
            return None;
        }
        return Some(Found::Mismatch);
    }
    let output_at = FENCE_AT + fence_len + 1;
    // `advance` keeps the reply's buffer as it is (`slice` would allocate to share it).
    let mut output = Bytes::from(stored);
    output.advance(output_at);
    Some(Found::Completed(output))
}

impl Reply {
    pub(super) fn parse(value: Value, key: &StorageKey) -> Result<Self, StoreError> {
        let malformed = |what: &str| StoreError::Backend {
            message: format!("unexpected reply from a store script for key {key}: {what}"),
            source: None,
        };
        let items = match value {
            Value::Array(items) => items,
            // The claim answers a replay with the bare output: no array and tag to build on
            // the server or to allocate on the client, for the most common answer.
            Value::BulkString(output) => return Ok(Reply::Completed(output)),
            Value::Int(number) => return Ok(Reply::Int(number)),
            _ => return Err(malformed("neither an array, an output nor a number")),
        };
        let mut items = items.into_iter();
        let tag = match items.next() {
            Some(Value::BulkString(tag)) => tag,
            _ => return Err(malformed("no tag")),
        };
        let arg = items.next();
        Ok(match (tag.as_slice(), arg) {
            (b"p", Some(Value::Int(left))) => {
                // `PTTL` rounds down: a lease with less than a millisecond left is still live.
                Reply::InProgress(millis::left(left))
            }
            (b"m", _) => Reply::Mismatch,
            (b"n", _) => Reply::NotInProgress,
            (b"x", Some(Value::BulkString(problem))) => {
                return Err(StoreError::Corrupt {
                    key: key.to_hex(),
                    message: String::from_utf8_lossy(&problem).into_owned(),
                });
            }
            _ => return Err(malformed("unknown tag")),
        })
    }

    pub(super) fn unexpected(self, key: &StorageKey) -> StoreError {
        StoreError::Backend {
            message: format!("a store script answered out of turn for key {key}"),
            source: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StorageKey {
        StorageKey::derive("redis::record", None, b"k").unwrap()
    }

    fn tagged(tag: &str, arg: Option<Value>) -> Value {
        let mut items = vec![Value::BulkString(tag.as_bytes().to_vec())];
        items.extend(arg);
        Value::Array(items)
    }

    #[test]
    fn scalars_are_a_replay_or_a_number() {
        assert!(matches!(
            Reply::parse(Value::BulkString(b"{}".to_vec()), &key()),
            Ok(Reply::Completed(output)) if output == b"{}"
        ));
        assert!(matches!(
            Reply::parse(Value::Int(7), &key()),
            Ok(Reply::Int(7))
        ));
        assert!(matches!(
            Reply::parse(Value::Nil, &key()),
            Err(StoreError::Backend { .. })
        ));
    }

    fn fingerprint(digit: u8) -> [u8; 64] {
        [digit; 64]
    }

    #[test]
    fn a_completed_record_is_read_by_the_native_claim() {
        let record = |fp: &[u8; 64], rest: &str| {
            let mut record = b"2c".to_vec();
            record.extend_from_slice(fp);
            record.extend_from_slice(rest.as_bytes());
            record
        };
        let (mine, other) = (fingerprint(b'a'), fingerprint(b'b'));
        assert_eq!(
            completed(record(&mine, "|1700000000000000|{\"id\":1}"), &mine),
            Some(Found::Completed(Bytes::from_static(b"{\"id\":1}")))
        );
        // An empty output, and an output holding the separator, are outputs.
        assert_eq!(
            completed(record(&mine, "|7|"), &mine),
            Some(Found::Completed(Bytes::new()))
        );
        assert_eq!(
            completed(record(&mine, "|7|a|b"), &mine),
            Some(Found::Completed(Bytes::from_static(b"a|b")))
        );
        assert_eq!(
            completed(record(&other, "|7|{}"), &mine),
            Some(Found::Mismatch)
        );
        // Everything else is the claim script's to answer.
        for stored in [
            record(&mine, "|7").to_vec(),
            record(&mine, "||{}").to_vec(),
            record(&mine, "|7x|{}").to_vec(),
            record(&mine, "7|{}").to_vec(),
            record(&fingerprint(b'z'), "|7|{}").to_vec(),
            [b"2p".as_slice(), &mine, b"|7|"].concat(),
            [b"2w".as_slice(), &mine, b"|7|"].concat(),
            b"2r|7|".to_vec(),
            [b"1c".as_slice(), &mine, b"|7|{}"].concat(),
            b"2c".to_vec(),
            Vec::new(),
        ] {
            assert_eq!(
                completed(stored.clone(), &mine),
                None,
                "{}",
                String::from_utf8_lossy(&stored)
            );
        }
    }

    #[test]
    fn tagged_answers_are_decoded() {
        let parse = |value| Reply::parse(value, &key());
        assert!(matches!(
            parse(tagged("p", Some(Value::Int(1500)))),
            Ok(Reply::InProgress(left)) if left == Duration::from_millis(1500)
        ));
        // Less than a millisecond left, as PTTL rounds it: still in progress.
        assert!(matches!(
            parse(tagged("p", Some(Value::Int(0)))),
            Ok(Reply::InProgress(left)) if left == Duration::from_millis(1)
        ));
        assert!(matches!(parse(tagged("m", None)), Ok(Reply::Mismatch)));
        assert!(matches!(parse(tagged("n", None)), Ok(Reply::NotInProgress)));
        assert!(matches!(
            parse(tagged("x", Some(Value::BulkString(b"malformed record".to_vec())))),
            Err(StoreError::Corrupt { message, .. }) if message == "malformed record"
        ));
        assert!(matches!(
            parse(tagged("q", None)),
            Err(StoreError::Backend { .. })
        ));
        assert!(matches!(
            parse(Value::Array(vec![Value::Int(1)])),
            Err(StoreError::Backend { .. })
        ));
    }
}
