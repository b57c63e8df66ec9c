//! The HTTP layer over real HTTP: an axum server with `IdempotencyLayer` on 127.0.0.1, reqwest
//! clients, every scenario on the memory, SQLite, PostgreSQL and Redis stores.
#![cfg(feature = "http")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::post;
use idempotent_core::http::{IdempotencyLayer, MissingKey, RecordPolicy};
use idempotent_core::{MemoryStore, OnConflict, Options, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

const DOCS: &str = "https://api.example.com/docs/idempotency";

/// What the handlers did, counted outside the idempotency store.
struct Counts {
    /// Handler runs started (POST, PUT, PATCH).
    executions: AtomicUsize,
    /// Handler runs that reached their end (a cancelled handler never does).
    finished: AtomicUsize,
    /// GET requests served.
    reads: AtomicUsize,
    /// A handler whose body says "wait" waits for a permit here.
    gate: Semaphore,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            executions: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        }
    }
}

/// The authenticated principal, as an authentication layer in front of the idempotency layer
/// would put it in the request's extensions.
#[derive(Clone)]
struct Principal(String);

struct Server {
    base: String,
    counts: Arc<Counts>,
    client: reqwest::Client,
}

impl Server {
    fn executions(&self) -> usize {
        self.counts.executions.load(Ordering::SeqCst)
    }

    fn finished(&self) -> usize {
        self.counts.finished.load(Ordering::SeqCst)
    }

    fn post(&self, path: &str, key: &str, body: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .header("idempotency-key", format!("\"{key}\""))
            .body(body.to_owned())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        Reply::from(request.send().await.expect("the server answers")).await
    }

    /// Waits until `count` handler runs have started (a state to reach, not a time to meet:
    /// the bound only turns a state never reached into a failure rather than a hang).
    async fn until_executions(&self, count: usize) {
        until(|| self.executions() >= count, "handler runs started").await;
    }

    async fn until_finished(&self, count: usize) {
        until(|| self.finished() >= count, "handler runs finished").await;
    }
}

async fn until(reached: impl Fn() -> bool, what: &str) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while !reached() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "never reached: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    async fn from(response: reqwest::Response) -> Self {
        Self {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes().await.expect("the whole body").to_vec(),
        }
    }

    fn replayed(&self) -> bool {
        match self.headers.get("idempotent-replayed") {
            Some(value) => {
                assert_eq!(value, "true");
                true
            }
            None => false,
        }
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("a text body")
    }

    /// The body as a problem (RFC 9457), checked against the layer's documentation URL.
    fn problem(&self, status: StatusCode) -> serde_json::Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(
            self.headers[header::LINK],
            format!("<{DOCS}>; rel=\"describedby\"")
        );
        let problem: serde_json::Value = serde_json::from_slice(&self.body).expect("JSON");
        assert_eq!(problem["type"], DOCS);
        assert_eq!(problem["status"], status.as_u16());
        assert!(problem["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()));
        problem
    }
}

/// `POST /orders`: counts itself, waits at the gate when the body says "wait", sleeps when it
/// says "sleep", answers 201 with headers a replay must repeat and headers it must not.
async fn create_order(
    State(counts): State<Arc<Counts>>,
    principal: Option<axum::Extension<Principal>>,
    body: String,
) -> Response {
    let n = counts.executions.fetch_add(1, Ordering::SeqCst) + 1;
    if body.contains("wait") {
        counts.gate.acquire().await.expect("open gate").forget();
    }
    if body.contains("sleep") {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    counts.finished.fetch_add(1, Ordering::SeqCst);
    let principal = principal.map(|p| p.0.0).unwrap_or_default();
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::LOCATION, format!("/orders/{n}"))
        .header(header::ETAG, format!("\"order-{n}\""))
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::SET_COOKIE, format!("session=s{n}"))
        .header("x-request-id", format!("r{n}"))
        .body(Body::from(
            serde_json::json!({ "order": n, "for": principal, "cart": body }).to_string(),
        ))
        .expect("a valid response")
}

