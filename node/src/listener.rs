//! Listening sockets and the accept loop.
//!
//! Sockets are bound before the node starts (`Listeners::bind`), so tests and the binary
//! can bind port 0 and learn the real address. The accept loop only accepts and spawns:
//! CONNECT handling runs in the connection's own task under the connect timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::Broker;
use crate::config::Config;
use crate::connection;
use crate::Error;

/// The node's bound sockets.
pub struct Listeners {
    pub mqtt: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(cfg: &Config) -> Result<Listeners, Error> {
        let mqtt = bind("mqtt", cfg.mqtt.addr).await?;
        let admin = if cfg.admin.enabled { Some(bind("admin", cfg.admin.addr).await?) } else { None };
        Ok(Listeners { mqtt, admin })
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { what, addr, source })
}

/// Accepts MQTT connections until cancelled, at most `max_connections` at once.
pub async fn accept_loop(listener: TcpListener, broker: Arc<Broker>, cancel: CancellationToken, tracker: TaskTracker) {
    let limit = Arc::new(Semaphore::new(broker.cfg.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection limit reached, closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::debug_span!("conn", listener = "mqtt", %peer, client_id = tracing::field::Empty);
        let broker = broker.clone();
        let cancel = cancel.clone();
        tracker.spawn(
            async move {
                connection::serve(stream, peer, broker, cancel).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}
