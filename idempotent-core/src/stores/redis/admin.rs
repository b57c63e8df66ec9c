//! [`Admin`] for the Redis store: a record is read with `GET` and `PTTL`; the statistics walk
//! the store's keys with `SCAN` (never `KEYS`, which blocks the server), a batch at a time,
//! on one server (a Redis Cluster is refused: each of its primaries would need its own walk).

use std::time::Duration;

use redis::Value;

use super::RedisStore;
use super::connection::Commands;
use super::error::from_redis;
use super::record::FENCE_AT;
use crate::admin::{Admin, OldestRecord, RecordState, RecordView, StoreStats};
use crate::error::StoreError;
use crate::key::StorageKey;
use crate::store::{BoxFuture, Bytes};

/// Keys a `SCAN` step asks for.
const SCAN_COUNT: u64 = 1000;

/// A record's parts, from its layout (`prelude.lua`): `2<state><fingerprint>|<fence>|<output>`,
/// or `2r|<fence>|` for a released key's tombstone.
fn parse(stored: &[u8]) -> Result<(RecordState, u64, Option<Bytes>), String> {
    let (state, fence_at) = match stored.get(..2) {
        Some(b"2p" | b"2w") => (RecordState::InProgress, FENCE_AT),
        Some(b"2c") => (RecordState::Completed, FENCE_AT),
        // A tombstone has no fingerprint: `2r|<fence>|`.
        Some(b"2r") => (RecordState::Released, 3),
        Some([version, _]) if version.is_ascii_digit() && *version != b'2' => {
            return Err(format!(
                "record format version {} is not supported by this release",
                char::from(*version)
            ));
        }
        _ => return Err("not an idempotency record of this format".to_string()),
    };
    let malformed = || "malformed record: no fence".to_string();
    if stored.get(fence_at - 1) != Some(&b'|') {
        return Err(malformed());
    }
    let rest = &stored[fence_at..];
    let end = rest
        .iter()
        .position(|&byte| byte == b'|')
        .ok_or_else(malformed)?;
    let fence = std::str::from_utf8(&rest[..end])
        .ok()
        .and_then(|fence| fence.parse().ok())
        .ok_or_else(malformed)?;
    let output =
        (state == RecordState::Completed).then(|| Bytes::copy_from_slice(&rest[end + 1..]));
    Ok((state, fence, output))
}

/// `PTTL`'s answer as the time left: -2 (gone) and -1 (no expiry) are `None`.
fn left(pttl: &Value) -> Option<Duration> {
    match pttl {
        Value::Int(ms) if *ms >= 0 => Some(Duration::from_millis(*ms as u64)),
        _ => None,
    }
}

/// `text` with the glob characters of `SCAN MATCH` escaped.
fn glob_escaped(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

impl RedisStore {
    /// Whether `key` (a Redis key) is one of this store's records: the prefix and 64 hex digits.
    fn is_record_key(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.key_prefix.as_bytes())
            .is_some_and(|hex| hex.len() == 64 && hex.iter().all(u8::is_ascii_hexdigit))
    }

    /// The storage key of one of this store's record keys.
    fn storage_key_of(&self, key: &[u8]) -> Option<StorageKey> {
        let hex = key.strip_prefix(self.key_prefix.as_bytes())?;
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            let digits = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(digits, 16).ok()?;
        }
        (hex.len() == 64).then(|| StorageKey::from_bytes(bytes))
    }
}

