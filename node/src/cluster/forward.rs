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
//! Backpressure: while a peer keeps up, its unacknowledged bytes past
//! `cluster.forward_window_bytes` pause the QoS 1/2 publishers that feed it (they stop reading
//! until half the window is free, or `mqtt.backpressure_max_wait_ms` passes) and drop its QoS 0
//! copies (counted); a peer that is behind holds nobody.
//!
//! The outbox is memory, bounded per peer by `cluster.forward_outbox_bytes` (then the oldest
//! go, counted); every copy whose publisher is acknowledged before its peer took it (ack
//! timeout, a peer that is behind) is also stored (`Cf::Outbox`) first, so a restart of this
//! node keeps it (see ARCHITECTURE.md "Forwarding").

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petrel_cluster_proto::pb;
use petrel_cluster_proto::pb::forward_client::ForwardClient;
use petrel_storage::{keys, Cf, Store, Ticket};
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use prost::Message as _;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::broker::Broker;
use crate::codec::QoS;
use crate::control::{BoxFuture, DataPlane, Forwarded, Window};
use crate::message::Message;
use crate::persist::value::{self, Clock};
use crate::router::Target;

use super::packed::{Fields, Messages, Packer};
use super::{network, wire};

/// Most messages in one batch.
const BATCH_MESSAGES: usize = 512;
/// Most payload bytes in one batch (it may pass this by one message).
const BATCH_BYTES: usize = 1 << 20;
/// How often the acknowledgement timeout of outbox entries is checked (their deadline is
/// this much early, so that no publisher waits longer than the timeout).
const EXPIRE_EVERY: Duration = Duration::from_millis(10);
/// Wait before the first reconnection of a link, doubled up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// What an outbox entry costs besides its message bytes (for the byte bound).
const ENTRY_OVERHEAD: usize = 64;

/// What an outbox entry of `msg` counts for (against `cluster.forward_outbox_bytes`).
fn entry_size(msg: &pb::ForwardedMessage) -> usize {
    let shared: usize = msg
        .shared
        .iter()
        .map(|s| shared_len(&s.group, &s.filter))
        .sum();
    msg.message.len() + shared + ENTRY_OVERHEAD
}

/// What a share-group target adds to an entry's size.
fn shared_len(group: &str, filter: &str) -> usize {
    group.len() + filter.len() + 8
}

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
    /// Publishes whose publisher was paused because a peer's window was full.
    pub window_full: IntCounter,
    /// Copies passed on to the node a session moved to (routed here before its claim).
    pub passed_on: IntCounter,
    /// Copies waiting in the outboxes (sent or not, unacknowledged) and their bytes.
    pub outbox_messages: IntGauge,
    pub outbox_bytes: IntGauge,
    /// Per peer (label `peer`): copies, bytes and batches sent, and streams that failed.
    pub peer_messages: IntCounterVec,
    pub peer_bytes: IntCounterVec,
    pub peer_batches: IntCounterVec,
    pub peer_errors: IntCounterVec,
}

/// One peer's counters, looked up once per link.
struct PeerCounters {
    messages: IntCounter,
    bytes: IntCounter,
    batches: IntCounter,
    errors: IntCounter,
}

impl PeerCounters {
    fn new(m: &ForwardMetrics, peer: u64) -> PeerCounters {
        let p = [peer.to_string()];
        PeerCounters {
            messages: m.peer_messages.with_label_values(&p),
            bytes: m.peer_bytes.with_label_values(&p),
            batches: m.peer_batches.with_label_values(&p),
            errors: m.peer_errors.with_label_values(&p),
        }
    }

    fn sent(&self, batch: &pb::ForwardBatch) {
        self.batches.inc();
        let n = batch.messages.len() + super::packed::count(&batch.packed);
        self.messages.inc_by(n as u64);
        // The messages' own bytes, not the framing around them: an exact count would
        // walk every message's encoding once more.
        let listed: usize = batch.messages.iter().map(|m| m.message.len()).sum();
        let bytes = listed + batch.packed.len();
        self.bytes.inc_by(bytes as u64);
    }
}

/// One copy in a peer's outbox.
struct Entry {
    /// What is sent, but for the message itself while `live` holds it.
    msg: pb::ForwardedMessage,
    /// The message as the broker holds it, while it is not encoded (`msg.message` empty):
    /// sent as fields to a peer of wire level 3 ([`wire::PACKED`]). Only while its peer
    /// keeps up: it may be a slice of a publisher's read buffer, which it would keep
    /// alive. An entry that will wait (stored, or for a peer that is behind) or goes to a
    /// peer of an earlier level is encoded first ([`Entry::encode`]).
    live: Option<Arc<Message>>,
    /// The forwarding mark it holds (0: none, or no longer: acknowledged or timed out).
    mark: u64,
    qos0: bool,
    size: usize,
    deadline: Instant,
    /// Its id in the stored outbox (`Cf::Outbox`); 0: only in memory.
    stored: u64,
}

