//! Claims and takeovers: the service below `connection/` that makes a CONNECT the owner of
//! its client id cluster-wide, and moves persistent sessions between nodes.
//!
//! ```text
//!  handshake ── claim() ── ControlPlane::claim (Raft: new epoch, session present?, previous
//!                 │                              node, and from it what it held: Moved)
//!                 ├─ a connection here of the client id: kicked (0x8E), waited for
//!                 ├─ resumed here, or a new session; a moved one gets its subscriptions
//!                 │  from the replica and the old owner's messages (`adopt`)
//!                 └─ attached: (session, state, session present) to the connection
//!
//!  cluster (old owner) ── SessionHost::surrender/forget ──> Takeovers::parked
//!  cluster (owner)     ── SessionHost::absorb ──> a late push joins the session's queue
//!  keep_sessions (every 2 s): sessions held here that another node owns are surrendered,
//!                             what is parked is pushed to the owner until it is taken
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use petrel_storage::{keys, Cf, Ticket};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::cluster::Cluster;
use crate::codec::{MqttStr, PacketId, QoS, ReasonCode};
use crate::control::{
    BoxFuture, ClaimRequest, HandedMessage, HandedOver, Moved, ReplicaSubscription, SessionHost,
};
use crate::persist::{self, value};
use crate::router::{topic, AclStamp};
use crate::session::{
    Delivery, Epoch, Inflight, Kick, Session, SessionState, Stage, StoredSubscription,
};

/// How long a CONNECT waits for the previous connection of its client id to let go.
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often sessions held here are checked against the replicated ownership.
const SESSION_CHECK: Duration = Duration::from_secs(2);

/// Longest a node back from an absence keeps the stored sessions other nodes resumed
/// meanwhile, for the copies the other nodes kept for it (published before those claims),
/// when a peer does not say it has sent everything (it is down too, or slow).
const STALE_HOLD: Duration = Duration::from_secs(15);

/// How long a surrendered session waits for its new owner's confirmation before it is
/// pushed to the owner instead.
const PUSH_AFTER: Duration = Duration::from_secs(3);

/// How long a session surrendered by a claim that brought its routes to the new owner stays
/// in the router here, passing on the copies routed to this node before that claim (they
/// are on their way from the other nodes, or in their outboxes: a stream that is slower
/// than this loses them).
const MOVED_HOLD: Duration = Duration::from_secs(5);

/// Sessions handed over by this node and not confirmed yet, and hand-overs taken here.
#[derive(Default)]
pub struct Takeovers {
    parked: Mutex<HashMap<Arc<str>, Parked>>,
    /// (client id, from epoch) of every hand-over taken here: a repeated one adds nothing.
    taken: Mutex<HashSet<(Arc<str>, u64)>>,
    /// Surrendered sessions still in the router (passing copies on), with their filters.
    moved: Mutex<Vec<MovedAway>>,
}

/// A session surrendered here with its routes' claim: since when, and its plain filters.
type MovedAway = (Instant, Arc<Session>, Vec<String>);

