//! The `Idempotency-Key` contract as a tower layer: a retried POST gets the first response
//! back instead of running the handler again.
//!
//! [`IdempotencyLayer`] implements the IETF draft "The Idempotency-Key HTTP Header Field"
//! (draft-ietf-httpapi-idempotency-key-header-07) with the conventions Stripe made common. It
//! takes and returns only `http` types, so it works under axum, hyper and tonic alike.
//!
//! | the request | the answer |
//! |---|---|
//! | a method the layer does not act on (GET, ...; POST and PATCH are acted on) | passed through untouched |
//! | no `Idempotency-Key` | `400`, or passed through with [`MissingKey::PassThrough`] |
//! | a malformed key, an empty one, one over 255 bytes, more than one field line | `400` |
//! | a body over the limit ([`IdempotencyLayer::with_max_request_bytes`]) | `413` |
//! | a new key | the handler runs; its response is recorded if the [`RecordPolicy`] says so (2xx, 3xx and 4xx but 408, 409 and 429 by default), otherwise the key is released |
//! | a key whose response is recorded, same request | that response again: status, body and the allow-listed headers, with `Idempotent-Replayed: true` |
//! | a recorded key with another method, path, query, body (or fingerprinted header) | `422` |
//! | a key whose first request is still running | `409` with `Retry-After`, or wait and replay ([`IdempotencyLayer::with_on_conflict`]) |
//! | the store is unreachable | `503` with `Retry-After`; the handler does not run |
//!
//! The layer's own answers are `application/problem+json` (RFC 9457), their `type` and
//! `Link: <..>; rel="describedby"` the URL given to [`IdempotencyLayer::with_docs_url`], where
//! the draft asks the service to publish its policy (which routes take a key, how long
//! responses are kept).
//!
//! **Scope the keys** ([`IdempotencyLayer::with_scope`]) by the authenticated principal: without
//! a scope, all clients share one key space, and a client who sends another's key gets that
//! client's recorded response (or a 422 or 409 that tells it the key is in use).
//!
//! **Disconnects.** A client that disconnects mid-request does not cancel its handler: the
//! response future, dropped before it finished, hands the request's run to a task of its own,
//! where the handler finishes and its response is recorded as usual, so the retry gets it
//! instead of a second execution. The layer therefore needs a Tokio runtime (as hyper and axum
//! have) and an inner service that is `Clone + Send + 'static`.
//!
//! **Records.** A recorded response is a line of JSON (status, allow-listed headers, body
//! length) followed by the body's bytes as they are. A response larger than the store's
//! largest record ([`Options::max_output_bytes`](crate::Options::max_output_bytes)) is
//! returned unrecorded with a WARN, and its key released.
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{Router, routing::post};
//! use idempotent_core::{http::IdempotencyLayer, MemoryStore};
//!
//! async fn create_order(body: String) -> (http::StatusCode, String) {
//!     (http::StatusCode::CREATED, format!("order for {body}"))
//! }
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = IdempotencyLayer::new("orders.create")
//!     .with_store(Arc::new(MemoryStore::new()))
//!     .with_docs_url("https://api.example.com/docs/idempotency")?;
//! let app = Router::new().route("/orders", post(create_order)).layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

mod body;
mod fingerprint;
mod future;
mod key;
mod layer;
mod policy;
mod problem;
mod record;
mod service;

pub use body::{RequestBody, ResponseBody};
pub use future::ResponseFuture;
pub use key::IDEMPOTENCY_KEY;
pub use layer::{IdempotencyLayer, MissingKey};
pub use policy::RecordPolicy;
pub use service::{IDEMPOTENT_REPLAYED, Idempotent};
