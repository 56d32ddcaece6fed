//! From an accepted socket to a connected session: CONNECT, the client-id claim, CONNACK.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::close::{self, close};
use super::conn::{Conn, ConnParams};
use crate::auth::PASSWORD_CHECKS;
use crate::broker::Broker;
use crate::codec::{
    decode_packet, encode_packet, read_remaining_length, ConnAck, ConnAckProperties, Connect,
    DecodeError, MqttStr, Packet, Protocol, QoS, ReasonCode,
};
use crate::limit::{Permits, Refusal, REFUSAL_TIMEOUT};
use crate::listener::Kind;
use crate::session::Kick;

/// What the transport learned before MQTT started.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub listener: Kind,
    /// Common name of a verified client certificate, when `tls.cn_as_username` is set.
    pub cert_cn: Option<String>,
    /// A limit refused the connection: its CONNECT only gets a CONNACK saying why.
    pub refused: Option<Refusal>,
}

enum ConnectFailure {
    Timeout,
    Closed,
    /// Closed with part of a CONNECT buffered.
    Truncated,
    NotConnect,
    Decode(DecodeError, Option<u8>),
    Io(std::io::Error),
}

/// Serves one client connection: the handshake here, then the connected life in a task of
/// its own (spawned on `tracker`), so that what an idle connection keeps is only that task's
/// small state, not the handshake's. `permits` (the connection limits' permits, or a
/// refusal slot) are released when the connection ends.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    info: ConnInfo,
    broker: Arc<Broker>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    permits: Permits,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    // Refused connections only get their CONNACK: they are not counted as connections.
    if info.refused.is_some() {
        if let Err(last) = handshake(&mut reader, peer, info, &broker).await {
            close(&mut reader, &mut writer, &last, linger_if(&last)).await;
        }
        return;
    }
    broker.metrics.connections.inc();
    broker.metrics.connections_total.inc();
    match handshake(&mut reader, peer, info, &broker).await {
        Ok((mut conn, mut rbuf)) => {
            if rbuf.is_empty() {
                // Usually all of it was the CONNECT: an idle connection keeps no buffer.
                rbuf = BytesMut::new();
            }
            conn.permits = Some(permits);
            // Shutdown kicks every attached session after cancelling; one attached after
            // that sweep sees the cancellation here.
            if cancel.is_cancelled() {
                conn.session.kick(Kick::Shutdown);
            }
            let connected = connected(reader, writer, conn, rbuf);
            // The span only when it records anything: it is part of every idle connection.
            let span = tracing::Span::current();
            if span.is_disabled() {
                tracker.spawn(connected);
            } else {
                tracker.spawn(connected.instrument(span));
            }
        }
        Err(last) => {
            broker.metrics.connections.dec();
            close(&mut reader, &mut writer, &last, linger_if(&last)).await;
        }
    }
}

/// A refusal that says something lingers (the client may have sent more after its CONNECT);
/// one that says nothing is just closed.
fn linger_if(last: &[u8]) -> usize {
    if last.is_empty() {
        0
    } else {
        close::LINGER_BYTES
    }
}

/// The connected life of a connection, to its end.
async fn connected<R, W>(mut reader: R, mut writer: W, mut conn: Box<Conn>, rbuf: BytesMut)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let exit = conn.run(&mut reader, &mut writer, rbuf).await;
    let broker = conn.broker.clone();
    let bye = (*conn).finish(exit);
    broker.metrics.connections.dec();
    // Boxed: only a closing connection needs this future's state.
    Box::pin(close(&mut reader, &mut writer, &bye.out, bye.linger)).await;
    drop(bye);
}