struct Parked {
    handed: HandedOver,
    since: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Takeovers {
    /// Notes a hand-over taken here; false if it was taken before.
    fn note_taken(&self, client_id: &Arc<str>, from_epoch: u64) -> bool {
        lock(&self.taken).insert((client_id.clone(), from_epoch))
    }

    fn is_parked(&self, client_id: &str) -> bool {
        lock(&self.parked).contains_key(client_id)
    }

    /// Sessions surrendered here and not confirmed (for status and tests).
    pub fn parked_count(&self) -> usize {
        lock(&self.parked).len()
    }
}

/// Claims the client id: first through the claim service (the cluster: a Raft command that
/// gives a new epoch and makes another node that owned it close its connection), then here:
/// takes over a connected session, resumes or replaces it, or builds a session another node
/// held.
///
/// Claims of one client id take turns (`lock_claim`), so each sees the outcome of the one
/// before; the registry's compare-and-set in `create` keeps one session per client id even
/// against the timer task ending sessions meanwhile.
pub async fn claim(
    broker: &Broker,
    client_id: &Arc<str>,
    clean_start: bool,
    expiry: u32,
    will: Option<(bytes::Bytes, u32)>,
    conn_id: u64,
) -> Result<(Arc<Session>, Box<SessionState>, bool), ReasonCode> {
    let _turn = broker.sessions.lock_claim(client_id).await;
    let request = ClaimRequest {
        client_id: client_id.clone(),
        clean_start,
        expiry_secs: expiry,
        will,
    };
    let grant = match broker.control.claim(request).await {
        Ok(g) => g,
        Err(e) => {
            broker.metrics.claims_refused.inc();
            tracing::info!(%client_id, error = %e, "claim refused: the cluster is unreachable");
            return Err(ReasonCode::SERVER_UNAVAILABLE);
        }
    };
    if let Some(node) = grant.previous_node {
        tracing::info!(%client_id, from_node = node, epoch = %grant.epoch, "client id taken over from another node");
    }
    let arriving = grant.arrived_at != 0;
    let attached = attach_claimed(broker, client_id, clean_start, expiry, conn_id, grant).await;
    if arriving {
        // In the router now (or not coming): copies for it wait no more, and what was
        // published here for it meanwhile is its.
        let held = broker.routes.arrived(client_id);
        if attached.is_ok() && !held.is_empty() {
            tracing::debug!(%client_id, messages = held.len(), "messages held for a moving session delivered");
            broker.deliver_held(client_id, held);
        }
        if attached.is_err() {
            broker.control.recheck_routes();
        }
    }
    attached
}

/// The part of [`claim`] after the cluster granted it: the session here.
async fn attach_claimed(
    broker: &Broker,
    client_id: &Arc<str>,
    clean_start: bool,
    expiry: u32,
    conn_id: u64,
    mut grant: crate::control::Grant,
) -> Result<(Arc<Session>, Box<SessionState>, bool), ReasonCode> {
    let mut moved = grant.moved.take();
    for _ in 0..4 {
        let existing = broker.sessions.get(client_id);
        if let Some(old) = &existing {
            if old.kick(Kick::TakenOver) {
                broker.metrics.takeovers.inc();
                tracing::info!(%client_id, epoch = %old.epoch(), "session taken over");
                if !old.wait_released(TAKEOVER_TIMEOUT).await {
                    return Err(ReasonCode::SERVER_BUSY);
                }
                // Look again: the old connection's end may have ended or replaced the session
                // while we waited.
                continue;
            }
        }
        let (session, present) = match existing {
            // Resumed only if the cluster holds the session (a clean start on another node, or
            // its expiry, ended it everywhere), and a session another node held supersedes what
            // this node may still have of it.
            Some(old)
                if !clean_start && !old.is_ended() && grant.session_present && moved.is_none() =>
            {
                broker.cancel_will(client_id, old.id());
                old.set_expiry_secs(expiry);
                (old, true)
            }
            old => {
                let expected = old.as_ref().map(|s| s.id());
                let Some((session, replaced)) =
                    broker.sessions.create(client_id.clone(), expiry, expected)
                else {
                    continue;
                };
                match replaced {
                    Some(old) => {
                        if moved.is_some() && old.queue_len() > 0 {
                            tracing::warn!(%client_id, dropped = old.queue_len(), "a stale copy of a moved session replaced");
                        }
                        broker.replace_session(&old)
                    }
                    None => {
                        broker.metrics.sessions.inc();
                        if broker.takeovers.is_parked(client_id) {
                            // Back here before the new owner confirmed: the stored copy of
                            // the surrendered session goes (its parked copy is still pushed),
                            // so that it does not come back inside this one after a restart.
                            broker.store.append(|w| w.delete_client(client_id));
                        }
                    }
                }
                let present = match moved.take() {
                    Some(m) => {
                        // Before its subscriptions reach the router: copies routed before the
                        // claim are the old node's.
                        session.set_arrived_at(grant.arrived_at);
                        adopt(broker, &session, *m, expiry > 0, grant.epoch);
                        true
                    }
                    None => false,
                };
                (session, present)
            }
        };
        if let Some(state) = session.attach(conn_id, grant.epoch) {
            persist_claim(broker, &session, expiry, grant.epoch);
            return Ok((session, state, present));
        }
    }
    Err(ReasonCode::SERVER_BUSY)
}

/// Stores a persistent session's record, or forgets a stored session that is no longer
/// persistent (resumed with expiry 0: it ends when this connection does).
fn persist_claim(broker: &Broker, session: &Session, expiry: u32, epoch: Epoch) {
    let client_id = session.client_id();
    if expiry > 0 {
        session.set_persistent(true);
        broker
            .store
            .append(|w| persist::put_session(w, client_id, expiry, 0, epoch.0));
    } else if session.is_persistent() {
        session.set_persistent(false);
        broker.store.append(|w| w.delete_client(client_id));
    }
}

/// Builds a new (unattached) session from what another node held: the replica's
/// subscriptions and the old owner's messages, stored here if the session is `persistent`.
/// Once the store has it, the old owner is told it may delete its copy.
fn adopt(broker: &Broker, session: &Arc<Session>, moved: Moved, persistent: bool, epoch: Epoch) {
    let client_id = session.client_id().clone();
    let mut txn = broker.store.begin();
    let mut subscriptions = 0;
    // The old owner's subscriptions that the replica lacks (its `SubPut` did not commit)
    // come too, and go into the replica now.
    let missing: Vec<&ReplicaSubscription> = moved
        .handed
        .iter()
        .flat_map(|h| &h.subscriptions)
        .filter(|h| !moved.subscriptions.iter().any(|r| r.filter == h.filter))
        .collect();
    for sub in missing.iter().filter(|_| persistent) {
        broker
            .control
            .subscription_put(&client_id, epoch, (*sub).clone());
    }
    if !missing.is_empty() {
        tracing::info!(%client_id, subscriptions = missing.len(), "subscriptions the replica lacked came with the hand-over");
    }
    for sub in moved.subscriptions.iter().chain(missing.iter().copied()) {
        let (Ok(raw), Ok(parsed), Some(options)) = (
            MqttStr::new(&sub.filter),
            // Stored filters were valid when stored; a lowered depth limit does not drop them.
            topic::parse_filter(&sub.filter, usize::MAX),
            value::options_from_byte(sub.options),
        ) else {
            continue;
        };
        let id = (sub.subscription_id != 0).then_some(sub.subscription_id);
        // The ACL may have changed, and the connection may be another user's: checked at
        // delivery, as a recovered subscription is.
        broker.subscribe(session, &parsed, options, id, AclStamp::UNDECIDED);
        if persistent {
            txn.writer().put(
                Cf::Subscriptions,
                &keys::subscription_key(&client_id, &raw),
                &value::subscription(&options, id),
            );
        }
        session.with_parked(|st| {
            st.subscriptions.insert(
                raw,
                StoredSubscription {
                    options,
                    subscription_id: id,
                },
            )
        });
        subscriptions += 1;
    }
    let Some(handed) = moved.handed else {
        broker
            .metrics
            .handovers
            .with_label_values(&["resumed_without"])
            .inc();
        txn.commit();
        tracing::info!(%client_id, subscriptions, "session resumed from the replica");
        return;
    };
    let taken_before = !broker.takeovers.note_taken(&client_id, handed.from_epoch);
    let messages = match taken_before {
        true => 0,
        false => take_messages(broker, session, &handed, persistent, &mut txn),
    };
    let ticket = txn.commit();
    broker.metrics.handovers.with_label_values(&["in"]).inc();
    tracing::info!(%client_id, subscriptions, messages, from_node = handed.from_node, "session moved here");
    confirm_after(
        broker,
        ticket,
        client_id,
        handed.from_node,
        handed.from_epoch,
    );
}

/// Puts handed-over messages into `session`: those in flight (with their packet ids) into
/// its state, the others at the end of its queue. Returns how many it took.
fn take_messages(
    broker: &Broker,
    session: &Arc<Session>,
    handed: &HandedOver,
    persistent: bool,
    txn: &mut petrel_storage::Txn<'_>,
) -> usize {
    let client_id = session.client_id().clone();
    let clock = value::Clock::now();
    let mut taken = 0;
    for m in &handed.queued {
        let Some(mut d) = live(broker, m, &clock) else {
            continue;
        };
        let inflight = PacketId::new(m.packet_id).filter(|_| d.qos != QoS::AtMostOnce);
        let parked = match inflight {
            Some(packet_id) => {
                let stage = match m.released {
                    true => Stage::Released,
                    false => Stage::Published,
                };
                if persistent {
                    d.seq = session.alloc_seq();
                    let mut w = txn.writer();
                    w.put(Cf::Queue, &keys::queue_key(&client_id, d.seq), &m.message);
                    if d.qos == QoS::ExactlyOnce {
                        persist::put_inflight(&mut w, &client_id, &d, packet_id.get(), stage);
                    }
                }
                let f = Inflight {
                    packet_id,
                    delivery: d,
                    stage,
                };
                session
                    .with_parked(move |st| {
                        st.push_inflight(f);
                        st.next_packet_id = packet_id.next().max(st.next_packet_id);
                    })
                    .is_some()
            }
            None => queue_last(broker, session, d, m, persistent.then_some(&mut *txn)),
        };
        taken += parked as usize;
    }
    let inbound = handed.inbound_qos2.clone();
    if persistent {
        for id in &inbound {
            txn.writer()
                .put(Cf::Inbound, &keys::inbound_key(&client_id, *id), &[]);
        }
    }
    session.with_parked(|st| st.inbound_qos2.extend(inbound));
    taken
}

/// A handed-over message as a delivery, unless it is unreadable or has expired (counted,
/// as one that expires in a queue here).
fn live(broker: &Broker, m: &HandedMessage, clock: &value::Clock) -> Option<Delivery> {
    let d = value::delivery(&m.message, clock)?;
    if d.msg.is_expired(clock.now) {
        broker
            .metrics
            .queue_dropped
            .with_label_values(&["expired"])
            .inc();
        return None;
    }
    Some(d)
}

/// Appends a handed-over message to `session`'s queue (stored in `txn` for a persistent
/// session); returns whether it was queued.
fn queue_last(
    broker: &Broker,
    session: &Session,
    d: Delivery,
    m: &HandedMessage,
    txn: Option<&mut petrel_storage::Txn<'_>>,
) -> bool {
    let stored = txn.map(|t| (t, m.message.clone()));
    matches!(
        session.enqueue(d, &broker.limits, stored),
        crate::session::Enqueued::Queued { .. }
    )
}

/// Tells `from_node` that its hand-over is here, once the store has it.
fn confirm_after(
    broker: &Broker,
    ticket: Ticket,
    client_id: Arc<str>,
    from_node: u64,
    from_epoch: u64,
) {
    let store = broker.store.clone();
    let control = broker.control.clone();
    tokio::spawn(async move {
        if store.wait(ticket).await.is_ok() {
            control.handover_taken(&client_id, from_node, from_epoch);
        }
    });
}

/// Encodes what a session held for another node: in-flight messages (with their packet
/// ids) first, then its queue. Queued copies routed at log index `cut` or later are left
/// out (0: none is): the claim at `cut` brought the session's routes to the new owner, which
/// got its own. (In-flight ones stay: the client may have them.)
fn hand_over(
    from_node: u64,
    from_epoch: u64,
    state: &SessionState,
    queue: &VecDeque<Delivery>,
    cut: u64,
) -> HandedOver {
    let clock = value::Clock::now();
    // Expired ones go too: the new owner drops and counts them (`live`).
    let encode = |d: &Delivery| {
        value::queued(
            &d.msg,
            d.qos,
            d.retain,
            d.subscription_ids.as_slice(),
            d.shared,
            &clock,
        )
        .ok()
    };
    let inflight = state.inflight.iter().filter_map(|f| {
        Some(HandedMessage {
            message: encode(&f.delivery)?,
            packet_id: f.packet_id.get(),
            released: f.stage == Stage::Released,
        })
    });
    let queued = queue.iter().filter_map(|d| {
        let at = d.msg.routed_at.get();
        if cut != 0 && at >= cut {
            return None;
        }
        Some(HandedMessage {
            message: encode(d)?,
            packet_id: 0,
            released: false,
        })
    });
    let subscriptions = state
        .subscriptions
        .iter()
        .map(|(filter, s)| ReplicaSubscription {
            filter: filter.to_string(),
            options: value::options_byte(&s.options),
            subscription_id: s.subscription_id.unwrap_or(0),
            acl_filtered: false,
        })
        .collect();
    HandedOver {
        from_node,
        from_epoch,
        queued: inflight.chain(queued).collect(),
        inbound_qos2: state.inbound_qos2.iter().copied().collect(),
        subscriptions,
    }
}

/// The node's sessions as the cluster sees them.
pub struct Host {
    pub broker: Arc<Broker>,
    pub node_id: u64,
}

impl Host {
    /// Ends this node's offline session of `client_id` at `epoch`, which the cluster no
    /// longer knows: it ended cluster-wide while this node held a copy (a clean start on
    /// another node that has ended too, an expiry decided elsewhere). Its stored data goes.
    async fn end_forgotten(&self, client_id: &str, epoch: u64) {
        let broker = &self.broker;
        let client: Arc<str> = client_id.into();
        let _turn = broker.sessions.lock_claim(&client).await;
        let Some(session) = broker.sessions.get(client_id) else {
            return;
        };
        if session.epoch().0 != epoch || session.is_connected() || session.is_ended() {
            return;
        }
        tracing::info!(%client_id, epoch, "stored session ended: the cluster has ended it");
        let (state, _) = session.end();
        broker.end_session(&session, state);
    }

