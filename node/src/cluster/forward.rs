//! The data plane: publishes forwarded to the other nodes that hold matching subscribers.
//!
//! ```text
//!  Broker::publish ── RouteTable::collect ──> Forwarder::forward(msg, targets)
//!     one encoding of the message; per target node: a seq, an entry in that peer's outbox
//!     (memory, bounded in bytes), a wake-up of the peer's link task
//!  link task (one per peer) ── Forward.Stream (gRPC, bidirectional) ──> peer's `receive`
//!     sends what the outbox has not sent, as one batch          dedupes by (incarnation, seq),
//!     (no timer: what queued while the previous batch was        delivers through its router,
//!     written goes in the next one)                              waits for its WAL, acks
//!     <── cumulative ack: entries up to seq leave the outbox ────
//!  a QoS 1/2 publisher's PUBACK waits for its mark: every target acknowledged, or its
//!  `forward_ack_timeout_ms` passed (the copy stays in the outbox, sent when the peer is back)
//! ```
//!
//! Order: one link per peer sends in the order messages were routed, and the receiver
//! delivers a batch in order, so messages of one publisher (one connection task) keep their
//! order on every node. After a broken stream the link sends again everything not
//! acknowledged, with the same sequence numbers; the receiver skips what it has delivered
//! (per sender and incarnation), so a reconnect doubles nothing.
//!
//! The outbox is memory: a peer that is down keeps its copies here (up to
//! `cluster.forward_outbox_bytes`, then the oldest go, counted) until it is back. This node's
//! own restart loses them (see ARCHITECTURE.md "Forwarding").

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petrel_cluster_proto::pb;
use petrel_cluster_proto::pb::forward_client::ForwardClient;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::broker::Broker;
use crate::codec::QoS;
use crate::control::DataPlane;
use crate::message::Message;
use crate::persist::value::{self, Clock};
use crate::router::Target;

use super::network;

/// Most messages in one batch.
const BATCH_MESSAGES: usize = 512;
/// Most payload bytes in one batch (it may pass this by one message).
const BATCH_BYTES: usize = 1 << 20;
/// How often the acknowledgement timeout of outbox entries is checked.
const EXPIRE_EVERY: Duration = Duration::from_millis(50);
/// Wait before the first reconnection of a link, doubled up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// What an outbox entry costs besides its message bytes (for the byte bound).
const ENTRY_OVERHEAD: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The data plane's metrics (registered with the node's).
#[derive(Clone)]
pub struct ForwardMetrics {
    /// Messages by direction: `out` (copies sent to a peer), `in` (delivered here).
    pub messages: IntCounterVec,
    /// Copies not forwarded, by reason.
    pub dropped: IntCounterVec,
    /// Retransmitted copies a receiver had already delivered.
    pub duplicates: IntCounter,
    /// QoS 1/2 copies whose peer did not acknowledge within the timeout.
    pub ack_timeouts: IntCounter,
    /// Copies waiting in the outboxes (sent or not, unacknowledged) and their bytes.
    pub outbox_messages: IntGauge,
    pub outbox_bytes: IntGauge,
}

/// One copy in a peer's outbox.
struct Entry {
    msg: pb::ForwardedMessage,
    /// The forwarding mark it holds (0: none, or no longer: acknowledged or timed out).
    mark: u64,
    qos0: bool,
    size: usize,
    deadline: Instant,
}

/// What [`Forwarder::forward`] queues for each target.
#[derive(Clone, Copy)]
struct Copy {
    mark: u64,
    qos0: bool,
    deadline: Instant,
}

/// A peer's outbox: entries in sequence order; the first `sent` were sent on the current
/// stream (QoS 0 ones leave once sent); the first `expired` no longer hold a mark.
#[derive(Default)]
struct Outbox {
    next_seq: u64,
    entries: VecDeque<Entry>,
    sent: usize,
    expired: usize,
    bytes: usize,
    /// A copy timed out and the peer has not acknowledged it yet: new copies do not hold
    /// their publishers either (one timeout per stall, not one per message).
    lagging: bool,
}