impl Entry {
    /// Puts the message in the stored encoding (if it is not yet), letting go of `live`.
    fn encode(&mut self) {
        if let Some(m) = self.live.take() {
            self.msg.message = stored_form(&m);
        }
    }
}

/// The stored encoding of a message that may go as fields (no expiry: the clock reading
/// does not matter; it fits, as [`Outgoing::new`] checked).
fn stored_form(m: &Message) -> Bytes {
    let v = value::message(m, m.qos, m.retain, &[], &Clock::cheap());
    v.unwrap_or_default()
}

/// A message on its way into outboxes: in the stored encoding when it must be (it has
/// properties or an expiry, which the fields do not carry), else encoded only if a copy
/// needs it, and then once.
struct Outgoing<'a> {
    msg: &'a Arc<Message>,
    encoded: Option<Bytes>,
    /// It can go as fields.
    fields: bool,
    /// What an entry of it counts for (the stored encoding's length, or about it).
    size: usize,
}

impl<'a> Outgoing<'a> {
    /// `None`: too large to encode (arrived within the packet limit, but grew past it by
    /// a topic alias: never in practice).
    fn new(msg: &'a Arc<Message>, fields: bool, clock: &Clock) -> Option<Outgoing<'a>> {
        let fields = fields && msg.props.is_none() && msg.expires_at.is_none();
        if fields && value::message_fits(msg, 0) {
            return Some(Outgoing {
                msg,
                encoded: None,
                fields,
                size: msg.topic.len() + msg.payload.len() + LIVE_HEADER,
            });
        }
        let v = value::message(msg, msg.qos, msg.retain, &[], clock).ok()?;
        Some(Outgoing {
            msg,
            size: v.len(),
            encoded: Some(v),
            fields: false,
        })
    }

    fn encoded(&mut self) -> Bytes {
        let msg = self.msg;
        self.encoded.get_or_insert_with(|| stored_form(msg)).clone()
    }
}

/// About what the stored encoding adds to a message's topic and payload (version, expiry,
/// fixed header, lengths, packet id).
const LIVE_HEADER: usize = 20;

/// What [`Forwarder::forward`] queues for each target.
#[derive(Clone, Copy)]
struct Copy<'a> {
    mark: u64,
    qos0: bool,
    deadline: Instant,
    published_at_ms: u64,
    routed_at: u64,
    /// Not empty: passed on for this client only (`DataPlane::push_on`).
    client_id: &'a str,
    /// Stored in the outbox at once (a copy passed on: what was acknowledged for it waits
    /// for that store write, not for the peer).
    store_now: bool,
    /// `ForwardedMessage.share_redirected`.
    share_redirected: bool,
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
    /// Removes the first `n` entries, adding the marks they held to `released` and their
    /// stored ids to `unstore`.
    fn pop_front(&mut self, n: usize, released: &mut Vec<u64>, unstore: &mut Vec<u64>) {
        for e in self.entries.drain(..n) {
            self.bytes -= e.size;
            if e.mark != 0 {
                released.push(e.mark);
            }
            if e.stored != 0 {
                unstore.push(e.stored);
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
    /// `cluster.forward_window_bytes`.
    window: usize,
    /// Woken when the outbox falls to half the window, or the peer is found behind, or the
    /// link stops: paused publishers look again.
    room: Notify,
    counters: PeerCounters,
    /// The wire level agreed on the current stream (0 before the first): whether copies
    /// may be queued as fields.
    level: AtomicU32,
}

impl Link {
    fn has_room(&self) -> bool {
        let o = lock(&self.outbox);
        o.lagging || o.bytes <= self.window / 2 || self.stop.is_cancelled()
    }
}

impl Window for Link {
    fn wait_room(self: Arc<Self>, until: Instant) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let notified = self.room.notified();
            tokio::pin!(notified);
            loop {
                // Registered before the check, so room made in between is not missed.
                notified.as_mut().enable();
                if self.has_room() {
                    return;
                }
                if tokio::time::timeout_at(until.into(), notified.as_mut())
                    .await
                    .is_err()
                {
                    return;
                }
                notified.set(self.room.notified());
            }
        })
    }
}

/// How much a forwarder holds and waits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `cluster.forward_ack_timeout_ms`.
    pub ack_timeout: Duration,
    /// `cluster.forward_window_bytes`.
    pub window: usize,
    /// `cluster.forward_outbox_bytes`.
    pub outbox: usize,
    /// `cluster.wire_level`: the highest this node uses on a stream it sends.
    pub wire_level: u32,
}

/// Which forwarding marks are still held: a mark settles once every copy of its message is
/// acknowledged (or timed out), and the settled watermark is the highest mark below every
/// held one.
///
/// Marks are handed out in order, so the held ones are a window: `held[i]` is how many
/// copies of mark `last - held.len() + 1 + i` are still out (0: settled, waiting for an
/// earlier one). O(1) per mark, no allocation in steady state.
#[derive(Default)]
struct Marks {
    last: u64,
    held: VecDeque<u32>,
}

