//! Starting and stopping a node.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::auth::AuthGate;
use crate::broker::Broker;
use crate::config::Config;
use crate::listener::{accept_loop, Listeners};
use crate::metrics::Metrics;
use crate::{sys, Error};

pub struct Node;

/// A running node.
pub struct NodeHandle {
    broker: Arc<Broker>,
    admin: Arc<Admin>,
    mqtt_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Node {
    /// Starts serving on already-bound listeners.
    pub async fn start(cfg: Config, listeners: Listeners) -> Result<NodeHandle, Error> {
        let mqtt_addr = listeners.mqtt.local_addr().map_err(Error::LocalAddr)?;
        let admin_addr = match &listeners.admin {
            Some(l) => Some(l.local_addr().map_err(Error::LocalAddr)?),
            None => None,
        };
        let sys_on = cfg.mqtt.sys_interval_secs > 0;
        let auth = AuthGate::from_config(&cfg.auth)?;
        let broker = Arc::new(Broker::new(cfg, Metrics::new(), auth));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        broker.auth.watch(&tracker, &cancel);
        tracker.spawn(accept_loop(listeners.mqtt, broker.clone(), cancel.clone(), tracker.clone()));
        tracker.spawn(broker.clone().run_timers(cancel.clone()));
        if sys_on {
            tracker.spawn(sys::run(broker.clone(), cancel.clone()));
        }
        let admin = Arc::new(Admin { broker: broker.clone(), ready: Default::default() });
        if let Some(listener) = listeners.admin {
            let app = petrel_admin_api::router(admin.clone());
            let stop = cancel.clone();
            tracker.spawn(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "admin server failed");
                }
            });
        }
        admin.ready.store(true, Ordering::Release);
        Ok(NodeHandle { broker, admin, mqtt_addr, admin_addr, cancel, tracker })
    }
}

impl NodeHandle {
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Stops accepting, tells connected clients the server is going away (v5 0x8B) and
    /// waits up to `grace` for every task to finish.
    pub async fn shutdown(self, grace: Duration) {
        self.admin.ready.store(false, Ordering::Release);
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!("shutdown grace period ran out with tasks still running");
        }
    }
}
