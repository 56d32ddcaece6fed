//! Petrel's HTTP admin surface.
//!
//! - [`router`]: the axum router: `/api/v1/...` (REST, JSON, bearer tokens), `/metrics`,
//!   `/healthz` and `/readyz` (with `/health/live` and `/health/ready` as the same).
//! - [`backend`]: [`AdminBackend`], what the node implements, so this crate never depends on it.
//! - [`model`]: the request and answer types; [`openapi`]: the OpenAPI 3 document made from
//!   them and from the handlers.
//! - [`error`]: [`AdminError`], the one mapping to an HTTP status and a JSON error code.
//! - [`page`]: cursors and pages. [`auth`]: tokens and roles. [`serve`]: plain or TLS.
//!
//! The Prometheus registry is owned by the node (one per node, so several nodes can share a
//! test process) and handed in through the backend.

pub mod auth;
pub mod backend;
pub mod error;
mod extract;
pub mod handlers;
pub mod model;
pub mod openapi;
pub mod page;
pub mod serve;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

pub use auth::{AuthPolicy, Role, Tokens};
pub use backend::AdminBackend;
pub use error::AdminError;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The backend as the handlers hold it.
pub(crate) type Backend = Arc<dyn AdminBackend>;

/// Builds the admin router over a backend, with `policy` deciding which routes need a token.
pub fn router(backend: Arc<dyn AdminBackend>, policy: AuthPolicy) -> Router {
    let tokens = Arc::new(policy.tokens);
    let guard = axum::middleware::from_fn_with_state(tokens, auth::require_token);
    let api = Router::new()
        .route("/sessions", get(handlers::list_sessions))
        .route(
            "/sessions/{client_id}",
            get(handlers::get_session).delete(handlers::kick_session),
        )
        .route("/subscriptions", get(handlers::list_subscriptions))
        .route("/retained", get(handlers::list_retained))
        .route(
            "/retained/message",
            get(handlers::get_retained).delete(handlers::delete_retained),
        )
        .route("/publish", post(handlers::publish))
        .route("/routes", get(handlers::list_routes))
        .route("/cluster", get(handlers::cluster))
        .route("/cluster/nodes/{node_id}", delete(handlers::remove_node))
        .route("/cluster/nodes/{node_id}/drain", post(handlers::drain_node))
        .fallback(handlers::unknown_api)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(guard.clone());
    let mut metrics = Router::new().route("/metrics", get(metrics));
    if policy.protect_metrics {
        metrics = metrics.layer(guard.clone());
    }
    let mut health = Router::new()
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        // The first names, kept: probes and scripts written against them go on working.
        .route("/health/live", get(live))
        .route("/health/ready", get(ready));
    if policy.protect_health {
        health = health.layer(guard);
    }
    Router::new()
        // The API's description is no secret: clients and checkers read it before they
        // have a token.
        .route("/api/v1/openapi.json", get(openapi::serve_document))
        .nest("/api/v1", api)
        .merge(metrics)
        .merge(health)
        .with_state(backend)
}

async fn metrics(State(backend): State<Backend>) -> Response {
    backend.before_scrape();
    let families = backend.registry().gather();
    let mut out = String::with_capacity(16384);
    match prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        Ok(()) => ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], out).into_response(),
        Err(e) => AdminError::internal(format!("encode metrics: {e}")).into_response(),
    }
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(backend): State<Backend>) -> Response {
    if backend.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
