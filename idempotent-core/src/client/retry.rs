//! When an attempt is tried again, and after how long: the errors and statuses that are safe to
//! retry with the same key, `Retry-After`, and exponential backoff with full jitter.

use std::time::Duration;

use http::StatusCode;
use http::header::RETRY_AFTER;
use reqwest::Response;
use uuid::Uuid;

/// What the middleware's settings say about retries (a copy of the few fields the decision
/// reads, so it can be tested without a client).
#[derive(Debug, Clone)]
pub(super) struct Policy {
    pub(super) statuses: Vec<StatusCode>,
    pub(super) initial_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) max_retry_after: Duration,
}

impl Policy {
    /// How long to wait before trying again after `failures` failed attempts (1 for the
    /// first), or `None` when the result is final.
    pub(super) fn retry_after(
        &self,
        result: &reqwest_middleware::Result<Response>,
        failures: u32,
    ) -> Option<Duration> {
        match result {
            Ok(response) => self.after_status(response, failures),
            Err(error) => is_transport(error).then(|| self.backoff(failures)),
        }
    }

    fn after_status(&self, response: &Response, failures: u32) -> Option<Duration> {
        let status = response.status();
        let asked = retry_after_seconds(response);
        if status == StatusCode::CONFLICT {
            // The first request with the key is still running. Without `Retry-After` the
            // server did not say it is that case (a 409 can mean anything), so it is final.
            return asked.map(|delay| delay.min(self.max_retry_after));
        }
        if !self.statuses.contains(&status) {
            return None;
        }
        Some(match asked {
            Some(delay) => delay.min(self.max_retry_after),
            None => self.backoff(failures),
        })
    }

    /// Full jitter: a uniform draw between zero and `initial * 2^(failures - 1)`, at most
    /// `max`.
    pub(super) fn backoff(&self, failures: u32) -> Duration {
        let doubling = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        let ceiling = self
            .initial_backoff
            .saturating_mul(doubling)
            .min(self.max_backoff);
        jitter(ceiling, random_48())
    }
}

/// A transport failure: no response arrived. The request may or may not have reached the
/// server (a timeout or a connection closed mid-request leaves that open), which is the case
/// the key exists for. Builder, redirect and body errors would fail again the same way.
///
/// reqwest reports all three transport failures (a connect that failed, a timeout before the
/// response, a connection closed before it) as request errors; the first two are also
/// `is_connect` and `is_timeout`, which add nothing here. The tests meet each of the three.
fn is_transport(error: &reqwest_middleware::Error) -> bool {
    match error {
        reqwest_middleware::Error::Reqwest(error) => error.is_request(),
        reqwest_middleware::Error::Middleware(_) => false,
    }
}

/// `Retry-After` in its delta-seconds form. The HTTP-date form is not read (the response is
/// then treated as if it had none).
fn retry_after_seconds(response: &Response) -> Option<Duration> {
    parse_seconds(response.headers().get(RETRY_AFTER)?.as_bytes())
}

fn parse_seconds(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    // Digits only, so the one way to fail is a number too large: hold the most a u64 can.
    Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)))
}

/// 48 random bits from the OS's CSPRNG (the random part of a fresh UUID v4), so jitter needs
/// no generator of its own.
fn random_48() -> u64 {
    let bytes = Uuid::new_v4().into_bytes();
    // Bytes 10..16 are all random; 6 and 8 carry the version and the variant.
    bytes[10..16]
        .iter()
        .fold(0, |acc, byte| (acc << 8) | u64::from(*byte))
}

/// `ceiling * random / 2^48`, in whole nanoseconds (a ceiling above u64::MAX nanoseconds, 584
/// years, counts as that).
fn jitter(ceiling: Duration, random: u64) -> Duration {
    let nanos = u128::from(u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX));
    let drawn = (nanos * u128::from(random & ((1 << 48) - 1))) >> 48;
    Duration::from_nanos(u64::try_from(drawn).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            statuses: vec![StatusCode::SERVICE_UNAVAILABLE],
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let policy = policy();
        for _ in 0..200 {
            assert!(policy.backoff(1) <= Duration::from_millis(100));
            assert!(policy.backoff(3) <= Duration::from_millis(400));
            assert!(policy.backoff(40) <= Duration::from_secs(1));
            assert!(policy.backoff(u32::MAX) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn jitter_spans_zero_to_the_ceiling() {
        let ceiling = Duration::from_secs(8);
        assert_eq!(jitter(ceiling, 0), Duration::ZERO);
        assert_eq!(jitter(ceiling, 1 << 47), Duration::from_secs(4));
        let top = jitter(ceiling, (1 << 48) - 1);
        assert!(top < ceiling && top > Duration::from_millis(7999));
        assert!(jitter(Duration::MAX, u64::MAX) <= Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn jitter_draws_differ() {
        let policy = policy();
        let draws: std::collections::BTreeSet<_> = (0..20).map(|_| policy.backoff(4)).collect();
        assert!(draws.len() > 1, "twenty draws were all {draws:?}");
    }

    fn response(status: u16, retry_after: Option<&str>) -> reqwest_middleware::Result<Response> {
        let mut builder = http::Response::builder().status(status);
        if let Some(value) = retry_after {
            builder = builder.header(RETRY_AFTER, value);
        }
        Ok(Response::from(builder.body("").expect("a valid response")))
    }

    #[test]
    fn conflict_is_retried_only_when_it_says_when() {
        let policy = policy();
        assert_eq!(
            policy.retry_after(&response(409, Some("1")), 1),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            policy.retry_after(&response(409, Some("3600")), 1),
            Some(Duration::from_secs(5)),
            "capped at max_retry_after"
        );
        assert_eq!(policy.retry_after(&response(409, None), 1), None);
        assert_eq!(
            policy.retry_after(&response(409, Some("Wed, 21 Oct 2015 07:28:00 GMT")), 1),
            None
        );
    }

    #[test]
    fn only_the_policys_statuses_are_retried() {
        let policy = policy();
        assert!(policy.retry_after(&response(503, None), 1).unwrap() <= Duration::from_millis(100));
        assert_eq!(
            policy.retry_after(&response(503, Some("2")), 1),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            policy.retry_after(&response(503, Some("3600")), 1),
            Some(Duration::from_secs(5)),
            "capped at max_retry_after"
        );
        for final_status in [200, 201, 400, 404, 422, 429, 500, 502] {
            assert_eq!(
                policy.retry_after(&response(final_status, Some("1")), 1),
                None,
                "{final_status} is final"
            );
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_only() {
        assert_eq!(parse_seconds(b"1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_seconds(b" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_seconds(b"99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_seconds(b""), None);
        assert_eq!(parse_seconds(b"-1"), None);
        assert_eq!(parse_seconds(b"1.5"), None);
        assert_eq!(parse_seconds(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_seconds(&[0xff]), None);
    }
}
