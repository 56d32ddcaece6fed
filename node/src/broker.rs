//! The node's shared broker state and the publish path.
//!
//! ```text
//!  connection task                    Broker::publish
//!  PUBLISH ──decode──> Message ──Arc──>  retained store (if retain)
//!                                        trie.collect(topic) -> matches (reused Vec)
//!                                        drop No Local, merge overlaps per session
//!                                        Session::enqueue ──notify──> subscriber's task
//!                                                                      drains, encodes, writes
//! ```
//! Locks are sync and never held across `.await`: the trie and retained store are
//! `RwLock`s, each session queue a `Mutex` held for a push or a drain.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use petrel_storage::{keys, Cf, Store, Ticket, Txn};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::AuthGate;
use crate::codec::{LastWill, QoS, SubscriptionOptions};
use crate::config::{Config, SharedStrategy};
use crate::control::{BoxFuture, ControlPlane, DataPlane, Forwarded, Window};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::persist::value::{self, Clock};
use crate::router::{
    AclStamp, Match, ParsedFilter, RetainedLimits, RouteTable, ShareKey, SharedRetained,
    Subscriber, SubscriptionTrie, Target,
};
use crate::session::{
    Delivery, DropReason, Enqueued, QueueLimits, Session, SessionId, SessionRegistry, SessionState,
    Stage, SubIds,
};

/// Copies whose session ended between the match and the queue ([`Broker::enqueue_in`]).
#[derive(Default)]
struct Ended {
    /// Routed before the claim that moved the session to another node: (message, that
    /// node, client id).
    moved: Vec<(Arc<Message>, u64, Arc<str>)>,
    /// Picked by a share group: another member takes them.
    shared: Vec<(Arc<Message>, Arc<ShareKey>)>,
}

/// Where a share group's copy may go when the member picked here has ended, or no member
/// of the group is left here ([`Broker::share_elsewhere`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Onward {
    /// Published (or orphaned) here: to a member on any node.
    Any,
    /// Forwarded here: to a member here, else once more to another node, marked
    /// `share_redirected` so that it goes no further.
    Once,
    /// Forwarded here already redirected: to a member here only (two nodes whose members
    /// ended at once could otherwise pass it back and forth until their routes go).
    Here,
}

/// The cluster as the broker reaches it (in the node: the cluster's control and data planes
/// and what its state machine writes; in unit tests, a process alone).
pub struct Planes {
    /// Claims of client ids and route changes.
    pub control: Arc<dyn ControlPlane>,
    /// The retained messages (the state machine applies the replicated ones).
    pub retained: Arc<SharedRetained>,
    /// The route table (the state machine writes it).
    pub routes: Arc<RouteTable>,
    /// Publishes to other nodes.
    pub forward: Arc<dyn DataPlane>,
}

impl Planes {
    /// A process alone: no cluster, epochs from a counter, nothing forwarded.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn alone() -> Planes {
        let retained = Arc::new(SharedRetained::default());
        Planes {
            control: Arc::new(crate::control::LocalControl::new(retained.clone())),
            retained,
            routes: Arc::new(RouteTable::new(0)),
            forward: Arc::new(crate::control::NoForwarding::default()),
        }
    }
}

/// What [`Broker::publish`] did with a message.
pub struct Routed {
    /// Sessions that got a copy.
    pub delivered: usize,
    /// Every stored copy is durable once the store has passed this ticket.
    pub ticket: Option<Ticket>,
    /// A connected session whose queue is long, or a peer whose forwarding window is full:
    /// the publisher should wait for it.
    pub congested: Option<Pause>,
    /// The message was refused, with nothing routed, retained or written: a stored copy would
    /// pass the MQTT size limit (see `value::message_fits`).
    pub unstorable: bool,
    /// The control plane's mark the publisher's acknowledgement waits for (a retained
    /// message is on every node once it settles); 0: none.
    pub mark: u64,
    /// The data plane's mark the publisher's acknowledgement waits for (every node the
    /// message was forwarded to has it); 0: none.
    pub forwarded: u64,
}

/// What a publisher's connection stops reading for (until it has room, or
/// `mqtt.backpressure_max_wait_ms` passes).
#[derive(Clone)]
pub enum Pause {
    /// A local subscriber whose queue is long.
    Subscriber(Arc<Session>),
    /// A peer node whose forwarding window is full.
    Peer(Arc<dyn Window>),
}

impl Pause {
    /// Resolves once there is room again (a subscriber's queue below `drained_below`, a
    /// peer's window half free), or at `until`.
    pub fn wait(self, drained_below: usize, until: Instant) -> BoxFuture<'static, ()> {
        match self {
            Pause::Subscriber(s) => Box::pin(async move {
                s.wait_drained(drained_below, until).await;
            }),
            Pause::Peer(w) => w.wait_room(until),
        }
    }
}

/// The later of two store tickets: points in one commit order, the later covers both.
fn later(a: Option<Ticket>, b: Option<Ticket>) -> Option<Ticket> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Routed {
    /// Makes the acknowledgement wait for `ticket` too.
    fn merge_ticket(&mut self, ticket: Option<Ticket>) {
        self.ticket = later(self.ticket, ticket);
    }

    fn refused() -> Routed {
        Routed {
            delivered: 0,
            ticket: None,
            congested: None,
            unstorable: true,
            mark: 0,
            forwarded: 0,
        }
    }
}

/// One planned delivery of a publish: the index of its first match, the delivery, and its
/// encoded value if a persistent session stores it.
type Planned = (usize, Delivery, Option<bytes::Bytes>);

thread_local! {
    /// The deliveries of the publish a worker thread is routing (reused, empty between).
    static PLAN: Cell<Vec<Planned>> = const { Cell::new(Vec::new()) };
    /// The other nodes the publish a worker thread is routing goes to (reused, empty
    /// between).
    static TARGETS: Cell<Vec<Target>> = const { Cell::new(Vec::new()) };
}