    /// Takes this node's session of `client_id` (older than `epoch`) out of the router and
    /// the registry, parks what it held and returns it. `moved_at`, `to_node`: see
    /// [`SessionHost::surrender`]; with a `moved_at` the session stays in the router for
    /// `MOVED_HOLD`, passing copies on.
    async fn surrender_now(
        &self,
        client_id: &str,
        epoch: u64,
        moved_at: u64,
        to_node: u64,
    ) -> Option<HandedOver> {
        let broker = &self.broker;
        if let Some(p) = lock(&broker.takeovers.parked).get(client_id) {
            return Some(p.handed.clone());
        }
        let client: Arc<str> = client_id.into();
        let _turn = broker.sessions.lock_claim(&client).await;
        let session = broker.sessions.get(client_id)?;
        if session.epoch().0 >= epoch {
            return None;
        }
        if session.kick(Kick::TakenOver) {
            broker.metrics.takeovers.inc();
            tracing::info!(%client_id, epoch, "session taken over by another node");
        }
        if !session.wait_released(TAKEOVER_TIMEOUT).await || !session.is_persistent() {
            // A clean session ends with its connection: nothing to hand over.
            return None;
        }
        let moved = (moved_at != 0).then_some((moved_at, to_node));
        let (state, queue) = session.take_all(moved)?;
        // The session goes on elsewhere: a delayed will of its last connection here must not
        // fire (its client came back within the delay).
        broker.cancel_will(client_id, session.id());
        let (shared, plain): (Vec<String>, Vec<String>) = state
            .subscriptions
            .keys()
            .map(|f| f.to_string())
            .partition(|f| f.starts_with(topic::SHARE_PREFIX));
        // A share group's messages go to its other members from now on.
        unsubscribe_all(broker, &session, &shared);
        match moved_at {
            0 => unsubscribe_all(broker, &session, &plain),
            _ => {
                // Copies the other nodes routed here before the claim are still coming: the
                // session stays in the router a while and passes them on.
                lock(&broker.takeovers.moved).push((Instant::now(), session.clone(), plain));
            }
        }
        if broker.sessions.remove(&session) {
            broker.metrics.sessions.dec();
        }
        let handed = hand_over(self.node_id, session.epoch().0, &state, &queue, moved_at);
        broker.metrics.handovers.with_label_values(&["out"]).inc();
        lock(&broker.takeovers.parked).insert(
            client.clone(),
            Parked {
                handed: handed.clone(),
                since: Instant::now(),
            },
        );
        Some(handed)
    }
}

/// Takes `session`'s subscriptions to `filters` out of the router.
fn unsubscribe_all(broker: &Broker, session: &Session, filters: &[String]) {
    for filter in filters {
        if let Ok(parsed) = topic::parse_filter(filter, usize::MAX) {
            broker.unsubscribe(session.id(), &parsed);
        }
    }
}

/// Takes the surrendered sessions held for `MOVED_HOLD` out of the router.
fn release_moved(broker: &Broker) {
    let due: Vec<(Arc<Session>, Vec<String>)> = {
        let mut moved = lock(&broker.takeovers.moved);
        let n = moved
            .iter()
            .take_while(|(since, _, _)| since.elapsed() >= MOVED_HOLD)
            .count();
        moved.drain(..n).map(|(_, s, f)| (s, f)).collect()
    };
    for (session, filters) in due {
        tracing::debug!(client_id = %session.client_id(), filters = filters.len(), "a moved session leaves the router");
        unsubscribe_all(broker, &session, &filters);
    }
}

impl SessionHost for Host {
    fn publish_will(&self, message: bytes::Bytes) {
        self.broker.publish_dead_nodes_will(&message);
    }