impl Marks {
    /// A new mark held by `copies` copies.
    fn take(&mut self, copies: u32) -> u64 {
        self.last += 1;
        self.held.push_back(copies);
        self.last
    }

    /// One copy of `mark` is acknowledged (or let go).
    fn release(&mut self, mark: u64) {
        let first = self.last + 1 - self.held.len() as u64;
        if mark < first || mark > self.last {
            return;
        }
        let n = &mut self.held[(mark - first) as usize];
        *n = n.saturating_sub(1);
    }

    /// The highest mark with every mark up to it settled.
    fn settled(&mut self) -> u64 {
        while self.held.front() == Some(&0) {
            self.held.pop_front();
        }
        self.last - self.held.len() as u64
    }
}

/// What this node has delivered of one sender's stream.
#[derive(Default)]
struct Received {
    incarnation: u64,
    seq: u64,
    /// The last seq delivered under the sender's earlier incarnations (the most recent
    /// few): its stored outbox resends copies under their first (incarnation, seq).
    earlier: BTreeMap<u64, u64>,
}

/// Earlier incarnations of a sender remembered for deduplication.
const EARLIER_KEPT: usize = 8;

impl Received {
    /// Whether `m` (of a batch of the current incarnation) is new here; records it.
    fn is_new(&mut self, m: &pb::ForwardedMessage) -> bool {
        if m.seq <= self.seq {
            return false;
        }
        self.seq = m.seq;
        if m.first_incarnation != 0 && m.first_incarnation != self.incarnation {
            let last = self.earlier.entry(m.first_incarnation).or_default();
            if m.first_seq <= *last {
                // Delivered before the sender restarted.
                return false;
            }
            *last = m.first_seq;
        }
        true
    }

    /// The sender restarted: a new incarnation.
    fn restart(&mut self, incarnation: u64) {
        if self.incarnation != 0 {
            self.earlier.insert(self.incarnation, self.seq);
            while self.earlier.len() > EARLIER_KEPT {
                self.earlier.pop_first();
            }
        }
        self.incarnation = incarnation;
        self.seq = 0;
    }
}

pub struct Forwarder {
    me: u64,
    /// Holds the copies whose publishers were acknowledged before their peer acknowledged
    /// them (the outbox of a peer that is behind), so that a restart keeps them.
    store: Store,
    /// The id of the last entry stored in `Cf::Outbox`.
    last_stored: AtomicU64,
    /// Stored entries read at start, by peer, until the peer's link exists.
    restored: Mutex<HashMap<u64, Vec<(u64, pb::ForwardedMessage)>>>,
    /// Sequence numbers restart with every start of the process.
    incarnation: u64,
    ack_timeout: Duration,
    window: usize,
    outbox_limit: usize,
    wire_level: u32,
    links: RwLock<HashMap<u64, Arc<Link>>>,
    marks: Mutex<Marks>,
    settled: watch::Sender<u64>,
    /// The watch's value, read without its lock (every QoS 1/2 publisher's acknowledgement
    /// checks it).
    settled_now: AtomicU64,
    broker: OnceLock<Arc<Broker>>,
    /// Per sending node; an async lock: one batch of a sender at a time is delivered (a
    /// reconnected stream waits for the old one's last batch).
    received: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<Received>>>>,
    /// Senders whose stream has delivered everything they kept for this node, since it
    /// started.
    drained: Mutex<std::collections::HashSet<u64>>,
    metrics: ForwardMetrics,
}