impl Outbox {
    /// Removes the first `n` entries, returning the marks they held.
    fn pop_front(&mut self, n: usize, released: &mut Vec<u64>) {
        for e in self.entries.drain(..n) {
            self.bytes -= e.size;
            if e.mark != 0 {
                released.push(e.mark);
            }
        }
        self.sent = self.sent.saturating_sub(n);
        self.expired = self.expired.saturating_sub(n);
        if self.expired == 0 {
            // The peer took everything that had timed out: it keeps up again.
            self.lagging = false;
        }
    }
}

/// The link to one peer: its outbox and the task that streams it.
struct Link {
    node: u64,
    addr: String,
    outbox: Mutex<Outbox>,
    wake: Notify,
    stop: CancellationToken,
}

/// Which forwarding marks are still held: a mark settles once every copy of its message is
/// acknowledged (or timed out), and the settled watermark is the highest mark below every
/// held one.
#[derive(Default)]
struct Marks {
    last: u64,
    held: BTreeMap<u64, u32>,
}

/// What this node has delivered of one sender's stream.
#[derive(Default)]
struct Received {
    incarnation: u64,
    seq: u64,
}

pub struct Forwarder {
    me: u64,
    /// Sequence numbers restart with every start of the process.
    incarnation: u64,
    ack_timeout: Duration,
    outbox_limit: usize,
    links: RwLock<HashMap<u64, Arc<Link>>>,
    marks: Mutex<Marks>,
    settled: watch::Sender<u64>,
    broker: OnceLock<Arc<Broker>>,
    /// Per sending node; an async lock: one batch of a sender at a time is delivered (a
    /// reconnected stream waits for the old one's last batch).
    received: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<Received>>>>,
    metrics: ForwardMetrics,
}

impl Forwarder {
    pub fn new(
        me: u64,
        ack_timeout: Duration,
        outbox_limit: usize,
        metrics: ForwardMetrics,
    ) -> Forwarder {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1);
        Forwarder {
            me,
            incarnation,
            ack_timeout,
            outbox_limit,
            links: RwLock::new(HashMap::new()),
            marks: Mutex::new(Marks::default()),
            settled: watch::channel(0).0,
            broker: OnceLock::new(),
            received: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The broker forwarded messages are delivered through (set once it is built and its
    /// sessions are recovered; until then peers are told to try again).
    pub fn set_broker(&self, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// Keeps one link to every peer in `peers` (node id -> gRPC address): new ones start,
    /// gone ones stop and drop their outbox (counted), moved ones keep it.
    pub fn set_peers(self: &Arc<Self>, peers: &HashMap<u64, String>) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        let mut released = Vec::new();
        links.retain(|id, link| {
            if peers.get(id) == Some(&link.addr) {
                return true;
            }
            link.stop.cancel();
            if !peers.contains_key(id) {
                let mut o = lock(&link.outbox);
                let n = o.entries.len();
                self.count_dropped("peer_removed", n as u64);
                o.pop_front(n, &mut released);
            }
            false
        });
        for (&id, addr) in peers {
            if id == self.me || links.contains_key(&id) {
                continue;
            }
            let link = Arc::new(Link {
                node: id,
                addr: addr.clone(),
                outbox: Mutex::new(Outbox::default()),
                wake: Notify::new(),
                stop: CancellationToken::new(),
            });
            tracing::debug!(peer = id, %addr, "forwarding link up");
            tokio::spawn(self.clone().run_link(link.clone()));
            links.insert(id, link);
        }
        drop(links);
        self.release(&released);
        self.update_outbox_gauges();
    }

    /// Stops every link (the node is going down).
    pub fn stop(&self) {
        for link in self
            .links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            link.stop.cancel();
        }
    }

    fn count_dropped(&self, reason: &str, n: u64) {
        if n > 0 {
            self.metrics.dropped.with_label_values(&[reason]).inc_by(n);
        }
    }

    /// Lets go of one hold of each mark in `marks` and moves the settled watermark.
    fn release(&self, marks: &[u64]) {
        if marks.is_empty() {
            return;
        }
        let mut m = lock(&self.marks);
        for mark in marks {
            if let Some(n) = m.held.get_mut(mark) {
                *n -= 1;
                if *n == 0 {
                    m.held.remove(mark);
                }
            }
        }
        let settled = match m.held.first_key_value() {
            Some((first, _)) => first - 1,
            None => m.last,
        };
        drop(m);
        self.settled.send_if_modified(|s| {
            let moved = settled > *s;
            if moved {
                *s = settled;
            }
            moved
        });
    }

    fn update_outbox_gauges(&self) {
        let (mut n, mut bytes) = (0, 0);
        for link in self
            .links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let o = lock(&link.outbox);
            n += o.entries.len();
            bytes += o.bytes;
        }
        self.metrics.outbox_messages.set(n as i64);
        self.metrics.outbox_bytes.set(bytes as i64);
    }

