//! The local cache of completed records (`RedisStoreBuilder::local_cache`, feature
//! `redis-cache`): replays of hot keys answered in the process, with no round trip.
//!
//! A completed record does not change until it expires (or is deleted), so a copy of it,
//! its fingerprint and output, answers a claim as the record would: the same fingerprint
//! replays the output, another is a mismatch. An entry is made from what this store saw of a
//! record, and carries a deadline no later than the record's own end:
//!
//! - when this store's `complete` is applied: (the time before it was sent) + the ttl as
//!   Redis holds it;
//! - when this store's native claim finds a completed record: the claim goes in one pipeline
//!   with the record's `PTTL`, and the entry ends at (the time before it was sent) + that.
//!
//! Both are read on this process's monotonic clock from a time before the server started the
//! record's life, so the entry ends before the record does (as long as the two clocks run at
//! the same rate). The pipeline is not a transaction: if the record is deleted and made
//! again between the claim and its `PTTL`, the entry takes the new record's life, which is
//! the staleness of a forget. An entry also ends `max_age` after it was made: the bound on
//! how long a record deleted elsewhere (`remove`, or `forget` in another process) can still
//! be replayed here. A `remove` through this store deletes its entry; and an entry that a claim or a
//! completion sent before a `remove` would make is not made.
//!
//! Without the feature the cache is an empty type: every hook is a `None` check.

use std::time::{Duration, Instant};

use redis::{RedisError, Value};

use super::RedisStore;
use super::connection::{Commands, past_deadline};
use super::error::is_demoted;
use crate::key::StorageKey;
use crate::store::{Bytes, Claim, Fence, FencedWrite};
use crate::stores::millis::held_u64 as millis;

/// What `RedisStoreBuilder::local_cache` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "redis-cache"), allow(dead_code))]
pub(super) struct Settings {
    /// The bound on the entries' weight: their outputs' lengths plus [`ENTRY_OVERHEAD`] each.
    pub(super) max_bytes: u64,
    /// The longest an entry is kept after it is made.
    pub(super) max_age: Duration,
}

/// What an entry weighs beyond its output: its key, its fingerprint, its deadline and the
/// cache's own bookkeeping for it, rounded up.
#[cfg_attr(not(feature = "redis-cache"), allow(dead_code))]
pub(super) const ENTRY_OVERHEAD: u64 = 256;

/// Taken just before a claim or a completion is sent: when, and how many removals this store
/// had made by then.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "redis-cache"), allow(dead_code))]
pub(super) struct Sent {
    at: Instant,
    removals: u64,
}

/// What a native claim learned of the record it found: its `PTTL`, measured after the claim
/// reached the server, and when the claim was sent.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordLife {
    sent: Sent,
    left: Duration,
}

#[cfg(feature = "redis-cache")]
mod enabled {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use moka::Expiry;
    use moka::sync::Cache;

    use super::{ENTRY_OVERHEAD, Sent, Settings};
    use crate::key::StorageKey;
    use crate::store::{Bytes, Claim};

    /// How many claims this store acquired and has not yet completed are remembered (their
    /// fingerprints, for the entry their completion makes); past that, or an hour, a
    /// completion just makes no entry (the next claim's replay makes it).
    const CLAIMS_REMEMBERED: u64 = 16_384;
    const CLAIM_REMEMBERED_FOR: Duration = Duration::from_secs(3600);

    /// The cache of one store (and its clones).
    pub(in crate::stores::redis) struct LocalCache {
        entries: Cache<StorageKey, Entry, ByDigest>,
        /// The claims this store acquired: key → fence and fingerprint.
        claimed: Cache<StorageKey, (u64, [u8; 64]), ByDigest>,
        max_age: Duration,
        /// How many `remove`s this store has made: a claim or completion sent before one
        /// makes no entry, which might hold the deleted record.
        removals: AtomicU64,
    }

    /// A completed record: its fingerprint (hex, as sent) and output, and when the entry ends.
    #[derive(Clone)]
    struct Entry {
        fingerprint: [u8; 64],
        output: Bytes,
        expires: Instant,
    }

    /// Each entry ends at its deadline: moka's `get` checks an entry's expiry against its clock
    /// (which it reads anyway) and answers `None` past it, even before its housekeeping has
    /// dropped the entry, so [`LocalCache::claim`] reads no clock of its own.
    struct UntilDeadline;

