//! The REST handlers: parse, ask the backend, cut pages. Each carries its OpenAPI
//! description.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::error::{AdminError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::model::{
    ClusterInfo, KickOutcome, KickParams, NodeOutcome, PublishOutcome, PublishRequest,
    RetainedFilter, RetainedMessage, RetainedPage, RoutePage, SessionFilter, SessionInfo,
    SessionPage, SubscriptionFilter, SubscriptionPage, TopicParam,
};
use crate::page::{paginate, PageParams};
use crate::Backend;

type Answer<T> = Result<axum::Json<T>, AdminError>;

/// Lists sessions of the whole cluster, ordered by client id.
#[utoipa::path(get, path = "/api/v1/sessions", tag = "sessions",
    params(PageParams, SessionFilter),
    responses(
        (status = 200, description = "A page of sessions", body = SessionPage),
        (status = 400, description = "Bad parameter or cursor", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 503, description = "A node could not be asked", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_sessions(
    State(b): State<Backend>,
    Query(page): Query<PageParams>,
    Query(filter): Query<SessionFilter>,
) -> Answer<SessionPage> {
    let req = page.request()?;
    let listed = b.sessions(filter, req.clone()).await?;
    let (items, next_cursor) = paginate(listed.items, req.limit, |s| s.client_id.clone());
    Ok(axum::Json(SessionPage {
        unreachable_nodes: listed.unreachable_nodes,
        items,
        next_cursor,
    }))
}

/// One session, with its subscriptions, wherever in the cluster it is.
#[utoipa::path(get, path = "/api/v1/sessions/{client_id}", tag = "sessions",
    params(("client_id" = String, Path, description = "The MQTT client id")),
    responses(
        (status = 200, description = "The session", body = SessionInfo),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such session (`unknown_session`)", body = ErrorBody),
        (status = 503, description = "Its node could not be asked", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_session(
    State(b): State<Backend>,
    Path(client_id): Path<String>,
) -> Answer<SessionInfo> {
    Ok(axum::Json(b.session(client_id).await?))
}

/// Closes the session's connection (MQTT 5: DISCONNECT 0x98 Administrative action). A
/// persistent session stays unless `discard=true`.
#[utoipa::path(delete, path = "/api/v1/sessions/{client_id}", tag = "sessions",
    params(("client_id" = String, Path, description = "The MQTT client id"), KickParams),
    responses(
        (status = 200, description = "What was done", body = KickOutcome),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Read-only token", body = ErrorBody),
        (status = 404, description = "No such session (`unknown_session`)", body = ErrorBody),
        (status = 503, description = "Its node could not be asked", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn kick_session(
    State(b): State<Backend>,
    Path(client_id): Path<String>,
    Query(p): Query<KickParams>,
) -> Answer<KickOutcome> {
    Ok(axum::Json(
        b.kick(client_id, p.discard.unwrap_or(false)).await?,
    ))
}

/// Lists subscriptions of the whole cluster, ordered by client id, then filter.
#[utoipa::path(get, path = "/api/v1/subscriptions", tag = "subscriptions",
    params(PageParams, SubscriptionFilter),
    responses(
        (status = 200, description = "A page of subscriptions", body = SubscriptionPage),
        (status = 400, description = "Bad parameter or cursor", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 503, description = "A node could not be asked", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_subscriptions(
    State(b): State<Backend>,
    Query(page): Query<PageParams>,
    Query(filter): Query<SubscriptionFilter>,
) -> Answer<SubscriptionPage> {
    let req = page.request()?;
    let listed = b.subscriptions(filter, req.clone()).await?;
    let (items, next_cursor) = paginate(listed.items, req.limit, subscription_key);
    Ok(axum::Json(SubscriptionPage {
        unreachable_nodes: listed.unreachable_nodes,
        items,
        next_cursor,
    }))
}

/// Lists retained messages that match a topic filter, ordered by topic.
#[utoipa::path(get, path = "/api/v1/retained", tag = "retained",
    params(PageParams, RetainedFilter),
    responses(
        (status = 200, description = "A page of retained messages", body = RetainedPage),
        (status = 400, description = "Bad filter, parameter or cursor", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_retained(
    State(b): State<Backend>,
    Query(page): Query<PageParams>,
    Query(filter): Query<RetainedFilter>,
) -> Answer<RetainedPage> {
    let req = page.request()?;
    let filter = filter.filter.unwrap_or_else(|| "#".to_owned());
    let items = b.retained(filter, req.clone()).await?;
    let (items, next_cursor) = paginate(items, req.limit, |m| m.topic.clone());
    Ok(axum::Json(RetainedPage { items, next_cursor }))
}

/// One retained message.
#[utoipa::path(get, path = "/api/v1/retained/message", tag = "retained",
    params(TopicParam),
    responses(
        (status = 200, description = "The retained message", body = RetainedMessage),
        (status = 400, description = "Bad topic", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "None on that topic (`unknown_retained`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_retained(
    State(b): State<Backend>,
    Query(t): Query<TopicParam>,
) -> Answer<RetainedMessage> {
    Ok(axum::Json(b.retained_one(t.topic).await?))
}

/// Deletes a retained message, on every node.
#[utoipa::path(delete, path = "/api/v1/retained/message", tag = "retained",
    params(TopicParam),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Bad topic", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Read-only token", body = ErrorBody),
        (status = 404, description = "None on that topic (`unknown_retained`)", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete_retained(
    State(b): State<Backend>,
    Query(t): Query<TopicParam>,
) -> Result<StatusCode, AdminError> {
    b.delete_retained(t.topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Publishes a message, as a client connected to this node would.
#[utoipa::path(post, path = "/api/v1/publish", tag = "messages",
    request_body = PublishRequest,
    responses(
        (status = 200, description = "Published", body = PublishOutcome),
        (status = 400, description = "Bad topic, QoS or payload, or malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Read-only token", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 503, description = "A retained message could not be replicated", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn publish(
    State(b): State<Backend>,
    Json(req): Json<PublishRequest>,
) -> Answer<PublishOutcome> {
    if req.qos > 2 {
        return Err(AdminError::bad_request(
            "bad_request",
            "qos must be 0, 1 or 2",
        ));
    }
    let payload = match (&req.payload, &req.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(AdminError::bad_request(
                "bad_request",
                "give payload or payload_base64, not both",
            ))
        }
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| AdminError::bad_request("bad_request", format!("payload_base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    Ok(axum::Json(b.publish(req, payload).await?))
}

/// The replicated route table: which node has subscribers to which filter.
#[utoipa::path(get, path = "/api/v1/routes", tag = "cluster",
    params(PageParams),
    responses(
        (status = 200, description = "A page of routes", body = RoutePage),
        (status = 400, description = "Bad parameter or cursor", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_routes(
    State(b): State<Backend>,
    Query(page): Query<PageParams>,
) -> Answer<RoutePage> {
    let req = page.request()?;
    let items = b.routes(req.clone()).await?;
    let (items, next_cursor) = paginate(items, req.limit, |r| {
        route_key(&r.filter, r.share_group.as_deref(), r.node_id)
    });
    Ok(axum::Json(RoutePage { items, next_cursor }))
}

/// The key subscriptions are ordered by (see [`crate::AdminBackend`]).
pub fn subscription_key(s: &crate::model::SubscriptionInfo) -> String {
    format!("{}\0{}", s.client_id, s.filter)
}

/// The key routes are ordered by (see [`crate::AdminBackend`]).
pub fn route_key(filter: &str, group: Option<&str>, node_id: u64) -> String {
    format!("{filter}\0{}\0{node_id:020}", group.unwrap_or(""))
}

/// Members, roles, Raft term and log positions.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The cluster", body = ClusterInfo),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn cluster(State(b): State<Backend>) -> Answer<ClusterInfo> {
    Ok(axum::Json(b.cluster().await?))
}

/// Removes a (dead) node for good: out of Raft, its routes and clean sessions with it.
#[utoipa::path(delete, path = "/api/v1/cluster/nodes/{node_id}", tag = "cluster",
    params(("node_id" = u64, Path, description = "The node's id")),
    responses(
        (status = 200, description = "Removed", body = NodeOutcome),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Read-only token", body = ErrorBody),
        (status = 404, description = "Not a member (`unknown_node`)", body = ErrorBody),
        (status = 409, description = "It cannot be removed (the last voter, or itself)", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn remove_node(
    State(b): State<Backend>,
    Path(node_id): Path<u64>,
) -> Answer<NodeOutcome> {
    Ok(axum::Json(b.remove_node(node_id).await?))
}

/// Drains a node: it turns not ready, hands Raft leadership away and tells its clients to
/// go to another node; it stays a member (used by rolling upgrades).
#[utoipa::path(post, path = "/api/v1/cluster/nodes/{node_id}/drain", tag = "cluster",
    params(("node_id" = u64, Path, description = "The node's id")),
    responses(
        (status = 200, description = "Draining", body = NodeOutcome),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Read-only token", body = ErrorBody),
        (status = 404, description = "Not a member (`unknown_node`)", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn drain_node(State(b): State<Backend>, Path(node_id): Path<u64>) -> Answer<NodeOutcome> {
    Ok(axum::Json(b.drain_node(node_id).await?))
}

pub async fn unknown_api() -> Response {
    AdminError::not_found("not_found", "no such API route").into_response()
}

pub async fn method_not_allowed() -> Response {
    AdminError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
    .into_response()
}