    /// Queues a copy for `link`; returns whether it holds its mark (queued, to a peer that
    /// keeps up). The oldest entries make room for it if need be (their marks let go).
    fn push(&self, link: &Link, message: &Bytes, target: &Target, copy: Copy) -> bool {
        let Copy {
            mark,
            qos0,
            deadline,
        } = copy;
        let shared_bytes: usize = target
            .shared
            .iter()
            .map(|(g, f)| g.len() + f.len() + 8)
            .sum();
        let size = message.len() + shared_bytes + ENTRY_OVERHEAD;
        let mut o = lock(&link.outbox);
        if qos0 && o.bytes + size > self.outbox_limit / 4 {
            // QoS 0 never waits: a peer that is behind does not get it.
            drop(o);
            self.count_dropped("slow_peer", 1);
            return false;
        }
        let mut dropped = 0;
        let mut released = Vec::new();
        while o.bytes + size > self.outbox_limit && !o.entries.is_empty() {
            o.pop_front(1, &mut released);
            dropped += 1;
        }
        // A peer that is behind holds no publisher: the copy waits in the outbox all the same.
        let (mark, holds) = match o.lagging {
            true => (0, false),
            false => (mark, true),
        };
        o.next_seq += 1;
        let msg = pb::ForwardedMessage {
            seq: o.next_seq,
            message: message.clone(),
            plain: target.plain,
            shared: target
                .shared
                .iter()
                .map(|(g, f)| pb::SharedTarget {
                    group: g.to_string(),
                    filter: f.to_string(),
                })
                .collect(),
        };
        o.entries.push_back(Entry {
            msg,
            mark,
            qos0,
            size,
            deadline,
        });
        o.bytes += size;
        let unsent = o.entries.len() - o.sent;
        drop(o);
        if dropped > 0 {
            self.count_dropped("outbox_full", dropped);
            self.release(&released);
        }
        if unsent == 1 {
            // The link task sleeps only with nothing to send.
            link.wake.notify_one();
        }
        holds
    }

    /// Takes the next batch of `link`'s outbox (entries not sent on this stream), if any.
    fn take_batch(&self, link: &Link) -> Option<pb::ForwardBatch> {
        let mut o = lock(&link.outbox);
        if o.sent == o.entries.len() {
            return None;
        }
        let mut messages = Vec::new();
        let mut bytes = 0;
        let mut i = o.sent;
        let mut sent_qos0 = 0;
        while i < o.entries.len() && messages.len() < BATCH_MESSAGES && bytes < BATCH_BYTES {
            let e = &o.entries[i];
            bytes += e.size;
            messages.push(e.msg.clone());
            sent_qos0 += e.qos0 as usize;
            i += 1;
        }
        let first = o.sent;
        o.sent = i;
        if sent_qos0 > 0 {
            // QoS 0 copies are sent once, never again: out of the outbox.
            let (before, expired) = (o.entries.len(), o.expired);
            let (mut at, mut bytes_gone, mut expired_gone) = (0, 0, 0);
            o.entries.retain(|e| {
                let gone = at >= first && at < i && e.qos0;
                if gone {
                    bytes_gone += e.size;
                    expired_gone += (at < expired) as usize;
                }
                at += 1;
                !gone
            });
            let gone = before - o.entries.len();
            o.bytes -= bytes_gone;
            o.sent -= gone;
            o.expired -= expired_gone;
        }
        drop(o);
        self.metrics
            .messages
            .with_label_values(&["out"])
            .inc_by(messages.len() as u64);
        Some(pb::ForwardBatch {
            node_id: self.me,
            incarnation: self.incarnation,
            messages,
        })
    }

