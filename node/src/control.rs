//! The control plane as the MQTT side sees it: the service below `connection/` that makes
//! this node the owner of a client id (with an epoch that only grows), hears when the
//! owner's connection or session ends, and learns which filters this node has subscribers
//! for (the route table).
//!
//! In the node it is the cluster (`cluster::Cluster`): a claim is a Raft command, so the
//! epoch is cluster-wide and a claim on another node kicks the connection here (DISCONNECT
//! 0x8E). Without a quorum a claim fails within `cluster.propose_timeout_ms`: CONNACK 0x88.
//! Tests that run connections without a cluster (the fuzzer, unit tests) use
//! [`LocalControl`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::session::Epoch;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a CONNECT asks for.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    pub client_id: Arc<str>,
    pub clean_start: bool,
    /// Session expiry interval in seconds; 0: the session ends with its connection.
    pub expiry_secs: u32,
}

/// A successful claim.
#[derive(Clone, Copy, Debug)]
pub struct Grant {
    pub epoch: Epoch,
    /// Another node owned the client id before (it closes its connection itself).
    pub previous_node: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The cluster could not be reached in time (no leader, no quorum on this side).
    #[error("no quorum: {0}")]
    NoQuorum(String),
}

pub trait ControlPlane: Send + Sync + 'static {
    /// Makes this node the owner of the client id, with a new epoch.
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Grant, ClaimError>>;

    /// The connection that claimed `client_id` at `epoch` ended; a session with an expiry
    /// stays (owned here) until it expires. Does not wait.
    fn disconnected(&self, client_id: &Arc<str>, epoch: Epoch);

    /// The session claimed at `epoch` ended (expired). Does not wait.
    fn ended(&self, client_id: &Arc<str>, epoch: Epoch);

    /// This node got its first subscriber to `filter` (in share group `group`): the other
    /// nodes forward matching publishes here from now on. Called with the subscription
    /// trie locked, so route changes are queued in the order they happened; does not wait.
    fn route_added(&self, group: Option<&str>, filter: &str);

    /// This node lost its last subscriber to `filter` (in `group`); as `route_added`.
    fn route_removed(&self, group: Option<&str>, filter: &str);
}

/// Claims inside one process: epochs from a counter, nothing else to tell.
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Default)]
pub struct LocalControl {
    next: std::sync::atomic::AtomicU64,
}

#[cfg(any(test, feature = "fuzzing"))]
impl ControlPlane for LocalControl {
    fn claim(&self, _req: ClaimRequest) -> BoxFuture<'_, Result<Grant, ClaimError>> {
        let epoch = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        Box::pin(std::future::ready(Ok(Grant {
            epoch: Epoch(epoch),
            previous_node: None,
        })))
    }

    fn disconnected(&self, _client_id: &Arc<str>, _epoch: Epoch) {}

    fn ended(&self, _client_id: &Arc<str>, _epoch: Epoch) {}

    fn route_added(&self, _group: Option<&str>, _filter: &str) {}

    fn route_removed(&self, _group: Option<&str>, _filter: &str) {}
}