    fn surrender(
        &self,
        client_id: &str,
        epoch: u64,
        moved_at: u64,
        to_node: u64,
    ) -> BoxFuture<'_, Option<HandedOver>> {
        let client_id = client_id.to_owned();
        Box::pin(async move {
            self.surrender_now(&client_id, epoch, moved_at, to_node)
                .await
        })
    }

    fn forget(&self, client_id: &str, from_epoch: u64) {
        let broker = &self.broker;
        let mut parked = lock(&broker.takeovers.parked);
        if parked
            .get(client_id)
            .is_none_or(|p| p.handed.from_epoch != from_epoch)
        {
            return;
        }
        parked.remove(client_id);
        drop(parked);
        // The stored copy goes, unless the client came back here meanwhile (its new
        // session's keys share the prefix; the old copy's then went when it was created).
        if broker.sessions.get(client_id).is_none() {
            broker.store.append(|w| w.delete_client(client_id));
        }
    }

    fn absorb(&self, client_id: &str, handed: HandedOver) -> bool {
        let broker = &self.broker;
        let client: Arc<str> = client_id.into();
        let Some(session) = broker.sessions.get(client_id).filter(|s| !s.is_ended()) else {
            // The session ended here (or never came): nothing to deliver the messages to.
            return true;
        };
        if !broker.takeovers.note_taken(&client, handed.from_epoch) {
            return true;
        }
        let persistent = session.is_persistent();
        let clock = value::Clock::now();
        let mut txn = broker.store.begin();
        let mut n = 0;
        // Late: after whatever the session got meanwhile, each message as new (in-flight
        // ones of the old owner are sent again with new packet ids).
        for m in &handed.queued {
            if let Some(d) = live(broker, m, &clock) {
                let stored = persistent.then_some(&mut txn);
                n += queue_last(broker, &session, d, m, stored) as usize;
            }
        }
        txn.commit();
        broker
            .metrics
            .handovers
            .with_label_values(&["late_in"])
            .inc();
        tracing::info!(%client_id, messages = n, from_node = handed.from_node, "late hand-over taken");
        true
    }
}

