//! The scripts' answers, decoded. The records themselves are read and written by the scripts
//! (their layout is in the module docs and `prelude.lua`); what comes back is one of a few
//! answers, each a scalar or a tagged array.

use std::time::Duration;

use redis::Value;

use crate::error::StoreError;
use crate::key::StorageKey;
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
