//! The server: `POST /checkout` behind the idempotency layer, behind a network that loses
//! responses.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{Full, Limited};
use idempotent_core::Store;
use idempotent_core::http::IdempotencyLayer;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::time::sleep;

use crate::faults::Fault;
use crate::shop::{Cart, Receipt, Shop, price};

/// How long a checkout with the slow fault waits after charging: longer than the client waits.
const SLOW_CHECKOUT: Duration = Duration::from_millis(500);

const DOCS_URL: &str = "https://shop.example/docs/idempotency";

/// `POST /checkout` behind the idempotency layer, behind a network that loses responses; and
/// `GET /metrics`, the Prometheus text of `metrics` (the library's calls by outcome, their
/// times, the store's operations: `idempotent_core::metrics`).
pub(crate) fn app(shop: Arc<Shop>, store: Arc<dyn Store>, metrics: PrometheusHandle) -> Router {
    // A real service also scopes keys by the authenticated principal (`with_scope`); this
    // example has no authentication, so all customers share one key space.
    let idempotency = IdempotencyLayer::new("shop.checkout.v1")
        .with_store(store)
        // The lease is what a 409's Retry-After says to wait; renewed while a checkout runs.
        .with_lease(Duration::from_secs(2))
        .with_docs_url(DOCS_URL)
        .expect("the documentation URL is a valid header value");
    Router::new()
        .route("/checkout", post(checkout))
        .layer(idempotency)
        // Outside the layer: what it does to a response happens after the layer recorded it.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shop),
            lossy_network,
        ))
        .with_state(shop)
        // Beside the checkout, not behind its layer or its lossy network.
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
}

async fn checkout(
    State(shop): State<Arc<Shop>>,
    headers: HeaderMap,
    cart: Result<Json<Cart>, JsonRejection>,
) -> Response {
    let _running = shop.running();
    shop.executions.fetch_add(1, Ordering::SeqCst);
    let cart = match cart {
        Ok(Json(cart)) => cart,
        Err(rejection) => {
            let detail = format!(
                "{}; send e.g. {{\"customer\":\"ada\",\"items\":[{{\"sku\":\"mug\",\"quantity\":2}}]}} \
                 with Content-Type: application/json",
                rejection.body_text()
            );
            return problem(
                StatusCode::BAD_REQUEST,
                "The cart could not be read",
                &detail,
            );
        }
    };
    let amount_cents = match price(&cart) {
        Ok(cents) => cents,
        Err(why) => return problem(StatusCode::BAD_REQUEST, "The cart is not valid", &why),
    };
    let fault = Fault::of(&headers);
    shop.reserve(&cart.customer).await;
    if fault == Fault::GatewayDown {
        shop.put_back(&cart.customer);
        shop.gateway_refusals.fetch_add(1, Ordering::SeqCst);
        let detail = "the card was not charged and the stock was put back: retry with the same \
                      Idempotency-Key";
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Payment gateway unavailable",
            detail,
        );
    }
    let charge_id = shop.charge(&cart.customer, amount_cents).await;
    let slow = match fault {
        Fault::Slow => SLOW_CHECKOUT.max(shop.slow),
        _ => shop.slow,
    };
    sleep(slow).await;
    let order_id = shop.create_order(&cart.customer, &charge_id).await;
    let location = format!("/orders/{order_id}");
    let receipt = Receipt {
        order_id,
        customer: cart.customer,
        amount_cents,
        charge_id,
    };
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(receipt),
    )
        .into_response()
}

/// An `application/problem+json` answer (RFC 9457), like the layer's own.
fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    #[derive(Serialize)]
    struct Problem<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        title: &'a str,
        status: u16,
        detail: &'a str,
    }
    let problem = Problem {
        kind: "about:blank",
        title,
        status: status.as_u16(),
        detail,
    };
    let content_type = [(header::CONTENT_TYPE, "application/problem+json")];
    let body = serde_json::to_string(&problem).unwrap_or_default();
    (status, content_type, body).into_response()
}

/// The network between the server and its clients: for a request whose `X-Fault` asks for it,
/// the response is lost after the handler (and the layer) ran.
async fn lossy_network(State(shop): State<Arc<Shop>>, request: Request, next: Next) -> Response {
    shop.requests.fetch_add(1, Ordering::SeqCst);
    let fault = Fault::of(request.headers());
    let response = next.run(request).await;
    match fault {
        Fault::BadGateway => {
            shop.lost_responses.fetch_add(1, Ordering::SeqCst);
            (StatusCode::BAD_GATEWAY, "upstream connection reset\n").into_response()
        }
        Fault::Dropped => {
            shop.lost_responses.fetch_add(1, Ordering::SeqCst);
            // The head goes out saying one byte follows; the body then fails, and the server
            // closes the connection before the client has the receipt.
            let (mut parts, _receipt) = response.into_parts();
            parts.headers.remove(header::CONTENT_LENGTH);
            let cut = Limited::new(Full::new(Bytes::from_static(b"{\"order_id\"")), 1);
            Response::from_parts(parts, Body::new(cut))
        }
        Fault::None | Fault::Slow | Fault::GatewayDown => response,
    }
}
