//! The HTTP layer (`idempotent_core::http::IdempotencyLayer`) against the same axum route
//! without it, and on Redis against the raw client doing only the round trips the layer needs.
//!
//! One axum `Router` with one route, `POST /orders`, whose handler reads the request body and
//! answers `201 Created` with a 200-byte JSON body. The router is called in process
//! (`tower::ServiceExt::oneshot`, the response body collected), on a task on a worker, so the
//! times hold no sockets: they are the layer's own cost, and its store's.
//!
//! Cases (group `http`):
//!
//! | id | one iteration |
//! |---|---|
//! | `route` | the route without the layer: the floor every other case is compared with |
//! | `route/spawned` | the route in a task of its own, awaited: what a spawn per request costs by itself (the layer spawns only the run of a request whose response future was dropped before it finished, so that a disconnect does not cancel its handler) |
//! | `memory/first_call/layer` | the layer on a `MemoryStore`, a fresh key: the handler runs, its response is recorded |
//! | `memory/replay/layer` | the same layer, one key recorded before: the recorded response is replayed |
//! | `redis/first_call/layer`, `redis/replay/layer` | the same two on a `RedisStore` |
//! | `redis/first_call/bare` | the raw `redis` client: `SET NX PX`, then `SET PX` of a record of the same size |
//! | `redis/replay/bare` | the raw `redis` client: `GET` of that record |
//! | `loopback/route`, `loopback/memory/first_call/layer`, `loopback/memory/replay/layer` | the route, and the layer on the memory store, over real HTTP: served by `axum::serve` on 127.0.0.1, called by one keep-alive `reqwest` client |
//!
//! Before the timings, the bench prints what a recorded response costs at rest: for bodies of
//! 1 KiB and 100 KiB, JSON text and random bytes, the record the layer hands the store, the
//! memory store's count of the record's bytes, and Redis' `STRLEN` of the record's key, beside
//! the body's size and the size the body would have as a JSON array of numbers. It writes them
//! to `<out>/http/stored_sizes.json` (see `common::out_dir`) when measuring.
//! `cargo bench --all-features --bench http -- stored_sizes` prints them alone (the filter
//! leaves every timed case out).
//!
//! The bench starts its own `redis-server` (idempotent-test-support).

mod common;

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::http::{Request, Response, StatusCode};
use axum::routing::post;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use idempotent_core::conformance::{Completing, Forwarding, Hooks};
use idempotent_core::http::{IDEMPOTENT_REPLAYED, IdempotencyLayer};
use idempotent_core::stores::redis::RedisStore;
use idempotent_core::{BoxFuture, FencedWrite, MemoryStore, StorageKey, Store, StoreError};
use redis::aio::MultiplexedConnection;
use tower::ServiceExt;

/// The route's response: an order as a client would get it back, 200 bytes of JSON.
const ORDER_CREATED: &str = r#"{"order_id":"order-1001","status":"created","customer_id":"customer-4711","items":[{"sku":"SKU-CHAIR-OAK-42","quantity":2,"unit_cents":12990}],"amount_cents":25980,"currency":"EUR","charge_id":"ch_3PqLk2Jd8sX0"}"#;
/// The request's body: the order as the client sends it.
const ORDER_REQUEST: &str = r#"{"order_id":"order-1001","customer_id":"customer-4711","sku":"SKU-CHAIR-OAK-42","quantity":2,"amount_cents":25980}"#;
/// The name of the layer's records (their namespace).
const NAME: &str = "bench.orders.create";
/// A new memory store every this many first calls, so a long run never fills one (a million
/// records by default); making it is not timed.
const CHUNK: u64 = 1 << 16;
const LEASE_MS: u64 = 30_000;
const TTL: Duration = Duration::from_secs(120);

/// `POST /orders`: reads the body, answers 201 with [`ORDER_CREATED`].
fn orders() -> Router {
    Router::new().route(
        "/orders",
        post(|body: Bytes| async move {
            black_box(body);
            (
                StatusCode::CREATED,
                [(CONTENT_TYPE, "application/json")],
                ORDER_CREATED,
            )
        }),
    )
}