pub struct Broker {
    pub cfg: Config,
    pub metrics: Metrics,
    pub sessions: SessionRegistry,
    pub limits: QueueLimits,
    pub started: Instant,
    pub store: Store,
    pub auth: AuthGate,
    /// Claims of client ids and route changes (the cluster, in the node).
    pub control: Arc<dyn ControlPlane>,
    /// Sessions surrendered to other nodes and hand-overs taken here.
    pub takeovers: crate::takeover::Takeovers,
    /// Publishes to other nodes (the cluster's data plane, in the node).
    pub forward: Arc<dyn DataPlane>,
    /// The node drains (an operator's drain, or SIGTERM): it is not ready, and new CONNECTs
    /// are sent to another server.
    pub draining: std::sync::atomic::AtomicBool,
    /// The replicated route table (the cluster's state machine writes it).
    pub routes: Arc<RouteTable>,
    router: RwLock<SubscriptionTrie>,
    /// Shared with the cluster's state machine, which applies the replicated retained
    /// messages to it.
    retained: Arc<SharedRetained>,
    timers: Timers,
    pending_wills: Mutex<HashMap<Arc<str>, PendingWill>>,
    next_conn_id: AtomicU64,
    /// This broker, for the tasks it starts (a will waits for the cluster's word).
    this: std::sync::Weak<Broker>,
}

struct PendingWill {
    session: SessionId,
    of: WillOf,
    msg: Message,
}

/// Whose will is due, which says how the cluster is asked before it is published.
#[derive(Clone, Copy, Debug)]
pub enum WillOf {
    /// The connection claimed at this epoch ended without a normal DISCONNECT: published
    /// once the cluster confirms it is the first to (`WillFired`).
    Connection(crate::session::Epoch),
    /// A connection taken over by a newer one: the ownership record is the new
    /// connection's now, and nobody else publishes this will; published as is.
    TakenOver,
    /// A client that was connected (at this epoch, if the record says) when this node died
    /// (found armed at start): published only if no other node did meanwhile.
    Crash(Option<crate::session::Epoch>),
}

#[derive(Clone, Debug)]
enum TimerEvent {
    Will(Arc<str>, SessionId),
    SessionExpiry(Arc<str>, SessionId),
}