    impl Expiry<StorageKey, Entry> for UntilDeadline {
        fn expire_after_create(
            &self,
            _key: &StorageKey,
            entry: &Entry,
            created_at: Instant,
        ) -> Option<Duration> {
            Some(entry.expires.saturating_duration_since(created_at))
        }

        fn expire_after_update(
            &self,
            _key: &StorageKey,
            entry: &Entry,
            updated_at: Instant,
            _left: Option<Duration>,
        ) -> Option<Duration> {
            Some(entry.expires.saturating_duration_since(updated_at))
        }
    }

    /// Hashes a [`StorageKey`] by folding its bytes, eight at a time: the key is a SHA-256
    /// digest already, as evenly spread as any hash of it, and the cache's default hasher
    /// (SipHash) was a noticeable share of a cached replay.
    #[derive(Clone, Default)]
    pub(in crate::stores::redis) struct ByDigest;

    impl BuildHasher for ByDigest {
        type Hasher = DigestHasher;

        fn build_hasher(&self) -> DigestHasher {
            DigestHasher(0)
        }
    }

    /// See [`ByDigest`]. A `StorageKey` hashes as its 32 bytes after their length; the
    /// length is ignored, the bytes folded in eight at a time (only the first eight bytes of
    /// a digest are needed, but any bytes written count, so other keys hash soundly too).
    pub(in crate::stores::redis) struct DigestHasher(u64);

    impl Hasher for DigestHasher {
        fn write(&mut self, bytes: &[u8]) {
            for chunk in bytes.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
            }
        }

        fn write_usize(&mut self, _length: usize) {}