impl Forwarder {
    /// A forwarder of node `me`, with the outbox entries `store` kept from before.
    pub fn new(
        me: u64,
        store: Store,
        limits: Limits,
        metrics: ForwardMetrics,
    ) -> std::io::Result<Forwarder> {
        let mut restored: HashMap<u64, Vec<(u64, pb::ForwardedMessage)>> = HashMap::new();
        let mut last = 0;
        for kv in store.scan(Cf::Outbox) {
            let (k, v) = kv.map_err(std::io::Error::other)?;
            let (Some((peer, id)), Ok(m)) = (
                keys::parse_outbox_key(&k),
                pb::ForwardedMessage::decode(&*v),
            ) else {
                tracing::warn!("unreadable outbox entry skipped");
                continue;
            };
            last = last.max(id);
            restored.entry(peer).or_default().push((id, m));
        }
        let n: usize = restored.values().map(Vec::len).sum();
        if n > 0 {
            tracing::info!(
                messages = n,
                peers = restored.len(),
                "forwarded messages kept for peers that had not taken them"
            );
        }
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1);
        Ok(Forwarder {
            me,
            store,
            last_stored: AtomicU64::new(last),
            restored: Mutex::new(restored),
            incarnation,
            ack_timeout: limits.ack_timeout,
            window: limits.window,
            outbox_limit: limits.outbox,
            wire_level: limits.wire_level,
            links: RwLock::new(HashMap::new()),
            marks: Mutex::new(Marks::default()),
            settled: watch::channel(0).0,
            settled_now: AtomicU64::new(0),
            broker: OnceLock::new(),
            received: Mutex::new(HashMap::new()),
            drained: Mutex::default(),
            metrics,
        })
    }

    /// Stores the entries `ids` of `link`'s outbox (their publishers are acknowledged before
    /// the peer takes them: a restart must keep them). Called with the outbox locked, so a
    /// delete after the peer's ack is always appended after the put.
    fn store_entries(&self, link: &Link, o: &mut Outbox, at: &[usize]) -> Option<Ticket> {
        if at.is_empty() {
            return None;
        }
        let mut txn = self.store.begin();
        let mut w = txn.writer();
        for &i in at {
            let id = self.last_stored.fetch_add(1, Ordering::Relaxed) + 1;
            let e = &mut o.entries[i];
            e.encode();
            e.stored = id;
            if e.msg.first_incarnation == 0 {
                // Resent after a restart under a new incarnation, it keeps this identity.
                e.msg.first_incarnation = self.incarnation;
                e.msg.first_seq = e.msg.seq;
            }
            w.put(
                Cf::Outbox,
                &keys::outbox_key(link.node, id),
                &e.msg.encode_to_vec(),
            );
        }
        Some(txn.commit())
    }

    /// A sender's stream ended: until its next stream says otherwise, it may keep copies
    /// for this node again.
    fn stream_ended(&self, sender: Option<u64>) {
        if let Some(n) = sender {
            lock(&self.drained).remove(&n);
        }
    }

    /// Whether `peer`'s current stream has delivered here everything it kept for this node:
    /// a stored session another node resumed meanwhile may then be surrendered (what was
    /// published for it before that claim is in its queue).
    pub fn has_drained(&self, peer: u64) -> bool {
        lock(&self.drained).contains(&peer)
    }

    /// Each peer's outbox as it stands: (node, copies, bytes, lagging).
    pub fn peers_view(&self) -> Vec<(u64, usize, usize, bool)> {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = links
            .values()
            .map(|l| {
                let o = lock(&l.outbox);
                (l.node, o.entries.len(), o.bytes, o.lagging)
            })
            .collect();
        out.sort_unstable_by_key(|p| p.0);
        out
    }

    /// Whether `peer` keeps up: a link exists and no copy to it has timed out unacknowledged.
    pub fn stream_up(&self, peer: u64) -> bool {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        links.get(&peer).is_some_and(|l| !lock(&l.outbox).lagging)
    }

    /// Deletes stored entries of `peer` (acknowledged, dropped, or their peer removed).
    fn unstore(&self, peer: u64, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        self.store.append(|w| {
            for &id in ids {
                w.delete(Cf::Outbox, &keys::outbox_key(peer, id));
            }
        });
    }

    /// The broker forwarded messages are delivered through (set once it is built and its
    /// sessions are recovered; until then peers are told to try again).
    pub fn set_broker(&self, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// Keeps one link to every peer in `peers` (node id -> gRPC address): new ones start
    /// (with what the stored outbox kept for them), gone ones stop and drop their outbox
    /// (counted), moved ones keep it.
    pub fn set_peers(self: &Arc<Self>, peers: &HashMap<u64, String>) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        let mut released = Vec::new();
        let mut moved = HashMap::new();
        links.retain(|id, link| {
            if peers.get(id) == Some(&link.addr) {
                return true;
            }
            link.stop.cancel();
            link.room.notify_waiters();
            let mut o = lock(&link.outbox);
            if peers.contains_key(id) {
                // A new address: the outbox goes to the new link, all of it unsent.
                let mut kept = std::mem::take(&mut *o);
                kept.sent = 0;
                moved.insert(*id, kept);
            } else {
                let n = o.entries.len();
                self.count_dropped("peer_removed", n as u64);
                let mut unstore = Vec::new();
                o.pop_front(n, &mut released, &mut unstore);
                self.unstore(*id, &unstore);
            }
            false
        });
        for (&id, addr) in peers {
            if id == self.me || links.contains_key(&id) {
                continue;
            }
            let outbox = match moved.remove(&id) {
                Some(o) => o,
                None => self.restored_outbox(id),
            };
            let link = Arc::new(Link {
                node: id,
                addr: addr.clone(),
                outbox: Mutex::new(outbox),
                wake: Notify::new(),
                stop: CancellationToken::new(),
                window: self.window,
                room: Notify::new(),
                counters: PeerCounters::new(&self.metrics, id),
                level: AtomicU32::new(0),
            });
            tracing::debug!(peer = id, %addr, "forwarding link up");
            tokio::spawn(self.clone().run_link(link.clone()));
            links.insert(id, link);
        }
        drop(links);
        self.release(&released);
        self.update_outbox_gauges();
    }

    /// The outbox of a new link to `peer`: what the stored outbox kept for it, first in
    /// line. Its publishers were acknowledged long ago, so it holds none, and the peer
    /// counts as behind until it has taken them.
    fn restored_outbox(&self, peer: u64) -> Outbox {
        let mut o = Outbox::default();
        let Some(mut kept) = lock(&self.restored).remove(&peer) else {
            return o;
        };
        // In the order they were first sent (ids follow the order they were stored in,
        // which is not it: a copy is stored when its timeout passes, a later one at once
        // once the peer is behind).
        kept.sort_by_key(|(_, m)| (m.first_incarnation, m.first_seq));
        let now = Instant::now();
        for (id, mut msg) in kept {
            o.next_seq += 1;
            msg.seq = o.next_seq;
            let size = entry_size(&msg);
            o.bytes += size;
            o.entries.push_back(Entry {
                msg,
                live: None,
                mark: 0,
                qos0: false,
                size,
                deadline: now,
                stored: id,
            });
        }
        o.expired = o.entries.len();
        o.lagging = true;
        o
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
        for &mark in marks {
            m.release(mark);
        }
        let settled = m.settled();
        drop(m);
        self.settled_now.fetch_max(settled, Ordering::Release);
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

    /// Queues one copy in `link`'s outbox; the oldest entries make room for it if need be
    /// (their marks let go). Returns whether it holds its publisher's mark (queued, to a
    /// peer that keeps up), the store write it waits for (if stored at once), and whether
    /// the peer's window is now full (its QoS 1/2 publishers should pause); `None` if it
    /// was not queued (a QoS 0 copy for a peer that is behind: dropped and counted).
    fn push(
        &self,
        link: &Link,
        out: &mut Outgoing<'_>,
        target: &Target,
        copy: Copy<'_>,
    ) -> Option<(bool, Option<Ticket>, bool)> {
        let Copy {
            mark,
            qos0,
            deadline,
            published_at_ms,
            routed_at,
            client_id,
            store_now,
            share_redirected,
        } = copy;
        let shared_bytes: usize = target.shared.iter().map(|(g, f)| shared_len(g, f)).sum();
        let size = out.size + shared_bytes + ENTRY_OVERHEAD;
        let fields = out.fields && link.level.load(Ordering::Relaxed) >= wire::PACKED;
        let mut o = lock(&link.outbox);
        if qos0 && o.bytes + size > self.window {
            // QoS 0 never waits: a peer that is behind does not get it.
            drop(o);
            self.count_dropped("slow_peer", 1);
            return None;
        }
        let mut dropped = 0;
        let (mut released, mut unstore) = (Vec::new(), Vec::new());
        while o.bytes + size > self.outbox_limit && !o.entries.is_empty() {
            o.pop_front(1, &mut released, &mut unstore);
            dropped += 1;
        }
        self.unstore(link.node, &unstore);
        // A peer that is behind holds no publisher: the copy waits in the outbox all the same.
        let (mark, holds) = match o.lagging {
            true => (0, false),
            false => (mark, true),
        };
        o.next_seq += 1;
        // Live only for a peer that keeps up and reads fields (see `Entry::live`).
        let (message, live) = match fields && !o.lagging && !store_now {
            true => (Bytes::new(), Some(out.msg.clone())),
            false => (out.encoded(), None),
        };
        let msg = pb::ForwardedMessage {
            seq: o.next_seq,
            message,
            plain: target.plain,
            shared: target
                .shared
                .iter()
                .map(|(g, f)| pb::SharedTarget {
                    group: g.to_string(),
                    filter: f.to_string(),
                })
                .collect(),
            first_incarnation: 0,
            first_seq: 0,
            published_at_ms,
            routed_at,
            client_id: client_id.to_owned(),
            share_redirected,
        };
        o.entries.push_back(Entry {
            msg,
            live,
            mark,
            qos0,
            size,
            deadline,
            stored: 0,
        });
        o.bytes += size;
        // Its publisher will not wait for the peer: stored first, and the acknowledgement
        // waits for that.
        let ticket = match (holds && !store_now) || qos0 {
            true => None,
            false => {
                let at = o.entries.len() - 1;
                self.store_entries(link, &mut o, &[at])
            }
        };
        let unsent = o.entries.len() - o.sent;
        let full = holds && !qos0 && o.bytes > self.window;
        drop(o);
        if dropped > 0 {
            self.count_dropped("outbox_full", dropped);
            self.release(&released);
        }
        if unsent == 1 {
            // The link task sleeps only with nothing to send.
            link.wake.notify_one();
        }
        Some((holds, ticket, full))
    }

    /// Takes the next batch of `link`'s outbox (entries not sent on this stream), if any.
    fn take_batch(&self, link: &Link) -> Option<pb::ForwardBatch> {
        let mut o = lock(&link.outbox);
        if o.sent == o.entries.len() {
            return None;
        }
        let batch = self.batch_of(&mut o, link.level.load(Ordering::Relaxed));
        drop(o);
        self.qos0_left(link);
        Some(batch)
    }

    /// QoS 0 copies left `link`'s outbox when sent: paused publishers look again if that
    /// made room (an acknowledgement may not come to wake them).
    fn qos0_left(&self, link: &Link) {
        if lock(&link.outbox).bytes <= link.window / 2 {
            link.room.notify_waiters();
        }
    }

    /// The next batch of outbox `o` (possibly empty), for a stream of wire level `level`,
    /// marked drained if nothing unsent is left after it.
    fn batch_of(&self, o: &mut Outbox, level: u32) -> pb::ForwardBatch {
        let unsent = o.entries.len() - o.sent;
        let (mut messages, mut packer) = match level >= wire::PACKED {
            true => {
                // What the batch's entries count for: about what they pack into (more,
                // but for a pass-on copy's client id; the buffer grows if need be).
                let mut size = 0;
                for e in o.entries.range(o.sent..).take(BATCH_MESSAGES) {
                    size += e.size;
                    if size >= BATCH_BYTES {
                        break;
                    }
                }
                (Vec::new(), Some(Packer::with_capacity(size)))
            }
            false => (Vec::with_capacity(unsent.min(BATCH_MESSAGES)), None),
        };
        let mut bytes = 0;
        let mut i = o.sent;
        let mut sent_qos0 = 0;
        while i < o.entries.len() && i - o.sent < BATCH_MESSAGES && bytes < BATCH_BYTES {
            let e = &mut o.entries[i];
            bytes += e.size;
            match &mut packer {
                Some(p) => p.push(&e.msg, e.live.as_deref()),
                None => {
                    // An earlier version reads the stored encoding only.
                    e.encode();
                    messages.push(e.msg.clone());
                }
            }
            sent_qos0 += e.qos0 as usize;
            i += 1;
        }
        let count = i - o.sent;
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
        let drained = o.sent == o.entries.len();
        self.metrics
            .messages
            .with_label_values(&["out"])
            .inc_by(count as u64);
        pb::ForwardBatch {
            node_id: self.me,
            incarnation: self.incarnation,
            messages,
            drained,
            packed: packer
                .filter(|p| !p.is_empty())
                .map(Packer::finish)
                .unwrap_or_default(),
        }
    }

    /// The peer has everything up to `seq`.
    fn acked(&self, link: &Link, seq: u64) {
        let mut o = lock(&link.outbox);
        let n = o.entries.iter().take_while(|e| e.msg.seq <= seq).count();
        // One mark per entry at most: no growing on the way.
        let (mut released, mut unstore) = (Vec::with_capacity(n), Vec::new());
        let was_full = o.bytes > link.window / 2;
        o.pop_front(n, &mut released, &mut unstore);
        self.unstore(link.node, &unstore);
        let room = was_full && o.bytes <= link.window / 2;
        drop(o);
        if room {
            link.room.notify_waiters();
        }
        self.release(&released);
    }

    /// Lets go of the marks of entries whose acknowledgement timeout has passed, once
    /// they are stored (their publishers are acknowledged without the peer).
    fn expire(self: &Arc<Self>, now: Instant) {
        let links: Vec<Arc<Link>> = self
            .links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        self.let_go(&links, Some(now));
    }

    /// Lets go of the marks of `links`' entries whose timeout has passed by `now` (all of
    /// them if `None`: the peer is unreachable), once they are stored.
    fn let_go(self: &Arc<Self>, links: &[Arc<Link>], now: Option<Instant>) {
        let mut released = Vec::new();
        let mut ticket: Option<Ticket> = None;
        for link in links {
            let mut o = lock(&link.outbox);
            let was_lagging = o.lagging;
            if now.is_none() {
                // New copies do not wait for it either until it has caught up.
                o.lagging = true;
            }
            let mut to_store = Vec::new();
            while o.expired < o.entries.len()
                && now.is_none_or(|now| o.entries[o.expired].deadline <= now)
            {
                let at = o.expired;
                let e = &mut o.entries[at];
                let mark = std::mem::take(&mut e.mark);
                if mark != 0 {
                    released.push(mark);
                    if e.stored == 0 {
                        to_store.push(at);
                    }
                }
                o.expired += 1;
                o.lagging = true;
            }
            if let Some(t) = self.store_entries(link, &mut o, &to_store) {
                ticket = Some(ticket.map_or(t, |x| x.max(t)));
            }
            let now_lagging = o.lagging && !was_lagging;
            if now_lagging {
                // What is queued for it will wait: no slices of read buffers kept.
                o.entries.iter_mut().for_each(Entry::encode);
            }
            drop(o);
            if now_lagging {
                // Behind: it holds no publisher, paused ones included.
                link.room.notify_waiters();
            }
        }
        if released.is_empty() {
            return;
        }
        self.metrics.ack_timeouts.inc_by(released.len() as u64);
        match ticket {
            None => self.release(&released),
            Some(t) => {
                let this = self.clone();
                tokio::spawn(async move {
                    // A failed store releases nothing: the node goes down.
                    if this.store.wait(t).await.is_ok() {
                        this.release(&released);
                    }
                });
            }
        }
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
            if n % 100 == 0 {
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
            // Everything unacknowledged goes again on the next stream; meanwhile the peer
            // holds no publisher (a dead peer is known at once, a stalled one by the timeout).
            lock(&link.outbox).sent = 0;
            self.let_go(std::slice::from_ref(&link), None);
            if let Err(e) = r {
                link.counters.errors.inc();
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
        let response = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| s.message().to_owned())?;
        let level = wire::stream_level(response.metadata()).min(self.wire_level);
        link.level.store(level, Ordering::Relaxed);
        let mut acks = response.into_inner();
        // The first batch goes even if empty: it tells the peer whether this node still
        // keeps anything for it (see `Forwarder::has_drained`). Taken once the peer has
        // taken the stream (one that is catching up refuses it, and a QoS 0 copy taken
        // for it would be gone).
        let first = {
            let mut o = lock(&link.outbox);
            if o.expired == 0 {
                // Reachable, and nothing of its is overdue: new copies wait for it again
                // (a refused first stream, or a broken one with nothing queued, left it
                // behind with nothing to acknowledge that would clear it).
                o.lagging = false;
            }
            self.batch_of(&mut o, level)
        };
        self.qos0_left(link);
        link.counters.sent(&first);
        tx.send(first)
            .await
            .map_err(|_| "stream closed".to_owned())?;
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
                    // One turn of the scheduler first: tasks already ready (publishers on
                    // this worker) queue what they have, and it joins this batch. Under
                    // load batches grow (fewer frames, acks and wake-ups per message); an
                    // idle link waits a few microseconds, not a timer's millisecond.
                    tokio::task::yield_now().await;
                    if let Some(batch) = self.take_batch(link) {
                        link.counters.sent(&batch);
                        permit.send(batch);
                    }
                }
                _ = link.wake.notified(), if !unsent => {}
            }
        }
    }

    /// Queues one copy of `msg` for `target` that holds no publisher: it is stored in the
    /// outbox at once, and the returned ticket is all an acknowledgement waits for. None:
    /// not queued (counted as dropped).
    fn pass_on(
        &self,
        msg: &Arc<Message>,
        target: &Target,
        client_id: &str,
        share_redirected: bool,
    ) -> Option<Forwarded> {
        let clock = Clock::now();
        // Stored at once: encoded.
        let Some(mut out) = Outgoing::new(msg, false, &clock) else {
            self.count_dropped("too_large", 1);
            return None;
        };
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        let Some(link) = links.get(&target.node) else {
            self.count_dropped("unknown_node", 1);
            return None;
        };
        let copy = Copy {
            mark: 0,
            qos0: msg.qos == QoS::AtMostOnce,
            deadline: clock.now + self.ack_timeout,
            published_at_ms: clock.unix_ms,
            routed_at: msg.routed_at.get(),
            client_id,
            store_now: true,
            share_redirected,
        };
        let (_, ticket, full) = self.push(link, &mut out, target, copy)?;
        Some(Forwarded {
            mark: 0,
            ticket,
            full: full.then(|| link.clone() as Arc<dyn Window>),
        })
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
        let mut sender = None;
        loop {
            let mut batch = match batches.message().await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.stream_ended(sender);
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "forwarding stream from a peer ended");
                    self.stream_ended(sender);
                    return;
                }
            };
            sender = Some(batch.node_id);
            let state = lock(&self.received)
                .entry(batch.node_id)
                .or_default()
                .clone();
            let mut st = state.lock().await;
            if st.incarnation != batch.incarnation {
                if st.earlier.contains_key(&batch.incarnation) {
                    // A late batch of a sender that has restarted since: it is dead.
                    continue;
                }
                st.restart(batch.incarnation);
            }
            let clock = Clock::now();
            let mut ticket = None;
            let (mut delivered, mut duplicates) = (0, 0);
            let backpressure = Duration::from_millis(broker.cfg.mqtt.backpressure_max_wait_ms);
            let drained = batch.drained;
            let (messages, mut refused) = match Messages::of(&mut batch) {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(e)),
            };
            for item in messages.into_iter().flatten() {
                let (m, fields) = match item {
                    Ok(m) => m,
                    Err(e) => {
                        // A message of it does not read, nor anything after it.
                        refused = Some(e);
                        break;
                    }
                };
                if !st.is_new(&m) {
                    duplicates += 1;
                    continue;
                }
                delivered += 1;
                // Slices of the batch: copied only if a session keeps it past delivery.
                let Some(mut msg) = received_message(&m, fields, &clock) else {
                    self.count_dropped("unreadable", 1);
                    continue;
                };
                if msg.is_expired(clock.now) {
                    continue;
                }
                if crate::message::sample_latency() {
                    if let Some(fresh) = Arc::get_mut(&mut msg) {
                        // Measured from the publishing node's clock reading.
                        let ago = clock.unix_ms.saturating_sub(m.published_at_ms);
                        if let Some(at) = clock.now.checked_sub(Duration::from_millis(ago)) {
                            fresh.received = crate::message::Stamp::at(at);
                        }
                    }
                }
                msg.routed_at.set(m.routed_at);
                if m.routed_at != 0 {
                    // Routed past what this node has applied while it claims a session, or
                    // for a session moving here that is not in the router yet: waits for it.
                    broker
                        .routes
                        .ready_for(&msg.topic, m.routed_at, &m.client_id)
                        .await;
                }
                let shared = m.shared.iter().map(|s| (&*s.group, &*s.filter));
                let routed = broker.deliver_forwarded(
                    msg,
                    m.plain,
                    shared,
                    m.published_at_ms,
                    &m.client_id,
                    m.share_redirected,
                    &mut scratch,
                );
                if let Some(t) = routed.ticket {
                    ticket = Some(ticket.map_or(t, |x: petrel_storage::Ticket| x.max(t)));
                }
                if let Some(pause) = routed.congested {
                    // A subscriber here is behind: the rest of the batch waits for it, as a
                    // local publisher would (and the sender's outbox holds what follows,
                    // its publishers waiting for their acknowledgements).
                    pause
                        .wait(broker.limits.drained_below(), Instant::now() + backpressure)
                        .await;
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
            if let Some(e) = refused {
                // The stream ends unacknowledged: the sender sends the batch again on its
                // next one, where what was delivered of it is skipped as a duplicate (it is
                // in the write-ahead log by now, so acknowledging it then is right). A
                // sender that keeps sending it is a bug, which this error names.
                tracing::error!(peer = batch.node_id, error = %e, "forwarded batch refused");
                let _ = acks
                    .send(Err(Status::invalid_argument(e.to_string())))
                    .await;
                self.stream_ended(sender);
                return;
            }
            let ack = pb::ForwardAck {
                incarnation: st.incarnation,
                seq: st.seq,
            };
            drop(st);
            if drained {
                lock(&self.drained).insert(batch.node_id);
            }
            if acks.send(Ok(ack)).await.is_err() {
                self.stream_ended(sender);
                return;
            }
        }
    }
}