/// `POST /status?code=N`: answers N; `POST /big?bytes=N`: a body of N bytes.
async fn status(State(counts): State<Arc<Counts>>, uri: Uri) -> Response {
    counts.executions.fetch_add(1, Ordering::SeqCst);
    let code = query_number(&uri, "code");
    Response::builder()
        .status(StatusCode::from_u16(code as u16).expect("a status code"))
        .body(Body::from(format!("answered {code}")))
        .expect("a valid response")
}

async fn big(State(counts): State<Arc<Counts>>, uri: Uri) -> Response {
    counts.executions.fetch_add(1, Ordering::SeqCst);
    Response::new(Body::from(vec![b'x'; query_number(&uri, "bytes")]))
}

fn query_number(uri: &Uri, name: &str) -> usize {
    uri.query()
        .and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        })
        .and_then(|value| value.parse().ok())
        .expect("the number in the query")
}

/// Serves the routes behind `layer` (and an authentication layer in front of it that takes the
/// principal from `x-principal`) on 127.0.0.1.
async fn serve(layer: IdempotencyLayer) -> Server {
    let counts = Arc::new(Counts::default());
    let app = Router::new()
        .route(
            "/orders",
            post(create_order)
                .put(create_order)
                .patch(create_order)
                .get(|State(counts): State<Arc<Counts>>| async move {
                    counts.reads.fetch_add(1, Ordering::SeqCst);
                    "the orders"
                }),
        )
        .route("/orders/express", post(create_order))
        .route("/status", post(status))
        .route("/big", post(big))
        .layer(layer.with_docs_url(DOCS).expect("a valid URL"))
        .layer(axum::middleware::map_request(
            |mut request: Request| async {
                let principal = request
                    .headers()
                    .get("x-principal")
                    .and_then(|value| value.to_str().ok())
                    .map(|value| Principal(value.to_owned()));
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                request
            },
        ))
        .with_state(Arc::clone(&counts));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let address = listener.local_addr().expect("an address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        base: format!("http://{address}"),
        counts,
        // A bound that turns a request that never ends into a failure rather than a hang.
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a client"),
    }
}

fn layer(store: Arc<dyn Store>) -> IdempotencyLayer {
    IdempotencyLayer::new("tests.http").with_store(store)
}

// ---- The scenarios, each run on every store ---------------------------------------------------