        fn finish(&self) -> u64 {
            self.0
        }
    }

    impl LocalCache {
        pub(in crate::stores::redis) fn new(settings: Settings) -> Self {
            let entries = Cache::builder()
                .max_capacity(settings.max_bytes)
                .weigher(|_key: &StorageKey, entry: &Entry| {
                    let weight = ENTRY_OVERHEAD.saturating_add(entry.output.len() as u64);
                    u32::try_from(weight).unwrap_or(u32::MAX)
                })
                .expire_after(UntilDeadline)
                .build_with_hasher(ByDigest);
            let claimed = Cache::builder()
                .max_capacity(CLAIMS_REMEMBERED)
                .time_to_live(CLAIM_REMEMBERED_FOR)
                .build_with_hasher(ByDigest);
            Self {
                entries,
                claimed,
                max_age: settings.max_age,
                removals: AtomicU64::new(0),
            }
        }

        pub(in crate::stores::redis) fn sent(&self) -> Sent {
            Sent {
                at: Instant::now(),
                removals: self.removals.load(Ordering::Acquire),
            }
        }

        /// The answer of a live entry for `key`, if there is one.
        pub(in crate::stores::redis) fn claim(
            &self,
            key: &StorageKey,
            fingerprint: &[u8; 64],
        ) -> Option<Claim> {
            let entry = self.entries.get(key)?;
            Some(if entry.fingerprint == *fingerprint {
                Claim::Completed {
                    output: entry.output,
                }
            } else {
                Claim::Mismatch
            })
        }

        pub(in crate::stores::redis) fn acquired(
            &self,
            key: &StorageKey,
            fence: u64,
            fingerprint: &[u8; 64],
        ) {
            self.claimed.insert(*key, (fence, *fingerprint));
        }

        /// This store's claim with `fence` is over (completed or fenced): the fingerprint it
        /// was made with, if it is still remembered.
        pub(in crate::stores::redis) fn take_claim(
            &self,
            key: &StorageKey,
            fence: u64,
        ) -> Option<[u8; 64]> {
            match self.claimed.get(key) {
                Some((claimed, fingerprint)) if claimed == fence => {
                    self.claimed.invalidate(key);
                    Some(fingerprint)
                }
                _ => None,
            }
        }

        /// Keeps the completed record of `key` until `record_ends` (or `max_age` from now, if
        /// sooner), unless a removal was made since `sent`.
        pub(in crate::stores::redis) fn keep(
            &self,
            key: &StorageKey,
            fingerprint: &[u8; 64],
            output: &Bytes,
            sent: Sent,
            record_left: Duration,
        ) {
            let now = Instant::now();
            let Some(expires) = [
                sent.at.checked_add(record_left),
                now.checked_add(self.max_age),
            ]
            .into_iter()
            .flatten()
            .min() else {
                return;
            };
            if expires <= now || self.removals.load(Ordering::Acquire) != sent.removals {
                return;
            }
            self.entries.insert(
                *key,
                Entry {
                    fingerprint: *fingerprint,
                    output: output.clone(),
                    expires,
                },
            );
            // A removal that raced the insert: its entry must not stay.
            if self.removals.load(Ordering::Acquire) != sent.removals {
                self.entries.invalidate(key);
            }
        }

        pub(in crate::stores::redis) fn forget(&self, key: &StorageKey) {
            self.removals.fetch_add(1, Ordering::AcqRel);
            self.entries.invalidate(key);
            self.claimed.invalidate(key);
        }

        pub(in crate::stores::redis) fn entry_count(&self) -> u64 {
            self.entries.run_pending_tasks();
            self.entries.entry_count()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn cache(max_age: Duration) -> LocalCache {
            LocalCache::new(Settings {
                max_bytes: 1 << 20,
                max_age,
            })
        }

        fn key(name: &[u8]) -> StorageKey {
            StorageKey::derive("redis::cache", None, name).unwrap()
        }

        const MINE: [u8; 64] = [b'a'; 64];
        const OTHER: [u8; 64] = [b'b'; 64];
        const HOUR: Duration = Duration::from_secs(3600);

        #[test]
        fn keys_hash_by_every_byte_and_spread_over_the_buckets() {
            let hash = |key: &StorageKey| ByDigest.hash_one(key);
            // Keys alike but for one byte, anywhere, hash apart.
            let base = [0u8; 32];
            for at in 0..32 {
                let mut other = base;
                other[at] = 1;
                assert_ne!(
                    hash(&StorageKey::from_bytes(base)),
                    hash(&StorageKey::from_bytes(other)),
                    "byte {at}"
                );
            }
            // Real keys fill the low bits evenly (a cache indexes its buckets by them).
            let mut buckets = [0u32; 64];
            for i in 0..64_000u32 {
                buckets[(hash(&key(&i.to_le_bytes())) % 64) as usize] += 1;
            }
            assert!(
                buckets.iter().all(|&n| (800..1200).contains(&n)),
                "{buckets:?}"
            );
        }

        #[test]
        fn an_entry_answers_its_fingerprint_and_refuses_another() {
            let cache = cache(HOUR);
            let output = Bytes::from_static(b"{}");
            cache.keep(&key(b"k"), &MINE, &output, cache.sent(), HOUR);
            assert_eq!(
                cache.claim(&key(b"k"), &MINE),
                Some(Claim::Completed { output })
            );
            assert_eq!(cache.claim(&key(b"k"), &OTHER), Some(Claim::Mismatch));
            assert_eq!(cache.claim(&key(b"other"), &MINE), None);
        }

        #[test]
        fn an_entry_ends_with_its_record_or_at_max_age_whichever_is_first() {
            let output = Bytes::from_static(b"{}");
            let long = cache(HOUR);
            // A record whose life ended before the answer came makes no entry.
            let sent = Sent {
                at: Instant::now() - Duration::from_secs(2),
                removals: 0,
            };
            long.keep(&key(b"k"), &MINE, &output, sent, Duration::from_secs(1));
            assert_eq!(long.claim(&key(b"k"), &MINE), None);

            let short = cache(Duration::from_millis(1));
            short.keep(&key(b"k"), &MINE, &output, short.sent(), HOUR);
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(short.claim(&key(b"k"), &MINE), None, "past max_age");
        }

        #[test]
        fn a_remove_while_a_claim_was_in_flight_keeps_its_answer_out() {
            let cache = cache(HOUR);
            let output = Bytes::from_static(b"{}");
            let sent = cache.sent();
            cache.forget(&key(b"elsewhere"));
            cache.keep(&key(b"k"), &MINE, &output, sent, HOUR);
            assert_eq!(cache.claim(&key(b"k"), &MINE), None);
            cache.keep(&key(b"k"), &MINE, &output, cache.sent(), HOUR);
            assert!(cache.claim(&key(b"k"), &MINE).is_some());
        }

        #[test]
        fn a_completion_finds_the_fingerprint_of_its_own_claim_only() {
            let cache = cache(HOUR);
            cache.acquired(&key(b"k"), 7, &MINE);
            assert_eq!(cache.take_claim(&key(b"k"), 8), None, "another fence");
            assert_eq!(cache.take_claim(&key(b"k"), 7), Some(MINE));
            assert_eq!(cache.take_claim(&key(b"k"), 7), None, "taken once");
        }
    }
}