/// [`orders`] behind the layer on `store`.
fn orders_with_layer(store: Arc<dyn Store>) -> Router {
    let layer = IdempotencyLayer::new(NAME)
        .with_store(store)
        .with_ttl(TTL)
        .with_lease(Duration::from_millis(LEASE_MS));
    orders().layer(layer)
}

/// The request: `POST /orders` with [`ORDER_REQUEST`], and `Idempotency-Key: "<key>"` when
/// `key` is given.
fn request(key: Option<&str>) -> Request<Body> {
    let mut builder = Request::post("/orders").header(CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        let value = HeaderValue::try_from(format!("\"{key}\"")).expect("a key is a header value");
        builder = builder.header("idempotency-key", value);
    }
    builder
        .body(Body::from(ORDER_REQUEST))
        .expect("a valid request")
}

/// Sends `request` through `router` and reads the whole response; panics on another status
/// than 201 (a bench measuring 400s would measure nothing).
async fn send(router: &Router, request: Request<Body>) -> Response<Bytes> {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("a router's error is Infallible");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the response body").to_bytes();
    assert_eq!(
        parts.status,
        StatusCode::CREATED,
        "the route answered {}: {}",
        parts.status,
        String::from_utf8_lossy(&body)
    );
    Response::from_parts(parts, body)
}

fn replayed(response: &Response<Bytes>) -> bool {
    response.headers().contains_key(IDEMPOTENT_REPLAYED)
}

/// The raw client: the round trips the layer's Redis store needs, and no more.
#[derive(Clone)]
struct Bare {
    connection: MultiplexedConnection,
    /// What is stored once a call completes: 32 bytes of fingerprint, then a record of the
    /// size the layer stores ([`response_record`]).
    record: Bytes,
}

impl Bare {
    /// `SET key <fingerprint> NX PX lease`, then `SET key <record> PX ttl`.
    async fn first_call(&self, key: &str) {
        let mut connection = self.connection.clone();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(&self.record[..32])
            .arg("NX")
            .arg("PX")
            .arg(LEASE_MS)
            .query_async(&mut connection)
            .await
            .expect("SET NX PX");
        assert!(claimed.is_some(), "a fresh key was already set");
        redis::cmd("SET")
            .arg(key)
            .arg(&self.record[..])
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .query_async::<()>(&mut connection)
            .await
            .expect("SET PX");
    }

    /// `GET key`.
    async fn replay(&self, key: &str) -> Bytes {
        let mut connection = self.connection.clone();
        let record: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("GET");
        Bytes::from(record.expect("the record was set"))
    }
}

/// What the layer records of the route's response, with a fingerprint in front: a line of
/// JSON (status, headers, body length) and the body, as `http/record.rs` writes it.
fn response_record() -> Bytes {
    let head = format!(
        "{{\"response\":{{\"status\":201,\"headers\":[[\"content-type\",\"application/json\"]],\"body_bytes\":{}}}}}\n",
        ORDER_CREATED.len()
    );
    let mut record = vec![7u8; 32];
    record.extend_from_slice(head.as_bytes());
    record.extend_from_slice(ORDER_CREATED.as_bytes());
    Bytes::from(record)
}

/// `iters` calls of `call` on a task on a worker (as a request handler is), timed.
async fn timed<F, Fut>(iters: u64, call: F) -> Duration
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    common::concurrent(1, iters, move |_, i| call(i)).await
}

/// `iters` first calls through the layer, each with a fresh key, `CHUNK` at a time on a new
/// memory store.
async fn memory_first_calls(iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(CHUNK);
        let router = Arc::new(orders_with_layer(Arc::new(MemoryStore::new())));
        let keys: Arc<Vec<String>> = Arc::new((0..n).map(|_| common::fresh_id("http")).collect());
        total += timed(n, move |i| {
            let (router, keys) = (Arc::clone(&router), Arc::clone(&keys));
            async move {
                let response = send(&router, request(Some(&keys[i as usize]))).await;
                debug_assert!(!replayed(&response));
                black_box(response);
            }
        })
        .await;
        done += n;
    }
    total
}