/// Keeps the sessions held here consistent with the replicated ownership: a persistent
/// session that another node claimed while this node was away (or cut off) is surrendered,
/// and what is parked and not confirmed is pushed to the owner until it is taken.
pub async fn keep_sessions(
    broker: Arc<Broker>,
    cluster: Arc<Cluster>,
    host: Arc<Host>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(SESSION_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let me = host.node_id;
    let mut caught_up_at = None;
    let mut drained = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        release_moved(&broker);
        if !cluster.is_caught_up() {
            // Behind again (cut off, stopped): what the peers keep for it is to come again.
            caught_up_at = None;
            drained = false;
            continue;
        }
        // A stale session still takes the forwarded copies published before the claim
        // that moved it (`Broker::deliver_forwarded`): surrendered once every peer has sent
        // what it kept for this node, so that they travel with it.
        let since = *caught_up_at.get_or_insert_with(Instant::now);
        drained = drained || cluster.peers_drained() || since.elapsed() >= STALE_HOLD;
        // Held here, owned elsewhere at a later epoch.
        let held: Vec<(Arc<str>, u64)> = match drained {
            false => Vec::new(),
            true => broker
                .sessions
                .lock()
                .values()
                .filter(|s| s.is_persistent() && !s.is_connected() && !s.is_ended())
                .map(|s| (s.client_id().clone(), s.epoch().0))
                .collect(),
        };
        for (client_id, epoch) in held {
            match cluster.session_owner(&client_id) {
                Some(o) if o.node != me && o.epoch > epoch => {
                    host.surrender_now(&client_id, o.epoch, o.claimed_at_index, o.node)
                        .await;
                }
                Some(_) => {}
                // No record: the session ended cluster-wide (a clean start elsewhere that
                // ended before this node surrendered its copy, an expiry).
                None => host.end_forgotten(&client_id, epoch).await,
            }
        }
        // Parked long enough without a confirmation: pushed.
        let due: Vec<(Arc<str>, HandedOver)> = lock(&broker.takeovers.parked)
            .iter()
            .filter(|(_, p)| p.since.elapsed() >= PUSH_AFTER)
            .map(|(c, p)| (c.clone(), p.handed.clone()))
            .collect();
        for (client_id, handed) in due {
            let from_epoch = handed.from_epoch;
            let taken = match cluster.session_owner(&client_id) {
                // The session ended cluster-wide, or a clean start replaced it: nobody to
                // give the messages to.
                None => true,
                Some(o) if !o.continues(from_epoch) => true,
                Some(o) if o.node == me => host.absorb(&client_id, handed),
                Some(o) => match cluster.push_session(o.node, &client_id, handed).await {
                    Ok(taken) => taken,
                    Err(e) => {
                        tracing::debug!(%client_id, owner = o.node, error = %e, "session push failed; retrying");
                        false
                    }
                },
            };
            if taken {
                tracing::debug!(%client_id, from_epoch, "parked session released");
            }
            if taken {
                host.forget(&client_id, from_epoch);
            }
        }
    }
}
