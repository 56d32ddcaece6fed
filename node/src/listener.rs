//! Listening sockets and the accept loops.
//!
//! Sockets are bound before the node starts (`Listeners::bind`), so tests and the binary
//! can bind port 0 and learn the real addresses. An accept loop only accepts and spawns: the
//! TLS handshake, the WebSocket upgrade and CONNECT run in the connection's own task, each
//! under the connect timeout.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::Broker;
use crate::config::Config;
use crate::connection::{self, ConnInfo};
use crate::limit::{Admission, Admit, Permits, Refusal, REFUSAL_TIMEOUT};
use crate::transport::{accept_ws_with_limit, peer_common_name, TlsAcceptorHandle};
use crate::Error;

/// The kinds of client listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mqtt,
    Mqtts,
    Ws,
    Wss,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mqtt => "mqtt",
            Kind::Mqtts => "mqtts",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The node's bound sockets.
pub struct Listeners {
    pub mqtt: TcpListener,
    pub mqtts: Option<TcpListener>,
    pub ws: Option<TcpListener>,
    pub wss: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(cfg: &Config) -> Result<Listeners, Error> {
        let m = &cfg.mqtt;
        Ok(Listeners {
            mqtt: bind("mqtt", m.addr).await?,
            mqtts: bind_opt("mqtts", &m.mqtts_addr).await?,
            ws: bind_opt("ws", &m.ws_addr).await?,
            wss: bind_opt("wss", &m.wss_addr).await?,
            admin: if cfg.admin.enabled {
                Some(bind("admin", cfg.admin.addr).await?)
            } else {
                None
            },
        })
    }