fn bench(c: &mut Criterion) {
    let runtime = common::runtime();
    let server = idempotent_test_support::RedisServer::start();
    let redis_store: Arc<dyn Store> = Arc::new({
        let _entered = runtime.enter();
        RedisStore::builder(server.url())
            .build()
            .expect("a valid Redis URL")
    });
    let bare = Bare {
        connection: runtime.block_on(async {
            redis::Client::open(server.url())
                .expect("a valid Redis URL")
                .get_multiplexed_async_connection()
                .await
                .expect("connect to Redis")
        }),
        record: response_record(),
    };
    let route = Arc::new(orders());
    let memory = Arc::new(orders_with_layer(Arc::new(MemoryStore::new())));
    let redis = Arc::new(orders_with_layer(redis_store));
    let replay_key = common::fresh_id("replay");
    let bare_key = format!("bare:{}", common::fresh_id("replay"));
    runtime.block_on(async {
        for router in [&memory, &redis] {
            let first = send(router, request(Some(&replay_key))).await;
            assert!(!replayed(&first), "the first request was replayed");
            let again = send(router, request(Some(&replay_key))).await;
            assert!(replayed(&again), "the second request was not replayed");
            assert_eq!(again.body(), first.body());
        }
        bare.first_call(&bare_key).await;
    });

    let mut group = c.benchmark_group("http");
    group.bench_function("route", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let route = Arc::clone(&route);
            timed(iters, move |_| {
                let route = Arc::clone(&route);
                async move {
                    black_box(send(&route, request(None)).await);
                }
            })
        })
    });

    group.bench_function("route/spawned", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let route = Arc::clone(&route);
            timed(iters, move |_| {
                let route = Arc::clone(&route);
                async move {
                    let response = tokio::spawn(async move { send(&route, request(None)).await });
                    black_box(response.await.expect("the route's task"));
                }
            })
        })
    });

    group.bench_function("memory/first_call/layer", |b| {
        b.to_async(&runtime).iter_custom(memory_first_calls)
    });
    bench_replay(
        &mut group,
        &runtime,
        "memory/replay/layer",
        &memory,
        &replay_key,
    );

    group.bench_function("redis/first_call/layer", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let redis = Arc::clone(&redis);
            timed(iters, move |_| {
                let redis = Arc::clone(&redis);
                async move {
                    let key = common::fresh_id("http");
                    let response = send(&redis, request(Some(&key))).await;
                    debug_assert!(!replayed(&response));
                    black_box(response);
                }
            })
        })
    });
    bench_replay(
        &mut group,
        &runtime,
        "redis/replay/layer",
        &redis,
        &replay_key,
    );

    group.bench_function("redis/first_call/bare", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let bare = bare.clone();
            timed(iters, move |_| {
                let bare = bare.clone();
                async move {
                    bare.first_call(&format!("bare:{}", common::fresh_id("http")))
                        .await;
                }
            })
        })
    });
    group.bench_function("redis/replay/bare", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let (bare, key) = (bare.clone(), Arc::new(bare_key.clone()));
            timed(iters, move |_| {
                let (bare, key) = (bare.clone(), Arc::clone(&key));
                async move {
                    black_box(bare.replay(&key).await);
                }
            })
        })
    });
    loopback(&mut group, &runtime, &route, &memory, &replay_key);
    group.finish();
    drop(runtime);
    drop(server);
}

/// Which key a loopback request carries.
#[derive(Debug, Clone, Copy)]
enum Key {
    None,
    Fresh,
    Recorded,
}