async fn a_retry_replays_the_first_response_with_the_allowed_headers(store: Arc<dyn Store>) {
    let server = serve(layer(store)).await;
    let first = server.send(server.post("/orders", "k-1", "cart 1")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert!(!first.replayed());
    assert_eq!(first.headers[header::SET_COOKIE], "session=s1");
    assert_eq!(first.headers["x-request-id"], "r1");

    let retry = server.send(server.post("/orders", "k-1", "cart 1")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    for name in [
        header::CONTENT_TYPE,
        header::LOCATION,
        header::ETAG,
        header::CACHE_CONTROL,
    ] {
        assert_eq!(retry.headers.get(&name), first.headers.get(&name), "{name}");
    }
    assert!(retry.headers.get(header::SET_COOKIE).is_none());
    assert!(retry.headers.get("x-request-id").is_none());
    assert_eq!(server.executions(), 1);
}

async fn only_post_and_patch_need_a_key(store: Arc<dyn Store>) {
    let server = serve(layer(store)).await;
    let url = format!("{}/orders", server.base);
    for _ in 0..2 {
        let read = server.send(server.client.get(&url)).await;
        assert_eq!(read.status, StatusCode::OK);
        assert!(!read.replayed());
    }
    assert_eq!(server.counts.reads.load(Ordering::SeqCst), 2);
    let put = server.send(server.client.put(&url).body("cart")).await;
    assert_eq!(put.status, StatusCode::CREATED, "PUT passes through");
    assert_eq!(server.executions(), 1);

    for missing in [server.client.post(&url), server.client.patch(&url)] {
        let refused = server.send(missing.body("cart")).await;
        let problem = refused.problem(StatusCode::BAD_REQUEST);
        assert_eq!(problem["title"], "Idempotency-Key is missing");
    }
    assert_eq!(
        server.executions(),
        1,
        "a request without a key did not run"
    );
    let patch = server
        .send(
            server
                .client
                .patch(&url)
                .header("idempotency-key", "\"p\"")
                .body("c"),
        )
        .await;
    assert_eq!(patch.status, StatusCode::CREATED);
    assert_eq!(server.executions(), 2);
}

async fn a_route_where_the_key_is_optional_passes_keyless_requests_through(store: Arc<dyn Store>) {
    let server = serve(layer(store).with_missing_key(MissingKey::PassThrough)).await;
    let url = format!("{}/orders", server.base);
    for run in 1..=2 {
        let keyless = server.send(server.client.post(&url).body("cart")).await;
        assert_eq!(keyless.status, StatusCode::CREATED);
        assert!(!keyless.replayed());
        assert_eq!(server.executions(), run, "without a key, no idempotency");
    }
    let keyed = server.send(server.post("/orders", "k", "cart")).await;
    let again = server.send(server.post("/orders", "k", "cart")).await;
    assert!(!keyed.replayed() && again.replayed(), "with a key, as ever");
    assert_eq!(server.executions(), 3);
}

async fn malformed_keys_are_refused(store: Arc<dyn Store>) {
    let server = serve(layer(Arc::clone(&store))).await;
    let url = format!("{}/orders", server.base);
    let long = format!("\"{}\"", "k".repeat(256));
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("a bare token", vec!["bare-key"]),
        ("an empty key", vec!["\"\""]),
        ("a key over 255 bytes", vec![long.as_str()]),
        ("two field lines", vec!["\"a\"", "\"a\""]),
        ("two values in one line", vec!["\"a\", \"b\""]),
        ("not a string", vec!["?1"]),
    ];
    for (case, values) in cases {
        let mut request = server.client.post(&url).body("cart");
        for value in values {
            request = request.header("idempotency-key", value);
        }
        let refused = server.send(request).await;
        let problem = refused.problem(StatusCode::BAD_REQUEST);
        assert_eq!(problem["title"], "Idempotency-Key is malformed", "{case}");
    }
    assert_eq!(server.executions(), 0);
    let longest = format!("\"{}\"", "k".repeat(255));
    let accepted = server
        .send(
            server
                .client
                .post(&url)
                .header("idempotency-key", longest)
                .body("c"),
        )
        .await;
    assert_eq!(accepted.status, StatusCode::CREATED, "255 bytes is a key");

    // Lenient: the bare token many clients send, the same key as its quoted form.
    let lenient = serve(layer(store).with_lenient_keys(true)).await;
    let bare = lenient
        .send(
            lenient
                .client
                .post(format!("{}/orders", lenient.base))
                .header("idempotency-key", "bare-key")
                .body("c"),
        )
        .await;
    assert_eq!(bare.status, StatusCode::CREATED);
    let quoted = lenient.send(lenient.post("/orders", "bare-key", "c")).await;
    assert!(quoted.replayed());
    assert_eq!(lenient.executions(), 1);
}

async fn a_key_reused_with_another_request_is_422(store: Arc<dyn Store>) {
    let account = axum::http::HeaderName::from_static("x-account");
    let server = serve(layer(store).with_fingerprint_headers([account.clone()])).await;
    let first = server
        .send(
            server
                .post("/orders?from=app", "k", "cart")
                .header(&account, "a1"),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let reused = [
        (
            "another body",
            server
                .post("/orders?from=app", "k", "other cart")
                .header(&account, "a1"),
        ),
        (
            "another query",
            server
                .post("/orders?from=web", "k", "cart")
                .header(&account, "a1"),
        ),
        (
            "another path",
            server
                .post("/orders/express?from=app", "k", "cart")
                .header(&account, "a1"),
        ),
        (
            "another method",
            server
                .client
                .patch(format!("{}/orders?from=app", server.base))
                .header("idempotency-key", "\"k\"")
                .header(&account, "a1")
                .body("cart"),
        ),
        (
            "another fingerprinted header",
            server
                .post("/orders?from=app", "k", "cart")
                .header(&account, "a2"),
        ),
    ];
    for (case, request) in reused {
        let problem = server
            .send(request)
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            problem["title"], "Idempotency-Key is already used",
            "{case}"
        );
    }
    let unlisted = server
        .send(
            server
                .post("/orders?from=app", "k", "cart")
                .header(&account, "a1")
                .header("user-agent", "other"),
        )
        .await;
    assert!(
        unlisted.replayed(),
        "headers outside the fingerprint do not count"
    );
    assert_eq!(server.executions(), 1);
}

async fn a_concurrent_request_is_409_with_retry_after(store: Arc<dyn Store>) {
    let server = Arc::new(serve(layer(store)).await);
    let first = tokio::spawn({
        let server = Arc::clone(&server);
        async move { server.send(server.post("/orders", "k", "wait")).await }
    });
    server.until_executions(1).await;
    let concurrent = server.send(server.post("/orders", "k", "wait")).await;
    concurrent.problem(StatusCode::CONFLICT);
    let retry_after: u64 = concurrent.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);

    server.counts.gate.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let later = server.send(server.post("/orders", "k", "wait")).await;
    assert!(later.replayed());
    assert_eq!(later.body, first.body);
    assert_eq!(server.executions(), 1);
}

