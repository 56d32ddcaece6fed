//! Petrel's HTTP admin surface.
//!
//! - [`router`]: the axum router (`/metrics`; `/healthz` and `/readyz`, with
//!   `/health/live` and `/health/ready` as the same).
//! - [`AdminBackend`]: what the node implements so this crate never depends on it.
//!
//! The Prometheus registry is owned by the node (one per node, so several nodes can share a
//! test process) and handed in through the backend.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the admin API needs from a node.
pub trait AdminBackend: Send + Sync + 'static {
    /// The node's metric registry.
    fn registry(&self) -> &prometheus::Registry;
    /// Whether the node is ready to take client traffic.
    fn is_ready(&self) -> bool;
}

/// Builds the admin router over a backend.
pub fn router<B>(backend: Arc<B>) -> Router
where
    B: AdminBackend,
{
    Router::new()
        .route("/metrics", get(metrics::<B>))
        .route("/healthz", get(live))
        .route("/readyz", get(ready::<B>))
        // The first names, kept: probes and scripts written against them go on working.
        .route("/health/live", get(live))
        .route("/health/ready", get(ready::<B>))
        .with_state(backend)
}

async fn metrics<B>(State(backend): State<Arc<B>>) -> Response
where
    B: AdminBackend,
{
    let families = backend.registry().gather();
    let mut out = String::with_capacity(8192);
    match prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        Ok(()) => ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], out).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encode metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready<B>(State(backend): State<Arc<B>>) -> Response
where
    B: AdminBackend,
{
    if backend.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
