//! The shared half of a session.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use petrel_storage::{keys, Cf, Txn};

use super::queue::{self, Delivery, DropReason, Enqueued, Plan, QueueLimits};
use super::registry::Epoch;
use super::state::SessionState;
use super::stats::SessionStats;
use super::view::{sub_views, ClientInfo, Detail, SessionView};
use crate::codec::QoS;
use crate::message::Message;

/// Identifies one incarnation of a session (a clean start makes a new one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// Origin of messages the broker publishes itself.
    pub const BROKER: SessionId = SessionId(0);
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a connection is told to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kick {
    /// Another connection claimed the client id.
    TakenOver = 1,
    /// The node is shutting down.
    Shutdown = 2,
    /// An operator closed the connection through the admin API (v5: DISCONNECT 0x98); the
    /// session stays.
    Admin = 3,
    /// As `Admin`, and the session ends with the connection.
    AdminDiscard = 4,
}

impl Kick {
    fn from_u8(v: u8) -> Option<Kick> {
        match v {
            1 => Some(Kick::TakenOver),
            2 => Some(Kick::Shutdown),
            3 => Some(Kick::Admin),
            4 => Some(Kick::AdminDiscard),
            _ => None,
        }
    }
}

struct Link {
    conn_id: u64,
}

struct Inner {
    queue: VecDeque<Delivery>,
    /// Sum of [`Delivery::size`] over `queue`.
    queued_bytes: usize,
    /// Parked while no connection owns it.
    state: Option<Box<SessionState>>,
    link: Option<Link>,
    /// Session expiry interval in seconds (u32::MAX: never).
    expiry_secs: u32,
    /// Set while offline: when the session expires.
    expires_at: Option<Instant>,
    /// Next position in the stored queue (persistent sessions).
    next_seq: u64,
    /// How the current (or last) connection came in (admin API).
    client: Option<Arc<ClientInfo>>,
    /// The subscriptions while a connection holds the state (admin API), kept up to date
    /// filter by filter (a client may hold 100,000); the parked state is read directly.
    subs: std::collections::BTreeMap<Box<str>, crate::codec::SubscriptionOptions>,
}

pub struct Session {
    id: SessionId,
    client_id: Arc<str>,
    connected: AtomicBool,
    /// The epoch of the claim that attached the current (or last) connection.
    epoch: AtomicU64,
    /// Whether the session is stored (its expiry interval is above 0).
    persistent: AtomicBool,
    /// Wakes the owning connection when the queue gains a message or it is kicked: a flag
    /// and one waker, polled by the connection's loop (no waiter list to lock, and nothing
    /// stored in an idle connection's task).
    wake: AtomicWaker,
    woken: AtomicBool,
    /// Why the attached connection must go ([`Kick`] as u8; 0: it may stay). A flag the
    /// connection reads when `wake` wakes it, rather than a channel per connection: an
    /// idle connection then waits on one thing only.
    kicked: AtomicU8,
    /// QoS 1/2 messages sent and not acknowledged, as the connection last said (admin API).
    inflight: AtomicU32,
    inflight_bytes: std::sync::atomic::AtomicUsize,
    /// Wakes a taking-over connection when the old one has parked the state.
    released: Notify,
    /// Wakes publishers waiting for this session's queue to get short again.
    drained: Notify,
    /// A publisher waited for this queue in vain: publishers stop waiting for it until it
    /// gets short again.
    stalled: AtomicBool,
    /// The node's counts this session adds to (set by the registry; none in unit tests).
    stats: Option<Arc<SessionStats>>,
    /// The log index of the claim that brought the session to this node from another (0:
    /// it did not move here, or the claim did not bring its routes): a forwarded copy
    /// routed before it is not this session's here (the old node has it).
    arrived_at: AtomicU64,
    /// Surrendered to another node by a claim at this log index (0: not): copies routed
    /// before it that still reach this node are passed on to `moved_to`.
    moved_at: AtomicU64,
    moved_to: AtomicU64,
    /// The session has ended: no copy can be queued for it any more. Set (never cleared)
    /// under `inner`'s lock, so code holding that lock reads it as part of the locked
    /// state; read without the lock too (a share group's pick, made under the router's
    /// lock, passes over ended members).
    ended: AtomicBool,
    inner: Mutex<Inner>,
}

