//! The client's retries: one logical request, sent until it has an answer worth keeping, with
//! one `Idempotency-Key` on every attempt. `idempotent_core::client`'s middleware is to take
//! this module's place.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{StatusCode, header};
use idempotent_core::http::IDEMPOTENT_REPLAYED;
use tokio::time::sleep;

use crate::faults::Rng;

/// The client hangs up after this long: longer than a checkout (about 50 ms), shorter than a
/// slow one (`server::SLOW_CHECKOUT`).
const CLIENT_TIMEOUT: Duration = Duration::from_millis(250);
const MAX_ATTEMPTS: u32 = 10;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What one attempt came to.
#[derive(Debug)]
pub(crate) enum Attempt {
    TimedOut,
    /// No complete response: the connection failed or dropped.
    Lost,
    Answered {
        status: StatusCode,
        replayed: bool,
        retry_after: Option<u64>,
    },
}

/// A complete response.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) replayed: bool,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Bytes,
}

/// A request's attempts, and the answer that ended them (none if every attempt failed).
pub(crate) struct Delivery {
    pub(crate) attempts: Vec<Attempt>,
    pub(crate) answer: Option<Answer>,
}

/// Sends one logical request until it has an answer worth keeping, with the same
/// `Idempotency-Key` on every attempt: safe to repeat, because the server replays the first
/// response instead of running the request again.
///
/// Retries after a timeout or a connection that failed or dropped, a 5xx, and a 409 with
/// `Retry-After` (the first request with the key still runs: wait as long as it says). The
/// other waits back off exponentially from 50 ms to 1 s, with jitter so that customers who
/// failed together do not retry together. `request(attempt)` builds each attempt.
pub(crate) async fn send_with_retries(
    key: &str,
    mut request: impl FnMut(u32) -> reqwest::RequestBuilder,
    jitter: &mut Rng,
) -> Delivery {
    let mut attempts = Vec::new();
    for attempt in 1..=MAX_ATTEMPTS {
        let sent = request(attempt)
            .header("idempotency-key", format!("\"{key}\""))
            .timeout(CLIENT_TIMEOUT)
            .send()
            .await;
        let backoff = {
            let ceiling = FIRST_BACKOFF.saturating_mul(1 << (attempt - 1).min(16));
            let ceiling = ceiling.min(MAX_BACKOFF);
            let half = u64::try_from(ceiling.as_millis() / 2).unwrap_or(u64::MAX);
            Duration::from_millis(half + jitter.below(half + 1))
        };
        let wait = match receive(sent).await {
            Err(error) if error.is_timeout() => {
                attempts.push(Attempt::TimedOut);
                backoff
            }
            Err(error) if error.is_connect() || error.is_request() || error.is_body() => {
                attempts.push(Attempt::Lost);
                backoff
            }
            Err(error) => {
                // Not the network's doing (a request that cannot be built): no retry helps.
                eprintln!("checkout_http: a request failed: {error}");
                attempts.push(Attempt::Lost);
                return Delivery {
                    attempts,
                    answer: None,
                };
            }
            Ok((answer, retry_after)) => {
                attempts.push(Attempt::Answered {
                    status: answer.status,
                    replayed: answer.replayed,
                    retry_after,
                });
                let seconds = retry_after.map(Duration::from_secs);
                match (answer.status, seconds) {
                    (status, Some(wait)) if status == StatusCode::CONFLICT => {
                        wait + Duration::from_millis(jitter.below(100))
                    }
                    (status, wait) if status.is_server_error() => wait.unwrap_or(backoff),
                    _ => {
                        return Delivery {
                            attempts,
                            answer: Some(answer),
                        };
                    }
                }
            }
        };
        if attempt < MAX_ATTEMPTS {
            sleep(wait).await;
        }
    }
    Delivery {
        attempts,
        answer: None,
    }
}

/// The whole response, head and body, and its `Retry-After` in seconds.
async fn receive(
    sent: reqwest::Result<reqwest::Response>,
) -> reqwest::Result<(Answer, Option<u64>)> {
    let response = sent?;
    let headers = response.headers();
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = text(header::RETRY_AFTER).and_then(|s| s.parse().ok());
    let status = response.status();
    let replayed = text(IDEMPOTENT_REPLAYED) == Some("true");
    let content_type = text(header::CONTENT_TYPE).map(str::to_owned);
    let body = response.bytes().await?;
    let answer = Answer {
        status,
        replayed,
        content_type,
        body,
    };
    Ok((answer, retry_after))
}

/// A fresh UUID v4 in its hyphenated form. The bits come from std's per-process random hash
/// keys, with no extra dependency; a real client uses a CSPRNG (`uuid::Uuid::new_v4`).
pub(crate) fn uuid_v4() -> String {
    let state = RandomState::new();
    let bits = u128::from(state.hash_one(1_u8)) << 64 | u128::from(state.hash_one(2_u8));
    let bits = (bits & !(0xf << 76)) | (0x4 << 76); // version 4
    let bits = (bits & !(0b11 << 62)) | (0b10 << 62); // variant RFC 9562
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        bits >> 96,
        (bits >> 80) & 0xffff,
        (bits >> 64) & 0xffff,
        (bits >> 48) & 0xffff,
        bits & 0xffff_ffff_ffff
    )
}