async fn a_waiting_layer_replays_the_first_response_to_a_concurrent_request(store: Arc<dyn Store>) {
    let wait = OnConflict::Wait {
        timeout: Duration::from_secs(30),
    };
    let server = Arc::new(serve(layer(store).with_on_conflict(wait)).await);
    let first = tokio::spawn({
        let server = Arc::clone(&server);
        async move { server.send(server.post("/orders", "k", "wait")).await }
    });
    server.until_executions(1).await;
    let second = tokio::spawn({
        let server = Arc::clone(&server);
        async move { server.send(server.post("/orders", "k", "wait")).await }
    });
    server.counts.gate.add_permits(1);
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(
        (first.status, second.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!first.replayed() && second.replayed());
    assert_eq!(first.body, second.body);
    assert_eq!(server.executions(), 1);
}

async fn sixty_four_concurrent_identical_posts_run_the_handler_once(store: Arc<dyn Store>) {
    let wait = OnConflict::Wait {
        timeout: Duration::from_secs(60),
    };
    let server = Arc::new(serve(layer(store).with_on_conflict(wait)).await);
    let requests: Vec<_> = (0..64)
        .map(|_| {
            let server = Arc::clone(&server);
            tokio::spawn(async move { server.send(server.post("/orders", "k-64", "sleep")).await })
        })
        .collect();
    let mut replies = Vec::new();
    for request in requests {
        replies.push(request.await.unwrap());
    }
    assert!(
        replies
            .iter()
            .all(|reply| reply.status == StatusCode::CREATED)
    );
    assert!(replies.iter().all(|reply| reply.body == replies[0].body));
    assert_eq!(replies.iter().filter(|reply| !reply.replayed()).count(), 1);
    assert_eq!(server.executions(), 1);
}

async fn the_policy_records_some_statuses_and_releases_the_others(store: Arc<dyn Store>) {
    let server = serve(layer(Arc::clone(&store))).await;
    let mut runs = 0;
    for code in [200, 201, 204, 303, 400, 404, 422] {
        let key = format!("recorded-{code}");
        let path = format!("/status?code={code}");
        let first = server.send(server.post(&path, &key, "")).await;
        let retry = server.send(server.post(&path, &key, "")).await;
        runs += 1;
        assert_eq!((first.status.as_u16(), retry.status.as_u16()), (code, code));
        assert!(retry.replayed(), "{code} is recorded");
        assert_eq!(retry.body, first.body);
        assert_eq!(server.executions(), runs, "{code} ran once");
    }
    for code in [408, 409, 429, 500, 502, 503] {
        let key = format!("released-{code}");
        let path = format!("/status?code={code}");
        for _ in 0..2 {
            let reply = server.send(server.post(&path, &key, "")).await;
            runs += 1;
            assert_eq!(reply.status.as_u16(), code);
            assert!(!reply.replayed(), "{code} is not recorded");
            assert_eq!(reply.text(), format!("answered {code}"));
            assert_eq!(
                server.executions(),
                runs,
                "{code} released its key: the retry ran"
            );
        }
    }

    let stripe =
        serve(layer(store).with_record_policy(RecordPolicy::including_server_errors())).await;
    let first = stripe
        .send(stripe.post("/status?code=500", "s-500", ""))
        .await;
    let retry = stripe
        .send(stripe.post("/status?code=500", "s-500", ""))
        .await;
    assert_eq!(
        (first.status, retry.status),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::INTERNAL_SERVER_ERROR
        )
    );
    assert!(retry.replayed());
    assert_eq!(stripe.executions(), 1);
}