    /// The client listeners that are enabled, with their kinds.
    pub fn clients(self) -> (Vec<(Kind, TcpListener)>, Option<TcpListener>) {
        let mut out = vec![(Kind::Mqtt, self.mqtt)];
        out.extend(self.mqtts.map(|l| (Kind::Mqtts, l)));
        out.extend(self.ws.map(|l| (Kind::Ws, l)));
        out.extend(self.wss.map(|l| (Kind::Wss, l)));
        (out, self.admin)
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

async fn bind_opt(what: &'static str, addr: &str) -> Result<Option<TcpListener>, Error> {
    if addr.is_empty() {
        return Ok(None);
    }
    let parsed: SocketAddr = addr.parse().map_err(|_| Error::BadAddr {
        what,
        addr: addr.to_owned(),
    })?;
    bind(what, parsed).await.map(Some)
}

/// What an accept loop needs besides its socket.
#[derive(Clone)]
pub struct AcceptCtx {
    pub broker: Arc<Broker>,
    pub tls: Option<TlsAcceptorHandle>,
    pub admission: Arc<Admission>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

/// Accepts connections on one listener until cancelled.
pub async fn accept_loop(kind: Kind, listener: TcpListener, ctx: AcceptCtx) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %kind, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (permits, refused) = match ctx.admission.admit(kind, peer.ip()) {
            Admit::Accepted(permits) => (permits, None),
            Admit::Refused(why, slot) => {
                count_refusal(&ctx.broker, why, peer, kind);
                (Permits::one(slot), Some(why))
            }
            Admit::Dropped(why) => {
                count_refusal(&ctx.broker, why, peer, kind);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::debug_span!("conn", listener = %kind, %peer, client_id = tracing::field::Empty);
        if kind == Kind::Mqtt {
            // Nothing to negotiate below MQTT: straight to the connection's own task.
            let info = ConnInfo {
                listener: kind,
                cert_cn: None,
                refused,
            };
            let _entered = span.enter();
            serve(stream, peer, info, permits, &ctx);
            continue;
        }
        let ctx2 = ctx.clone();
        ctx.tracker.spawn(
            async move {
                open(kind, stream, peer, refused, permits, &ctx2).await;
            }
            .instrument(span),
        );
    }
}

fn count_refusal(broker: &Broker, why: Refusal, peer: SocketAddr, kind: Kind) {
    broker.metrics.limit_hit(why.label());
    tracing::debug!(%peer, listener = %kind, limit = why.label(), "connection refused by a limit");
}

/// Runs the transport handshakes, then serves MQTT on the resulting stream (or, for a
/// refused connection, answers its CONNECT with the refusal).
async fn open(
    kind: Kind,
    stream: TcpStream,
    peer: SocketAddr,
    refused: Option<Refusal>,
    permits: Permits,
    ctx: &AcceptCtx,
) {
    let broker = &ctx.broker;
    let mut limit = Duration::from_millis(broker.cfg.mqtt.connect_timeout_ms);
    if refused.is_some() {
        limit = limit.min(REFUSAL_TIMEOUT);
    }
    let info = ConnInfo {
        listener: kind,
        cert_cn: None,
        refused,
    };
    // The TLS and WebSocket paths are boxed so that a plain TCP connection's task does not
    // carry their (much larger) state.
    match kind {
        Kind::Mqtt => serve(stream, peer, info, permits, ctx),
        Kind::Ws => Box::pin(open_ws(stream, peer, info, limit, permits, ctx)).await,
        Kind::Mqtts | Kind::Wss => {
            Box::pin(open_tls(stream, peer, info, limit, permits, ctx)).await
        }
    }
}

/// WebSocket upgrade, then MQTT.
async fn open_ws<S>(
    stream: S,
    peer: SocketAddr,
    info: ConnInfo,
    limit: Duration,
    permits: Permits,
    ctx: &AcceptCtx,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (broker, kind) = (&ctx.broker, info.listener);
    let (path, max) = (
        &broker.cfg.mqtt.ws_path,
        broker.cfg.mqtt.max_packet_size_bytes as usize + 16,
    );
    match tokio::time::timeout(limit, accept_ws_with_limit(stream, path, max)).await {
        Ok(Ok(ws)) => serve(ws, peer, info, permits, ctx),
        Ok(Err(e)) => failed(broker, kind, peer, &e.to_string()),
        Err(_) => failed(broker, kind, peer, "websocket upgrade timed out"),
    }
}

/// TLS handshake, then MQTT or a WebSocket upgrade.
async fn open_tls(
    stream: TcpStream,
    peer: SocketAddr,
    mut info: ConnInfo,
    limit: Duration,
    permits: Permits,
    ctx: &AcceptCtx,
) {
    let (broker, kind) = (&ctx.broker, info.listener);
    let acceptor = ctx
        .tls
        .as_ref()
        .expect("TLS listeners have an acceptor")
        .acceptor();
    let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return failed(broker, kind, peer, &e.to_string()),
        Err(_) => return failed(broker, kind, peer, "TLS handshake timed out"),
    };
    if broker.cfg.tls.cn_as_username {
        info.cert_cn = peer_common_name(tls.get_ref().1);
    }
    if kind == Kind::Wss {
        open_ws(tls, peer, info, limit, permits, ctx).await;
    } else {
        serve(tls, peer, info, permits, ctx);
    }
}

/// Serves MQTT on a ready stream in a task of its own: the accept task, with its transport
/// handshakes, ends here (and `connection::serve` hands the connected life to yet another
/// task), so a connection's long-lived task holds only the connection.
fn serve<S>(stream: S, peer: SocketAddr, info: ConnInfo, permits: Permits, ctx: &AcceptCtx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (broker, cancel, tracker) = (ctx.broker.clone(), ctx.cancel.clone(), ctx.tracker.clone());
    let conn = connection::serve(stream, peer, info, broker, cancel, tracker, permits);
    ctx.tracker.spawn(conn.in_current_span());
}

fn failed(broker: &Broker, kind: Kind, peer: SocketAddr, why: &str) {
    broker
        .metrics
        .handshake_failures
        .with_label_values(&[kind.name()])
        .inc();
    tracing::debug!(%peer, listener = %kind, reason = why, "transport handshake failed");
}