/// CONNECT, authentication, the claim and CONNACK (written into the connection's buffer).
/// `Err`: the connection was refused or failed and is done; it holds what to write before
/// closing (the refusal CONNACK, or nothing).
async fn handshake<R>(
    reader: &mut R,
    peer: SocketAddr,
    info: ConnInfo,
    broker: &Arc<Broker>,
) -> Result<(Box<Conn>, BytesMut), BytesMut>
where
    R: AsyncRead + Unpin,
{
    // Small to start: most CONNECTs fit, and an idle connection keeps what it has here.
    let mut rbuf = BytesMut::with_capacity(256);
    let cfg = &broker.cfg.mqtt;
    let mut limit = Duration::from_millis(cfg.connect_timeout_ms);
    if info.refused.is_some() {
        limit = limit.min(REFUSAL_TIMEOUT);
    }
    let read = read_connect(reader, &mut rbuf, cfg.max_packet_size_bytes);
    let mut connect = match tokio::time::timeout(limit, read)
        .await
        .unwrap_or(Err(ConnectFailure::Timeout))
    {
        Ok(c) => c,
        Err(f) => return Err(refuse_early(f, broker, peer)),
    };
    tracing::Span::current().record("client_id", connect.client_id.as_str());
    let protocol = connect.protocol;
    if let Some(why) = info.refused {
        return Err(refuse(protocol, why.reason_code(protocol)));
    }
    let accepted = match accept(&connect, broker) {
        Ok(a) => a,
        Err(rc) => return Err(refuse(protocol, rc)),
    };
    if let Some(cn) = info.cert_cn.as_deref().and_then(|cn| MqttStr::new(cn).ok()) {
        // A verified certificate is the credential: its CN is the username.
        connect.username = Some(cn);
        connect.password = None;
    }
    let (username, password) = (connect.username.as_deref(), connect.password.as_deref());
    let verdict = match info.cert_cn {
        Some(_) => Ok(()),
        None => {
            broker
                .auth
                .authenticate(peer.ip(), username, password)
                .await
        }
    };
    if let Err(rc) = verdict {
        if rc == ReasonCode::QUOTA_EXCEEDED {
            // Too many password checks running and waiting: not the client's fault.
            broker.metrics.limit_hit(PASSWORD_CHECKS);
            tracing::debug!(%peer, client_id = %accepted.client_id, "password checks busy");
            return Err(refuse(protocol, rc));
        }
        let reason = if rc == ReasonCode::NOT_AUTHORIZED {
            "not_authorized"
        } else {
            "bad_credentials"
        };
        broker
            .metrics
            .auth_failures
            .with_label_values(&[reason])
            .inc();
        tracing::info!(%peer, client_id = %accepted.client_id, ?username, reason, "authentication failed");
        return Err(refuse(protocol, rc));
    }
    let conn_id = broker.next_conn_id();
    let will_delay = match protocol.is_v5() {
        true => connect
            .will
            .as_ref()
            .and_then(|w| w.properties.will_delay_interval)
            .unwrap_or(0),
        false => 0,
    };
    // The will goes into the ownership record: another node publishes it if this one dies.
    let will = connect.will.as_ref().and_then(|w| {
        let clock = crate::persist::value::Clock::now();
        let msg =
            crate::message::Message::from_will(w, crate::session::SessionId::BROKER, clock.now);
        let v = crate::persist::value::message(&msg, msg.qos, msg.retain, &[], &clock).ok()?;
        Some((v, will_delay))
    });
    if broker.draining.load(std::sync::atomic::Ordering::Relaxed) {
        // v5: 0x9C Use another server; 3.1.x: 3 Server unavailable.
        let rc = match protocol.is_v5() {
            true => ReasonCode::USE_ANOTHER_SERVER,
            false => ReasonCode::SERVER_UNAVAILABLE,
        };
        return Err(refuse(protocol, rc));
    }
    let claim = crate::takeover::claim(
        broker,
        &accepted.client_id,
        connect.clean_start,
        accepted.expiry,
        will,
        conn_id,
    )
    .await;
    let (session, state, present) = match claim {
        Ok(c) => c,
        Err(rc) => return Err(refuse(protocol, rc)),
    };
    session.set_client(crate::session::ClientInfo {
        peer,
        listener: info.listener.name(),
        tls: matches!(
            info.listener,
            crate::listener::Kind::Mqtts | crate::listener::Kind::Wss
        ),
        protocol: protocol.level(),
        keep_alive_secs: accepted.keep_alive,
        clean_start: connect.clean_start,
        username: connect.username.as_deref().map(str::to_owned),
        connected_at_ms: crate::persist::value::Clock::now().unix_ms,
    });
    if let Some(w) = &connect.will {
        // Stored now, not at the disconnect: if the node dies under this connection, the
        // restarted node still publishes it.
        broker.arm_will(&accepted.client_id, w, will_delay, session.epoch().0);
    }
    if present {
        // A resumed session's subscriptions hold as a SUBACK's do: a session that moved
        // here brought routes of this node, and every live member applies them before the
        // CONNACK (a publish that starts afterwards, anywhere, reaches it).
        let mark = broker.control.barrier();
        if mark > broker.control.settled_now() {
            let mut settled = broker.control.settled();
            let _ = settled.wait_for(|s| *s >= mark).await;
        }
    }
    // The CONNACK goes out once what the claim stored (the session record, the will) is in
    // the WAL: a client that saw its CONNACK keeps both across a crash. An empty append's
    // ticket covers everything appended before it.
    let durable =
        (session.is_persistent() || connect.will.is_some()).then(|| broker.store.append(|_| {}));
    tracing::debug!(client_id = %accepted.client_id, %protocol, present, "connected");
    let connack = connack(&connect, broker, &accepted, present);
    let mut out = BytesMut::new();
    encode_packet(&Packet::ConnAck(connack), protocol, &mut out).expect("connack encodes");
    let params = ConnParams {
        connect,
        client_id: accepted.client_id,
        keep_alive: accepted.keep_alive,
        expiry: accepted.expiry,
        conn_id,
    };
    let mut conn = Box::new(Conn::new(broker.clone(), session, state, params, out));
    if let Some(t) = durable {
        conn.write_barrier = t;
    }
    Ok((conn, rbuf))
}