impl Session {
    pub fn new(id: SessionId, client_id: Arc<str>, expiry_secs: u32) -> Session {
        Session {
            id,
            client_id,
            connected: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            persistent: AtomicBool::new(false),
            wake: AtomicWaker::new(),
            woken: AtomicBool::new(false),
            kicked: AtomicU8::new(0),
            inflight: AtomicU32::new(0),
            inflight_bytes: Default::default(),
            released: Notify::new(),
            drained: Notify::new(),
            stalled: AtomicBool::new(false),
            stats: None,
            arrived_at: AtomicU64::new(0),
            moved_at: AtomicU64::new(0),
            moved_to: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                queued_bytes: 0,
                state: Some(Box::default()),
                link: None,
                expiry_secs,
                expires_at: None,
                next_seq: 1,
                client: None,
                subs: Default::default(),
            }),
        }
    }

    /// A stored session brought back at start: offline, with its parked state and queue.
    pub fn restore(
        id: SessionId,
        client_id: Arc<str>,
        expiry_secs: u32,
        state: Box<SessionState>,
        queue: VecDeque<Delivery>,
        next_seq: u64,
    ) -> Session {
        let s = Session::new(id, client_id, expiry_secs);
        s.persistent.store(true, Ordering::Relaxed);
        {
            let mut inner = s.lock();
            inner.state = Some(state);
            inner.queued_bytes = queue.iter().map(Delivery::size).sum();
            inner.queue = queue;
            inner.next_seq = next_seq;
        }
        s
    }

    /// Makes the session count itself in `stats` (its queue as it is now, and from now on
    /// its queue and whether a connection is attached).
    pub fn with_stats(mut self, stats: Arc<SessionStats>) -> Session {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        stats.queue_changed(inner.queue.len(), 0);
        if inner.link.is_some() {
            stats.attached();
        }
        self.stats = Some(stats);
        self
    }

    fn count_queue(&self, added: usize, removed: usize) {
        if let Some(s) = &self.stats {
            s.queue_changed(added, removed);
        }
    }

    #[cfg(test)]
    pub fn new_for_test(client_id: &str) -> Arc<Session> {
        use std::sync::atomic::AtomicU64;
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Session::new(
            SessionId(NEXT.fetch_add(1, Ordering::Relaxed)),
            client_id.into(),
            0,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }

    /// The epoch of the claim that attached the current (or last) connection.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// See [`Session::set_arrived_at`].
    pub fn arrived_at(&self) -> u64 {
        self.arrived_at.load(Ordering::Relaxed)
    }

    /// The session came here from another node by the claim at log `index`, which brought
    /// its routes here: copies routed before it went to the old node.
    pub fn set_arrived_at(&self, index: u64) {
        self.arrived_at.store(index, Ordering::Relaxed);
    }

    /// The log index of the claim it was surrendered to, and the node that claimed it, if
    /// it was.
    pub fn moved(&self) -> Option<(u64, u64)> {
        match self.moved_at.load(Ordering::Acquire) {
            0 => None,
            at => Some((at, self.moved_to.load(Ordering::Relaxed))),
        }
    }

    /// Surrendered to `node` by its claim at log `index`.
    fn set_moved(&self, index: u64, node: u64) {
        self.moved_to.store(node, Ordering::Relaxed);
        self.moved_at.store(index, Ordering::Release);
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::Release);
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    pub fn set_persistent(&self, v: bool) {
        self.persistent.store(v, Ordering::Release);
    }

    /// Queues a delivery for the client, online or not. With `stored` (an open store
    /// transaction and the encoded message, for a persistent session) the delivery is
    /// appended to the store before it becomes visible to the connection, so its delete after
    /// the acknowledgement can never precede it. Under drop-oldest, older messages make room.
    pub fn enqueue(
        &self,
        mut d: Delivery,
        limits: &QueueLimits,
        mut stored: Option<(&mut Txn<'_>, bytes::Bytes)>,
    ) -> Enqueued {
        let mut inner = self.lock();
        if self.is_ended() {
            return Enqueued::Gone(d);
        }
        let online = inner.link.is_some();
        let (dropped, why) = match queue::plan(&inner.queue, inner.queued_bytes, &d, online, limits)
        {
            Plan::Reject(why) => return Enqueued::Dropped(why),
            Plan::Push => (0, DropReason::QueueFull),
            Plan::ReplaceOldest(why) => {
                let size = d.size();
                let mut dropped = 0;
                while inner.queue.len() >= limits.max_messages
                    || !queue::fits_bytes(inner.queue.len(), inner.queued_bytes, size, limits)
                {
                    let Some(old) = inner.queue.pop_front() else {
                        break;
                    };
                    inner.queued_bytes -= old.size();
                    dropped += 1;
                    if let Some((txn, _)) = stored.as_mut().filter(|_| old.seq != 0) {
                        crate::persist::delete_queued(&mut txn.writer(), &self.client_id, old.seq);
                    }
                }
                (dropped, why)
            }
        };
        if !online && !d.msg.owned {
            // Taken by a session that went offline after the publish looked (the publish
            // copies for those offline then, `Broker::plan_deliveries`): kept until the
            // client is back, it must not pin a read buffer (a client's, or a batch's).
            d.msg = Message::kept(&d.msg);
        }
        if let Some((txn, value)) = stored {
            d.seq = inner.next_seq;
            inner.next_seq += 1;
            txn.writer()
                .put(Cf::Queue, &keys::queue_key(&self.client_id, d.seq), &value);
        }
        inner.queued_bytes += d.size();
        let was_empty = inner.queue.is_empty();
        inner.queue.push_back(d);
        let congested = online
            && limits.congested_at > 0
            && inner.queue.len() >= limits.congested_at
            && !self.stalled.load(Ordering::Relaxed);
        drop(inner);
        self.count_queue(1, dropped);
        // A queue that held messages already has its connection's attention (a stored
        // wake-up, a full window that an ack reopens, or a batch still being taken).
        if online && was_empty {
            self.wake_conn();
        }
        Enqueued::Queued {
            dropped,
            why,
            congested,
        }
    }

    /// Takes deliveries off the front: any number of QoS 0, at most `window` of QoS 1/2, at
    /// most `max` in all. Stops at the first QoS 1/2 that does not fit, to keep order.
    pub fn drain(&self, mut window: usize, max: usize, out: &mut Vec<Delivery>, low: usize) {
        let mut inner = self.lock();
        let before = inner.queue.len();
        while out.len() < max {
            let Some(front) = inner.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce {
                if window == 0 {
                    break;
                }
                window -= 1;
            }
            if let Some(d) = inner.queue.pop_front() {
                inner.queued_bytes -= d.size();
                out.push(d);
            }
        }
        let after = inner.queue.len();
        drop(inner);
        self.count_queue(0, before - after);
        if before >= low && after < low {
            self.stalled.store(false, Ordering::Relaxed);
            self.drained.notify_waiters();
        }
    }

    /// Waits until the queue is shorter than `low` (true) or `deadline` passes (false, and
    /// the session is marked stalled so publishers stop waiting for it).
    pub async fn wait_drained(&self, low: usize, deadline: Instant) -> bool {
        let notified = self.drained.notified();
        tokio::pin!(notified);
        // Registered before the check, so a drain in between is not missed.
        notified.as_mut().enable();
        {
            let inner = self.lock();
            if inner.queue.len() < low || inner.link.is_none() || self.is_ended() {
                return true;
            }
        }
        if tokio::time::timeout_at(deadline.into(), notified)
            .await
            .is_ok()
        {
            return true;
        }
        self.stalled.store(true, Ordering::Relaxed);
        false
    }

    pub fn queue_len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Ready once a message was queued for the attached connection, or it was kicked, since
    /// it last returned ready. Only the attached connection polls it.
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.wake.register(cx.waker());
        // Registered before the second look: a wake in between is not lost.
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    fn wake_conn(&self) {
        self.woken.store(true, Ordering::Release);
        self.wake.wake();
    }

    /// Attaches a connection and hands it the parked state. `None` if another connection
    /// still holds the session or it has ended.
    pub fn attach(&self, conn_id: u64, epoch: Epoch) -> Option<Box<SessionState>> {
        let mut inner = self.lock();
        if inner.link.is_some() || self.is_ended() {
            return None;
        }
        let state = inner.state.take()?;
        self.epoch.store(epoch.0, Ordering::Release);
        inner.link = Some(Link { conn_id });
        inner.expires_at = None;
        self.kicked.store(0, Ordering::Release);
        self.connected.store(true, Ordering::Release);
        if let Some(s) = &self.stats {
            s.attached();
        }
        Some(state)
    }

    /// Releases the session after connection `conn_id` closed. If `end` is set the session
    /// ends and the state comes back for the caller to clean up the router; otherwise the
    /// state is parked until `expires_at` (None: it never expires).
    pub fn release(
        &self,
        conn_id: u64,
        state: Box<SessionState>,
        expires_at: Option<Instant>,
        end: bool,
    ) -> Option<Box<SessionState>> {
        let mut inner = self.lock();
        let mut back = None;
        if inner.link.as_ref().is_some_and(|l| l.conn_id == conn_id) {
            inner.link = None;
            self.connected.store(false, Ordering::Release);
            if let Some(s) = &self.stats {
                s.released();
            }
            if end {
                self.ended.store(true, Ordering::Release);
                self.count_queue(0, inner.queue.len());
                let mut state = state;
                state.orphans = inner.queue.drain(..).filter(|d| d.shared).collect();
                inner.queued_bytes = 0;
                back = Some(state);
            } else {
                let mut state = state;
                // Kept while offline: nothing may pin a read buffer of the closed connection.
                let mut copies = HashMap::new();
                let queued = inner.queue.iter_mut();
                let inflight = state.inflight.iter_mut().map(|f| &mut f.delivery);
                for d in queued.chain(inflight) {
                    if !d.msg.owned {
                        let key = Arc::as_ptr(&d.msg);
                        d.msg = copies
                            .entry(key)
                            .or_insert_with(|| Message::kept(&d.msg))
                            .clone();
                    }
                }
                inner.state = Some(state);
                inner.expires_at = expires_at;
            }
        }
        drop(inner);
        self.released.notify_waiters();
        // Offline now: publishers no longer wait for it.
        self.drained.notify_waiters();
        back
    }

    /// Tells the attached connection to go (the first reason given stands). Returns false
    /// if none is attached.
    pub fn kick(&self, why: Kick) -> bool {
        let inner = self.lock();
        if inner.link.is_none() {
            return false;
        }
        let _ = self
            .kicked
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
        drop(inner);
        self.wake_conn();
        true
    }

    /// Why the attached connection was told to go, if it was. The connection asks whenever
    /// [`Session::poll_woken`] is ready.
    pub fn kicked(&self) -> Option<Kick> {
        Kick::from_u8(self.kicked.load(Ordering::Acquire))
    }

    /// Waits until no connection is attached, at most `timeout`. Returns whether it is free.
    pub async fn wait_released(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.lock().link.is_none() {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return self.lock().link.is_none();
            }
        }
    }

    pub fn expiry_secs(&self) -> u32 {
        self.lock().expiry_secs
    }

    pub fn set_expiry_secs(&self, secs: u32) {
        self.lock().expiry_secs = secs;
    }

    /// Sets when an offline (recovered) session expires.
    pub fn set_offline_until(&self, at: Option<Instant>) {
        self.lock().expires_at = at;
    }

    /// When an offline session expires; None while connected or if it never expires.
    pub fn expires_at(&self) -> Option<Instant> {
        self.lock().expires_at
    }

    /// Sets the epoch of a session restored from the store (the last claim that attached it).
    pub fn set_epoch(&self, epoch: Epoch) {
        self.epoch.store(epoch.0, Ordering::Release);
    }

    /// Allocates the next position in the stored queue, for a message stored outside
    /// [`Session::enqueue`] (one handed over in flight).
    pub fn alloc_seq(&self) -> u64 {
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        seq
    }

    /// Changes the parked state of a session no connection holds (one being built).
    pub fn with_parked<R>(&self, f: impl FnOnce(&mut SessionState) -> R) -> Option<R> {
        self.lock().state.as_deref_mut().map(f)
    }

    /// Ends a session no connection holds and takes everything it held: its parked state and
    /// its queue (a session handed over to another node). `None` if a connection holds it
    /// or it has ended. `moved`: the log index and node of the claim that took it, when the
    /// session stays in the router to pass copies on.
    pub fn take_all(
        &self,
        moved: Option<(u64, u64)>,
    ) -> Option<(Box<SessionState>, VecDeque<Delivery>)> {
        let mut inner = self.lock();
        if inner.link.is_some() || self.is_ended() {
            return None;
        }
        let state = inner.state.take()?;
        if let Some((index, node)) = moved {
            // Before it is ended, under the lock `enqueue` takes: a copy that finds it ended
            // also finds where it went ([`Session::moved`]).
            self.set_moved(index, node);
        }
        self.ended.store(true, Ordering::Release);
        let queue = std::mem::take(&mut inner.queue);
        inner.queued_bytes = 0;
        self.count_queue(0, queue.len());
        self.drained.notify_waiters();
        Some((state, queue))
    }

    /// Marks the session ended and returns its parked state (None if a connection holds it)
    /// and the number of messages that were still queued.
    pub fn end(&self) -> (Option<Box<SessionState>>, usize) {
        let mut inner = self.lock();
        self.ended.store(true, Ordering::Release);
        let dropped = inner.queue.len();
        self.count_queue(0, dropped);
        let mut state = inner.state.take();
        match state.as_mut() {
            Some(s) => s.orphans = inner.queue.drain(..).filter(|d| d.shared).collect(),
            None => inner.queue.clear(),
        }
        inner.queued_bytes = 0;
        self.drained.notify_waiters();
        (state, dropped)
    }

    /// Records how a connection came in (at CONNECT).
    pub fn set_client(&self, info: ClientInfo) {
        self.lock().client = Some(Arc::new(info));
    }

    /// Records the subscriptions a connection holds (at attach).
    pub fn set_subscriptions<'a>(
        &self,
        subs: impl IntoIterator<Item = (&'a str, crate::codec::SubscriptionOptions)>,
    ) {
        let subs = subs.into_iter().map(|(f, o)| (Box::from(f), o)).collect();
        self.lock().subs = subs;
    }

    /// Records a subscription the connection made (or replaced).
    pub fn show_subscribed(&self, filter: &str, options: crate::codec::SubscriptionOptions) {
        self.lock().subs.insert(filter.into(), options);
    }

    /// Records a subscription the connection ended.
    pub fn show_unsubscribed(&self, filter: &str) {
        self.lock().subs.remove(filter);
    }

    /// Records how many messages the connection has in flight.
    pub fn set_inflight(&self, n: usize, bytes: usize) {
        self.inflight
            .store(n.min(u32::MAX as usize) as u32, Ordering::Relaxed);
        self.inflight_bytes.store(bytes, Ordering::Relaxed);
    }

    /// A snapshot for the admin API and the metrics.
    pub fn view(&self, detail: Detail) -> SessionView {
        let inner = self.lock();
        let with_subs = detail == Detail::Subscriptions;
        let (subscription_count, subscriptions, inflight, inflight_bytes) = match &inner.state {
            // Parked: the state itself.
            Some(st) => (
                st.subscriptions.len(),
                with_subs
                    .then(|| sub_views(st.subscriptions.iter().map(|(f, s)| (&**f, s.options)))),
                st.inflight.len(),
                st.inflight_bytes,
            ),
            None => (
                inner.subs.len(),
                with_subs.then(|| sub_views(inner.subs.iter().map(|(f, o)| (&**f, *o)))),
                self.inflight.load(Ordering::Relaxed) as usize,
                self.inflight_bytes.load(Ordering::Relaxed),
            ),
        };
        SessionView {
            client_id: self.client_id.clone(),
            connected: self.is_connected(),
            persistent: self.is_persistent(),
            expiry_secs: inner.expiry_secs,
            client: inner.client.clone(),
            queued_messages: inner.queue.len(),
            queued_bytes: inner.queued_bytes,
            inflight_messages: inflight,
            inflight_bytes,
            subscription_count,
            subscriptions,
        }
    }

    /// Whether the session has ended (no copy can be queued for it any more). Lock-free:
    /// set under the session's lock, so a copy queued after this reads true finds it ended.
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueOverflow;

    fn limits() -> QueueLimits {
        QueueLimits {
            max_messages: 100,
            max_bytes: 0,
            overflow: QueueOverflow::DropNewest,
            qos0_offline: false,
            congested_at: 0,
        }
    }

    #[test]
    fn a_copy_that_finds_a_moved_session_ended_gets_it_back_with_where_it_went() {
        let s = Session::new_for_test("c");
        assert!(matches!(
            s.enqueue(Delivery::for_test(4), &limits(), None),
            Enqueued::Queued { .. }
        ));
        let (_, queue) = s.take_all(Some((42, 3))).expect("parked, not ended");
        assert_eq!(queue.len(), 1, "what was queued goes with the hand-over");
        // A publish that matched the session before it was taken and queues after.
        match s.enqueue(Delivery::for_test(4), &limits(), None) {
            Enqueued::Gone(d) => assert_eq!(d.msg.payload.len(), 4),
            other => panic!("expected the delivery back, got {other:?}"),
        }
        assert_eq!(s.moved(), Some((42, 3)), "seen as soon as it has ended");
        assert!(s.take_all(None).is_none(), "taken once");
    }

    #[test]
    fn a_session_taken_without_a_move_is_not_marked_moved() {
        let s = Session::new_for_test("c");
        assert!(s.take_all(None).is_some());
        assert_eq!(s.moved(), None);
        assert!(matches!(
            s.enqueue(Delivery::for_test(1), &limits(), None),
            Enqueued::Gone(_)
        ));
    }
}
