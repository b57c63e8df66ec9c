//! A [`reqwest_middleware`] middleware that gives POST and PATCH requests an `Idempotency-Key`
//! and retries them safely: [`IdempotencyKeys`].
//!
//! ```
//! use idempotent_core::client::IdempotencyKeys;
//! use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
//!
//! let client: ClientWithMiddleware = ClientBuilder::new(reqwest::Client::new())
//!     .with(IdempotencyKeys::new())
//!     .build();
//! # drop(client);
//! ```
//!
//! # Why the key makes a retry safe
//!
//! A POST that timed out, or whose connection closed before the answer came, may have been
//! done by the server or not: the client cannot tell. Sending it again without a key could
//! charge a card twice; not sending it could lose an order. With the same key on every
//! attempt, a server that keeps the key (such as this crate's `http::IdempotencyLayer`, or Stripe's API)
//! does the work at most once and answers the later attempts with what it recorded the first
//! time. That is the only reason this middleware retries POST and PATCH at all: against a
//! server that ignores `Idempotency-Key`, its retries can repeat the work.
//!
//! # What it does
//!
//! - A request whose method is keyed ([POST and PATCH](IdempotencyKeys::with_methods) by
//!   default) and that has no `Idempotency-Key` gets one: a UUID v4 drawn from the operating
//!   system's CSPRNG, sent as an RFC 9651 sf-string (`Idempotency-Key: "8e03978e-…"`), or as
//!   the bare value for servers that expect that ([`KeyForm`]). A request's own key is never
//!   replaced. Other methods pass through untouched, once.
//! - The request is sent again, with the same key, up to
//!   [`with_max_attempts`](IdempotencyKeys::with_max_attempts) times in all, when:
//!   - no response came: the connection failed or closed, or the request timed out
//!     (reqwest's own timeouts: [`reqwest::ClientBuilder::timeout`], or per request);
//!   - the answer is `409 Conflict` with `Retry-After`: the first request with this key is
//!     still running; the middleware waits as asked (at most
//!     [`with_max_retry_after`](IdempotencyKeys::with_max_retry_after)) and asks again,
//!     to get the replay;
//!   - the answer is one of the [retried statuses](IdempotencyKeys::with_retry_statuses)
//!     (500, 502, 503 and 504 by default): a server releases the key on a 5xx, so the next
//!     attempt runs the request afresh. Its `Retry-After` is honoured when it has one.
//! - Everything else is final and returned as it is: 2xx, 3xx, `400` (a bad key), `422` (the
//!   key was used before with another payload: sending it again cannot succeed), a `409`
//!   without `Retry-After`, other 4xx.
//! - Between attempts it waits an exponential backoff with full jitter: a uniform draw between
//!   zero and `initial * 2^(n - 1)` after the `n`th failure, at most `max`
//!   ([`with_backoff`](IdempotencyKeys::with_backoff)).
//! - The response carries [`Keyed`] in its extensions: the key, the number of attempts, and
//!   whether the server answered with a replay ([`is_replayed`] reads the last from any
//!   response).
//!
//! After the last attempt the last response (or error) is returned. An error does not carry
//! the key; to send the request again later, give it your own key, or read [`Keyed`] from the
//! extensions passed to
//! [`execute_with_extensions`](reqwest_middleware::ClientWithMiddleware::execute_with_extensions).
//!
//! # Requests that are sent once
//!
//! A request whose body is a stream ([`reqwest::Body::wrap`], or `wrap_stream`) cannot be copied, so it is
//! sent once, with its key, and whatever happens is returned. Buffer the body (bytes, a
//! string, `json`, `form`) to have it retried.
//!
//! # Where in the stack
//!
//! Middlewares run in the order they were added. Add this one before (outside) those that
//! should see every attempt, such as tracing, and after those whose work should happen once
//! per logical request. A retrying middleware (such as `reqwest-retry`) added before this one
//! sends each of its attempts through this one as a new request, which gets a new key, so the
//! server cannot tell them apart from new work: let this middleware retry the keyed methods,
//! or add the other one after it, where every attempt already carries the key.

mod keyed;
mod retry;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::{Extensions, HeaderName, HeaderValue, Method, StatusCode};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use uuid::Uuid;

pub use keyed::{Keyed, is_replayed};

use retry::Policy;

/// The request header that carries the key.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How the key is written in the `Idempotency-Key` field.
///
/// ```
/// use idempotent_core::client::{IdempotencyKeys, KeyForm};
///
/// // Stripe's API expects the bare value.
/// let keys = IdempotencyKeys::new().with_key_form(KeyForm::Bare);
/// assert_eq!(keys.key_form(), KeyForm::Bare);
/// assert_eq!(KeyForm::default(), KeyForm::Quoted);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyForm {
    /// An RFC 9651 sf-string, as draft-ietf-httpapi-idempotency-key-header asks:
    /// `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`.
    #[default]
    Quoted,
    /// The bare value: `Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324`.
    Bare,
}