#[derive(Default)]
struct Timers {
    queue: Mutex<BTreeMap<(Instant, u64), TimerEvent>>,
    seq: AtomicU64,
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    pub fn new(
        cfg: Config,
        metrics: Metrics,
        auth: AuthGate,
        store: Store,
        planes: Planes,
    ) -> Arc<Broker> {
        let Planes {
            control,
            retained,
            routes,
            forward,
        } = planes;
        let limits = QueueLimits {
            max_messages: cfg.mqtt.max_queued_messages,
            max_bytes: cfg.mqtt.max_queued_bytes,
            overflow: cfg.mqtt.queue_overflow,
            qos0_offline: cfg.mqtt.queue_qos0_offline,
            congested_at: if cfg.mqtt.backpressure_max_wait_ms > 0 {
                QueueLimits::congestion_threshold(cfg.mqtt.max_queued_messages)
            } else {
                0
            },
        };
        Arc::new_cyclic(|this| Broker {
            this: this.clone(),
            cfg,
            metrics,
            sessions: SessionRegistry::default(),
            limits,
            started: Instant::now(),
            store,
            auth,
            control,
            takeovers: Default::default(),
            forward,
            draining: Default::default(),
            routes,
            router: RwLock::new(SubscriptionTrie::default()),
            retained,
            timers: Timers::default(),
            pending_wills: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
        })
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Routes a message to every matching local session and stores it if retained.
    /// `scratch` is the caller's reusable match buffer. `inbound` names an inbound QoS 2
    /// packet id to record in the same atomic write as the stored copies (exactly once across
    /// a crash).
    ///
    /// Two passes: the first builds one delivery per session and encodes the copies that are
    /// stored, holding no lock; the second takes the store's batch once, appends every write
    /// of this publish atomically and queues the deliveries. The batch lock, shared by every
    /// connection, is held for the appends only.
    pub fn publish(
        &self,
        msg: Arc<Message>,
        scratch: &mut Vec<Match>,
        inbound: Option<(&str, u16)>,
    ) -> Routed {
        self.publish_retaining(msg, scratch, inbound, true)
    }

    /// [`Broker::publish`]; `retain`: whether a retained message is stored (false: the
    /// caller did that already).
    fn publish_retaining(
        &self,
        msg: Arc<Message>,
        scratch: &mut Vec<Match>,
        inbound: Option<(&str, u16)>,
        retain: bool,
    ) -> Routed {
        scratch.clear();
        let mut targets = TARGETS.take();
        // Read before `has_remote`: the table held at least the routes up to it.
        let mut routed_at = self.routes.index();
        // The node's own `$SYS` topics stay here.
        let held;
        if self.routes.has_remote() && !msg.topic.starts_with("$SYS/") {
            routed_at = self.routes.collect(&msg.topic, &mut targets);
            // A session moving here by a claim up to that index, not in the router yet: it
            // gets the message when it is (the node it left drops the copy routed at or past
            // its claim). Before the router is read.
            held = self.routes.hold_for_arrivals(&msg, routed_at);
            let router = self.router.read().unwrap_or_else(|e| e.into_inner());
            match targets.iter().position(|t| t.node == self.routes.me()) {
                // The share-group strategy chose, among the nodes, the groups this one
                // serves (any strategy but local first).
                Some(at) => {
                    let mine = targets.remove(at);
                    let groups = mine.shared.iter().map(|(g, f)| (&**g, &**f));
                    router.collect_forwarded(&msg.topic, true, groups, scratch);
                }
                None if self.routes.strategy() != SharedStrategy::LocalFirst => {
                    router.collect_forwarded(&msg.topic, true, [], scratch);
                }
                None => router.collect(&msg.topic, scratch),
            }
        } else {
            // Nothing is forwarded: a session arriving by any claim applied so far is held
            // for.
            held = self
                .routes
                .hold_for_arrivals(&msg, self.routes.index().max(routed_at));
            self.router
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .collect(&msg.topic, scratch);
        }
        scratch.retain(|m| !(m.no_local && m.session.id() == msg.origin));
        if !held.is_empty() {
            // A session that got into the router after the message was held for it gets the
            // held copy when its arrival completes, not a second one now.
            scratch.retain(|m| !held.contains(m.session.client_id()));
        }
        msg.routed_at.set(routed_at);
        let mut moved = Ended::default();
        self.pass_on_moved(&msg, scratch, &mut moved);
        let Some(stored) = self.local_storable(&msg, scratch) else {
            targets.clear();
            TARGETS.set(targets);
            return Routed::refused();
        };
        let mark = match msg.retain && retain {
            true => self.retain(&msg),
            false => 0,
        };
        let (forwarded, nodes) = match targets.is_empty() {
            true => (Forwarded::default(), 0),
            false => (self.forward.forward(&msg, &targets), targets.len()),
        };
        targets.clear();
        TARGETS.set(targets);
        let mut routed = self.route_local(msg, scratch, stored, inbound, Onward::Any);
        // Handed on: the publisher is not told that no one took them.
        routed.delivered += moved.moved.len() + moved.shared.len();
        routed.merge_ticket(self.pass_on_ended(moved, scratch, Onward::Any));
        routed.mark = mark;
        routed.forwarded = forwarded.mark;
        if routed.congested.is_none() {
            routed.congested = forwarded.full.map(Pause::Peer);
        }
        routed.delivered += nodes;
        routed.merge_ticket(forwarded.ticket);
        routed
    }

    /// Delivers a message another node forwarded to this node's matching sessions: its
    /// ordinary subscriptions if `plain`, and one member of each of the `shared` (group,
    /// filter) share groups. Neither retained (the control plane did that) nor forwarded
    /// again.
    ///
    /// `msg.routed_at`: the log index the sending node routed it at. A session that moved
    /// between nodes by a claim at index I takes the copies routed before I on the node it
    /// left (a stored session there that the claim made stale keeps them, one already
    /// surrendered passes them on: [`Broker::pass_on_moved`]) and those routed at I or
    /// later on the node it moved to (the claim brought its routes there). Copies of a
    /// sender of an earlier version (`routed_at` 0) are cut by `published_at_ms`, when the
    /// sending node received it, against the claim's time.
    ///
    /// `for_client`: not empty for a copy another node passed on for the session of that
    /// client, which moved here from it; delivered to that session only.
    ///
    /// A share group with no member left here (its last one went, and the sender routed
    /// before its route's removal reached it) passes its copy on to a node that has one,
    /// once: `redirected` says the copy has been passed on so already, and then it is
    /// dropped (counted in `petrel_shared_redelivered_total`).
    #[allow(clippy::too_many_arguments)]
    pub fn deliver_forwarded<'a>(
        &self,
        msg: Arc<Message>,
        plain: bool,
        shared: impl IntoIterator<Item = (&'a str, &'a str)>,
        published_at_ms: u64,
        for_client: &str,
        redirected: bool,
        scratch: &mut Vec<Match>,
    ) -> Routed {
        scratch.clear();
        // Groups with no member here (rare: no allocation otherwise).
        let mut absent: Vec<(&str, &str)> = Vec::new();
        {
            let router = self.router.read().unwrap_or_else(|e| e.into_inner());
            router.collect_forwarded(&msg.topic, plain, [], scratch);
            for (group, filter) in shared {
                let before = scratch.len();
                router.collect_forwarded(&msg.topic, false, [(group, filter)], scratch);
                if scratch.len() == before {
                    absent.push((group, filter));
                }
            }
        }
        let onward = match redirected {
            true => Onward::Here,
            false => Onward::Once,
        };
        let routed_at = msg.routed_at.get();
        match for_client.is_empty() {
            false => scratch.retain(|m| &**m.session.client_id() == for_client),
            // A session that came here by a claim at a later index: the node it left has
            // this copy. (A share group's member is chosen among the members here: any.)
            true if routed_at != 0 => {
                scratch.retain(|m| m.shared || m.session.arrived_at() <= routed_at)
            }
            true => {}
        }
        let mut moved = Ended::default();
        self.pass_on_moved(&msg, scratch, &mut moved);
        let again = (!absent.is_empty()).then(|| msg.clone());
        let mut routed = match self.local_storable_at(&msg, scratch, published_at_ms) {
            Some(stored) => self.route_local(msg, scratch, stored, None, onward),
            None => Routed::refused(),
        };
        if !routed.unstorable {
            routed.delivered += moved.moved.len() + moved.shared.len();
            routed.merge_ticket(self.pass_on_ended(moved, scratch, onward));
        }
        if let (Some(msg), false) = (again, routed.unstorable) {
            for (group, filter) in absent {
                let t = self.share_elsewhere(msg.clone(), group, filter, scratch, onward);
                routed.merge_ticket(t);
            }
        }
        routed
    }

    /// Delivers messages published here while `client_id`'s session moved here (held by
    /// the route table until it was in the router), to that session only.
    pub fn deliver_held(&self, client_id: &str, held: Vec<Arc<Message>>) {
        let mut scratch = Vec::new();
        for msg in held {
            self.deliver_forwarded(msg, true, [], 0, client_id, false, &mut scratch);
        }
    }