#[cfg(feature = "redis-cache")]
pub(super) use enabled::LocalCache;

/// Without the feature `redis-cache` no cache can be made: a store's `Option` of it is
/// always `None`.
#[cfg(not(feature = "redis-cache"))]
pub(super) enum LocalCache {}

#[cfg(not(feature = "redis-cache"))]
impl LocalCache {
    fn sent(&self) -> Sent {
        match *self {}
    }
    fn claim(&self, _: &StorageKey, _: &[u8; 64]) -> Option<Claim> {
        match *self {}
    }
    fn acquired(&self, _: &StorageKey, _: u64, _: &[u8; 64]) {
        match *self {}
    }
    fn take_claim(&self, _: &StorageKey, _: u64) -> Option<[u8; 64]> {
        match *self {}
    }
    fn keep(&self, _: &StorageKey, _: &[u8; 64], _: &Bytes, _: Sent, _: Duration) {
        match *self {}
    }
    fn forget(&self, _: &StorageKey) {
        match *self {}
    }
    fn entry_count(&self) -> u64 {
        match *self {}
    }
}

/// The cache made for a builder's settings: none without them, or without the feature.
pub(super) fn build(settings: Option<Settings>) -> Option<std::sync::Arc<LocalCache>> {
    #[cfg(feature = "redis-cache")]
    {
        settings.map(|settings| std::sync::Arc::new(LocalCache::new(settings)))
    }
    #[cfg(not(feature = "redis-cache"))]
    {
        let _ = settings;
        None
    }
}

/// The store's hooks into its cache, each a `None` check when the cache is off.
impl RedisStore {
    /// A claim answered by the cache: `Completed` or `Mismatch` from a live entry.
    pub(super) fn cached_claim(&self, key: &StorageKey, fingerprint: &[u8; 64]) -> Option<Claim> {
        self.cache.as_ref()?.claim(key, fingerprint)
    }

    /// A claim's answer from the server, passed through; an acquired one is remembered with
    /// its fingerprint, for the entry its completion makes.
    pub(super) fn claimed(&self, key: &StorageKey, fingerprint: &[u8; 64], claim: Claim) -> Claim {
        if let (Some(cache), Claim::Acquired { fence }) = (&self.cache, &claim) {
            cache.acquired(key, fence.get(), fingerprint);
        }
        claim
    }

    /// Sends the native claim; with the cache on, in one pipeline with the record's `PTTL`,
    /// which is the record's life if the claim found one.
    pub(super) async fn send_claim(
        &self,
        command: &redis::Cmd,
        key: &StorageKey,
    ) -> (Result<Value, RedisError>, Option<RecordLife>) {
        let Some(cache) = &self.cache else {
            return (self.send(command, None).await, None);
        };
        let mut pipeline = redis::pipe();
        pipeline
            .add_command(command.clone())
            .cmd("PTTL")
            .arg(self.record_key(key))
            // Each command's error is its answer, not the pipeline's: see `query`.
            .ignore_errors();
        let sent = cache.sent();
        // Boxed: inline, the pipeline's future would make every claim's future larger, with
        // the cache or without.
        match Box::pin(self.send_pipeline(&pipeline)).await {
            Ok((answer, Value::Int(left))) => {
                // -2 (no key: the record ended after the claim) or -1 (no expiry: not a
                // record this store wrote) make no entry.
                let life = u64::try_from(left).ok().map(|left| RecordLife {
                    sent,
                    left: Duration::from_millis(left),
                });
                (Ok(answer), life)
            }
            Ok((answer, _)) => (Ok(answer), None),
            Err(error) => (Err(error), None),
        }
    }