async fn read_connect<R>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    max: u32,
) -> Result<Box<Connect>, ConnectFailure>
where
    R: AsyncRead + Unpin,
{
    loop {
        if !rbuf.is_empty() && rbuf[0] != 0x10 {
            return Err(ConnectFailure::NotConnect);
        }
        // Before decoding: a frame that fails to decode is taken out of the buffer, and what
        // follows it is not this CONNECT.
        let level = peek_level(rbuf);
        match decode_packet(rbuf, Protocol::V5, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err(ConnectFailure::NotConnect),
            Ok(None) => {}
            Err(e) => return Err(ConnectFailure::Decode(e, level)),
        }
        match reader.read_buf(rbuf).await {
            Ok(0) if rbuf.is_empty() => return Err(ConnectFailure::Closed),
            Ok(0) => return Err(ConnectFailure::Truncated),
            Ok(_) => {}
            Err(e) => return Err(ConnectFailure::Io(e)),
        }
    }
}

/// The protocol level byte of a (possibly malformed) CONNECT, if it can be read.
fn peek_level(buf: &[u8]) -> Option<u8> {
    let (_, n) = read_remaining_length(buf.get(1..)?).ok()??;
    let at = 1 + n;
    let name_len = u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]) as usize;
    buf.get(at + 2 + name_len).copied()
}

/// What a connection that sent no acceptable CONNECT is told before it is closed: a v5
/// CONNACK with the decode error's reason code when the CONNECT says it is v5, CONNACK 0x01
/// for an unknown protocol level, else nothing (3.x has no code for a malformed CONNECT).
fn refuse_early(f: ConnectFailure, broker: &Broker, peer: SocketAddr) -> BytesMut {
    match f {
        ConnectFailure::Timeout => {
            broker.metrics.connect_timeouts.inc();
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
        }
        ConnectFailure::Closed => tracing::debug!(%peer, "closed before CONNECT"),
        ConnectFailure::Truncated => {
            broker.metrics.bad_packet("truncated");
            tracing::debug!(%peer, "closed in the middle of CONNECT");
        }
        ConnectFailure::Io(e) => tracing::debug!(%peer, error = %e, "read error before CONNECT"),
        ConnectFailure::NotConnect => {
            broker.metrics.bad_packet("first_packet_not_connect");
            tracing::debug!(%peer, "first packet is not CONNECT");
        }
        ConnectFailure::Decode(e, level) => {
            broker.metrics.bad_packet(e.metric_label());
            tracing::debug!(%peer, error = %e, "bad CONNECT");
            match (e, level) {
                (DecodeError::UnsupportedProtocol { .. }, _) => {
                    return refuse(Protocol::V3_1_1, ReasonCode(1));
                }
                (e, Some(5)) => return refuse(Protocol::V5, e.reason_code()),
                _ => {}
            }
        }
    }
    BytesMut::new()
}

