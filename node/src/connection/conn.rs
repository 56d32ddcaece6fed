//! The connected state of one connection and its event loop.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use petrel_storage::Ticket;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::ReusableBoxFuture;

use super::error::ConnError;
use crate::auth::ClientCtx;
use crate::broker::{Broker, WillOf};
use crate::codec::{
    decode_packet, encode_packet, Connect, Disconnect, LastWill, MqttStr, Packet, Protocol,
};
use crate::config::PublishRatePolicy;
use crate::control::WillElsewhere;
use crate::limit::{Permits, TokenBucket};
use crate::message::Message;
use crate::router::Match;
use crate::session::{Delivery, Kick, Session, SessionState};

/// Stop taking messages off the session queue while this much is waiting to be written.
pub(super) const HIGH_WATER: usize = 64 * 1024;
/// Read buffer sizes: an idle connection reads into `READ_MIN` bytes, a busy one's reads
/// double up to `READ_MAX` while they fill the buffer.
const READ_MIN: usize = 64;
const READ_MAX: usize = 64 * 1024;
/// Stop reading from a client while this much is waiting to be written to it: a client
/// that never reads (its acknowledgements, pings, messages) cannot make us buffer more.
const OUT_MAX: usize = 4 * HIGH_WATER;
/// Write buffer reserved when a batch of messages starts going out.
pub(super) const WRITE_RESERVE: usize = 16 * 1024;

pub(super) struct ConnParams {
    pub connect: Box<Connect>,
    pub client_id: Arc<str>,
    pub keep_alive: u16,
    pub expiry: u32,
    pub conn_id: u64,
}

/// How the event loop ended.
pub(super) enum Exit {
    /// The client sent DISCONNECT (v5 0x04 asks for the will anyway).
    Disconnect {
        with_will: bool,
    },
    Error(ConnError),
}

pub(super) struct Conn {
    pub broker: Arc<Broker>,
    pub session: Arc<Session>,
    pub state: Box<SessionState>,
    pub client_id: Arc<str>,
    /// The CONNECT's username, for ACL decisions.
    pub username: Option<Arc<str>>,
    pub conn_id: u64,
    /// Boxed: most clients have none, and a connection's size matters when idle.
    pub will: Option<Box<LastWill>>,
    /// Encoded packets waiting to be written.
    pub out: BytesMut,
    /// Largest packet the client accepts.
    pub out_max_packet: usize,
    /// Outbound QoS 1/2 window: min(client's receive maximum, configured in-flight maximum).
    pub out_window: usize,
    /// Topic aliases in both directions, made on first use (3.1.1 clients never use them).
    pub aliases: Option<Box<Aliases>>,
    /// Acknowledgements waiting for their store writes and control-plane marks (see
    /// `ControlPlane::settled`), in the order they must be sent.
    pub pending_acks: VecDeque<(AckWait, Packet)>,
    /// PUBACKs in `pending_acks`: inbound QoS 1 messages the client has no answer to yet,
    /// counted against the server's Receive Maximum with the inbound QoS 2 ones.
    pub pending_pubacks: usize,
    /// SUBACKs in `pending_acks`: retained messages of a SUBSCRIBE wait behind its SUBACK.
    pub pending_subacks: u32,
    /// An acknowledgement that waits for a control-plane mark was queued since the wait for
    /// the store was armed: arm it again, watching the marks too.
    pub marks_changed: bool,
    /// A 3.x client reached the Receive Maximum with QoS 1: reading waits until the store
    /// releases acknowledgements (3.x has no way to be told; v5 gets DISCONNECT 0x93).
    pub inbound_full: bool,
    /// Nothing in `out` may reach the socket before this ticket is durable.
    pub write_barrier: Ticket,
    /// `limits.max_publish_rate_per_client`, when set.
    pub rate: Option<Box<PublishRate>>,
    /// Backpressure: a subscriber this client feeds has a long queue, or a peer node's
    /// forwarding window is full; reading stops until it drains or the instant passes.
    pub backpressure: Option<(crate::broker::Pause, Instant)>,
    /// Session expiry interval in seconds; DISCONNECT may change it.
    pub expiry: u32,
    pub keep_alive_secs: u16,
    pub out_alias_max: u16,
    pub protocol: Protocol,
    /// v5 Request Problem Information: reason strings and user properties on acks.
    pub problem_info: bool,
    /// The session queue may hold messages we have not taken yet.
    pub queue_pending: bool,
    /// `storage.durable_acks`: hold QoS 1/2 acknowledgements until the WAL has the message.
    pub durable_acks: bool,
    /// The connection limits' permits, released when the connection is dropped.
    pub permits: Option<Permits>,
}