    /// Passes copies whose session ended under them on (see [`Broker::enqueue_in`]): to the
    /// nodes their sessions moved to, and to other members of the share groups that picked
    /// them (on another node as `onward` allows). Returns the store write they wait for.
    /// `scratch`: an empty match buffer.
    fn pass_on_ended(
        &self,
        ended: Ended,
        scratch: &mut Vec<Match>,
        onward: Onward,
    ) -> Option<Ticket> {
        let mut ticket = None;
        for (msg, node, client_id) in ended.moved {
            tracing::debug!(%client_id, node, "a copy for a session that just moved passed on");
            ticket = later(ticket, self.forward.push_on(&msg, node, &client_id).ticket);
        }
        for (msg, share) in ended.shared {
            tracing::debug!(group = %share.group, "a shared copy for a session that just ended goes to another member");
            ticket = later(
                ticket,
                self.share_elsewhere(msg, &share.group, &share.filter, scratch, onward),
            );
        }
        ticket
    }

    /// Gives `msg` to one member of share group `group` on `filter` that has not ended:
    /// on this node if it has one, else (as `onward` allows) on a node that has (counted in
    /// `petrel_shared_redelivered_total`). Returns the store write the copy waits for
    /// (here, or in the outbox for that node: the sender's acknowledgement waits for it).
    fn share_elsewhere(
        &self,
        msg: Arc<Message>,
        group: &str,
        filter: &str,
        scratch: &mut Vec<Match>,
        onward: Onward,
    ) -> Option<Ticket> {
        let count = |outcome: &str| {
            self.metrics
                .shared_redelivered
                .with_label_values(&[outcome])
                .inc()
        };
        // The pick passes over members that ended but are still in the router (their
        // subscriptions go a moment later); it picks one of those only if no other is left.
        self.router
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .collect_forwarded(&msg.topic, false, [(group, filter)], scratch);
        scratch.retain(|m| !m.session.is_ended());
        let stored = match scratch.is_empty() {
            true => None,
            false => self.local_storable(&msg, scratch),
        };
        if let (Some(stored), false) = (stored, scratch.is_empty()) {
            let routed = self.route_local(msg, scratch, stored, None, onward);
            count("local");
            scratch.clear();
            return routed.ticket;
        }
        scratch.clear();
        match self
            .routes
            .shared_node(group, filter)
            .filter(|_| onward != Onward::Here)
        {
            Some(node) => {
                let redirected = onward == Onward::Once;
                match self
                    .forward
                    .pass_shared(&msg, node, group, filter, redirected)
                {
                    Some(f) => {
                        count("forwarded");
                        f.ticket
                    }
                    None => {
                        count("dropped");
                        None
                    }
                }
            }
            None => {
                count("dropped");
                None
            }
        }
    }

    /// Takes the sessions surrendered to another node out of `scratch`. A copy routed to
    /// one of them before the claim that took it goes into `ended`, to be passed on to the
    /// new owner (which did not get it) once `scratch` is routed
    /// ([`Broker::pass_on_ended`]; nothing is passed on for a publish that is refused);
    /// the others' copies are dropped (the owner got its own).
    ///
    /// A share group's copy that picked such a session (every member here has ended) is the
    /// group's only copy, whatever the claim's index: it goes into `ended` too, for another
    /// member of the group to take.
    fn pass_on_moved(&self, msg: &Arc<Message>, scratch: &mut Vec<Match>, ended: &mut Ended) {
        if !scratch.iter().any(|m| m.session.moved().is_some()) {
            return;
        }
        let routed_at = msg.routed_at.get();
        let mut passed: Vec<SessionId> = Vec::new();
        scratch.retain(|m| {
            let Some((claim, node)) = m.session.moved() else {
                return true;
            };
            if let Some(share) = &m.share {
                ended.shared.push((msg.clone(), share.clone()));
                return false;
            }
            let id = m.session.id();
            if routed_at != 0 && routed_at < claim && !passed.contains(&id) {
                passed.push(id);
                ended
                    .moved
                    .push((msg.clone(), node, m.session.client_id().clone()));
            }
            false
        });
    }

    /// Drops stale sessions from the local matches, sorts them and checks that every copy
    /// they store can be encoded; if not the publish is refused (counted) before anything is
    /// written or routed: `None`. Else whether a persistent session stores a copy.
    fn local_storable(&self, msg: &Message, scratch: &mut Vec<Match>) -> Option<bool> {
        self.local_storable_at(msg, scratch, 0)
    }

    /// [`Broker::local_storable`] for a message published at `published_at_ms` (0: now,
    /// here).
    fn local_storable_at(
        &self,
        msg: &Message,
        scratch: &mut Vec<Match>,
        published_at_ms: u64,
    ) -> Option<bool> {
        // A stored session another node took over (this node is away or just back, and has
        // not surrendered it yet) gets nothing new: the owner's node delivers its own copy.
        // Only a forwarded copy published before that claim, kept for this node while it
        // was away, is still the stale session's (see `deliver_forwarded`).
        let routed_at = msg.routed_at.get();
        scratch.retain(|m| {
            m.session.is_connected()
                || !m.session.is_persistent()
                || self
                    .control
                    .claimed_elsewhere(m.session.client_id(), m.session.epoch())
                    .is_none_or(|c| c.before(routed_at, published_at_ms))
        });
        if scratch.len() > 1 {
            scratch.sort_unstable_by_key(|m| (m.session.id(), m.shared));
        }
        let stored = msg.qos != QoS::AtMostOnce
            && scratch
                .iter()
                .any(|m| m.qos != QoS::AtMostOnce && m.session.is_persistent());
        if (stored || msg.retain) && !self.storable(msg, scratch) {
            // Refused before the transaction opens: nothing half-written, nothing half-routed.
            scratch.clear();
            self.count_unstorable();
            tracing::debug!(topic = %msg.topic, "message too large to store; refused");
            return None;
        }
        Some(stored)
    }

