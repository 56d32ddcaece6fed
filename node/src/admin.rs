//! The node's side of the admin API: what `petrel-admin-api` asks through `AdminBackend`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use petrel_admin_api::AdminBackend;

use crate::broker::Broker;
use crate::cluster::Cluster;

pub struct Admin {
    pub broker: Arc<Broker>,
    pub cluster: Arc<Cluster>,
    pub ready: AtomicBool,
}

impl AdminBackend for Admin {
    fn registry(&self) -> &prometheus::Registry {
        &self.broker.metrics.registry
    }

    /// Ready while the node is in a cluster with a leader and has applied what that leader
    /// committed; not ready once a store write has failed, from that instant (before the
    /// node's reaction to it has run).
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.broker.store.committed_now().failed
            && self.cluster.is_caught_up()
    }
}