async fn scopes_keep_tenants_apart(store: Arc<dyn Store>) {
    let scoped = layer(store).with_scope(|request: &axum::http::request::Parts| {
        request
            .extensions
            .get::<Principal>()
            .map(|principal| principal.0.clone())
    });
    let server = serve(scoped).await;
    let as_tenant = |tenant: &str, body: &str| {
        server
            .post("/orders", "shared-key", body)
            .header("x-principal", tenant)
    };
    let a = server.send(as_tenant("tenant-a", "cart a")).await;
    let b = server.send(as_tenant("tenant-b", "cart b")).await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(
        !b.replayed(),
        "the same key in another scope is another operation"
    );
    assert_eq!(server.executions(), 2);
    let a_again = server.send(as_tenant("tenant-a", "cart a")).await;
    let b_again = server.send(as_tenant("tenant-b", "cart b")).await;
    assert!(a_again.replayed() && b_again.replayed());
    assert_eq!(
        (a_again.body, b_again.body),
        (a.body.clone(), b.body.clone())
    );
    assert!(a.text().contains("tenant-a") && b.text().contains("tenant-b"));
    let unscoped = server
        .send(server.post("/orders", "shared-key", "cart a"))
        .await;
    assert!(!unscoped.replayed(), "no principal is a scope of its own");
    assert_eq!(server.executions(), 3);
}

async fn a_client_that_disconnects_mid_handler_causes_no_second_execution(store: Arc<dyn Store>) {
    let server = serve(layer(store)).await;
    let impatient = server
        .post("/orders", "k", "wait")
        .timeout(Duration::from_millis(200));
    let gone = impatient
        .send()
        .await
        .expect_err("the client gives up and disconnects");
    assert!(gone.is_timeout(), "{gone}");
    assert_eq!(server.executions(), 1);

    // Its retry while the handler still runs is told to come back, not run again.
    let early = server.send(server.post("/orders", "k", "wait")).await;
    early.problem(StatusCode::CONFLICT);

    // The handler was not cancelled by the disconnect: it finishes, and its response is
    // recorded for the retry.
    server.counts.gate.add_permits(1);
    server.until_finished(1).await;
    let mut retry = server.send(server.post("/orders", "k", "wait")).await;
    while retry.status == StatusCode::CONFLICT {
        // Recording follows the handler's end closely; until then the key is still claimed.
        tokio::time::sleep(Duration::from_millis(10)).await;
        retry = server.send(server.post("/orders", "k", "wait")).await;
    }
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(server.executions(), 1);
}

async fn a_request_body_over_the_limit_is_413(store: Arc<dyn Store>) {
    let server = serve(layer(store).with_max_request_bytes(1024)).await;
    let at_limit = server
        .send(server.post("/orders", "fits", &"c".repeat(1024)))
        .await;
    assert_eq!(at_limit.status, StatusCode::CREATED);
    let over = server
        .send(server.post("/orders", "over", &"c".repeat(1025)))
        .await;
    over.problem(StatusCode::PAYLOAD_TOO_LARGE);

    // Without a Content-Length: a chunked body, refused once it passes the limit.
    let address = server.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let chunk = "c".repeat(2048);
    let request = format!(
        "POST /orders HTTP/1.1\r\nhost: {address}\r\nidempotency-key: \"chunked\"\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(
        server.executions(),
        1,
        "only the request within the limit ran"
    );
}

async fn a_response_too_large_to_record_is_returned_unrecorded(store: Arc<dyn Store>) {
    let limit = Options::new()
        .with_on_conflict(OnConflict::Reject)
        .with_max_output_bytes(4096);
    let server = serve(layer(store).with_options(limit)).await;
    for run in 1..=2 {
        let big = server
            .send(server.post("/big?bytes=10000", "big", ""))
            .await;
        assert_eq!(big.status, StatusCode::OK);
        assert_eq!(big.body.len(), 10_000, "the whole response");
        assert!(!big.replayed());
        assert_eq!(server.executions(), run, "unrecorded: its key was released");
    }
    // Just under the limit once the record's head is counted: still recorded.
    let small = server
        .send(server.post("/big?bytes=3900", "small", ""))
        .await;
    let again = server
        .send(server.post("/big?bytes=3900", "small", ""))
        .await;
    assert_eq!(small.body.len(), 3900);
    assert!(again.replayed());
    assert_eq!(again.body, small.body);
}

