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
    /// Raft and node-to-node gRPC.
    pub grpc: TcpListener,
}

impl Listeners {
    pub async fn bind(cfg: &Config) -> Result<Listeners, Error> {
        let m = &cfg.mqtt;
        Ok(Listeners {
            mqtt: client(bind("mqtt", m.addr).await?),
            mqtts: bind_opt("mqtts", &m.mqtts_addr).await?.map(client),
            ws: bind_opt("ws", &m.ws_addr).await?.map(client),
            wss: bind_opt("wss", &m.wss_addr).await?.map(client),
            admin: if cfg.admin.enabled {
                Some(bind("admin", cfg.admin.addr).await?)
            } else {
                None
            },
            grpc: bind("grpc", cfg.cluster.grpc_addr).await?,
        })
    }

    /// The client listeners that are enabled, with their kinds; the admin listener; the
    /// gRPC listener.
    pub fn clients(self) -> (Vec<(Kind, TcpListener)>, Option<TcpListener>, TcpListener) {
        let mut out = vec![(Kind::Mqtt, self.mqtt)];
        out.extend(self.mqtts.map(|l| (Kind::Mqtts, l)));
        out.extend(self.ws.map(|l| (Kind::Ws, l)));
        out.extend(self.wss.map(|l| (Kind::Wss, l)));
        (out, self.admin, self.grpc)
    }
}

/// How long the kernel holds a connection that has sent nothing: one SYN-ACK retransmission.
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// A client listener: the kernel hands a connection to `accept` only once its first bytes
/// (CONNECT, a TLS ClientHello, an HTTP upgrade) have arrived, so a connection costs the
/// node one wake-up instead of two (the handshake, then the data), and the connecting side
/// one wake-up of the node less. A client that sends nothing is accepted anyway when the
/// deferral ends (about a second) and then meets the connect timeout. Where the option is
/// unknown (not Linux) the listener works as before.
fn client(listener: TcpListener) -> TcpListener {
    if let Err(e) = defer_accept(&listener) {
        tracing::debug!(error = %e, "TCP_DEFER_ACCEPT not set");
    }
    listener
}

#[cfg(target_os = "linux")]
fn defer_accept(listener: &TcpListener) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is the listener's, open for the duration of the call, and the
    // option value is a c_int constant (static storage), with its size passed.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&DEFER_ACCEPT_SECS).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_listener: &TcpListener) -> std::io::Result<()> {
    Ok(())
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// TCP_DEFER_ACCEPT as the kernel reports it (seconds, rounded from retransmissions).
    fn deferral(listener: &TcpListener) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the descriptor is open for the call; value and len outlive it and len is
        // the size of value.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        value
    }

    #[tokio::test]
    async fn client_listeners_defer_accept_and_admin_does_not() {
        let mut cfg = Config::default();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        cfg.mqtt.addr = any;
        cfg.mqtt.mqtts_addr = any.to_string();
        cfg.mqtt.ws_addr = any.to_string();
        cfg.mqtt.wss_addr = any.to_string();
        cfg.admin.addr = any;
        cfg.cluster.grpc_addr = any;
        let (clients, admin, _grpc) = Listeners::bind(&cfg).await.unwrap().clients();
        assert_eq!(clients.len(), 4);
        for (kind, listener) in &clients {
            assert!(deferral(listener) > 0, "{kind} accepts before data");
        }
        assert_eq!(
            deferral(&admin.unwrap()),
            0,
            "admin is plain HTTP, not deferred"
        );
    }
}
