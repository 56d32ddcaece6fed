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

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