// ---- The stores --------------------------------------------------------------------------------

macro_rules! on_every_store {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(std::sync::Arc::new(super::MemoryStore::new())).await;
                }
            )*
        }

        #[cfg(feature = "sqlite")]
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = idempotent_core::stores::sqlite::SqliteStore::open(dir.path().join("records.sqlite3"))
                        .expect("open the SQLite database");
                    super::$scenario(std::sync::Arc::new(store)).await;
                }
            )*
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let url = idempotent_test_support::shared_postgres().create_unique_database("http");
                    let store = idempotent_core::stores::postgres::PostgresStore::builder(url)
                        .max_connections(4)
                        .build()
                        .await
                        .expect("connect to PostgreSQL");
                    super::$scenario(std::sync::Arc::new(store)).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    // One server for the binary: each scenario names its records apart.
                    let redis = idempotent_test_support::shared_redis();
                    let url = format!("{}/{}", redis.url().trim_end_matches('/'), super::database_of(stringify!($scenario)));
                    super::$scenario(super::support::redis_store(&url)).await;
                }
            )*
        }
    };
}

/// A Redis database number per scenario (0 to 15), so scenarios sharing a server never meet.
#[allow(dead_code)]
fn database_of(scenario: &str) -> usize {
    SCENARIOS
        .iter()
        .position(|name| *name == scenario)
        .expect("a listed scenario")
}

const SCENARIOS: [&str; 13] = [
    "a_retry_replays_the_first_response_with_the_allowed_headers",
    "only_post_and_patch_need_a_key",
    "a_route_where_the_key_is_optional_passes_keyless_requests_through",
    "malformed_keys_are_refused",
    "a_key_reused_with_another_request_is_422",
    "a_concurrent_request_is_409_with_retry_after",
    "a_waiting_layer_replays_the_first_response_to_a_concurrent_request",
    "sixty_four_concurrent_identical_posts_run_the_handler_once",
    "the_policy_records_some_statuses_and_releases_the_others",
    "scopes_keep_tenants_apart",
    "a_client_that_disconnects_mid_handler_causes_no_second_execution",
    "a_request_body_over_the_limit_is_413",
    "a_response_too_large_to_record_is_returned_unrecorded",
];

on_every_store!(
    a_retry_replays_the_first_response_with_the_allowed_headers,
    only_post_and_patch_need_a_key,
    a_route_where_the_key_is_optional_passes_keyless_requests_through,
    malformed_keys_are_refused,
    a_key_reused_with_another_request_is_422,
    a_concurrent_request_is_409_with_retry_after,
    a_waiting_layer_replays_the_first_response_to_a_concurrent_request,
    sixty_four_concurrent_identical_posts_run_the_handler_once,
    the_policy_records_some_statuses_and_releases_the_others,
    scopes_keep_tenants_apart,
    a_client_that_disconnects_mid_handler_causes_no_second_execution,
    a_request_body_over_the_limit_is_413,
    a_response_too_large_to_record_is_returned_unrecorded,
);

/// The store unreachable: 503 with `Retry-After`, and the handler does not run (the body never
/// runs without a claim).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_reached_is_503_and_the_handler_does_not_run() {
    let closed = idempotent_test_support::free_port();
    let store =
        idempotent_core::stores::redis::RedisStore::builder(format!("redis://127.0.0.1:{closed}/"))
            .connect_timeout(Duration::from_millis(200))
            .build()
            .expect("a valid URL");
    let server = serve(layer(Arc::new(store))).await;
    let refused = server.send(server.post("/orders", "k", "cart")).await;
    let problem = refused.problem(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem["title"], "Idempotency store unavailable");
    assert_eq!(refused.headers[header::RETRY_AFTER], "1");
    assert_eq!(server.executions(), 0);
}
