//! [`AdminBackend`]: what the admin API asks of a node. The node implements it (this crate
//! never depends on the node); answers are cluster-wide wherever the item list says so.

use std::future::Future;
use std::pin::Pin;

use crate::error::AdminError;
use crate::model::{
    ClusterInfo, KickOutcome, Listed, NodeOutcome, PublishOutcome, PublishRequest, RetainedMessage,
    RouteInfo, SessionFilter, SessionInfo, SubscriptionFilter, SubscriptionInfo,
};
use crate::page::PageRequest;

/// A backend call's future.
pub type Reply<'a, T> = Pin<Box<dyn Future<Output = Result<T, AdminError>> + Send + 'a>>;

/// What the admin API needs from a node.
///
/// List calls take a [`PageRequest`] and return the items whose key is above
/// `page.after`, in ascending key order, at most `page.limit + 1` of them (the router
/// cuts the page and makes the next cursor). Keys: sessions by client id, subscriptions by
/// `client_id + '\0' + filter`, retained messages by topic, routes by
/// `filter + '\0' + group + '\0' + node id (20 digits)`.
pub trait AdminBackend: Send + Sync + 'static {
    /// The node's metric registry.
    fn registry(&self) -> &prometheus::Registry;
    /// Whether the node is ready to take client traffic.
    fn is_ready(&self) -> bool;
    /// Refreshes the gauges that are computed when read (queue depths, Raft figures).
    fn before_scrape(&self) {}

    /// Sessions of the whole cluster.
    fn sessions(&self, filter: SessionFilter, page: PageRequest) -> Reply<'_, Listed<SessionInfo>>;
    /// One session with its subscriptions, wherever it is; `unknown_session` if none.
    fn session(&self, client_id: String) -> Reply<'_, SessionInfo>;
    /// Closes the session's connection (v5: DISCONNECT 0x98), on whichever node it is, and
    /// with `discard` ends the session.
    fn kick(&self, client_id: String, discard: bool) -> Reply<'_, KickOutcome>;
    /// Subscriptions of the whole cluster.
    fn subscriptions(
        &self,
        filter: SubscriptionFilter,
        page: PageRequest,
    ) -> Reply<'_, Listed<SubscriptionInfo>>;
    /// Retained messages matching an MQTT filter.
    fn retained(&self, filter: String, page: PageRequest) -> Reply<'_, Vec<RetainedMessage>>;
    /// One retained message; `unknown_retained` if none.
    fn retained_one(&self, topic: String) -> Reply<'_, RetainedMessage>;
    /// Deletes a retained message (cluster-wide); `unknown_retained` if none.
    fn delete_retained(&self, topic: String) -> Reply<'_, ()>;
    /// Publishes a message as if a client on this node had.
    fn publish(&self, req: PublishRequest, payload: Vec<u8>) -> Reply<'_, PublishOutcome>;
    /// The replicated route table.
    fn routes(&self, page: PageRequest) -> Reply<'_, Vec<RouteInfo>>;
    /// Members, roles and log positions.
    fn cluster(&self) -> Reply<'_, ClusterInfo>;
    /// Removes a node for good.
    fn remove_node(&self, node_id: u64) -> Reply<'_, NodeOutcome>;
    /// Drains a node: it turns not ready, hands Raft leadership away and tells its clients
    /// to go; it stays a member.
    fn drain_node(&self, node_id: u64) -> Reply<'_, NodeOutcome>;
}