    /// Queues `msg` for the matched local sessions (`scratch`, sorted by
    /// [`Broker::local_storable`], which said whether a copy is `stored`) and stores the
    /// persistent sessions' copies. `onward`: where a share group's copy whose member ended
    /// under it may go (see [`Broker::share_elsewhere`]).
    fn route_local(
        &self,
        msg: Arc<Message>,
        scratch: &mut Vec<Match>,
        stored: bool,
        inbound: Option<(&str, u16)>,
        onward: Onward,
    ) -> Routed {
        if !stored && inbound.is_none() {
            // Nothing of this publish is stored (the common case of clean sessions or QoS
            // 0): one pass, each delivery queued as it is made.
            let mut delivered = 0;
            let mut congested = None;
            let mut ended = Ended::default();
            self.plan_deliveries(&msg, scratch, |at, d, _| {
                let session = &scratch[at].session;
                let share = scratch[at].share.as_ref();
                let (queued, full) = self.enqueue_in(session, share, d, None, &mut ended);
                delivered += queued as usize;
                if full && congested.is_none() && session.id() != msg.origin {
                    congested = Some(Pause::Subscriber(session.clone()));
                }
            });
            scratch.clear();
            return Routed {
                delivered,
                ticket: self.pass_on_ended(ended, scratch, onward),
                congested,
                unstorable: false,
                mark: 0,
                forwarded: 0,
            };
        }
        let mut plan = PLAN.take();
        let any_stored =
            self.plan_deliveries(&msg, scratch, |at, d, value| plan.push((at, d, value)));
        // One atomic write for everything this publish stores; nothing is taken when the
        // message goes only to clean sessions.
        let mut txn = (any_stored || inbound.is_some()).then(|| self.store.begin());
        if let (Some(txn), Some((client_id, packet_id))) = (txn.as_mut(), inbound) {
            txn.writer()
                .put(Cf::Inbound, &keys::inbound_key(client_id, packet_id), &[]);
        }
        let mut delivered = 0;
        let mut congested = None;
        let mut ended = Ended::default();
        for (at, d, value) in plan.drain(..) {
            let session = &scratch[at].session;
            let share = scratch[at].share.as_ref();
            let stored = match (txn.as_mut(), value) {
                (Some(txn), Some(v)) => Some((txn, v)),
                _ => None,
            };
            let (queued, full) = self.enqueue_in(session, share, d, stored, &mut ended);
            delivered += queued as usize;
            // The publisher's own session never makes it wait (it could not drain).
            if full && congested.is_none() && session.id() != msg.origin {
                congested = Some(Pause::Subscriber(session.clone()));
            }
        }
        PLAN.set(plan);
        scratch.clear();
        // After the commit: the outbox's store write would wait for the open transaction.
        let ticket = txn.map(Txn::commit);
        Routed {
            delivered,
            ticket: later(ticket, self.pass_on_ended(ended, scratch, onward)),
            congested,
            unstorable: false,
            mark: 0,
            forwarded: 0,
        }
    }

    /// The first pass of [`Broker::publish`]: one delivery per matched session (overlapping
    /// subscriptions of one session merged), handed to `plan` with the index of its first
    /// match and the encoded value if a persistent session stores it. Returns whether any
    /// is stored.
    fn plan_deliveries(
        &self,
        msg: &Arc<Message>,
        scratch: &[Match],
        mut plan: impl FnMut(usize, Delivery, Option<bytes::Bytes>),
    ) -> bool {
        let acl_now = self.auth.acl_generation();
        // Read the wall clock only if something is stored.
        let mut clock = None;
        // A copy that owns its bytes, made once, for the sessions that keep it past delivery.
        let mut detached: Option<Arc<Message>> = None;
        let mut any_stored = false;
        let mut i = 0;
        while i < scratch.len() {
            let first = &scratch[i];
            let mut qos = first.qos;
            let mut rap = first.retain_as_published;
            let mut acl_check = AclStamp::must_check(first.acl_filtered, first.acl_gen, acl_now);
            let mut ids = SubIds::None;
            ids.extend(first.subscription_id);
            let mut j = i + 1;
            // Overlapping subscriptions of one session: one copy, highest QoS, every id.
            while !first.shared
                && j < scratch.len()
                && !scratch[j].shared
                && scratch[j].session.id() == first.session.id()
            {
                qos = qos.max(scratch[j].qos);
                rap |= scratch[j].retain_as_published;
                acl_check &=
                    AclStamp::must_check(scratch[j].acl_filtered, scratch[j].acl_gen, acl_now);
                ids.extend(scratch[j].subscription_id);
                j += 1;
            }
            let qos = qos.min(msg.qos);
            let session = &first.session;
            // Queued for an offline session: kept until it comes back, so it must not pin
            // the publisher's read buffer.
            let kept =
                (qos != QoS::AtMostOnce || self.limits.qos0_offline) && !session.is_connected();
            let msg = match kept {
                true => detached.get_or_insert_with(|| Message::kept(msg)).clone(),
                false => msg.clone(),
            };
            let retain = msg.retain && rap;
            let value = match (qos != QoS::AtMostOnce && session.is_persistent())
                .then(|| {
                    let clock = clock.get_or_insert_with(Clock::now);
                    value::queued(&msg, qos, retain, ids.as_slice(), first.shared, clock)
                })
                .transpose()
            {
                Ok(value) => value,
                Err(e) => {
                    // This copy alone (the message plus this session's subscription
                    // identifiers) is too large to store: dropped, nothing of it written.
                    tracing::debug!(client_id = %session.client_id(), error = %e, "message too large to store; dropped");
                    self.count_unstorable();
                    i = j;
                    continue;
                }
            };
            any_stored |= value.is_some();
            let d = Delivery {
                msg,
                qos,
                retain,
                subscription_ids: ids,
                seq: 0,
                acl_check,
                acl_gen: acl_now as u32,
                shared: first.shared,
            };
            plan(i, d, value);
            i = j;
        }
        any_stored
    }

    /// Whether every copy of `msg` this publish would store can be encoded: the message at
    /// its own QoS with every subscription identifier of the persistent matches (more than
    /// any one session's copy carries).
    fn storable(&self, msg: &Message, matches: &[Match]) -> bool {
        let id_bytes = matches
            .iter()
            .filter(|m| m.session.is_persistent())
            .filter_map(|m| m.subscription_id)
            .map(value::sub_id_len)
            .sum();
        value::message_fits(msg, id_bytes)
    }