    /// The peer has everything up to `seq`.
    fn acked(&self, link: &Link, seq: u64) {
        let mut released = Vec::new();
        let mut o = lock(&link.outbox);
        let n = o.entries.iter().take_while(|e| e.msg.seq <= seq).count();
        o.pop_front(n, &mut released);
        drop(o);
        self.release(&released);
    }

    /// Lets go of the marks of entries whose acknowledgement timeout has passed.
    fn expire(&self, now: Instant) {
        let mut released = Vec::new();
        let mut timed_out = 0;
        for link in self
            .links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let mut o = lock(&link.outbox);
            while o.expired < o.entries.len() && o.entries[o.expired].deadline <= now {
                let at = o.expired;
                let mark = std::mem::take(&mut o.entries[at].mark);
                if mark != 0 {
                    released.push(mark);
                    timed_out += 1;
                }
                o.expired += 1;
                o.lagging = true;
            }
        }
        if timed_out > 0 {
            self.metrics.ack_timeouts.inc_by(timed_out);
        }
        self.release(&released);
    }

    /// Checks the acknowledgement timeouts and the outbox gauges until `cancel`.
    pub async fn run_timers(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(EXPIRE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.expire(Instant::now());
            n = n.wrapping_add(1);
            if n % 20 == 0 {
                self.update_outbox_gauges();
            }
        }
    }

    /// Streams `link`'s outbox to its peer, reconnecting until the link stops.
    async fn run_link(self: Arc<Self>, link: Arc<Link>) {
        let mut retry = RETRY_MIN;
        loop {
            let started = Instant::now();
            let r = self.stream_to(&link).await;
            if link.stop.is_cancelled() {
                return;
            }
            // Everything unacknowledged goes again on the next stream.
            lock(&link.outbox).sent = 0;
            if let Err(e) = r {
                tracing::debug!(peer = link.node, error = %e, "forwarding stream ended");
            }
            if started.elapsed() > RETRY_MAX {
                retry = RETRY_MIN;
            }
            tokio::select! {
                _ = link.stop.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    async fn stream_to(&self, link: &Link) -> Result<(), String> {
        let channel = network::channel(&link.addr).map_err(|e| e.to_string())?;
        let mut client = ForwardClient::new(channel)
            .max_decoding_message_size(network::MAX_MESSAGE)
            .max_encoding_message_size(network::MAX_MESSAGE);
        let (tx, rx) = mpsc::channel::<pb::ForwardBatch>(4);
        lock(&link.outbox).sent = 0;
        let mut acks = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        tracing::debug!(peer = link.node, "forwarding stream open");
        loop {
            let unsent = {
                let o = lock(&link.outbox);
                o.sent < o.entries.len()
            };
            tokio::select! {
                biased;
                _ = link.stop.cancelled() => return Ok(()),
                ack = acks.message() => match ack.map_err(|s| s.message().to_owned())? {
                    Some(a) if a.incarnation == self.incarnation => self.acked(link, a.seq),
                    Some(_) => {}
                    None => return Err("closed by the peer".to_owned()),
                },
                permit = tx.reserve(), if unsent => {
                    let permit = permit.map_err(|_| "stream closed".to_owned())?;
                    if let Some(batch) = self.take_batch(link) {
                        permit.send(batch);
                    }
                }
                _ = link.wake.notified(), if !unsent => {}
            }
        }
    }

    // ---- receiving ----------------------------------------------------------------------

    /// Serves one sender's stream: delivers each batch, then acknowledges it once what it
    /// stored is in the write-ahead log.
    pub async fn receive(
        self: Arc<Self>,
        mut batches: Streaming<pb::ForwardBatch>,
        acks: mpsc::Sender<Result<pb::ForwardAck, Status>>,
    ) {
        let Some(broker) = self.broker.get().cloned() else {
            let _ = acks.send(Err(Status::unavailable("node starting"))).await;
            return;
        };
        let mut scratch = Vec::new();
        loop {
            let batch = match batches.message().await {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "forwarding stream from a peer ended");
                    return;
                }
            };
            let state = lock(&self.received)
                .entry(batch.node_id)
                .or_default()
                .clone();
            let mut st = state.lock().await;
            if st.incarnation != batch.incarnation {
                *st = Received {
                    incarnation: batch.incarnation,
                    seq: 0,
                };
            }
            let clock = Clock::now();
            let mut ticket = None;
            let mut congested = None;
            let (mut delivered, mut duplicates) = (0, 0);
            for m in batch.messages {
                if m.seq <= st.seq {
                    duplicates += 1;
                    continue;
                }
                st.seq = m.seq;
                delivered += 1;
                let Some(d) = value::delivery(&m.message, &clock) else {
                    self.count_dropped("unreadable", 1);
                    continue;
                };
                if d.msg.is_expired(clock.now) {
                    continue;
                }
                let shared = m.shared.iter().map(|s| (&*s.group, &*s.filter));
                let routed = broker.deliver_forwarded(d.msg, m.plain, shared, &mut scratch);
                if let Some(t) = routed.ticket {
                    ticket = Some(ticket.map_or(t, |x: petrel_storage::Ticket| x.max(t)));
                }
                if congested.is_none() {
                    congested = routed.congested;
                }
            }
            scratch.clear();
            self.metrics
                .messages
                .with_label_values(&["in"])
                .inc_by(delivered);
            if duplicates > 0 {
                self.metrics.duplicates.inc_by(duplicates);
            }
            if let Some(t) = ticket {
                if broker.store.wait(t).await.is_err() {
                    // The store failed: nothing more is acknowledged (the node goes down).
                    return;
                }
            }
            if let Some(session) = congested {
                // A subscriber here is behind: the sender's outbox holds the rest (and its
                // publishers wait for their acknowledgements) until it catches up a little.
                let wait = Duration::from_millis(broker.cfg.mqtt.backpressure_max_wait_ms);
                session
                    .wait_drained(broker.limits.drained_below(), Instant::now() + wait)
                    .await;
            }
            let ack = pb::ForwardAck {
                incarnation: st.incarnation,
                seq: st.seq,
            };
            drop(st);
            if acks.send(Ok(ack)).await.is_err() {
                return;
            }
        }
    }
}

