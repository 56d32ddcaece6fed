//! The OpenAPI 3 document, generated from the handlers' annotations and the model's types
//! (never written by hand), served at `/api/v1/openapi.json`.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::handlers;

#[derive(OpenApi)]
#[openapi(
    info(title = "Petrel admin API", description = "Sessions, subscriptions, retained messages, routes and the cluster of a Petrel MQTT broker. Every route needs a bearer token (read-only tokens may only GET)."),
    paths(
        handlers::list_sessions,
        handlers::get_session,
        handlers::kick_session,
        handlers::list_subscriptions,
        handlers::list_retained,
        handlers::get_retained,
        handlers::delete_retained,
        handlers::publish,
        handlers::list_routes,
        handlers::cluster,
        handlers::remove_node,
        handlers::drain_node,
    ),
    modifiers(&Bearer),
    tags(
        (name = "sessions", description = "MQTT sessions, cluster-wide"),
        (name = "subscriptions", description = "Subscriptions, cluster-wide"),
        (name = "retained", description = "Retained messages"),
        (name = "messages", description = "Publishing"),
        (name = "cluster", description = "Members, Raft and routes"),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON text.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
        doc.to_pretty_json()
            .expect("the OpenAPI document serializes")
    })
}

pub(crate) async fn serve_document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}