/// The middleware: keys POST and PATCH requests with a UUID v4 and retries them with that key.
/// The [module docs](self) say what is retried and why that is safe.
///
/// ```
/// use std::time::Duration;
///
/// use http::{Method, StatusCode};
/// use idempotent_core::client::{IdempotencyKeys, KeyForm};
/// use reqwest_middleware::ClientBuilder;
///
/// let keys = IdempotencyKeys::new()
///     .with_methods([Method::POST, Method::PATCH, Method::PUT])
///     .with_max_attempts(5)
///     .with_backoff(Duration::from_millis(50), Duration::from_secs(2))
///     .with_retry_statuses([StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE])
///     .with_max_retry_after(Duration::from_secs(5))
///     .with_key_form(KeyForm::Quoted);
/// assert_eq!(keys.max_attempts(), 5);
///
/// let http = reqwest::Client::builder()
///     .timeout(Duration::from_secs(10))
///     .build()?;
/// let client = ClientBuilder::new(http).with(keys).build();
/// # drop(client);
/// # Ok::<(), reqwest::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct IdempotencyKeys {
    methods: Vec<Method>,
    max_attempts: u32,
    key_form: KeyForm,
    policy: Policy,
}

impl IdempotencyKeys {
    /// The methods keyed by default: POST and PATCH (PUT and DELETE are idempotent by their
    /// definition).
    pub const DEFAULT_METHODS: [Method; 2] = [Method::POST, Method::PATCH];
    /// The attempts made by default, the first included.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// The default backoff ceiling after the first failure.
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
    /// The default largest backoff ceiling.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
    /// The statuses retried by default: a server releases the key on them.
    pub const DEFAULT_RETRY_STATUSES: [StatusCode; 4] = [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::BAD_GATEWAY,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::GATEWAY_TIMEOUT,
    ];
    /// The longest `Retry-After` honoured by default.
    pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

    /// The middleware with the defaults (the `DEFAULT_*` constants, quoted keys).
    ///
    /// ```
    /// use idempotent_core::client::{IdempotencyKeys, KeyForm};
    ///
    /// let keys = IdempotencyKeys::new();
    /// assert_eq!(keys.methods(), &IdempotencyKeys::DEFAULT_METHODS);
    /// assert_eq!(keys.max_attempts(), IdempotencyKeys::DEFAULT_MAX_ATTEMPTS);
    /// assert_eq!(keys.key_form(), KeyForm::Quoted);
    /// ```
    pub fn new() -> Self {
        Self {
            methods: Self::DEFAULT_METHODS.to_vec(),
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            key_form: KeyForm::Quoted,
            policy: Policy {
                statuses: Self::DEFAULT_RETRY_STATUSES.to_vec(),
                initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
                max_backoff: Self::DEFAULT_MAX_BACKOFF,
                max_retry_after: Self::DEFAULT_MAX_RETRY_AFTER,
            },
        }
    }