/// Over real loopback HTTP: the same routers served by `axum::serve` on 127.0.0.1, called by
/// one keep-alive `reqwest` client.
fn loopback(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    route: &Router,
    memory: &Router,
    replay_key: &str,
) {
    let serve = |router: Router| {
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind 127.0.0.1:0");
            let address = listener.local_addr().expect("the listener's address");
            tokio::spawn(async move { axum::serve(listener, router).await });
            format!("http://{address}/orders")
        })
    };
    let route_url = Arc::new(serve(route.clone()));
    let memory_url = Arc::new(serve(memory.clone()));
    let client = reqwest::Client::new();

    /// One request: the order, with the key when given; panics on another status than 201.
    async fn post(client: &reqwest::Client, url: &str, key: Option<&str>) -> bool {
        let mut request = client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(ORDER_REQUEST);
        if let Some(key) = key {
            request = request.header("idempotency-key", format!("\"{key}\""));
        }
        let response = request.send().await.expect("the request over loopback");
        let status = response.status();
        let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
        let body = response.bytes().await.expect("the response body");
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        black_box(body);
        replayed
    }

    for (id, url, kind) in [
        ("loopback/route", &route_url, Key::None),
        ("loopback/memory/first_call/layer", &memory_url, Key::Fresh),
        ("loopback/memory/replay/layer", &memory_url, Key::Recorded),
    ] {
        group.bench_function(id, |b| {
            b.to_async(runtime).iter_custom(|iters| {
                let (client, url) = (client.clone(), Arc::clone(url));
                let replay_key = Arc::new(replay_key.to_string());
                timed(iters, move |_| {
                    let (client, url, replay_key) =
                        (client.clone(), Arc::clone(&url), Arc::clone(&replay_key));
                    async move {
                        let key = match kind {
                            Key::None => None,
                            Key::Fresh => Some(common::fresh_id("loopback")),
                            Key::Recorded => Some(replay_key.to_string()),
                        };
                        let replayed = post(&client, &url, key.as_deref()).await;
                        debug_assert_eq!(replayed, matches!(kind, Key::Recorded));
                    }
                })
            })
        });
    }
}

/// Benches `id`: the request with `key` (recorded) through `router`, replayed.
fn bench_replay(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    id: &str,
    router: &Arc<Router>,
    key: &str,
) {
    group.bench_function(id, |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let (router, key) = (Arc::clone(router), Arc::new(key.to_string()));
            timed(iters, move |_| {
                let (router, key) = (Arc::clone(&router), Arc::clone(&key));
                async move {
                    let response = send(&router, request(Some(&key))).await;
                    debug_assert!(replayed(&response));
                    black_box(response);
                }
            })
        })
    });
}

/// Notes the key and the output of each `complete` the layer sends to its store.
#[derive(Debug, Default)]
struct Completes(Mutex<Vec<(StorageKey, usize)>>);

impl Hooks for Completes {
    fn complete<'a>(
        &'a self,
        op: Completing<'a>,
    ) -> BoxFuture<'a, Result<FencedWrite, StoreError>> {
        self.0.lock().unwrap().push((*op.key, op.output.len()));
        op.send()
    }
}

impl Completes {
    /// The one `complete` sent so far: its key and its output's length.
    fn only(&self) -> (StorageKey, usize) {
        let completes = self.0.lock().unwrap();
        assert_eq!(completes.len(), 1, "one request, one record");
        completes[0]
    }
}

