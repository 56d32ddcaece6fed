//! What the REST API takes and returns. The OpenAPI document is generated from these types.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// One MQTT session, wherever in the cluster it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SessionInfo {
    pub client_id: String,
    /// The node that holds the session.
    pub node_id: u64,
    /// A connection is attached now.
    pub connected: bool,
    /// The session outlives its connection (a session expiry interval above 0).
    pub persistent: bool,
    /// Session expiry interval in seconds; absent: never expires.
    pub expiry_secs: Option<u32>,
    /// Username of the current (or last) connection.
    pub username: Option<String>,
    /// Address of the current (or last) connection's client.
    pub peer: Option<String>,
    /// MQTT protocol level of the current (or last) connection: 3 (3.1), 4 (3.1.1), 5.
    pub protocol_version: Option<u8>,
    /// When the current (or last) connection was accepted (ms since the Unix epoch).
    pub connected_at_ms: Option<u64>,
    /// Keep alive the connection runs with (seconds).
    pub keep_alive_secs: Option<u16>,
    /// The CONNECT asked for a clean start (v5) or a clean session (3.1.x).
    pub clean_start: Option<bool>,
    /// The connection came over TLS (mqtts or wss).
    pub tls: Option<bool>,
    /// The listener it came through: `mqtt`, `mqtts`, `ws`, `wss`.
    pub listener: Option<String>,
    /// Messages queued for the client, not yet sent.
    pub queued_messages: u64,
    /// Bytes of the queued messages.
    pub queued_bytes: u64,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight_messages: u64,
    /// Bytes of the messages in flight.
    pub inflight_bytes: u64,
    /// Number of subscriptions.
    pub subscription_count: u64,
    /// The subscriptions (only in the answer for one session).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subscriptions: Option<Vec<SubscriptionInfo>>,
}

/// Filters of the session list; all optional, combined with AND.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionFilter {
    /// Only sessions held by this node.
    pub node: Option<u64>,
    /// Only connected (`true`) or only offline (`false`) sessions.
    pub connected: Option<bool>,
    /// Only client ids that start with this.
    pub client_id_prefix: Option<String>,
    /// Only sessions whose (last) connection used this username.
    pub username: Option<String>,
}

impl SessionFilter {
    /// Whether a session passes the filter.
    pub fn admits(&self, s: &SessionInfo) -> bool {
        self.node.is_none_or(|n| n == s.node_id)
            && self.connected.is_none_or(|c| c == s.connected)
            && self
                .client_id_prefix
                .as_deref()
                .is_none_or(|p| s.client_id.starts_with(p))
            && self
                .username
                .as_deref()
                .is_none_or(|u| s.username.as_deref() == Some(u))
    }
}

/// A page of sessions, ordered by client id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionPage {
    /// Nodes that did not answer in time: their items are missing from this page.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable_nodes: Vec<u64>,
    pub items: Vec<SessionInfo>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// `?discard=` of a kick.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KickParams {
    /// Also end the session (its subscriptions and queued messages); by default a
    /// persistent session stays for the client to resume.
    pub discard: Option<bool>,
}

/// What a kick did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct KickOutcome {
    pub client_id: String,
    pub node_id: u64,
    /// A connection was closed (v5: DISCONNECT 0x98 Administrative action).
    pub disconnected: bool,
    /// The session was ended.
    pub discarded: bool,
}

/// One subscription.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SubscriptionInfo {
    pub client_id: String,
    /// The filter as subscribed, with any `$share/<group>/` prefix.
    pub filter: String,
    /// Maximum QoS granted.
    pub qos: u8,
    pub node_id: u64,
    /// Share group, if the filter is `$share/<group>/...`.
    pub share_group: Option<String>,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

/// Filters of the subscription list.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscriptionFilter {
    /// Only this client's subscriptions.
    pub client_id: Option<String>,
    /// Only subscriptions whose filter is exactly this (with any `$share/` prefix).
    pub filter: Option<String>,
    /// Only subscriptions held by this node.
    pub node: Option<u64>,
}

/// A page of subscriptions, ordered by client id, then filter.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionPage {
    /// Nodes that did not answer in time: their items are missing from this page.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable_nodes: Vec<u64>,
    pub items: Vec<SubscriptionInfo>,
    pub next_cursor: Option<String>,
}

/// A retained message. The payload is given as UTF-8 text when it is text, and always as
/// base64.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RetainedMessage {
    pub topic: String,
    pub qos: u8,
    pub payload_bytes: u64,
    /// The payload, if it is valid UTF-8.
    pub payload: Option<String>,
    /// The payload in base64 (standard alphabet, padded).
    pub payload_base64: String,
}

/// `?filter=` of the retained list.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RetainedFilter {
    /// An MQTT topic filter (wildcards allowed); default `#`.
    pub filter: Option<String>,
}

/// `?topic=` naming one retained message.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TopicParam {
    /// The topic name (no wildcards).
    pub topic: String,
}

/// A page of retained messages, ordered by topic.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RetainedPage {
    pub items: Vec<RetainedMessage>,
    pub next_cursor: Option<String>,
}

/// A message to publish.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// Topic name (no wildcards).
    pub topic: String,
    /// The payload as text.
    #[serde(default)]
    pub payload: Option<String>,
    /// The payload in base64, instead of `payload`.
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// 0, 1 or 2 (default 0).
    #[serde(default)]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
}

/// What a publish did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PublishOutcome {
    /// Sessions on this node that got a copy, plus the other nodes that got one.
    pub receivers: u64,
}

/// A backend's answer to a cluster-wide list: the items, and the nodes that did not answer
/// (their items are missing).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Listed<T> {
    pub items: Vec<T>,
    pub unreachable_nodes: Vec<u64>,
}

/// An entry of the replicated route table: `node_id` has subscribers to `filter`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RouteInfo {
    pub filter: String,
    pub share_group: Option<String>,
    pub node_id: u64,
    /// The node is not a member any more (such a route is a bug to report).
    pub unknown_node: bool,
}

/// A page of routes, ordered by filter, then group, then node.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoutePage {
    pub items: Vec<RouteInfo>,
    pub next_cursor: Option<String>,
}

/// A member of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct MemberInfo {
    pub node_id: u64,
    /// `leader`, `follower`, `learner`, `candidate`, or `removed`.
    pub role: String,
    pub grpc_addr: String,
    pub mqtt_addr: String,
    pub version: String,
    /// Answers (this node, or a peer whose forwarding stream is up or which the leader
    /// replicates to).
    pub reachable: bool,
    pub draining: bool,
    /// Last log index known to be on that node (from the leader; 0 when unknown).
    pub matched_index: u64,
    /// How far it is behind the leader's last log index (when known).
    pub lag: Option<u64>,
    /// Entries of the route table for that node.
    pub routes: u64,
}

/// The cluster as the answering node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ClusterInfo {
    /// The node that answered.
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    /// The answering node's role.
    pub role: String,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    /// Route-table entries that point at non-members.
    pub routes_unknown_node: u64,
    pub members: Vec<MemberInfo>,
}

/// What a change to the membership did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NodeOutcome {
    pub node_id: u64,
    /// `removed` or `draining`.
    pub state: String,
}