    /// The native claim found `key` completed with the call's fingerprint: the cache keeps
    /// it for the record's life, as the claim's `PTTL` measured it.
    pub(super) fn replayed(
        &self,
        key: &StorageKey,
        fingerprint: &[u8; 64],
        output: &Bytes,
        life: Option<RecordLife>,
    ) {
        if let (Some(cache), Some(life)) = (&self.cache, life) {
            cache.keep(key, fingerprint, output, life.sent, life.left);
        }
    }

    /// Taken before a `complete` is sent, for [`completed`](Self::completed).
    pub(super) fn before_complete(&self) -> Option<Sent> {
        Some(self.cache.as_ref()?.sent())
    }

    /// A `complete` with `fence` answered `written`: if it was applied, the cache keeps the
    /// record for its ttl from `sent`.
    pub(super) fn completed(
        &self,
        key: &StorageKey,
        fence: Fence,
        output: &Bytes,
        ttl: Duration,
        sent: Option<Sent>,
        written: FencedWrite,
    ) {
        let (Some(cache), Some(sent)) = (&self.cache, sent) else {
            return;
        };
        let Some(fingerprint) = cache.take_claim(key, fence.get()) else {
            return;
        };
        if written.is_applied() {
            // The ttl as Redis holds it (whole ms, at most the maximum duration).
            let ttl = Duration::from_millis(millis(ttl));
            cache.keep(key, &fingerprint, output, sent, ttl);
        }
    }

    /// `remove` deletes `key`'s entry, and any that a claim or completion in flight would
    /// make.
    pub(super) fn forgotten(&self, key: &StorageKey) {
        if let Some(cache) = &self.cache {
            cache.forget(key);
        }
    }

    /// How many entries the local cache holds, after its pending evictions have run; `None`
    /// when the store has no cache. For tests of the cache's bound.
    #[doc(hidden)]
    pub fn local_cache_entries(&self) -> Option<u64> {
        Some(self.cache.as_ref()?.entry_count())
    }

    /// Sends a pipeline of two commands within the store's deadline, as
    /// [`send`](Self::send) does a command (again on a new connection after `READONLY`;
    /// the connection replaced after a timeout): the first command's answer, whose error is
    /// the pipeline's, and the second's.
    async fn send_pipeline(
        &self,
        pipeline: &redis::Pipeline,
    ) -> Result<(Value, Value), RedisError> {
        let deadline = self.deadline;
        let timed_out = || past_deadline(deadline);
        match &*self.commands {
            Commands::Single(connection) => {
                let mut generation = None;
                let send = async {
                    let (seen, answer) = connection.send_pipeline(pipeline).await;
                    generation = Some(seen);
                    match two_answers(answer) {
                        Err(error) if is_demoted(&error) => {
                            connection.replace(seen);
                            let (seen, answer) = connection.send_pipeline(pipeline).await;
                            generation = Some(seen);
                            two_answers(answer)
                        }
                        answer => answer,
                    }
                };
                let answer = tokio::time::timeout(deadline, send).await;
                let replace = || {
                    if let Some(generation) = generation {
                        connection.replace(generation);
                    }
                };
                match answer {
                    Ok(Err(error)) if error.is_timeout() => {
                        replace();
                        Err(error)
                    }
                    Ok(answer) => answer,
                    Err(_) => {
                        replace();
                        Err(timed_out())
                    }
                }
            }
            Commands::Cluster(cluster) => {
                let send = async {
                    let mut connection = cluster.connection().await?;
                    query(pipeline, &mut connection).await
                };
                tokio::time::timeout(deadline, send)
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))
            }
        }
    }
}

/// The answers of a two-command pipeline sent with `ignore_errors`: the first command's error
/// is returned as the error (as the command alone would have failed), the second's is its
/// answer.
async fn query(
    pipeline: &redis::Pipeline,
    connection: &mut impl redis::aio::ConnectionLike,
) -> Result<(Value, Value), RedisError> {
    two_answers(pipeline.query_async(connection).await)
}

/// [`query`]'s answer from the pipeline's answers.
fn two_answers(answers: Result<Vec<Value>, RedisError>) -> Result<(Value, Value), RedisError> {
    let mut answers = answers?.into_iter();
    match (answers.next(), answers.next()) {
        (Some(Value::ServerError(error)), _) => Err(error.into()),
        (Some(first), Some(second)) => Ok((first, second)),
        _ => Err(RedisError::from(std::io::Error::other(
            "a pipeline of two commands was answered with fewer than two replies",
        ))),
    }
}