    /// The methods whose requests are keyed and retried, in place of POST and PATCH. Requests
    /// with other methods pass through once, untouched.
    ///
    /// ```
    /// use http::Method;
    /// use idempotent_core::client::IdempotencyKeys;
    ///
    /// let keys = IdempotencyKeys::new().with_methods([Method::POST]);
    /// assert_eq!(keys.methods(), &[Method::POST]);
    /// ```
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// How many times a request may be sent in all, the first included (1: never retried).
    /// Zero counts as one: a request is always sent.
    ///
    /// ```
    /// use idempotent_core::client::IdempotencyKeys;
    ///
    /// assert_eq!(IdempotencyKeys::new().with_max_attempts(0).max_attempts(), 1);
    /// ```
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The backoff between attempts: after the `n`th failure the middleware waits a random
    /// time between zero and `initial * 2^(n - 1)`, capped at `max` (full jitter, so clients
    /// that failed together do not come back together).
    ///
    /// ```
    /// use std::time::Duration;
    /// use idempotent_core::client::IdempotencyKeys;
    ///
    /// let keys = IdempotencyKeys::new().with_backoff(Duration::from_millis(10), Duration::from_secs(1));
    /// assert_eq!(keys.backoff(), (Duration::from_millis(10), Duration::from_secs(1)));
    /// ```
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.policy.initial_backoff = initial;
        self.policy.max_backoff = max;
        self
    }

    /// The response statuses sent again with the same key, in place of 500, 502, 503 and 504.
    ///
    /// Retry only statuses after which the server does not keep the key's result: by the
    /// draft, a server releases the key on a 5xx, and records neither `408` nor `429`, so those
    /// two may be added. `409` needs no entry (it is retried when it has `Retry-After`), and
    /// adding `400` or `422` only repeats the refusal.
    ///
    /// ```
    /// use http::StatusCode;
    /// use idempotent_core::client::IdempotencyKeys;
    ///
    /// let keys = IdempotencyKeys::new().with_retry_statuses([
    ///     StatusCode::SERVICE_UNAVAILABLE,
    ///     StatusCode::TOO_MANY_REQUESTS,
    /// ]);
    /// assert!(keys.retry_statuses().contains(&StatusCode::TOO_MANY_REQUESTS));
    /// assert!(!keys.retry_statuses().contains(&StatusCode::INTERNAL_SERVER_ERROR));
    /// ```
    pub fn with_retry_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.policy.statuses = statuses.into_iter().collect();
        self
    }

    /// The longest `Retry-After` waited for; a longer one is cut to this (the attempt after it
    /// may then meet another `409`, and use up the attempts sooner). Only the delta-seconds
    /// form is read: a `409` whose `Retry-After` is an HTTP-date is returned as it is, and a
    /// retried status with one waits the backoff instead.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idempotent_core::client::IdempotencyKeys;
    ///
    /// let keys = IdempotencyKeys::new().with_max_retry_after(Duration::from_secs(2));
    /// assert_eq!(keys.max_retry_after(), Duration::from_secs(2));
    /// ```
    pub fn with_max_retry_after(mut self, max: Duration) -> Self {
        self.policy.max_retry_after = max;
        self
    }

    /// How a generated key is written: an sf-string (the default) or bare. A caller's own
    /// `Idempotency-Key` is sent as the caller wrote it.
    ///
    /// ```
    /// use idempotent_core::client::{IdempotencyKeys, KeyForm};
    ///
    /// let keys = IdempotencyKeys::new().with_key_form(KeyForm::Bare);
    /// assert_eq!(keys.key_form(), KeyForm::Bare);
    /// ```
    pub fn with_key_form(mut self, form: KeyForm) -> Self {
        self.key_form = form;
        self
    }

    /// The methods keyed and retried.
    pub fn methods(&self) -> &[Method] {
        &self.methods
    }

    /// How many times a request may be sent in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff: (initial, max).
    pub fn backoff(&self) -> (Duration, Duration) {
        (self.policy.initial_backoff, self.policy.max_backoff)
    }

    /// The statuses retried besides a `409` with `Retry-After`.
    pub fn retry_statuses(&self) -> &[StatusCode] {
        &self.policy.statuses
    }

    /// The longest `Retry-After` honoured.
    pub fn max_retry_after(&self) -> Duration {
        self.policy.max_retry_after
    }

    /// How generated keys are written.
    pub fn key_form(&self) -> KeyForm {
        self.key_form
    }

    /// The key field of a request: its own, or a new UUID v4 written into it.
    fn key(&self, request: &mut Request) -> (String, bool) {
        if let Some(own) = request.headers().get(IDEMPOTENCY_KEY) {
            return (keyed::key_of(own), false);
        }
        let key = Uuid::new_v4().hyphenated().to_string();
        let field = match self.key_form {
            KeyForm::Quoted => format!("\"{key}\""),
            KeyForm::Bare => key.clone(),
        };
        // Hex digits, hyphens and quotes only: always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&field) {
            request.headers_mut().insert(IDEMPOTENCY_KEY, value);
        }
        (key, true)
    }

    async fn send(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.methods.contains(request.method()) {
            return next.run(request, extensions).await;
        }
        let (key, generated) = self.key(&mut request);
        let mut attempts = 1;
        loop {
            // The copy for the next attempt is made before this one consumes the request; a
            // streamed body has none, and is sent this once.
            let spare = if attempts < self.max_attempts {
                request.try_clone()
            } else {
                None
            };
            let mut result = next.clone().run(request, extensions).await;
            let replayed = result.as_ref().is_ok_and(is_replayed);
            let keyed = Keyed {
                key: key.clone(),
                generated,
                attempts,
                replayed,
            };
            extensions.insert(keyed.clone());
            let wait = self.policy.retry_after(&result, attempts);
            match (spare, wait) {
                (Some(spare), Some(wait)) => {
                    // Not the key: whoever holds it can replay this request's response from a
                    // server that does not scope keys.
                    tracing::debug!(
                        attempts,
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "idempotent request: trying again with the same key"
                    );
                    drop(result);
                    tokio::time::sleep(wait).await;
                    request = spare;
                    attempts += 1;
                }
                _ => {
                    if let Ok(response) = &mut result {
                        response.extensions_mut().insert(keyed);
                    }
                    return result;
                }
            }
        }
    }
}

impl Default for IdempotencyKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl Middleware for IdempotencyKeys {
    // The trait is declared with `async_trait`; this is the signature it expands to, written
    // out so the crate needs no macro for one method.
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        req: Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> Pin<Box<dyn Future<Output = reqwest_middleware::Result<Response>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.send(req, extensions, next))
    }
}
