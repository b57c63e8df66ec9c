//! The layer: its configuration, and the service it wraps around each inner service.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, InvalidHeaderValue};
use http::{Method, request};
use tower::Layer;

use super::policy::{REPLAYED_HEADERS, RecordPolicy, never_replayed};
use super::service::Idempotent;
use crate::{Idempotency, OnConflict, Options, Store};

/// What the layer does with a request (of an idempotent method) that has no `Idempotency-Key`.
///
/// ```
/// use idempotent_core::http::{IdempotencyLayer, MissingKey};
/// // A route where the key is a courtesy: requests without one run as they always did.
/// let layer = IdempotencyLayer::new("orders.create").with_missing_key(MissingKey::PassThrough);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Answer `400 Bad Request` (a problem response saying the key is required).
    #[default]
    Reject,
    /// Hand the request to the inner service untouched, without idempotency.
    PassThrough,
}

/// The request's scope, from its head: e.g. the authenticated principal an authentication
/// layer put in the extensions.
pub(crate) type ScopeFn = dyn Fn(&request::Parts) -> Option<String> + Send + Sync;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) engine: Idempotency,
    pub(crate) name: &'static str,
    pub(crate) methods: Vec<Method>,
    pub(crate) missing_key: MissingKey,
    pub(crate) lenient_keys: bool,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) replayed_headers: Vec<HeaderName>,
    pub(crate) policy: RecordPolicy,
    pub(crate) max_request_bytes: usize,
    pub(crate) docs: Option<HeaderValue>,
    pub(crate) scope: Option<Arc<ScopeFn>>,
}