    /// Which retained-message cap retaining `payload` under `topic` would break now, counted.
    pub fn retained_over_limit_of(&self, topic: &str, payload: &[u8]) -> Option<&'static str> {
        let limit = self
            .retained
            .read()
            .over_limit(topic, payload.len(), self.retained_limits());
        if let Some(limit) = limit {
            self.metrics.limit_hit(limit);
        }
        limit
    }

    fn retained_limits(&self) -> RetainedLimits {
        RetainedLimits {
            max_messages: self.cfg.limits.max_retained_messages,
            max_bytes: self.cfg.limits.max_retained_bytes,
        }
    }

    /// Retains `msg` (or clears its topic), unless a cap forbids it: then the message is
    /// only delivered. The node's own `$SYS` topics are set here; every other topic through
    /// the control plane, which applies the change on every node (the publisher's
    /// acknowledgement waits for the returned mark; 0: nothing to wait for).
    fn retain(&self, msg: &Arc<Message>) -> u64 {
        // Kept past delivery: its own allocation, not a slice of a connection's read buffer.
        let kept = || match msg.payload.is_empty() {
            true => msg.clone(),
            false => Message::kept(msg),
        };
        if msg.topic.starts_with("$SYS/") {
            self.retained.update(|r| r.set(kept()));
            return 0;
        }
        if msg.payload.is_empty() {
            return self.control.retain(&msg.topic, None);
        }
        if let Some(limit) = self.retained_over_limit_of(&msg.topic, &msg.payload) {
            // A race with another publisher past the check in `on_publish`, or a will.
            tracing::debug!(topic = %msg.topic, limit, "retained cap reached; delivered only");
            return 0;
        }
        // `storable` passed: the record encodes.
        match value::message(msg, msg.qos, true, &[], &Clock::now()) {
            Ok(v) => self.control.retain(&msg.topic, Some(v)),
            Err(_) => 0,
        }
    }

    /// Queues one delivery, counting what the overflow policy drops. `stored`: the open
    /// transaction and the encoded delivery, for a copy a persistent session stores. Returns
    /// whether it was queued and whether the session is congested (its publishers should
    /// wait).
    ///
    /// A session that ended between the match and this call takes nothing; its copy goes
    /// into `ended` ([`Broker::pass_on_ended`], once no transaction is open): one that a
    /// share group (`share`) picked goes to another member of the group; one for a session
    /// surrendered to another node, routed before the claim that took it, to its new owner.
    fn enqueue_in(
        &self,
        session: &Session,
        share: Option<&Arc<ShareKey>>,
        d: Delivery,
        stored: Option<(&mut Txn<'_>, bytes::Bytes)>,
        ended: &mut Ended,
    ) -> (bool, bool) {
        match session.enqueue(d, &self.limits, stored) {
            Enqueued::Gone(d) => {
                let routed_at = d.msg.routed_at.get();
                if let (true, Some(share)) = (d.shared, share) {
                    ended.shared.push((d.msg, share.clone()));
                    return (true, false);
                }
                match session.moved() {
                    Some((claim, node)) if !d.shared && routed_at != 0 && routed_at < claim => {
                        ended.moved.push((d.msg, node, session.client_id().clone()));
                        (true, false)
                    }
                    _ => {
                        self.count_overflow(DropReason::SessionGone, 1);
                        (false, false)
                    }
                }
            }
            Enqueued::Queued {
                dropped,
                why,
                congested,
            } => {
                if dropped > 0 {
                    self.count_overflow(why, dropped as u64);
                }
                (true, congested)
            }
            Enqueued::Dropped(why) => {
                self.count_overflow(why, 1);
                (false, false)
            }
        }
    }

    /// Counts a message (or one copy of it) refused because its stored encoding would pass
    /// the MQTT size limit.
    fn count_unstorable(&self) {
        self.metrics
            .queue_dropped
            .with_label_values(&["too_large"])
            .inc();
    }

    /// Counts messages a session queue's overflow policy dropped.
    fn count_overflow(&self, why: DropReason, n: u64) {
        if let Some(limit) = why.limit_label() {
            self.metrics
                .queue_dropped
                .with_label_values(&["queue_full"])
                .inc_by(n);
            self.metrics
                .limit_hits
                .with_label_values(&[limit])
                .inc_by(n);
        }
    }

    /// Adds or replaces a subscription; returns whether it existed.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        f: &ParsedFilter<'_>,
        options: SubscriptionOptions,
        id: Option<u32>,
        acl: AclStamp,
    ) -> bool {
        let sub = Subscriber {
            session: session.clone(),
            options,
            subscription_id: id,
            acl_filtered: acl.filtered,
            acl_gen: acl.generation,
        };
        let mut router = self.router.write().unwrap_or_else(|e| e.into_inner());
        let (existed, first) = router.subscribe(f.filter, f.group, sub);
        if first {
            // Under the lock: route changes reach the cluster in the order they happen.
            self.control.route_added(f.group, f.filter);
        }
        drop(router);
        if !existed {
            self.metrics.subscriptions.inc();
        }
        existed
    }

    pub fn unsubscribe(&self, session: SessionId, f: &ParsedFilter<'_>) -> bool {
        let mut router = self.router.write().unwrap_or_else(|e| e.into_inner());
        let (found, last) = router.unsubscribe(f.filter, f.group, session);
        if last {
            match self.routes.removal_must_wait(f.group, f.filter) {
                // A session on its way here may need the route: reconciled later.
                true => self.control.recheck_routes(),
                false => self.control.route_removed(f.group, f.filter),
            }
        }
        drop(router);
        if found {
            self.metrics.subscriptions.dec();
        }
        found
    }

    /// Whether this node has a subscriber to `f` already (its route exists).
    pub fn has_route(&self, f: &ParsedFilter<'_>) -> bool {
        self.router
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .has_route(f.filter, f.group)
    }

    /// Calls `f` with this node's routes (every filter with a local subscriber, with its
    /// share group), the subscription trie held so that no route change happens meanwhile.
    pub fn with_routes<R>(&self, f: impl FnOnce(&[(Option<String>, String)]) -> R) -> R {
        let router = self.router.read().unwrap_or_else(|e| e.into_inner());
        let routes = router.routes();
        f(&routes)
    }

    /// Retained messages matching a (non-shared) filter, expired ones left out.
    pub fn retained_matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.retained.read().collect(filter, &mut out);
        out.retain(|m| !m.is_expired(now));
        out
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    /// Removes an ended session's subscriptions and registry entry and fires its pending will.
    /// Its stored keys go only if it still held the registry entry: a session that a claim
    /// replaced had its keys deleted by [`Broker::replace_session`], and the client id's keys
    /// may by now be the new session's.
    pub fn end_session(&self, session: &Session, state: Option<Box<SessionState>>) {
        if let Some(mut state) = state {
            let max_levels = usize::MAX;
            for filter in state.subscriptions.keys() {
                if let Ok(parsed) = crate::router::topic::parse_filter(filter, max_levels) {
                    self.unsubscribe(session.id(), &parsed);
                }
            }
            self.reroute_orphans(&mut state);
        }
        let removed = self.sessions.remove(session);
        if removed {
            self.metrics.sessions.dec();
        }
        self.fire_will(session.client_id(), session.id());
        if removed && session.is_persistent() {
            let client_id = session.client_id();
            self.store.append(|w| w.delete_client(client_id));
        }
    }

    /// MQTT 5 section 4.8.2: what a share group routed to a session that ended before its
    /// client acknowledged it (queued, or sent and not acknowledged: a QoS 2 message whose
    /// PUBREC came is the client's) goes to another member of the group: on this node if
    /// it has one, else on a node that has (the session is unsubscribed already). A
    /// persistent session that only disconnects keeps its messages (the specification lets
    /// the server wait for the client); they move on if it expires.
    fn reroute_orphans(&self, state: &mut SessionState) {
        let unacked = state
            .inflight
            .iter()
            .filter(|f| f.stage == Stage::Published && f.delivery.shared)
            .map(|f| f.delivery.msg.clone());
        let mut orphans: Vec<Arc<Message>> = unacked.collect();
        orphans.extend(state.orphans.drain(..).map(|d| d.msg));
        if orphans.is_empty() {
            return;
        }
        let groups: Vec<ParsedFilter<'_>> = state
            .subscriptions
            .keys()
            .filter_map(|raw| crate::router::topic::parse_filter(raw, usize::MAX).ok())
            .filter(|p| p.group.is_some())
            .collect();
        let now = Instant::now();
        let mut scratch = Vec::new();
        for msg in orphans {
            let Some(p) = groups
                .iter()
                .find(|p| crate::router::topic::matches(p.filter, &msg.topic))
            else {
                continue;
            };
            if msg.is_expired(now) {
                continue;
            }
            let group = p.group.unwrap_or_default();
            self.share_elsewhere(msg, group, p.filter, &mut scratch, Onward::Any);
        }
    }

    /// Ends a session that a clean-start claim replaced in the registry, and deletes what
    /// it stored before the new session writes anything.
    pub fn replace_session(&self, old: &Session) {
        if !old.is_ended() {
            let (state, _) = old.end();
            self.end_session(old, state);
        }
        if old.is_persistent() {
            let client_id = old.client_id();
            self.store.append(|w| w.delete_client(client_id));
        }
    }

    /// Stores the will of a client that just connected, so that it is published even if the
    /// node dies under the connection (recovery finds it armed). Small: the will is bounded
    /// by the packet size. The connection's end replaces it ([`Broker::schedule_will`]) or
    /// deletes it ([`Broker::disarm_will`]).
    pub fn arm_will(&self, client_id: &str, will: &LastWill, delay_secs: u32, epoch: u64) {
        let clock = Clock::now();
        let msg = Message::from_will(will, SessionId::BROKER, clock.now);
        match value::armed_will(&msg, delay_secs, epoch, &clock) {
            Ok(v) => {
                self.store
                    .append(|w| w.put(Cf::Wills, client_id.as_bytes(), &v));
            }
            // A will just under the packet-size ceiling: published if the connection ends,
            // not across a crash.
            Err(e) => tracing::debug!(%client_id, error = %e, "will too large to store"),
        }
    }

    /// Forgets the stored will of a connection that ended without publishing it.
    pub fn disarm_will(&self, client_id: &str) {
        self.store
            .append(|w| w.delete(Cf::Wills, client_id.as_bytes()));
    }

    /// Publishes a will now, or after `delay` unless the client comes back first.
    pub fn schedule_will(
        &self,
        client_id: &Arc<str>,
        session: SessionId,
        of: WillOf,
        msg: Message,
        delay: Duration,
    ) {
        if delay.is_zero() {
            self.disarm_will(client_id);
            self.release_will(client_id, of, msg);
            return;
        }
        let due = Instant::now() + delay;
        let stored = value::will(&msg, due, &Clock::now());
        let mut wills = lock(&self.pending_wills);
        wills.insert(client_id.clone(), PendingWill { session, of, msg });
        match &stored {
            Ok(v) => {
                self.store
                    .append(|w| w.put(Cf::Wills, client_id.as_bytes(), v));
            }
            // Kept in memory only: it fires unless the node restarts first.
            Err(e) => tracing::warn!(%client_id, error = %e, "delayed will too large to store"),
        }
        drop(wills);
        self.timers
            .add(due, TimerEvent::Will(client_id.clone(), session));
    }

    /// Re-arms a will recovered from the store.
    pub fn restore_will(
        &self,
        client_id: Arc<str>,
        session: SessionId,
        msg: Message,
        due: Instant,
    ) {
        let will = PendingWill {
            session,
            of: WillOf::Crash(None),
            msg,
        };
        lock(&self.pending_wills).insert(client_id.clone(), will);
        self.timers.add(due, TimerEvent::Will(client_id, session));
    }

    /// Drops a pending will of this session (its client reconnected in time).
    pub fn cancel_will(&self, client_id: &str, session: SessionId) {
        let mut wills = lock(&self.pending_wills);
        if wills.get(client_id).is_some_and(|w| w.session == session) {
            wills.remove(client_id);
            self.store
                .append(|w| w.delete(Cf::Wills, client_id.as_bytes()));
        }
    }

    fn fire_will(&self, client_id: &str, session: SessionId) {
        let will = {
            let mut wills = lock(&self.pending_wills);
            match wills.get(client_id) {
                Some(w) if w.session == session => {
                    self.store
                        .append(|w| w.delete(Cf::Wills, client_id.as_bytes()));
                    wills.remove(client_id)
                }
                _ => None,
            }
        };
        if let Some(w) = will {
            let client_id: Arc<str> = client_id.into();
            self.release_will(&client_id, w.of, w.msg);
        }
    }

    /// Publishes a due will once the cluster says this node is the one that does (exactly
    /// once in the cluster: a node that died with the client connected may come back with
    /// the will while another node has published it already).
    fn release_will(&self, client_id: &Arc<str>, of: WillOf, msg: Message) {
        let epoch = match of {
            // One process alone (tests, the fuzzer): its word is final.
            _ if !self.control.wills_need_agreement() => return self.publish_will(msg),
            WillOf::TakenOver => return self.publish_will(msg),
            WillOf::Connection(epoch) => Some(epoch),
            WillOf::Crash(epoch) => epoch,
        };
        let Some(this) = self.this.upgrade() else {
            return;
        };
        // Asked now, so the answer comes before whatever the caller changes next (the
        // session's end).
        let confirmed = self.control.fire_will(client_id, epoch);
        let client_id = client_id.clone();
        tokio::spawn(async move {
            if confirmed.await {
                this.publish_will(msg);
            } else {
                this.metrics.wills_skipped.inc();
                tracing::debug!(%client_id, "will not published: fired elsewhere, or the client is back");
            }
        });
    }

    /// Publishes the will of a client of a node that died, once this node won its
    /// `WillFired` (`message`: the stored-message encoding).
    pub fn publish_dead_nodes_will(&self, message: &[u8]) {
        let clock = Clock::now();
        if let Some(msg) = value::delivery(message, &clock).and_then(|d| Arc::into_inner(d.msg)) {
            self.publish_will(msg);
        }
    }

    fn publish_will(&self, mut msg: Message) {
        // The expiry interval counts from publication, not from CONNECT.
        let now = Instant::now();
        msg.expires_at = msg
            .props()
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(s as u64));
        self.metrics.wills_published.inc();
        tracing::debug!(topic = %msg.topic, "publishing will");
        let msg = Arc::new(msg);
        if msg.retain && self.control.wills_need_agreement() {
            // In a cluster the copies forwarded to other nodes would arrive before the
            // retained will is applied there: a client that saw the will on one node and
            // subscribes on another could miss it. A will has no publisher waiting and
            // nothing after it to keep in order, so it waits for the retained change to be
            // applied on every live member first.
            let mark = self.retain(&msg);
            if mark > self.control.settled_now() {
                let Some(this) = self.this.upgrade() else {
                    return;
                };
                let mut settled = self.control.settled();
                tokio::spawn(async move {
                    // Settled means applied everywhere, or given up on (no quorum for the
                    // proposer's retries): either way the will goes out then.
                    let _ = settled.wait_for(|&s| s >= mark).await;
                    this.publish_retaining(msg, &mut Vec::new(), None, false);
                });
                return;
            }
            self.publish_retaining(msg, &mut Vec::new(), None, false);
            return;
        }
        self.publish(msg, &mut Vec::new(), None);
    }

    pub fn schedule_session_expiry(&self, session: &Session, at: Instant) {
        self.timers.add(
            at,
            TimerEvent::SessionExpiry(session.client_id().clone(), session.id()),
        );
    }

    fn on_timer(&self, ev: TimerEvent, now: Instant) {
        match ev {
            TimerEvent::Will(client_id, session) => self.fire_will(&client_id, session),
            TimerEvent::SessionExpiry(client_id, id) => {
                let Some(session) = self.sessions.get(&client_id) else {
                    return;
                };
                if session.id() != id
                    || session.is_connected()
                    || session.expires_at().is_none_or(|t| t > now)
                {
                    return;
                }
                tracing::debug!(%client_id, "session expired");
                self.metrics.sessions_expired.inc();
                let epoch = session.epoch();
                let (state, _) = session.end();
                self.end_session(&session, state);
                self.control.ended(&client_id, epoch);
            }
        }
    }

    /// Runs delayed wills and session expiry until cancelled.
    pub async fn run_timers(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let wake = self.timers.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let now = Instant::now();
            let (due, next) = self.timers.take_due(now);
            for ev in due {
                self.on_timer(ev, now);
            }
            let sleep = match next {
                Some(t) => tokio::time::sleep_until(t.into()),
                None => tokio::time::sleep(Duration::from_secs(3600)),
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut wake => {}
                _ = sleep => {}
            }
        }
    }
}

impl Timers {
    fn add(&self, at: Instant, ev: TimerEvent) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        let earliest = q.keys().next().is_none_or(|(t, _)| at < *t);
        q.insert((at, seq), ev);
        drop(q);
        if earliest {
            self.wake.notify_one();
        }
    }

    fn take_due(&self, now: Instant) -> (Vec<TimerEvent>, Option<Instant>) {
        let mut q = lock(&self.queue);
        let mut due = Vec::new();
        while let Some(entry) = q.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        (due, q.keys().next().map(|(t, _)| *t))
    }
}

#[cfg(test)]
#[path = "broker_test.rs"]
mod tests;
