//! `client::IdempotencyKeys` over real HTTP on 127.0.0.1: a small axum server answers each path
//! from a script (a status per attempt, a sleep, `Retry-After`, `Idempotent-Replayed`) and
//! records the `Idempotency-Key` of every request it receives. Each test checks what the server
//! saw (one UUID v4, the same on every attempt, or the caller's own key, or none) and what the
//! caller is told (`Keyed`, `is_replayed`).
#![cfg(feature = "client")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::Full;
use idempotent_core::client::{IdempotencyKeys, KeyForm, Keyed, is_replayed};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the server does for one attempt at a path.
#[derive(Clone, Copy)]
enum Step {
    /// Answer with this status.
    Status(u16),
    /// Answer with this status and `Retry-After`.
    RetryAfter(u16, &'static str),
    /// Answer 201 after this long (longer than the client's timeout).
    Sleep(Duration),
    /// Answer 201 with `Idempotent-Replayed: true`.
    Replayed,
}

/// Every path's script; the attempt past the end of a script repeats its last step.
#[derive(Default)]
struct Server {
    scripts: HashMap<&'static str, Vec<Step>>,
    /// The `Idempotency-Key` field of each request, by path, in arrival order.
    seen: Mutex<HashMap<String, Vec<Option<String>>>>,
}

impl Server {
    fn seen(&self, path: &str) -> Vec<Option<String>> {
        self.seen
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

async fn answer(State(server): State<Arc<Server>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let key = key_field(request.headers());
    let attempt = {
        let mut seen = server.seen.lock().unwrap();
        let keys = seen.entry(path.clone()).or_default();
        keys.push(key);
        keys.len() - 1
    };
    // The body is read before answering, as a handler that uses it would.
    let _ = axum::body::to_bytes(request.into_body(), 1 << 20).await;
    let script = server
        .scripts
        .get(path.as_str())
        .map_or(&[Step::Status(201)][..], Vec::as_slice);
    let status = |code: u16| StatusCode::from_u16(code).expect("a valid status");
    match script[attempt.min(script.len() - 1)] {
        Step::Status(code) => status(code).into_response(),
        Step::RetryAfter(code, after) => (status(code), [("retry-after", after)]).into_response(),
        Step::Sleep(time) => {
            tokio::time::sleep(time).await;
            StatusCode::CREATED.into_response()
        }
        Step::Replayed => (
            StatusCode::CREATED,
            [("idempotent-replayed", "true")],
            "recorded",
        )
            .into_response(),
    }
}

fn key_field(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .map(|value| value.to_str().expect("a key field in ASCII").to_owned())
}

/// Serves the scripts on a free port of 127.0.0.1.
async fn serve(scripts: &[(&'static str, &[Step])]) -> (Arc<Server>, String) {
    let server = Arc::new(Server {
        scripts: scripts
            .iter()
            .map(|(path, steps)| (*path, steps.to_vec()))
            .collect(),
        ..Server::default()
    });
    let app = Router::new().fallback(answer).with_state(server.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (server, base)
}

/// Small backoffs, so retries take milliseconds, and a client timeout far below the slow
/// step's sleep.
fn keys() -> IdempotencyKeys {
    IdempotencyKeys::new().with_backoff(Duration::from_millis(5), Duration::from_millis(20))
}

fn client(keys: IdempotencyKeys) -> ClientWithMiddleware {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("a client");
    ClientBuilder::new(http).with(keys).build()
}

/// A POST of `body` to `base` + `path` through the middleware with [`keys`], which must get an
/// answer.
async fn post(base: &str, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    client(keys())
        .post(format!("{base}{path}"))
        .body(body)
        .send()
        .await
        .expect("an answer")
}

/// Whether `key` is a UUID v4 in lowercase hyphenated text: the version nibble is 4 and the
/// variant bits are 10 (the first digit of the fourth group is 8, 9, a or b).
fn is_uuid_v4(key: &str) -> bool {
    let bytes = key.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(at, byte)| match at {
            8 | 13 | 18 | 23 => *byte == b'-',
            _ => byte.is_ascii_digit() || (b'a'..=b'f').contains(byte),
        })
        && bytes[14] == b'4'
        && matches!(bytes[19], b'8' | b'9' | b'a' | b'b')
}

/// The server saw `attempts` requests, all with one quoted UUID v4; returns the UUID.
#[track_caller]
fn one_quoted_uuid(seen: &[Option<String>], attempts: usize) -> String {
    assert_eq!(seen.len(), attempts, "requests the server saw: {seen:?}");
    let first = seen[0].clone().expect("the request has an Idempotency-Key");
    assert!(
        seen.iter()
            .all(|key| key.as_deref() == Some(first.as_str())),
        "every attempt carries the same key: {seen:?}"
    );
    let uuid = first
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("the key is an sf-string: {first}"));
    assert!(is_uuid_v4(uuid), "the key is a UUID v4: {uuid}");
    uuid.to_owned()
}

#[track_caller]
fn keyed(response: &reqwest::Response) -> Keyed {
    response
        .extensions()
        .get::<Keyed>()
        .cloned()
        .expect("a keyed request's response carries Keyed")
}

#[test]
fn the_uuid_check_refuses_what_is_not_a_v4() {
    assert!(is_uuid_v4("8e03978e-40d5-43e8-bc93-6894a57f9324"));
    assert!(
        !is_uuid_v4("8e03978e-40d5-13e8-bc93-6894a57f9324"),
        "version 1"
    );
    assert!(
        !is_uuid_v4("8e03978e-40d5-43e8-cc93-6894a57f9324"),
        "variant 110"
    );
    assert!(
        !is_uuid_v4("8E03978E-40D5-43E8-BC93-6894A57F9324"),
        "upper case"
    );
    assert!(
        !is_uuid_v4("8e03978e40d543e8bc936894a57f9324"),
        "no hyphens"
    );
}

#[tokio::test]
async fn a_timed_out_post_is_sent_again_with_the_same_key() {
    // The first attempt outlives the client's 500 ms timeout; the second is answered at once.
    let (server, base) = serve(&[(
        "/slow",
        &[Step::Sleep(Duration::from_secs(30)), Step::Status(201)],
    )])
    .await;
    let response = client(keys())
        .post(format!("{base}/slow"))
        .body("order")
        .send()
        .await
        .expect("the second attempt is answered");
    assert_eq!(response.status(), StatusCode::CREATED);
    let uuid = one_quoted_uuid(&server.seen("/slow"), 2);
    let keyed = keyed(&response);
    assert_eq!((keyed.key(), keyed.attempts()), (uuid.as_str(), 2));
    assert!(keyed.generated());
    assert!(!keyed.replayed());
}

#[tokio::test]
async fn a_503_is_retried_with_the_same_key() {
    let (server, base) = serve(&[("/flaky", &[Step::Status(503), Step::Status(201)])]).await;
    let response = post(&base, "/flaky", "[1,2,3]").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let uuid = one_quoted_uuid(&server.seen("/flaky"), 2);
    assert_eq!(keyed(&response).key(), uuid);
    assert_eq!(keyed(&response).attempts(), 2);
}

#[tokio::test]
async fn patch_is_keyed_as_post_is() {
    let (server, base) = serve(&[("/flaky", &[Step::Status(502), Step::Status(200)])]).await;
    let response = client(keys())
        .patch(format!("{base}/flaky"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    one_quoted_uuid(&server.seen("/flaky"), 2);
}

#[tokio::test]
async fn attempts_run_out_and_the_last_answer_is_returned() {
    let (server, base) = serve(&[("/down", &[Step::Status(500)])]).await;
    let response = client(keys().with_max_attempts(4))
        .post(format!("{base}/down"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    one_quoted_uuid(&server.seen("/down"), 4);
    assert_eq!(keyed(&response).attempts(), 4);
}

#[tokio::test]
async fn a_status_outside_the_policy_is_final() {
    let (server, base) = serve(&[("/down", &[Step::Status(503), Step::Status(201)])]).await;
    let keys = keys().with_retry_statuses([StatusCode::BAD_GATEWAY]);
    let response = client(keys)
        .post(format!("{base}/down"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    one_quoted_uuid(&server.seen("/down"), 1);
}

#[tokio::test]
async fn a_409_with_retry_after_is_retried_after_it_and_gets_the_replay() {
    let (server, base) = serve(&[("/busy", &[Step::RetryAfter(409, "1"), Step::Replayed])]).await;
    let response = post(&base, "/busy", "x").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(is_replayed(&response));
    let uuid = one_quoted_uuid(&server.seen("/busy"), 2);
    let keyed = keyed(&response);
    assert_eq!((keyed.key(), keyed.attempts()), (uuid.as_str(), 2));
    assert!(keyed.replayed());
    assert_eq!(response.text().await.unwrap(), "recorded");
}

#[tokio::test]
async fn a_long_retry_after_is_cut_to_the_cap() {
    let (server, base) =
        serve(&[("/busy", &[Step::RetryAfter(409, "3600"), Step::Status(201)])]).await;
    let keys = keys().with_max_retry_after(Duration::from_millis(10));
    // Bounded only so that a cap that does not hold fails instead of waiting an hour.
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        client(keys).post(format!("{base}/busy")).body("x").send(),
    )
    .await
    .expect("the hour-long Retry-After was capped")
    .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    one_quoted_uuid(&server.seen("/busy"), 2);
}

#[tokio::test]
async fn a_409_without_retry_after_is_final() {
    let (server, base) = serve(&[("/busy", &[Step::Status(409), Step::Status(201)])]).await;
    let response = post(&base, "/busy", "x").await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    one_quoted_uuid(&server.seen("/busy"), 1);
    assert_eq!(keyed(&response).attempts(), 1);
}

#[tokio::test]
async fn a_422_is_never_retried() {
    // Even with Retry-After, and even if the retried statuses name it: the key was used with
    // another payload, and sending it again cannot succeed.
    let (server, base) =
        serve(&[("/reused", &[Step::RetryAfter(422, "1"), Step::Status(201)])]).await;
    let response = post(&base, "/reused", "another payload").await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    one_quoted_uuid(&server.seen("/reused"), 1);
    assert_eq!(keyed(&response).attempts(), 1);
}

#[tokio::test]
async fn a_400_is_never_retried() {
    let (server, base) = serve(&[("/bad", &[Step::Status(400), Step::Status(201)])]).await;
    let response = post(&base, "/bad", "x").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    one_quoted_uuid(&server.seen("/bad"), 1);
}

#[tokio::test]
async fn get_gets_no_key_and_is_sent_once() {
    let (server, base) = serve(&[("/items", &[Step::Status(503), Step::Status(200)])]).await;
    let response = client(keys())
        .get(format!("{base}/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.seen("/items"), vec![None]);
    assert!(response.extensions().get::<Keyed>().is_none());
}

#[tokio::test]
async fn put_is_keyed_only_when_asked() {
    let (server, base) = serve(&[]).await;
    let keys = keys().with_methods([reqwest::Method::PUT]);
    let client = client(keys);
    client.put(format!("{base}/put")).send().await.unwrap();
    client.post(format!("{base}/post")).send().await.unwrap();
    one_quoted_uuid(&server.seen("/put"), 1);
    assert_eq!(server.seen("/post"), vec![None]);
}

#[tokio::test]
async fn a_callers_own_key_is_kept_across_retries() {
    let (server, base) = serve(&[("/flaky", &[Step::Status(503), Step::Status(201)])]).await;
    let response = client(keys())
        .post(format!("{base}/flaky"))
        .header("Idempotency-Key", "\"order-42\"")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let seen = server.seen("/flaky");
    assert_eq!(seen, vec![Some("\"order-42\"".to_owned()); 2]);
    let keyed = keyed(&response);
    assert_eq!((keyed.key(), keyed.attempts()), ("order-42", 2));
    assert!(!keyed.generated());
}

#[tokio::test]
async fn each_request_gets_its_own_key() {
    let (server, base) = serve(&[]).await;
    let client = client(keys());
    for _ in 0..3 {
        client.post(format!("{base}/new")).send().await.unwrap();
    }
    let seen = server.seen("/new");
    assert_eq!(seen.len(), 3);
    let distinct: std::collections::BTreeSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), 3, "three requests, three keys: {seen:?}");
    for key in &seen {
        one_quoted_uuid(std::slice::from_ref(key), 1);
    }
}

#[tokio::test]
async fn a_bare_key_has_no_quotes() {
    let (server, base) = serve(&[("/flaky", &[Step::Status(503), Step::Status(201)])]).await;
    let response = client(keys().with_key_form(KeyForm::Bare))
        .post(format!("{base}/flaky"))
        .body("x")
        .send()
        .await
        .unwrap();
    let seen = server.seen("/flaky");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], seen[1]);
    let key = seen[0].clone().unwrap();
    assert!(is_uuid_v4(&key), "a bare UUID v4: {key}");
    assert_eq!(keyed(&response).key(), key);
}

#[tokio::test]
async fn a_replay_is_told_to_the_caller() {
    let (server, base) = serve(&[("/replay", &[Step::Replayed])]).await;
    let response = post(&base, "/replay", "x").await;
    one_quoted_uuid(&server.seen("/replay"), 1);
    assert!(is_replayed(&response));
    assert!(keyed(&response).replayed());
    assert_eq!(keyed(&response).attempts(), 1);

    let fresh = client(keys())
        .post(format!("{base}/fresh"))
        .send()
        .await
        .unwrap();
    assert!(!is_replayed(&fresh));
    assert!(!keyed(&fresh).replayed());
}

#[tokio::test]
async fn a_streamed_body_is_sent_once() {
    let (server, base) = serve(&[("/flaky", &[Step::Status(503), Step::Status(201)])]).await;
    let body = reqwest::Body::wrap(Full::new(Bytes::from_static(b"streamed")));
    let response = post(&base, "/flaky", body).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    one_quoted_uuid(&server.seen("/flaky"), 1);
    assert_eq!(keyed(&response).attempts(), 1);
}

/// A server that reads the first request's head and closes the connection without answering
/// (the request may have been done: the case keys exist for), then answers 201 to every later
/// one. Returns the key field of each request and the address.
async fn closes_the_first_connection() -> (Arc<Mutex<Vec<Option<String>>>>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let head = read_head(&mut stream).await;
            let key = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("idempotency-key")
                    .then(|| value.trim().to_owned())
            });
            let first = {
                let mut seen = record.lock().unwrap();
                seen.push(key);
                seen.len() == 1
            };
            if !first {
                let answer =
                    b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                let _ = stream.write_all(answer).await;
            }
            drop(stream);
        }
    });
    (seen, address)
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut buffer = [0; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn a_connection_closed_before_the_answer_is_retried() {
    let (seen, address) = closes_the_first_connection().await;
    let response = client(keys())
        .post(format!("http://{address}/pay"))
        .body("x")
        .send()
        .await
        .expect("the second attempt is answered");
    assert_eq!(response.status(), StatusCode::CREATED);
    let uuid = one_quoted_uuid(&seen.lock().unwrap(), 2);
    assert_eq!(keyed(&response).key(), uuid);
    assert_eq!(keyed(&response).attempts(), 2);
}

#[tokio::test]
async fn a_refused_connection_is_retried_until_the_server_listens() {
    // A port nobody listens on for now; the server takes it a little later.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let (server, _) = serve(&[]).await;
    let app = Router::new().fallback(answer).with_state(server.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let listener = TcpListener::bind(address)
            .await
            .expect("the port is still free");
        axum::serve(listener, app).await
    });
    // Enough attempts, far enough apart, to span the server's start many times over.
    let keys = keys()
        .with_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .with_max_attempts(100);
    let response = client(keys)
        .post(format!("http://{address}/late"))
        .body("x")
        .send()
        .await
        .expect("an attempt after the server listens is answered");
    assert_eq!(response.status(), StatusCode::CREATED);
    // The refused attempts never reached it: the server saw the one that connected.
    let uuid = one_quoted_uuid(&server.seen("/late"), 1);
    let keyed = keyed(&response);
    assert_eq!(keyed.key(), uuid);
    assert!(keyed.attempts() >= 2, "refused first: {keyed:?}");
}

#[tokio::test]
async fn the_key_is_known_after_every_attempt_failed() {
    let (seen, address) = closes_the_first_connection().await;
    let client = client(keys().with_max_attempts(1));
    let request = client
        .post(format!("http://{address}/pay"))
        .body("x")
        .build()
        .unwrap();
    let mut extensions = axum::http::Extensions::new();
    let error = client
        .execute_with_extensions(request, &mut extensions)
        .await
        .expect_err("the only attempt's connection was closed");
    assert!(error.is_request(), "{error:?}");
    let keyed = extensions
        .get::<Keyed>()
        .expect("the key is in the request's extensions");
    let uuid = one_quoted_uuid(&seen.lock().unwrap(), 1);
    assert_eq!((keyed.key(), keyed.attempts()), (uuid.as_str(), 1));
}

/// The client against the crate's own server layer: the keys it sends are the ones the layer
/// accepts, and a timed-out POST runs the handler once.
#[cfg(feature = "http")]
mod against_the_layer {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::routing::post;
    use idempotent_core::MemoryStore;
    use idempotent_core::http::IdempotencyLayer;

    use super::*;

    /// A POST route under `IdempotencyLayer` whose first run takes `first_run` (longer than
    /// the client's timeout, or nothing); returns how many times the handler ran, the key field
    /// of every request, and the base URL.
    async fn serve_orders(
        first_run: Duration,
    ) -> (Arc<AtomicUsize>, Arc<Mutex<Vec<Option<String>>>>, String) {
        let runs = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let counted = runs.clone();
        let handler = move |body: String| {
            let counted = counted.clone();
            async move {
                let run = counted.fetch_add(1, Ordering::SeqCst) + 1;
                if run == 1 {
                    tokio::time::sleep(first_run).await;
                }
                (StatusCode::CREATED, format!("order {run} for {body}"))
            }
        };
        let layer = IdempotencyLayer::new("http_client.orders")
            .with_store(Arc::new(MemoryStore::new()))
            .with_lease(Duration::from_secs(5));
        let record = seen.clone();
        let app = Router::new()
            .route("/orders", post(handler))
            .layer(layer)
            .layer(tower::util::MapRequestLayer::new(
                move |request: axum::extract::Request| {
                    record.lock().unwrap().push(key_field(request.headers()));
                    request
                },
            ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (runs, seen, base)
    }

    #[tokio::test]
    async fn a_timed_out_post_runs_once_and_its_retry_gets_the_replay() {
        let (runs, seen, base) = serve_orders(Duration::from_millis(800)).await;
        // The layer answers 409 with the lease left (5 s) while the first run goes on; the
        // cap makes the client ask again every 100 ms instead.
        let keys = keys()
            .with_max_retry_after(Duration::from_millis(100))
            .with_max_attempts(50);
        let response = client(keys)
            .post(format!("{base}/orders"))
            .body("ada")
            .send()
            .await
            .expect("an attempt after the first run ended gets its response");
        assert_eq!(response.status(), StatusCode::CREATED);
        let keyed = keyed(&response);
        assert!(keyed.replayed(), "{keyed:?}");
        assert!(is_replayed(&response));
        assert_eq!(response.text().await.unwrap(), "order 1 for ada");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
        let uuid = one_quoted_uuid(&seen.lock().unwrap(), keyed.attempts() as usize);
        assert_eq!(keyed.key(), uuid);
        assert!(
            keyed.attempts() >= 2,
            "the first attempt timed out: {keyed:?}"
        );
    }

    #[tokio::test]
    async fn a_key_reused_with_another_payload_gets_one_422() {
        let (runs, seen, base) = serve_orders(Duration::ZERO).await;
        let client = client(keys());
        let send = |body: &'static str| {
            client
                .post(format!("{base}/orders"))
                .header("Idempotency-Key", "\"order-7\"")
                .body(body)
                .send()
        };
        let first = send("ada").await.unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        let runs_before = runs.load(Ordering::SeqCst);
        seen.lock().unwrap().clear();
        let reused = send("grace").await.unwrap();
        assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(keyed(&reused).attempts(), 1);
        assert_eq!(seen.lock().unwrap().len(), 1, "the 422 was not sent again");
        assert_eq!(runs.load(Ordering::SeqCst), runs_before);
    }
}