/// The message a peer forwarded: `fields` if it came so, else `m.message`; slices of the
/// batch's buffer. `None` if the stored encoding does not read.
fn received_message(
    m: &pb::ForwardedMessage,
    fields: Option<Fields>,
    clock: &Clock,
) -> Option<Arc<Message>> {
    let Some(f) = fields else {
        return value::delivery_in(&m.message, clock).map(|d| d.msg);
    };
    // Checked by the reader (a topic name, a QoS).
    Some(Arc::new(Message {
        topic: f.topic,
        payload: f.payload,
        qos: f.qos,
        retain: f.retain,
        props: None,
        expires_at: None,
        origin: crate::session::SessionId::BROKER,
        owned: false,
        received: crate::message::Stamp::NONE,
        routed_at: Default::default(),
    }))
}

impl DataPlane for Forwarder {
    fn forward(&self, msg: &Arc<Message>, targets: &[Target]) -> Forwarded {
        // One clock reading per message: the stamp, the expiry and the deadline.
        let clock = Clock::cheap();
        let fields = self.wire_level >= wire::PACKED;
        let Some(mut out) = Outgoing::new(msg, fields, &clock) else {
            self.count_dropped("too_large", targets.len() as u64);
            return Forwarded::default();
        };
        let qos0 = msg.qos == QoS::AtMostOnce;
        let mark = match qos0 {
            true => 0,
            false => lock(&self.marks).take(targets.len() as u32),
        };
        let deadline = clock.now + self.ack_timeout.saturating_sub(2 * EXPIRE_EVERY);
        let mut released = Vec::new();
        let mut ticket = None;
        let mut full = None;
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        for t in targets {
            let holds = match links.get(&t.node) {
                Some(link) => {
                    let copy = Copy {
                        mark,
                        qos0,
                        deadline,
                        published_at_ms: clock.unix_ms,
                        routed_at: msg.routed_at.get(),
                        client_id: "",
                        store_now: false,
                        share_redirected: false,
                    };
                    let (holds, stored, window_full) = self
                        .push(link, &mut out, t, copy)
                        .unwrap_or((false, None, false));
                    if let Some(s) = stored {
                        ticket = Some(ticket.map_or(s, |x: Ticket| x.max(s)));
                    }
                    if window_full && full.is_none() {
                        full = Some(link.clone() as Arc<dyn Window>);
                    }
                    holds
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
        if full.is_some() {
            self.metrics.window_full.inc();
        }
        Forwarded { mark, ticket, full }
    }

    fn push_on(&self, msg: &Arc<Message>, node: u64, client_id: &str) -> Forwarded {
        let target = Target {
            node,
            plain: true,
            shared: Vec::new(),
        };
        let f = self.pass_on(msg, &target, client_id, false);
        if f.is_some() {
            self.metrics.passed_on.inc();
        }
        f.unwrap_or_default()
    }

    fn pass_shared(
        &self,
        msg: &Arc<Message>,
        node: u64,
        group: &str,
        filter: &str,
        redirected: bool,
    ) -> Option<Forwarded> {
        let target = Target {
            node,
            plain: false,
            shared: vec![(group.into(), filter.into())],
        };
        self.pass_on(msg, &target, "", redirected)
    }

    fn forwarded(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    fn forwarded_now(&self) -> u64 {
        self.settled_now.load(Ordering::Acquire)
    }
}

#[cfg(test)]
#[path = "forward_test.rs"]
mod tests;