/// Topic aliases of one connection (MQTT 5).
#[derive(Default)]
pub(super) struct Aliases {
    /// Topic -> alias, for messages to the client.
    pub outbound: HashMap<MqttStr, u16>,
    /// Alias -> topic, from the client's PUBLISHes.
    pub inbound: HashMap<u16, MqttStr>,
}

/// The publish-rate limit of one connection.
pub(super) struct PublishRate {
    pub bucket: TokenBucket,
    /// Throttle policy: the next PUBLISH waits for a token; reading stops until then.
    pub throttled_until: Option<Instant>,
}

thread_local! {
    /// Scratch vectors of the connections a worker thread runs, one at a time (taken and put
    /// back with no await between): reused across messages, and kept by no idle connection.
    pub(super) static MATCHES: Cell<Vec<Match>> = const { Cell::new(Vec::new()) };
    pub(super) static BATCH: Cell<Vec<Delivery>> = const { Cell::new(Vec::new()) };
}

/// Waits for the store's committed watermark to move. Boxed and made the first time an
/// acknowledgement waits for the store: most connections never need one.
/// What an acknowledgement waits for before it goes out.
#[derive(Clone, Copy, Debug, Default)]
pub struct AckWait {
    /// The store's write of everything it promises.
    pub ticket: Ticket,
    /// The control plane's mark (0: none).
    pub mark: u64,
    /// The data plane's mark (0: none).
    pub forwarded: u64,
}

