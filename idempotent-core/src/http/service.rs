//! The service: decides which requests are idempotent, and runs those through the engine, in
//! a run that a dropped response future detaches rather than cancels.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, request};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tower::Service;

use super::body::{RequestBody, ResponseBody};
use super::fingerprint;
use super::future::ResponseFuture;
use super::key::{self, KeyProblem};
use super::layer::{Config, MissingKey};
use super::problem::Problem;
use super::record::{BufferedResponse, ResponseRecording};
use crate::{BoxError, Call, Error, Outcome};

/// `Idempotent-Replayed: true`, on every replayed response.
pub const IDEMPOTENT_REPLAYED: header::HeaderName =
    header::HeaderName::from_static("idempotent-replayed");

/// The service [`IdempotencyLayer`](super::IdempotencyLayer) wraps around `S`.
#[derive(Clone)]
pub struct Idempotent<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Idempotent<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }
}

impl<S: fmt::Debug> fmt::Debug for Idempotent<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("inner", &self.inner)
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotent<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        if !config.methods.contains(request.method()) {
            return ResponseFuture::passthrough(
                self.inner.call(request.map(RequestBody::streaming)),
            );
        }
        let key = match key::read(request.headers(), config.lenient_keys) {
            Ok(Some(key)) => key,
            Ok(None) if config.missing_key == MissingKey::PassThrough => {
                return ResponseFuture::passthrough(
                    self.inner.call(request.map(RequestBody::streaming)),
                );
            }
            Ok(None) => {
                return ResponseFuture::ready(problem(config, Problem::Key(KeyProblem::Missing)));
            }
            Err(why) => return ResponseFuture::ready(problem(config, Problem::Key(why))),
        };
        // The service polled ready is this one; the clone left behind is polled next time.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        // Never cancelled with the connection: a client that disconnects drops the response
        // future, which hands this run to a task of its own (`ResponseFuture`'s drop). The
        // request is recorded (or its key released) whatever the client does, and its retry
        // replays it instead of running the handler a second time.
        ResponseFuture::idempotent(Box::pin(idempotent(
            Arc::clone(config),
            inner,
            request,
            key,
        )))
    }
}

fn problem<B>(config: &Config, problem: Problem) -> Response<ResponseBody<B>> {
    problem
        .into_response(config.docs.as_ref())
        .map(|body| ResponseBody::buffered(body, None))
}

/// Why a handler's response is not recorded, which releases its key.
enum Unrecorded<B, E> {
    /// Returned as it is: a status the policy does not record, a body too large to record.
    Response(Response<ResponseBody<B>>),
    /// The layer's own answer.
    Problem(Problem),
    /// The inner service failed.
    Service(E),
    /// The engine refused the call.
    Engine(Error),
}

impl<B, E> From<Error> for Unrecorded<B, E> {
    fn from(error: Error) -> Self {
        Self::Engine(error)
    }
}

async fn idempotent<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    request: Request<ReqBody>,
    key: String,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let body = match read_request(&parts, body, config.max_request_bytes).await {
        Ok(body) => body,
        Err(why) => return Ok(problem(&config, why)),
    };
    let scope = config.scope.as_ref().and_then(|scope| scope(&parts));
    let fingerprint = fingerprint::of_request(&parts, &config.fingerprint_headers, &body);
    let call = Call::new(config.name, fingerprint).key(key.as_str());
    let call = match &scope {
        Some(scope) => call.scope(scope.as_str()),
        None => call,
    };
    let handler = async {
        let response = inner
            .call(Request::from_parts(parts, RequestBody::buffered(body)))
            .await
            .map_err(Unrecorded::Service)?;
        to_record(&config, response).await
    };
    let outcome = config
        .engine
        .run_recorded::<ResponseRecording, _, _, _>(call, handler)
        .await;
    Ok(match outcome {
        Ok(Outcome::Executed(response) | Outcome::Unrecorded(response)) => executed(response),
        Ok(Outcome::Replayed(response)) => replayed(response),
        Err(Unrecorded::Response(response)) => response,
        Err(Unrecorded::Problem(why)) => problem(&config, why),
        Err(Unrecorded::Engine(error)) => problem(&config, Problem::Engine(error)),
        Err(Unrecorded::Service(error)) => return Err(error),
    })
}

/// The request body, buffered up to `limit` bytes.
async fn read_request<B>(parts: &request::Parts, body: B, limit: usize) -> Result<Bytes, Problem>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(Problem::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(Problem::BodyTooLarge { limit })
        }
        Err(error) => Err(Problem::BodyUnreadable(format!(
            "the request body could not be read: {error}"
        ))),
    }
}

/// Buffers a response the policy records, if it fits in a record.
async fn to_record<B, E>(
    config: &Config,
    response: Response<B>,
) -> Result<BufferedResponse, Unrecorded<B, E>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    if !config.policy.records(parts.status) {
        return Err(Unrecorded::Response(Response::from_parts(
            parts,
            ResponseBody::streaming(body),
        )));
    }
    let limit = config.engine.options().max_output_bytes();
    let mut body = Box::pin(body);
    let mut data = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                let error: BoxError = error.into();
                tracing::warn!(
                    target: "idempotent::http",
                    name = config.name,
                    status = parts.status.as_u16(),
                    error = %error,
                    "the response body failed while it was read to be recorded; the key was released"
                );
                return Err(Unrecorded::Problem(Problem::ResponseFailed(
                    error.to_string(),
                )));
            }
        };
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > limit {
                    too_large(config, parts.status, limit);
                    return Err(Unrecorded::Response(Response::from_parts(
                        parts,
                        ResponseBody::remainder(data.freeze(), body),
                    )));
                }
            }
            Err(frame) => {
                // Trailers (gRPC's status, say) are not recorded: the response goes out as it
                // came, unrecorded.
                let trailers = frame.into_trailers().ok();
                return Err(Unrecorded::Response(Response::from_parts(
                    parts,
                    ResponseBody::buffered(data.freeze(), trailers),
                )));
            }
        }
    }
    let recorded = replayed_headers(config, &parts.headers);
    let buffered = BufferedResponse::new(parts, recorded, data.freeze());
    if buffered.record_len() > limit {
        too_large(config, buffered.status, limit);
        return Err(Unrecorded::Response(executed(buffered)));
    }
    Ok(buffered)
}

fn too_large(config: &Config, status: StatusCode, limit: usize) {
    tracing::warn!(
        target: "idempotent::http",
        name = config.name,
        status = status.as_u16(),
        limit,
        "the response is larger than the largest record (max_output_bytes): it was returned \
         unrecorded and its key released, so a retry runs the handler again"
    );
}

fn replayed_headers(config: &Config, headers: &HeaderMap) -> HeaderMap {
    let mut recorded = HeaderMap::new();
    for name in &config.replayed_headers {
        for value in headers.get_all(name) {
            recorded.append(name.clone(), value.clone());
        }
    }
    recorded
}

fn executed<B>(response: BufferedResponse) -> Response<ResponseBody<B>> {
    match response.parts {
        Some(parts) => Response::from_parts(parts, ResponseBody::buffered(response.body, None)),
        None => replayed(response),
    }
}

fn replayed<B>(response: BufferedResponse) -> Response<ResponseBody<B>> {
    let mut replay = Response::new(ResponseBody::buffered(response.body, None));
    *replay.status_mut() = response.status;
    *replay.headers_mut() = response.headers;
    replay
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    replay
}