impl DataPlane for Forwarder {
    fn forward(&self, msg: &Message, targets: &[Target]) -> u64 {
        let message = match value::message(msg, msg.qos, msg.retain, &[], &Clock::now()) {
            Ok(v) => Bytes::from(v),
            Err(_) => {
                // Arrived within the packet limit, but grew past it (never in practice).
                self.count_dropped("too_large", targets.len() as u64);
                return 0;
            }
        };
        let qos0 = msg.qos == QoS::AtMostOnce;
        let mark = match qos0 {
            true => 0,
            false => {
                let mut m = lock(&self.marks);
                m.last += 1;
                let mark = m.last;
                m.held.insert(mark, targets.len() as u32);
                mark
            }
        };
        let deadline = Instant::now() + self.ack_timeout;
        let mut released = Vec::new();
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        for t in targets {
            let holds = match links.get(&t.node) {
                Some(link) => {
                    let copy = Copy {
                        mark,
                        qos0,
                        deadline,
                    };
                    self.push(link, &message, t, copy)
                }
                None => {
                    // A route of a node that is not (or not yet) a member.
                    self.count_dropped("unknown_node", 1);
                    false
                }
            };
            if !holds && mark != 0 {
                released.push(mark);
            }
        }
        drop(links);
        self.release(&released);
        mark
    }

    fn forwarded(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    fn forwarded_now(&self) -> u64 {
        *self.settled.borrow()
    }
}

#[cfg(test)]
#[path = "forward_test.rs"]
mod tests;