/// The CONNACK refusing a connection with `rc` (3.x: the nearest return code).
fn refuse(protocol: Protocol, rc: ReasonCode) -> BytesMut {
    tracing::debug!(reason = %rc, "connection refused");
    let connack = ConnAck {
        session_present: false,
        reason_code: rc,
        properties: ConnAckProperties::default(),
    };
    let mut out = BytesMut::new();
    if encode_packet(&Packet::ConnAck(connack), protocol, &mut out).is_err() {
        out.clear();
    }
    out
}

/// What CONNECT negotiated, before the session is claimed.
struct Accepted {
    client_id: Arc<str>,
    assigned: Option<MqttStr>,
    expiry: u32,
    keep_alive: u16,
    server_keep_alive: Option<u16>,
}

fn accept(c: &Connect, broker: &Broker) -> Result<Accepted, ReasonCode> {
    let cfg = &broker.cfg.mqtt;
    let v5 = c.protocol.is_v5();
    if v5 && c.properties.authentication_method.is_some() {
        return Err(ReasonCode::BAD_AUTHENTICATION_METHOD);
    }
    let mut assigned = None;
    let client_id: Arc<str> = if c.client_id.is_empty() {
        if !v5 && (!c.clean_start || c.protocol == Protocol::V3_1) {
            return Err(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "{}{:x}{:04x}",
            cfg.client_id_prefix,
            nanos,
            broker.next_conn_id() & 0xffff
        );
        if v5 {
            assigned =
                Some(MqttStr::new(&id).map_err(|_| ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR)?);
        }
        id.into()
    } else {
        c.client_id.as_str().into()
    };
    if let Some(w) = &c.will {
        if w.qos as u8 > cfg.max_qos {
            return Err(ReasonCode::QOS_NOT_SUPPORTED);
        }
        if w.retain && !cfg.retain_available {
            return Err(ReasonCode::RETAIN_NOT_SUPPORTED);
        }
        if w.topic.starts_with("$SYS") {
            return Err(ReasonCode::TOPIC_NAME_INVALID);
        }
        if let Some(limit) = crate::limit::topic_over_limit(&w.topic, &broker.cfg.limits) {
            broker.metrics.limit_hit(limit);
            return Err(ReasonCode::TOPIC_NAME_INVALID);
        }
    }
    let expiry = if v5 {
        c.properties
            .session_expiry_interval
            .unwrap_or(0)
            .min(cfg.session_expiry_max_secs)
    } else if c.clean_start {
        0
    } else {
        cfg.persistent_session_expiry_secs
    };
    let (mut keep_alive, mut server_keep_alive) = (c.keep_alive, None);
    let cap = cfg.max_keep_alive_secs;
    if v5 && cap > 0 && (keep_alive == 0 || keep_alive > cap) {
        keep_alive = cap;
        server_keep_alive = Some(cap);
    }
    Ok(Accepted {
        client_id,
        assigned,
        expiry,
        keep_alive,
        server_keep_alive,
    })
}

fn connack(c: &Connect, broker: &Broker, a: &Accepted, present: bool) -> ConnAck {
    let cfg = &broker.cfg.mqtt;
    let mut p = ConnAckProperties::default();
    if c.protocol.is_v5() {
        if c.properties
            .session_expiry_interval
            .is_some_and(|asked| asked != a.expiry)
        {
            p.session_expiry_interval = Some(a.expiry);
        }
        p.receive_maximum = Some(cfg.receive_maximum);
        if cfg.max_qos < 2 {
            p.maximum_qos = QoS::from_u8(cfg.max_qos);
        }
        if !cfg.retain_available {
            p.retain_available = Some(false);
        }
        p.maximum_packet_size = Some(cfg.max_packet_size_bytes);
        p.assigned_client_identifier = a.assigned.clone();
        if cfg.topic_alias_maximum > 0 {
            p.topic_alias_maximum = Some(cfg.topic_alias_maximum);
        }
        p.server_keep_alive = a.server_keep_alive;
        if c.properties.request_response_information == Some(true) {
            p.response_information = MqttStr::new(&format!("response/{}", a.client_id)).ok();
        }
    }
    let present = present && c.protocol != Protocol::V3_1;
    ConnAck {
        session_present: present,
        reason_code: ReasonCode::SUCCESS,
        properties: p,
    }
}
