//! `examples/checkout_http.rs`'s `GET /metrics`: the example is started as a server, one
//! checkout is sent, retried with its key, and sent again with its key and another cart; the
//! Prometheus text then counts one execution, the replays and one key reused, and renders the
//! call's and the store operations' times as histograms with buckets. The example
//! binary is the one `cargo build --example checkout_http` builds beside this test
//! (`scripts/test` builds it first: `cargo test` builds examples only as test harnesses).
#![cfg(all(feature = "http", feature = "client", feature = "metrics"))]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

const FUNCTION: &str = "shop.checkout.v1";
const RETRIES: u64 = 3;

fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let example = profile.join("examples").join("checkout_http");
    assert!(
        example.exists(),
        "{} is missing: build it first with `cargo build --example checkout_http` (scripts/test does)",
        example.display()
    );
    example
}

/// The example serving on a free port, killed when dropped.
struct Server {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve() -> Server {
    let mut child = Command::new(example())
        .args(["--serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the example starts");
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut base = None;
    for line in lines.by_ref() {
        let line = line.expect("the example's output");
        if let Some(url) = line.strip_prefix("metrics: ") {
            base = Some(url.trim_end_matches("/metrics").to_string());
            break;
        }
    }
    // The example goes on printing (how to call it with curl): keep its stdout open and read,
    // or its next print fails on a closed pipe and stops the server.
    std::thread::spawn(move || lines.for_each(drop));
    Server {
        base: base.expect("the example prints its metrics URL"),
        child,
    }
}

/// The value of the sample `idempotent_calls_total{function="…",outcome="<outcome>"}`; 0 if
/// there is none.
fn calls(metrics: &str, outcome: &str) -> u64 {
    let series =
        format!("idempotent_calls_total{{function=\"{FUNCTION}\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

/// The `(le, count)` of every sample whose line starts with `prefix` (a histogram's
/// `…_bucket{<labels>,le="`), in the order of the text.
fn buckets(metrics: &str, prefix: &str) -> Vec<(String, u64)> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .map(|rest| {
            let (le, count) = rest.split_once("\"} ").expect("le=\"<bound>\"} <count>");
            (le.to_owned(), count.trim().parse().expect("a count"))
        })
        .collect()
}

#[tokio::test]
async fn the_metrics_count_one_execution_the_replays_and_one_key_reused() {
    let server = serve();
    let http = reqwest::Client::new();
    let checkout = format!("{}/checkout", server.base);
    let key = "\"6f1e3a52-9c1b-4c0e-8a57-3d1f0c9b2e41\"";
    let send = |cart: &'static str| {
        http.post(&checkout)
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", key)
            .body(cart)
            .send()
    };
    let two_mugs = r#"{"customer":"ada","items":[{"sku":"mug","quantity":2}]}"#;
    let first = send(two_mugs).await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    for _ in 0..RETRIES {
        let retry = send(two_mugs).await.unwrap();
        assert_eq!(retry.status(), 201);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
    }
    let other_cart = send(r#"{"customer":"ada","items":[{"sku":"mug","quantity":3}]}"#)
        .await
        .unwrap();
    assert_eq!(other_cart.status(), 422, "the key with another cart");

    let response = http
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics = response.text().await.unwrap();
    assert_eq!(calls(&metrics, "executed"), 1, "{metrics}");
    assert_eq!(calls(&metrics, "replayed"), RETRIES, "{metrics}");
    assert_eq!(calls(&metrics, "mismatch"), 1, "{metrics}");
    assert!(
        metrics.contains(&format!(
            "idempotent_claims_in_flight{{function=\"{FUNCTION}\"}} 0"
        )),
        "no claim is left held: {metrics}"
    );
    assert!(
        metrics.contains("idempotent_store_operation_duration_seconds_count{store=\"memory\",operation=\"claim\"}"),
        "the store's claims are timed: {metrics}"
    );
    // The durations are histograms with buckets, not summaries with quantiles.
    for name in [
        "idempotent_call_duration_seconds",
        "idempotent_store_operation_duration_seconds",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} histogram\n")),
            "{name} is a histogram: {metrics}"
        );
    }
    let executed = buckets(
        &metrics,
        &format!(
            "idempotent_call_duration_seconds_bucket{{function=\"{FUNCTION}\",outcome=\"executed\",le=\""
        ),
    );
    // The example's buckets: from 50µs to 10s, then +Inf.
    let bounds: Vec<&str> = executed.iter().map(|(le, _)| le.as_str()).collect();
    assert_eq!(
        (bounds.first(), bounds.iter().rev().nth(1)),
        (Some(&"0.00005"), Some(&"10")),
        "the executed call's time has its buckets: {metrics}"
    );
    assert_eq!(
        executed.last(),
        Some(&("+Inf".to_owned(), 1)),
        "the last bucket counts the one executed call: {metrics}"
    );
    assert!(
        executed.windows(2).all(|pair| pair[0].1 <= pair[1].1),
        "the buckets are cumulative: {executed:?}"
    );
    assert!(
        !buckets(
            &metrics,
            "idempotent_store_operation_duration_seconds_bucket{store=\"memory\",operation=\"claim\",le=\""
        )
        .is_empty(),
        "the store's claims have their buckets: {metrics}"
    );
    assert!(
        !metrics.contains("6f1e3a52"),
        "no key appears in the metrics: {metrics}"
    );
}