/// The `Idempotency-Key` contract (draft-ietf-httpapi-idempotency-key-header) as a tower
/// [`Layer`]: a retried POST gets the first response back instead of running the handler
/// again. See the [module documentation](super) for the whole contract.
///
/// Its store, ttl and lease are those of the attribute ([`Options`]); the default store is the
/// process-wide one, as for `#[idempotent]`. Unlike the attribute, a request that finds its key
/// in progress is answered `409 Conflict` with `Retry-After` at once, as the draft says; wait
/// instead with [`IdempotencyLayer::with_on_conflict`].
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use idempotent_core::http::IdempotencyLayer;
/// use idempotent_core::MemoryStore;
///
/// let layer = IdempotencyLayer::new("orders.create")
///     .with_store(Arc::new(MemoryStore::new()))
///     .with_ttl(Duration::from_secs(24 * 3600))
///     .with_docs_url("https://api.example.com/docs/idempotency")
///     .expect("a valid header value");
/// // With axum: Router::new().route("/orders", post(create_order)).layer(layer)
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl IdempotencyLayer {
    /// Default for [`IdempotencyLayer::with_max_request_bytes`]: 1 MiB.
    pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;

    /// A layer whose records are named `name` (their namespace, as the attribute's `name`:
    /// keep it stable across deployments), on the process-wide default store.
    ///
    /// ```
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("payments.v1");
    /// ```
    pub fn new(name: &'static str) -> Self {
        Self::with_engine(name, Idempotency::with_default_store())
    }

    fn with_engine(name: &'static str, engine: Idempotency) -> Self {
        let options = Options::new().with_on_conflict(OnConflict::Reject);
        Self {
            config: Arc::new(Config {
                engine: engine.with_options(options),
                name,
                methods: vec![Method::POST, Method::PATCH],
                missing_key: MissingKey::Reject,
                lenient_keys: false,
                fingerprint_headers: Vec::new(),
                replayed_headers: REPLAYED_HEADERS.to_vec(),
                policy: RecordPolicy::default(),
                max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES,
                docs: None,
                scope: None,
            }),
        }
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Records in `store` rather than the default store.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use idempotent_core::{http::IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new("orders").with_store(Arc::new(MemoryStore::new()));
    /// ```
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        let config = self.config();
        config.engine = Idempotency::new(store).with_options(*config.engine.options());
        self
    }

    /// All the engine's options at once: ttl, lease, on_conflict, lease loss, and the largest
    /// recorded response (`max_output_bytes`, the record's size: the body plus a line of JSON).
    ///
    /// ```
    /// # use std::time::Duration;
    /// use idempotent_core::{http::IdempotencyLayer, OnConflict, Options};
    /// let layer = IdempotencyLayer::new("orders").with_options(
    ///     Options::new().with_on_conflict(OnConflict::Reject).with_max_output_bytes(256 * 1024),
    /// );
    /// ```
    pub fn with_options(mut self, options: Options) -> Self {
        let config = self.config();
        config.engine = config.engine.clone().with_options(options);
        self
    }

    fn map_options(self, map: impl FnOnce(Options) -> Options) -> Self {
        let options = map(*self.config.engine.options());
        self.with_options(options)
    }

    /// How long a recorded response is replayed (24 hours by default). Publish it with the
    /// rest of the policy at [`IdempotencyLayer::with_docs_url`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("orders").with_ttl(Duration::from_secs(3600));
    /// ```
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.map_options(|options| options.with_ttl(ttl))
    }

    /// How long a request's claim lasts if its server dies (renewed while the handler runs).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("orders").with_lease(Duration::from_secs(10));
    /// ```
    pub fn with_lease(self, lease: Duration) -> Self {
        self.map_options(|options| options.with_lease(lease))
    }

    /// What a request does while another with its key runs: [`OnConflict::Reject`] (the
    /// default: `409 Conflict` with `Retry-After`), or wait for the first response and replay
    /// it ([`OnConflict::Wait`], up to its timeout, then 409).
    ///
    /// ```
    /// # use std::time::Duration;
    /// use idempotent_core::{http::IdempotencyLayer, OnConflict};
    /// let layer = IdempotencyLayer::new("orders")
    ///     .with_on_conflict(OnConflict::Wait { timeout: Duration::from_secs(5) });
    /// ```
    pub fn with_on_conflict(self, on_conflict: OnConflict) -> Self {
        self.map_options(|options| options.with_on_conflict(on_conflict))
    }

    /// The methods the layer acts on (POST and PATCH by default); others pass through.
    ///
    /// ```
    /// use http::Method;
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("orders").with_methods([Method::POST, Method::PUT, Method::DELETE]);
    /// ```
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config().methods = methods.into_iter().collect();
        self
    }

    /// What a request without a key gets: `400` ([`MissingKey::Reject`], the default) or no
    /// idempotency ([`MissingKey::PassThrough`]).
    ///
    /// ```
    /// # use idempotent_core::http::{IdempotencyLayer, MissingKey};
    /// let layer = IdempotencyLayer::new("orders").with_missing_key(MissingKey::PassThrough);
    /// ```
    pub fn with_missing_key(mut self, missing_key: MissingKey) -> Self {
        self.config().missing_key = missing_key;
        self
    }

    /// Accepts bare keys (`Idempotency-Key: 8e03978e-40d5-...`) as well as the draft's quoted
    /// strings: many clients send them. A bare key is visible ASCII without spaces, quotes,
    /// backslashes or commas; `abc` and `"abc"` are the same key. Off by default.
    ///
    /// ```
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("orders").with_lenient_keys(true);
    /// ```
    pub fn with_lenient_keys(mut self, lenient: bool) -> Self {
        self.config().lenient_keys = lenient;
        self
    }

    /// Request headers that are part of the fingerprint, beside the method, path, query and
    /// body: a retry must repeat them, or it gets `422`.
    ///
    /// ```
    /// use http::HeaderName;
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("orders")
    ///     .with_fingerprint_headers([HeaderName::from_static("x-account")]);
    /// ```
    pub fn with_fingerprint_headers(
        mut self,
        headers: impl IntoIterator<Item = HeaderName>,
    ) -> Self {
        self.config().fingerprint_headers = headers.into_iter().collect();
        self
    }

    /// Response headers a replay repeats, besides the default allow-list (Content-Type,
    /// Content-Encoding, Content-Language, Content-Location, Location, ETag, Last-Modified,
    /// Cache-Control, Expires, Vary, Link). Set-Cookie, Date, Content-Length and hop-by-hop
    /// headers are never recorded, even when named here.
    ///
    /// ```
    /// use http::HeaderName;
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("orders")
    ///     .with_replayed_headers([HeaderName::from_static("x-order-id")]);
    /// ```
    pub fn with_replayed_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let config = self.config();
        for name in headers {
            if !never_replayed(&name) && !config.replayed_headers.contains(&name) {
                config.replayed_headers.push(name);
            }
        }
        self
    }

    /// Which responses are recorded; see [`RecordPolicy`].
    ///
    /// ```
    /// use idempotent_core::http::{IdempotencyLayer, RecordPolicy};
    /// let layer = IdempotencyLayer::new("charges")
    ///     .with_record_policy(RecordPolicy::including_server_errors());
    /// ```
    pub fn with_record_policy(mut self, policy: RecordPolicy) -> Self {
        self.config().policy = policy;
        self
    }

    /// The largest request body the layer buffers to fingerprint (1 MiB by default): a larger
    /// one is answered `413 Content Too Large` without running the handler.
    ///
    /// ```
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("uploads").with_max_request_bytes(16 * 1024 * 1024);
    /// ```
    pub fn with_max_request_bytes(mut self, limit: usize) -> Self {
        self.config().max_request_bytes = limit;
        self
    }

    /// Where the service documents its idempotency policy (which routes take a key, how long
    /// responses are kept): the draft asks a server to publish it. The layer's problem
    /// responses name it as their `type` and in `Link: <url>; rel="describedby"`. Without it,
    /// their type is `about:blank` and they have no `Link`.
    ///
    /// # Errors
    /// When `url` cannot be a header value (control characters).
    ///
    /// ```
    /// # use idempotent_core::http::IdempotencyLayer;
    /// let layer = IdempotencyLayer::new("orders").with_docs_url("https://api.example.com/idempotency")?;
    /// assert!(IdempotencyLayer::new("orders").with_docs_url("bad\nurl").is_err());
    /// # Ok::<(), http::header::InvalidHeaderValue>(())
    /// ```
    pub fn with_docs_url(mut self, url: &str) -> Result<Self, InvalidHeaderValue> {
        self.config().docs = Some(HeaderValue::from_str(url)?);
        Ok(self)
    }

    /// Scopes each request's key by a function of its head: the same key in two scopes is two
    /// operations, so one tenant can neither replay nor block another's request by guessing or
    /// reusing its key. `None` is the unscoped space. Use the authenticated principal, put in
    /// the request's extensions by the authentication layer that runs before this one.
    ///
    /// ```
    /// # use idempotent_core::http::IdempotencyLayer;
    /// #[derive(Clone)]
    /// struct Principal(String);
    ///
    /// let layer = IdempotencyLayer::new("orders").with_scope(|request: &http::request::Parts| {
    ///     request.extensions.get::<Principal>().map(|principal| principal.0.clone())
    /// });
    /// ```
    pub fn with_scope(
        mut self,
        scope: impl Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.config().scope = Some(Arc::new(scope));
        self
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.config;
        f.debug_struct("IdempotencyLayer")
            .field("name", &config.name)
            .field("options", config.engine.options())
            .field("methods", &config.methods)
            .field("missing_key", &config.missing_key)
            .field("lenient_keys", &config.lenient_keys)
            .field("fingerprint_headers", &config.fingerprint_headers)
            .field("replayed_headers", &config.replayed_headers)
            .field("max_request_bytes", &config.max_request_bytes)
            .field("docs", &config.docs)
            .field("scoped", &config.scope.is_some())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotent<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotent::new(inner, Arc::clone(&self.config))
    }
}