/// The next change of a watched mark; never, without one.
async fn changed(rx: Option<&mut tokio::sync::watch::Receiver<u64>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

type StoreWait = ReusableBoxFuture<'static, bool>;

impl Conn {
    pub fn new(
        broker: Arc<Broker>,
        session: Arc<Session>,
        state: Box<SessionState>,
        p: ConnParams,
        out: BytesMut,
    ) -> Conn {
        let cfg = &broker.cfg.mqtt;
        let props = &p.connect.properties;
        let v5 = p.connect.protocol.is_v5();
        let client_receive_max = props.receive_maximum.unwrap_or(u16::MAX) as usize;
        session.set_subscriptions(state.subscriptions.iter().map(|(f, s)| (&**f, s.options)));
        Conn {
            protocol: p.connect.protocol,
            client_id: p.client_id,
            username: p.connect.username.as_deref().map(Arc::from),
            conn_id: p.conn_id,
            keep_alive_secs: p.keep_alive,
            expiry: p.expiry,
            will: p.connect.will.map(Box::new),
            out,
            out_max_packet: props.maximum_packet_size.unwrap_or(u32::MAX) as usize,
            out_window: client_receive_max
                .min(cfg.max_inflight_messages as usize)
                .max(1),
            out_alias_max: if v5 {
                props
                    .topic_alias_maximum
                    .unwrap_or(0)
                    .min(cfg.topic_alias_maximum)
            } else {
                0
            },
            aliases: None,
            problem_info: props.request_problem_information.unwrap_or(true),
            queue_pending: true,
            pending_acks: VecDeque::new(),
            pending_subacks: 0,
            marks_changed: false,
            pending_pubacks: 0,
            inbound_full: false,
            write_barrier: Ticket::default(),
            durable_acks: broker.cfg.storage.durable_acks,
            rate: {
                let l = &broker.cfg.limits;
                (l.max_publish_rate_per_client > 0).then(|| {
                    Box::new(PublishRate {
                        bucket: TokenBucket::new(
                            l.max_publish_rate_per_client,
                            l.publish_rate_burst,
                            Instant::now(),
                        ),
                        throttled_until: None,
                    })
                })
            },
            backpressure: None,
            permits: None,
            session,
            state,
            broker,
        }
    }

    fn throttled_until(&self) -> Option<Instant> {
        self.rate.as_ref().and_then(|r| r.throttled_until)
    }

    /// Who the ACL sees.
    pub fn acl_ctx(&self) -> ClientCtx<'_> {
        ClientCtx {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        }
    }

    pub fn v5(&self) -> bool {
        self.protocol.is_v5()
    }

    /// Encodes a control packet into the write buffer.
    pub fn send(&mut self, p: &Packet) {
        if let Err(e) = encode_packet(p, self.protocol, &mut self.out) {
            tracing::warn!(error = %e, packet = p.name(), "could not encode packet");
        }
    }

    /// Sends an acknowledgement once `ticket` is durable (at once if nothing waits). Keeps
    /// acknowledgements in the order of the packets they answer.
    pub fn send_after(&mut self, ticket: Option<Ticket>, ack: Packet) {
        self.send_after_mark(ticket, 0, ack);
    }

    /// Sends `ack` once the store has passed `ticket` and the control plane has settled
    /// `mark` (0: no mark), never ahead of an earlier one.
    pub fn send_after_mark(&mut self, ticket: Option<Ticket>, mark: u64, ack: Packet) {
        self.send_after_all(ticket, mark, 0, ack);
    }

    /// As [`Conn::send_after_mark`], and once the data plane has settled `forwarded` (every
    /// other node the message went to has it; 0: none).
    pub fn send_after_all(
        &mut self,
        ticket: Option<Ticket>,
        mark: u64,
        forwarded: u64,
        ack: Packet,
    ) {
        // Only an ack that depends on a store write looks at the watermark (a lock read).
        // Once the store has failed, even `durable_acks = false` holds it: it would never
        // be written.
        let unsettled = (mark > 0 && mark > self.broker.control.settled_now())
            || (forwarded > 0 && forwarded > self.broker.forward.forwarded_now());
        let wait = unsettled
            || ticket.is_some_and(|t| {
                let c = self.broker.store.committed_now();
                t > c.ticket && (self.durable_acks || c.failed)
            });
        self.marks_changed |= unsettled;
        if wait || !self.pending_acks.is_empty() {
            self.pending_pubacks += matches!(ack, Packet::PubAck(_)) as usize;
            self.pending_subacks += matches!(ack, Packet::SubAck(_)) as u32;
            let w = AckWait {
                ticket: ticket.unwrap_or_default(),
                mark,
                forwarded,
            };
            self.pending_acks.push_back((w, ack));
        } else {
            self.send(&ack);
        }
    }

    /// Sends the acknowledgements whose writes are now durable. Once the store has failed,
    /// anything still waiting never will be: the connection ends without those acks.
    fn release_acks(&mut self) -> Result<(), ConnError> {
        let c = self.broker.store.committed_now();
        let mut settled = None;
        let mut forwarded = None;
        while self.pending_acks.front().is_some_and(|(w, _)| {
            w.ticket <= c.ticket
                && (w.mark == 0
                    || w.mark <= *settled.get_or_insert_with(|| self.broker.control.settled_now()))
                && (w.forwarded == 0
                    || w.forwarded
                        <= *forwarded.get_or_insert_with(|| self.broker.forward.forwarded_now()))
        }) {
            let (_, ack) = self.pending_acks.pop_front().expect("front exists");
            self.pending_pubacks -= matches!(ack, Packet::PubAck(_)) as usize;
            if matches!(ack, Packet::SubAck(_)) {
                self.pending_subacks -= 1;
                // Its retained messages may go now.
                self.queue_pending = true;
            }
            self.send(&ack);
        }
        if c.failed && (!self.pending_acks.is_empty() || self.write_barrier > c.ticket) {
            return Err(ConnError::StoreFailed);
        }
        Ok(())
    }

    pub async fn run<R, W>(&mut self, reader: &mut R, writer: &mut W, mut rbuf: BytesMut) -> Exit
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // The CONNACK first, on its own: its buffer is then released, and an idle connection
        // keeps no write buffer at all. It waits for what the claim stored, if anything.
        let store = &self.broker.store;
        if self.durable_acks
            && self.write_barrier > store.committed_now().ticket
            && store.wait(self.write_barrier).await.is_err()
        {
            return Exit::Error(ConnError::StoreFailed);
        }
        if let Err(e) = writer.write_all(&self.out).await {
            return Exit::Error(e.into());
        }
        self.broker.metrics.bytes_sent.inc_by(self.out.len() as u64);
        self.out = BytesMut::new();
        self.resend_inflight();
        let max_in = self.broker.cfg.mqtt.max_packet_size_bytes;
        let ka_limit = Duration::from_secs(u64::from(self.keep_alive_secs)) * 3 / 2;
        let ka_on = !ka_limit.is_zero();
        let mut last_seen = Instant::now();
        let sleep = tokio::time::sleep(if ka_on {
            ka_limit
        } else {
            Duration::from_secs(86_400)
        });
        tokio::pin!(sleep);
        let mut read_hint = READ_MIN;
        let drained_below = self.broker.limits.drained_below();
        let mut store_wait: Option<StoreWait> = None;
        let mut store_armed = false;
        loop {
            if self.queue_pending && self.out.len() < HIGH_WATER {
                self.pump();
            }
            if rbuf.capacity() - rbuf.len() < read_hint / 2 {
                rbuf.reserve(read_hint);
            }
            let spare = rbuf.capacity() - rbuf.len();
            // Connections that never stored an outbound QoS 2 packet id skip the watermark.
            let barrier_open = self.write_barrier == Ticket::default()
                || self.write_barrier <= self.broker.store.committed_now().ticket;
            if std::mem::take(&mut self.marks_changed) {
                // The armed wait may watch the store only.
                store_armed = false;
            }
            if (!self.pending_acks.is_empty() || !barrier_open) && !store_armed {
                // Armed first, then looked at: a commit in between is not missed.
                self.arm_store_wait(&mut store_wait);
                store_armed = true;
                if let Err(e) = self.release_acks() {
                    return Exit::Error(e);
                }
                if self.inbound_full && self.pending_acks.is_empty() {
                    // Everything went out here: the armed wait would only come back with the
                    // next commit, so the PUBLISHes read but held go on now.
                    self.inbound_full = false;
                    if let Some(exit) = self.decode_all(&mut rbuf, max_in) {
                        return exit;
                    }
                }
                continue;
            }
            let can_write = !self.out.is_empty() && barrier_open;
            let reading = self.throttled_until().is_none()
                && self.backpressure.is_none()
                && !self.inbound_full
                && self.out.len() < OUT_MAX;
            // Boxed and built only while paused: every branch's future is part of this
            // connection's state, and most connections never pause.
            let mut paused = self.pause_future(drained_below);
            let is_paused = paused.is_some();
            let resumed = poll_fn(|cx| match paused.as_mut() {
                Some(f) => f.as_mut().poll(cx),
                None => Poll::Pending,
            });
            let store_moved = poll_fn(|cx| match store_wait.as_mut() {
                Some(f) => f.poll(cx),
                None => Poll::Pending,
            });
            tokio::select! {
                biased;
                // First, so that a client that floods us still hears a kick (takeover,
                // shutdown) at once.
                _ = poll_fn(|cx| self.session.poll_woken(cx)) => {
                    if let Some(k) = self.session.kicked() {
                        return Exit::Error(match k {
                            Kick::TakenOver => ConnError::TakenOver,
                            // The node goes down because its store failed: say so.
                            Kick::Shutdown if self.broker.store.committed_now().failed => {
                                ConnError::StoreFailed
                            }
                            Kick::Shutdown => ConnError::ShuttingDown,
                            Kick::Admin => ConnError::Administrative { discard: false },
                            Kick::AdminDiscard => ConnError::Administrative { discard: true },
                        });
                    }
                    self.queue_pending = true;
                }
                r = writer.write_buf(&mut self.out), if can_write => match r {
                    Ok(0) => return Exit::Error(ConnError::PeerClosed),
                    Ok(n) => self.broker.metrics.bytes_sent.inc_by(n as u64),
                    Err(e) => return Exit::Error(e.into()),
                },
                r = reader.read_buf(&mut rbuf), if reading => {
                    match r {
                        Ok(0) if rbuf.is_empty() => return Exit::Error(ConnError::PeerClosed),
                        Ok(0) => return Exit::Error(ConnError::Truncated),
                        Ok(n) => {
                            self.broker.metrics.bytes_received.inc_by(n as u64);
                            if n >= spare {
                                read_hint = (read_hint * 2).min(READ_MAX);
                            } else if n < read_hint / 8 {
                                read_hint = (read_hint / 2).max(READ_MIN);
                            }
                        }
                        Err(e) => return Exit::Error(e.into()),
                    }
                    last_seen = Instant::now();
                    if let Some(exit) = self.decode_all(&mut rbuf, max_in) {
                        return exit;
                    }
                    if rbuf.is_empty() && rbuf.capacity() > 2 * read_hint {
                        // The client slowed down: drop the big buffer (decoded payloads that
                        // still point into it keep their part alive on their own).
                        rbuf = BytesMut::new();
                    }
                }
                _ = resumed, if is_paused => {
                    self.backpressure = None;
                    if let Some(r) = &mut self.rate {
                        r.throttled_until = None;
                    }
                    last_seen = Instant::now();
                    if let Some(exit) = self.decode_all(&mut rbuf, max_in) {
                        return exit;
                    }
                }
                alive = store_moved, if store_armed => {
                    store_armed = false;
                    if !alive {
                        return Exit::Error(ConnError::StoreFailed);
                    }
                    if let Err(e) = self.release_acks() {
                        return Exit::Error(e);
                    }
                    if self.inbound_full {
                        // Acknowledgements went out: the PUBLISHes read but held go on.
                        self.inbound_full = false;
                        if let Some(exit) = self.decode_all(&mut rbuf, max_in) {
                            return exit;
                        }
                    }
                }
                _ = &mut sleep, if ka_on => {
                    let deadline = last_seen + ka_limit;
                    if Instant::now() >= deadline {
                        return Exit::Error(ConnError::KeepAliveTimeout);
                    }
                    sleep.as_mut().reset(deadline.into());
                }
            }
        }
    }

    /// Sets `slot` to wait for the next move of the committed watermark after the one
    /// seen now (reusing the slot's allocation).
    fn arm_store_wait(&self, slot: &mut Option<StoreWait>) {
        // A new receiver has seen the current value: it wakes on the next commit (or, while
        // an acknowledgement waits for a control-plane mark, on the next settled mark).
        let mut rx = self.broker.store.committed();
        let settled = self.broker.control.settled_now();
        let forwarded = self.broker.forward.forwarded_now();
        let mut marks = self
            .pending_acks
            .iter()
            .any(|(w, _)| w.mark > settled)
            .then(|| self.broker.control.settled());
        let mut fwd = self
            .pending_acks
            .iter()
            .any(|(w, _)| w.forwarded > forwarded)
            .then(|| self.broker.forward.forwarded());
        let wait = async move {
            match (marks.as_mut(), fwd.as_mut()) {
                (None, None) => rx.changed().await.is_ok(),
                (marks, fwd) => tokio::select! {
                    r = rx.changed() => r.is_ok(),
                    _ = changed(marks) => true,
                    _ = changed(fwd) => true,
                },
            }
        };
        match slot {
            Some(f) => f.set(wait),
            None => *slot = Some(ReusableBoxFuture::new(wait)),
        }
    }

    /// What a paused reader waits for: a congested subscriber's queue to drain (or the wait
    /// to run out), or the publish-rate bucket to refill.
    fn pause_future(
        &self,
        drained_below: usize,
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        if let Some((p, until)) = self.backpressure.clone() {
            return Some(p.wait(drained_below, until));
        }
        let until = self.throttled_until()?;
        Some(Box::pin(tokio::time::sleep_until(until.into())))
    }

    /// Handles every complete packet in `rbuf`; `Some` ends the connection. Under the
    /// throttle policy it stops before a PUBLISH that has no token yet and sets
    /// `throttled_until`, leaving the rest in the buffer.
    fn decode_all(&mut self, rbuf: &mut BytesMut, max_in: u32) -> Option<Exit> {
        loop {
            if self.backpressure.is_some()
                || self.must_wait_for_token(rbuf)
                || self.must_wait_for_acks(rbuf)
            {
                return None;
            }
            match decode_packet(rbuf, self.protocol, max_in) {
                Ok(Some(p)) => match self.handle(p) {
                    Ok(None) => {}
                    Ok(Some(exit)) => return Some(exit),
                    Err(e) => return Some(Exit::Error(e)),
                },
                Ok(None) => return None,
                Err(e) => return Some(Exit::Error(e.into())),
            }
        }
    }

    /// Inbound QoS 1/2 messages the client has no final answer to (PUBACK not sent yet,
    /// PUBREL not received yet): bounded by the server's Receive Maximum.
    pub fn inbound_unacked(&self) -> usize {
        self.pending_pubacks + self.state.inbound_qos2.len()
    }

    /// 3.x: before a QoS 1 PUBLISH past the Receive Maximum, stop until the store releases
    /// acknowledgements (v5 clients are told with DISCONNECT 0x93 instead, in `on_publish`).
    fn must_wait_for_acks(&mut self, rbuf: &[u8]) -> bool {
        const PUBLISH_QOS1: u8 = 0x32;
        if self.v5()
            || self.pending_pubacks == 0
            || rbuf.first().is_none_or(|b| b & 0xf6 != PUBLISH_QOS1)
            || self.inbound_unacked() < self.broker.cfg.mqtt.receive_maximum as usize
        {
            return false;
        }
        self.inbound_full = true;
        self.broker.metrics.limit_hit("receive_maximum");
        true
    }

    fn must_wait_for_token(&mut self, rbuf: &[u8]) -> bool {
        const PUBLISH: u8 = 3;
        let Some(rate) = &mut self.rate else {
            return false;
        };
        if self.broker.cfg.limits.publish_rate_policy != PublishRatePolicy::Throttle
            || rbuf.first().is_none_or(|b| b >> 4 != PUBLISH)
        {
            return false;
        }
        let now = Instant::now();
        let wait = rate.bucket.wait(now);
        if wait.is_zero() {
            return false;
        }
        rate.throttled_until = Some(now + wait);
        self.broker.metrics.limit_hit("publish_rate");
        true
    }

    /// Fires or schedules the will and parks or ends the session, and returns what is left
    /// to say: the v5 DISCONNECT (if any) after whatever was still waiting to be written.
    /// Nothing is written here, so the session is free before the socket is closed: a
    /// taking-over connection never waits for this one's last write.
    pub fn finish(mut self, exit: Exit) -> Goodbye {
        let metrics = &self.broker.metrics;
        let label = match &exit {
            Exit::Disconnect { .. } => "client_disconnect",
            Exit::Error(e) => e.close_label(),
        };
        metrics.connections_closed.with_label_values(&[label]).inc();
        let (publish_will, reason) = match &exit {
            Exit::Disconnect { with_will } => (*with_will, None),
            Exit::Error(e) => {
                if let Some(label) = e.bad_packet_label() {
                    metrics.bad_packet(label);
                }
                if matches!(e, ConnError::KeepAliveTimeout) {
                    metrics.keepalive_timeouts.inc();
                }
                tracing::debug!(client_id = %self.client_id, error = %e, "connection closed");
                // A failed store is not the client's failure: no will. A drain (SIGTERM, or
                // an operator's) keeps the will, delayed below.
                let server_side = matches!(e, ConnError::StoreFailed);
                (!server_side, Some(e))
            }
        };
        if let Some(rc) = reason.and_then(|e| e.reason_code()) {
            if self.v5() {
                let reference = &self.broker.cfg.mqtt.server_reference;
                let elsewhere =
                    matches!(reason, Some(ConnError::ShuttingDown)) && !reference.is_empty();
                let rc = match elsewhere {
                    true => crate::codec::ReasonCode::USE_ANOTHER_SERVER,
                    false => rc,
                };
                let mut d = Disconnect::new(rc);
                if elsewhere {
                    d.properties.server_reference = MqttStr::new(reference).ok();
                }
                if self.problem_info || rc.is_error() {
                    d.properties.reason_string =
                        reason.and_then(|e| MqttStr::new(&e.reason_string()).ok());
                }
                self.send(&Packet::Disconnect(d));
            }
        }
        // The node closes first (the client may still be writing): linger so that what it
        // is told arrives. Not after the client's DISCONNECT or its own close.
        let out = std::mem::take(&mut self.out);
        let linger = match reason {
            Some(e) if e.reason_code().is_some() && !out.is_empty() => {
                super::close::linger_bytes(e)
            }
            _ => 0,
        };
        let bye = Goodbye {
            out,
            linger,
            _permits: self.permits.take(),
        };
        let now = Instant::now();
        let will = self.will.take();
        let will_pending = publish_will && will.is_some();
        let epoch = self.session.epoch();
        // What other nodes did with this connection's will, asked once whatever this end
        // does with it.
        let elsewhere = match &will {
            Some(_) => self.broker.control.will_elsewhere(&self.client_id, epoch),
            None => WillElsewhere::Nothing,
        };
        if !publish_will && will.is_some() {
            // Stored at CONNECT (`Broker::arm_will`); this end does not publish it.
            self.broker.disarm_will(&self.client_id);
        }
        if publish_will {
            if let Some(w) = will {
                let delay = if self.v5() {
                    w.properties
                        .will_delay_interval
                        .unwrap_or(0)
                        .min(self.expiry)
                } else {
                    0
                };
                let mut delay = Duration::from_secs(delay as u64);
                let drained = matches!(reason, Some(ConnError::ShuttingDown));
                if drained {
                    // Drained (a rolling upgrade): the client gets `cluster.will_grace_ms` to
                    // connect again, here after a restart or to another node; its will is
                    // published only if it does not (a new claim makes it stale).
                    let grace = Duration::from_millis(self.broker.cfg.cluster.will_grace_ms);
                    delay = delay.max(grace);
                }
                let msg = Message::from_will(&w, self.session.id(), now);
                let taken_over = matches!(reason, Some(ConnError::TakenOver));
                let of = match elsewhere {
                    WillElsewhere::Fired => {
                        // The leader published it while this node seemed dead.
                        self.broker.disarm_will(&self.client_id);
                        self.broker.metrics.wills_skipped.inc();
                        None
                    }
                    // Drained: its end drops the kept will (`SessionDisconnected.drained`),
                    // and the delayed one here is stale by then (the client is elsewhere).
                    WillElsewhere::Kept if drained => Some(WillOf::Connection(epoch)),
                    WillElsewhere::Kept => {
                        // A claim of another node took the connection over and kept the will
                        // aside (due now: no delay, or the session ended with that claim): it
                        // is published through the cluster, by this node or, if this node
                        // seems dead meanwhile, by the leader, once.
                        delay = Duration::ZERO;
                        Some(WillOf::Connection(epoch))
                    }
                    WillElsewhere::Nothing if taken_over => Some(WillOf::TakenOver),
                    WillElsewhere::Nothing => Some(WillOf::Connection(epoch)),
                };
                if let Some(of) = of {
                    self.broker
                        .schedule_will(&self.client_id, self.session.id(), of, msg, delay);
                }
            }
        }
        if matches!(reason, Some(ConnError::Administrative { discard: true })) {
            // The operator asked for the session to go with its connection.
            self.expiry = 0;
        }
        let end = self.expiry == 0;
        let expires_at = (!end && self.expiry != u32::MAX)
            .then(|| now + Duration::from_secs(self.expiry as u64));
        let broker = self.broker.clone();
        let session = self.session.clone();
        if session.is_persistent() && !end {
            let since = crate::persist::value::Clock::now().unix_ms;
            let epoch = session.epoch().0;
            broker.store.append(|w| {
                crate::persist::put_session(w, &self.client_id, self.expiry, since, epoch)
            });
        }
        broker.control.disconnected(
            &self.client_id,
            session.epoch(),
            will_pending,
            self.expiry,
            matches!(reason, Some(ConnError::ShuttingDown)),
        );
        if let Some(state) = session.release(self.conn_id, self.state, expires_at, end) {
            broker.end_session(&session, Some(state));
        } else if let Some(at) = expires_at {
            broker.schedule_session_expiry(&session, at);
        }
        bye
    }
}

/// What a finished connection still has to do with its socket (see `close.rs`).
pub(super) struct Goodbye {
    /// The last bytes to write.
    pub out: BytesMut,
    /// The node closes while the client may still be writing: read and discard up to this
    /// many bytes, for a while (0: close at once).
    pub linger: usize,
    /// The connection limits' permits, held until the socket is closed.
    pub _permits: Option<Permits>,
}