impl Admin for RedisStore {
    fn inspect<'a>(
        &'a self,
        key: &'a StorageKey,
    ) -> BoxFuture<'a, Result<Option<RecordView>, StoreError>> {
        Box::pin(async move {
            let record_key = self.record_key(key);
            let mut get = redis::cmd("GET");
            get.arg(&record_key);
            let stored = self
                .send(&get, None)
                .await
                .map_err(|error| from_redis("could not read a record", error))?;
            let stored = match stored {
                Value::Nil => return Ok(None),
                Value::BulkString(stored) => stored,
                _ => {
                    return Err(StoreError::Corrupt {
                        key: key.to_hex(),
                        message: "GET answered something other than a string".to_string(),
                    });
                }
            };
            let mut pttl = redis::cmd("PTTL");
            pttl.arg(&record_key);
            let life = self
                .send(&pttl, None)
                .await
                .map_err(|error| from_redis("could not read a record's expiry", error))?;
            let (state, fence, output) = parse(&stored).map_err(|message| StoreError::Corrupt {
                key: key.to_hex(),
                message,
            })?;
            let life = left(&life);
            Ok(Some(RecordView {
                state,
                fence,
                left: life.unwrap_or(Duration::ZERO),
                // Redis deletes a record when it ends: one just read has at most ended since.
                expired: life.is_none(),
                output,
                bytes: (record_key.len() + stored.len()) as u64,
            }))
        })
    }

    fn stats(&self) -> BoxFuture<'_, Result<StoreStats, StoreError>> {
        Box::pin(async move {
            let Commands::Single(connection) = &*self.commands else {
                return Err(StoreError::Backend {
                    message: "statistics over a Redis Cluster are not supported yet: run them against each primary as a single server".to_string(),
                    source: None,
                });
            };
            let failed = |error| from_redis("could not walk the records (SCAN)", error);
            let pattern = format!("{}*", glob_escaped(&self.key_prefix));
            let mut stats = StoreStats::default();
            let mut cursor: u64 = 0;
            loop {
                let (_, mut manager) = connection.current().await.map_err(failed)?;
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut manager)
                    .await
                    .map_err(failed)?;
                let keys: Vec<Vec<u8>> = keys
                    .into_iter()
                    .filter(|key| self.is_record_key(key))
                    .collect();
                if !keys.is_empty() {
                    let mut pipeline = redis::pipe();
                    for key in &keys {
                        // The state, fingerprint and fence: `2<state><fingerprint>|<fence>|`.
                        pipeline
                            .cmd("GETRANGE")
                            .arg(key)
                            .arg(0)
                            .arg(FENCE_AT + 21)
                            .cmd("STRLEN")
                            .arg(key)
                            .cmd("PTTL")
                            .arg(key);
                    }
                    let answers: Vec<Value> =
                        pipeline.query_async(&mut manager).await.map_err(failed)?;
                    for (key, answer) in keys.iter().zip(answers.chunks(3)) {
                        let [head, length, pttl] = answer else {
                            continue;
                        };
                        let Some(life) = left(pttl) else {
                            // Gone since the SCAN.
                            continue;
                        };
                        let Value::BulkString(head) = head else {
                            continue;
                        };
                        let Ok((state, fence, _)) = parse(head) else {
                            continue;
                        };
                        match state {
                            RecordState::InProgress => stats.in_progress += 1,
                            RecordState::Completed => stats.completed += 1,
                            RecordState::Released => stats.released += 1,
                        }
                        if state != RecordState::Released
                            && stats
                                .oldest
                                .as_ref()
                                .is_none_or(|oldest| fence < oldest.fence)
                            && let Some(storage) = self.storage_key_of(key)
                        {
                            stats.oldest = Some(OldestRecord {
                                key: storage,
                                fence,
                                state,
                                left: life,
                            });
                        }
                        if let Value::Int(length) = length {
                            stats.bytes += (key.len() as u64) + u64::try_from(*length).unwrap_or(0);
                        }
                        stats.nearest_end = Some(stats.nearest_end.map_or(life, |n| n.min(life)));
                    }
                }
                if next == 0 {
                    return Ok(stats);
                }
                cursor = next;
            }
        })
    }

    fn purge_expired_batch(&self, _limit: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        // Redis deletes each record when its PX ends.
        Box::pin(std::future::ready(Ok(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_as_the_scripts_write_them() {
        let fp = "a".repeat(64);
        let completed = format!("2c{fp}|17|{{\"ok\":1}}");
        let (state, fence, output) = parse(completed.as_bytes()).unwrap();
        assert_eq!(state, RecordState::Completed);
        assert_eq!(fence, 17);
        assert_eq!(output.as_deref(), Some(&b"{\"ok\":1}"[..]));
        for head in ["2p", "2w"] {
            let (state, fence, output) = parse(format!("{head}{fp}|9|").as_bytes()).unwrap();
            assert_eq!((state, fence, output), (RecordState::InProgress, 9, None));
        }
        let (state, fence, _) = parse(b"2r|5|").unwrap();
        assert_eq!((state, fence), (RecordState::Released, 5));
        assert!(parse(b"3c...").unwrap_err().contains("version 3"));
        assert!(parse(b"hello").is_err());
        assert!(parse(format!("2c{fp}|x|").as_bytes()).is_err());
        assert!(parse(format!("2c{fp}").as_bytes()).is_err());
    }

    #[test]
    fn glob_characters_in_the_prefix_are_escaped() {
        assert_eq!(glob_escaped("app:[eu]*?\\"), "app:\\[eu\\]\\*\\?\\\\");
        assert_eq!(glob_escaped("idempotent:"), "idempotent:");
    }
}