/// A body of exactly `size` bytes: JSON text (an array of orders, its last string padded), or
/// random bytes (splitmix64, seeded by the size).
fn body_of(size: usize, json: bool) -> Bytes {
    if !json {
        let mut x = size as u64;
        let mut bytes = Vec::with_capacity(size + 8);
        while bytes.len() < size {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        bytes.truncate(size);
        return Bytes::from(bytes);
    }
    let end = r#"],"note":""}"#;
    let mut text = String::from(r#"{"orders":["#);
    let mut n = 0;
    loop {
        let item = format!(
            r#"{}{{"order_id":"order-{n}","sku":"SKU-CHAIR-OAK-42","quantity":2,"amount_cents":25980}}"#,
            if n == 0 { "" } else { "," }
        );
        if text.len() + item.len() + end.len() > size {
            break;
        }
        text.push_str(&item);
        n += 1;
    }
    text.push_str(r#"],"note":""#);
    while text.len() + 2 < size {
        text.push('x');
    }
    text.push_str(r#""}"#);
    assert_eq!(text.len(), size, "the JSON body is {size} bytes");
    serde_json::from_str::<serde_json::Value>(&text).expect("the body is JSON");
    Bytes::from(text)
}

/// One body's sizes at rest.
struct Sizes {
    kind: &'static str,
    body: usize,
    /// The output the layer hands the store: its line of JSON and the body.
    record: usize,
    /// `MemoryStore::bytes()` with that one record.
    memory: usize,
    /// `STRLEN` of the record's Redis key.
    redis: usize,
    /// The body as a JSON array of numbers (`serde_json` of a `Vec<u8>`), for comparison.
    json_array: usize,
}

/// Sends one request through the layer on `store` to a route answering `body`; the key and
/// the output of the record's `complete`.
async fn record_once(
    store: Arc<dyn Store>,
    body: Bytes,
    content_type: &'static str,
) -> (StorageKey, usize) {
    let completes = Arc::new(Forwarding::new(store, Completes::default()));
    let router = Router::new()
        .route(
            "/orders",
            post(
                move || async move { (StatusCode::CREATED, [(CONTENT_TYPE, content_type)], body) },
            ),
        )
        .layer(IdempotencyLayer::new(NAME).with_store(Arc::clone(&completes) as Arc<dyn Store>));
    send(&router, request(Some(&common::fresh_id("size")))).await;
    completes.only()
}

fn stored_sizes(_: &mut Criterion) {
    let runtime = common::runtime();
    let server = idempotent_test_support::RedisServer::start();
    let mut rows = Vec::new();
    runtime.block_on(async {
        let redis_store = Arc::new(
            RedisStore::builder(server.url())
                .build()
                .expect("a valid Redis URL"),
        );
        let mut connection = redis::Client::open(server.url())
            .expect("a valid Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis");
        for size in [1024, 100 * 1024] {
            for (kind, json, content_type) in [
                ("JSON text", true, "application/json"),
                ("random bytes", false, "application/octet-stream"),
            ] {
                let body = body_of(size, json);
                let memory_store = Arc::new(MemoryStore::new());
                let (_, record) = record_once(
                    Arc::clone(&memory_store) as Arc<dyn Store>,
                    body.clone(),
                    content_type,
                )
                .await;
                let (key, redis_record) = record_once(
                    Arc::clone(&redis_store) as Arc<dyn Store>,
                    body.clone(),
                    content_type,
                )
                .await;
                assert_eq!(record, redis_record, "the same response, the same record");
                let redis: usize = redis::cmd("STRLEN")
                    .arg(redis_store.record_key(&key))
                    .query_async(&mut connection)
                    .await
                    .expect("STRLEN");
                rows.push(Sizes {
                    kind,
                    body: body.len(),
                    record,
                    memory: memory_store.bytes(),
                    redis,
                    json_array: serde_json::to_vec(&body.to_vec())
                        .expect("bytes serialize")
                        .len(),
                });
            }
        }
    });
    drop(runtime);
    drop(server);

    eprintln!(
        "http/stored_sizes: a 201 response with one Content-Type header, recorded by the layer"
    );
    eprintln!(
        "{:>13} | {:>7} | {:>7} | {:>13} | {:>12} | {:>17}",
        "body", "bytes", "record", "memory store", "Redis STRLEN", "as a JSON array"
    );
    for row in &rows {
        eprintln!(
            "{:>13} | {:>7} | {:>7} | {:>13} | {:>12} | {:>17}",
            row.kind, row.body, row.record, row.memory, row.redis, row.json_array
        );
    }
    if !common::measuring() {
        return;
    }
    let json = serde_json::json!({
        "rows": rows.iter().map(|row| serde_json::json!({
            "kind": row.kind,
            "body_bytes": row.body,
            "record_bytes": row.record,
            "memory_store_bytes": row.memory,
            "redis_strlen": row.redis,
            "json_array_bytes": row.json_array,
        })).collect::<Vec<_>>(),
    });
    let dir = common::out_dir().join("http");
    std::fs::create_dir_all(&dir).expect("create the http output folder");
    let path = dir.join("stored_sizes.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap())
        .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
}

criterion_group!(benches, stored_sizes, bench);
criterion_main!(benches);
