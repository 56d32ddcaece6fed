//! The node's side of the admin API: what `petrel-admin-api` asks through `AdminBackend`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use petrel_admin_api::AdminBackend;

use crate::broker::Broker;

pub struct Admin {
    pub broker: Arc<Broker>,
    pub ready: AtomicBool,
}

impl AdminBackend for Admin {
    fn registry(&self) -> &prometheus::Registry {
        &self.broker.metrics.registry
    }

    /// Not ready once a store write has failed, from that instant (before the node's
    /// reaction to it has run).
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.broker.store.committed_now().failed
    }
}
