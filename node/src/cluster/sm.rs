//! The replicated state machine: the one place where replicated state changes.
//!
//! ```text
//!  Raft (committed entry) ──> StateMachine::apply ──> ClusterState (members, routes,
//!                                                     sessions, subscriptions, retained)
//!                                 │                   applied index (watch)
//!                                 └─ one Outcome per command, to the proposer
//! ```
//!
//! `apply` is deterministic: it reads nothing but the state and the command (commands carry
//! the proposer's wall clock where time matters), so every member computes the same state.
//! The state lives in memory; it is made durable by the Raft log and by snapshots
//! (length-delimited `SnapshotRecord`s, saved in the store with fsync). After a restart the
//! node loads its last snapshot and openraft re-applies the log after it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use petrel_cluster_proto::{pb, SNAPSHOT_FORMAT};
use petrel_storage::Store;
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use super::raft::{self, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};
use crate::persist::value::{self, Clock};
pub use crate::router::NodeSet;
use crate::router::{topic, RouteOp, RouteTable, SharedRetained};

/// Everything the cluster agrees on. Only [`StateMachine::apply`] and snapshot install
/// change it.
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// The epoch the next claim gets.
    pub next_epoch: u64,
    pub members: BTreeMap<u64, pb::Member>,
    /// (group, filter) -> the nodes with at least one subscriber to it. The one copy a node
    /// holds: the table the publish path matches against (a clone of the state shares
    /// it). Commands do not change it; the route changes of an entry are applied to it at
    /// once, with the entry's index ([`RouteTable::apply`]).
    pub routes: Arc<RouteTable>,
    pub sessions: HashMap<Arc<str>, pb::SessionRecord>,
    /// client id -> filter -> subscription, for persistent sessions.
    pub subscriptions: HashMap<Arc<str>, BTreeMap<String, pb::Subscription>>,
    /// (client id, epoch) -> a connected record of another node that a claim replaced while
    /// its will was due (`Claim.keep_replaced_will`): kept until a `WillFired` of that epoch.
    pub replaced_wills: BTreeMap<(Arc<str>, u64), pb::SessionRecord>,
    // Retained messages are not here: `StateMachine` applies them to the node's retained
    // store, the one SUBSCRIBE reads (one copy of each message per node).
}

fn done() -> pb::Outcome {
    pb::Outcome {
        result: Some(pb::outcome::Result::Done(pb::Done {})),
    }
}

fn stale() -> pb::Outcome {
    pb::Outcome {
        result: Some(pb::outcome::Result::Stale(pb::Stale {})),
    }
}

/// Whether the will of `rec`, a connected record, is due when its connection ends and a new
/// claim takes its place: at once (no delay), or because the session does not go on (a
/// clean start, or none present); a delayed will of a resumed session is not published (MQTT
/// 5, 3.1.3.2.2).
fn will_due(rec: &pb::SessionRecord, present: bool) -> bool {
    rec.will
        .as_ref()
        .is_some_and(|w| !present || w.delay_secs.min(rec.expiry_secs) == 0)
}

/// Whether a disconnected session's expiry has passed at `now_ms`.
fn expired(rec: &pb::SessionRecord, now_ms: u64) -> bool {
    !rec.connected
        && rec.expiry_secs != u32::MAX
        && rec
            .disconnected_at_ms
            .saturating_add(u64::from(rec.expiry_secs) * 1000)
            <= now_ms
}

impl ClusterState {
    /// Applies one command as an entry of its own; the outcome goes back to its proposer.
    /// (Tests.)
    pub fn apply(&mut self, cmd: pb::Command) -> pb::Outcome {
        let index = self.last_applied.map(|l| l.index).unwrap_or(0);
        let mut ops = Vec::new();
        let outcome = self.apply_at(cmd, index, &mut ops);
        self.routes.apply(&ops, index);
        outcome
    }

    /// Applies one command of the entry at log `index`; its changes of the routes go to
    /// `ops`, for the caller to apply once the entry's commands are all applied.
    pub fn apply_at(
        &mut self,
        cmd: pb::Command,
        index: u64,
        ops: &mut Vec<RouteOp>,
    ) -> pb::Outcome {
        use pb::command::Cmd;
        let Some(cmd) = cmd.cmd else {
            // A command kind this version does not know: the compatibility rules keep newer
            // kinds out of the log until every member applies them.
            return stale();
        };
        match cmd {
            Cmd::MemberUp(m) => {
                self.members.insert(
                    m.node_id,
                    pb::Member {
                        node_id: m.node_id,
                        grpc_addr: m.grpc_addr,
                        mqtt_addr: m.mqtt_addr,
                        version: m.version,
                        draining: false,
                        wire_level: m.wire_level,
                    },
                );
                done()
            }
            Cmd::MemberDrain(d) => match self.members.get_mut(&d.node_id) {
                Some(m) => {
                    m.draining = d.draining;
                    done()
                }
                None => stale(),
            },
            Cmd::MemberRemove(r) => {
                if self.members.remove(&r.node_id).is_none() {
                    return stale();
                }
                let gone: Vec<Arc<str>> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.node_id == r.node_id && s.expiry_secs == 0)
                    .map(|(c, _)| c.clone())
                    .collect();
                for c in gone {
                    self.end_session(&c);
                }
                ops.push(RouteOp::NodeGone(r.node_id));
                for s in self.sessions.values_mut() {
                    if s.node_id == r.node_id {
                        s.orphaned = true;
                        if s.connected {
                            s.connected = false;
                            s.disconnected_at_ms = r.at_ms;
                        }
                    }
                }
                done()
            }
            Cmd::RouteAdd(a) => {
                let Some(r) = a.route else { return stale() };
                self.add_route(r.share_group, r.filter, r.node_id, ops);
                done()
            }
            Cmd::RouteDel(d) => {
                let Some(r) = d.route else { return stale() };
                ops.push(RouteOp::Del {
                    group: r.share_group,
                    filter: r.filter,
                    node: r.node_id,
                });
                done()
            }
            Cmd::Claim(c) => self.claim(c, index, ops),
            Cmd::SessionDisconnected(d) => {
                let no_will = (!d.keep_will && d.will.is_none()) || d.drained;
                if no_will && !self.replaced_wills.is_empty() {
                    // The connection ended without its will (a normal DISCONNECT), or was
                    // drained, while a claim elsewhere replaced it: that claim kept a will
                    // nobody may publish.
                    self.replaced_wills
                        .remove(&(d.client_id.as_str().into(), d.epoch));
                }
                let Some(rec) = self.sessions.get_mut(d.client_id.as_str()) else {
                    return stale();
                };
                if rec.epoch != d.epoch {
                    return stale();
                }
                if let Some(e) = d.expiry_secs {
                    rec.expiry_secs = e;
                }
                // A will still to publish keeps even a session without expiry until WillFired.
                let will_pending = d.keep_will && rec.will.is_some();
                if rec.expiry_secs == 0 && !will_pending {
                    let c: Arc<str> = d.client_id.into();
                    self.end_session(&c);
                } else {
                    rec.connected = false;
                    rec.disconnected_at_ms = d.at_ms;
                    if !d.keep_will {
                        rec.will = d.will;
                    }
                }
                done()
            }
            Cmd::SessionEnd(e) => match self.sessions.get(e.client_id.as_str()) {
                Some(rec) if rec.epoch == e.epoch => {
                    let c: Arc<str> = e.client_id.into();
                    self.end_session(&c);
                    done()
                }
                _ => stale(),
            },
            Cmd::SubPut(p) => {
                let Some(sub) = p.sub else { return stale() };
                if !self.epoch_is(&sub.client_id, sub.epoch) {
                    return stale();
                }
                let client: Arc<str> = sub.client_id.as_str().into();
                self.subscriptions
                    .entry(client)
                    .or_default()
                    .insert(sub.filter.clone(), sub);
                done()
            }
            Cmd::SubDel(d) => {
                if !self.epoch_is(&d.client_id, d.epoch) {
                    return stale();
                }
                if let Some(subs) = self.subscriptions.get_mut(d.client_id.as_str()) {
                    subs.remove(&d.filter);
                    if subs.is_empty() {
                        self.subscriptions.remove(d.client_id.as_str());
                    }
                }
                done()
            }
            // Applied by `StateMachine::apply_one` to the retained store.
            Cmd::RetainSet(_) | Cmd::RetainClear(_) => done(),
            Cmd::WillFired(w) => match self.sessions.get_mut(w.client_id.as_str()) {
                // Exactly once: only the first WillFired of an epoch is Done; its proposer
                // publishes the will.
                _ if self
                    .replaced_wills
                    .remove(&(w.client_id.as_str().into(), w.epoch))
                    .is_some() =>
                {
                    done()
                }
                Some(rec) if rec.epoch == w.epoch && rec.will.is_some() => {
                    rec.will = None;
                    if rec.connected {
                        // Its node died under the connection.
                        rec.connected = false;
                        rec.disconnected_at_ms = w.at_ms;
                    }
                    if rec.expiry_secs == 0 {
                        let c: Arc<str> = w.client_id.into();
                        self.end_session(&c);
                    }
                    done()
                }
                _ => stale(),
            },
        }
    }

    /// Node `node` has subscribers to `filter` in `group`.
    fn add_route(&mut self, group: String, filter: String, node: u64, ops: &mut Vec<RouteOp>) {
        ops.push(RouteOp::Add {
            group,
            filter,
            node,
        });
    }

    fn claim(&mut self, c: pb::Claim, index: u64, ops: &mut Vec<RouteOp>) -> pb::Outcome {
        let epoch = self.next_epoch.max(1);
        self.next_epoch = epoch + 1;
        let client: Arc<str> = c.client_id.as_str().into();
        let previous = self.sessions.get(&client).cloned();
        let present = !c.clean_start && previous.as_ref().is_some_and(|p| !expired(p, c.at_ms));
        if !present {
            self.subscriptions.remove(&client);
        }
        if let Some(p) = previous.as_ref().filter(|p| {
            c.keep_replaced_will
                && p.connected
                && p.node_id != c.node_id
                && will_due(p, present)
                && !self.members.get(&p.node_id).is_some_and(|m| m.draining)
        }) {
            // Its connection on another node goes (taken over, or its node died under it):
            // its will is due, and is published once, by that node or by the leader
            // (`WillFired` of its epoch). A claim of the same node, or of a version before
            // level 4, leaves the will to the node that held the connection, as before; so
            // does a claim that replaces a connection of a draining node (DESIGN: a drained
            // client's will is dropped if it reconnects elsewhere within the grace).
            self.replaced_wills
                .insert((client.clone(), p.epoch), p.clone());
        }
        if c.expiry_secs == 0 && c.will.is_none() && !present {
            // A new session that ends with its connection and has no will leaves nothing to
            // resume or to fire: no record (the claim still takes an epoch, and every node
            // applying it still closes an older connection of the client id). Most clients
            // of a fleet look like this, and every record is held by every node. (One that
            // resumes a present session keeps a record while connected: its subscriptions
            // hang off it, and its disconnect ends both.)
            self.sessions.remove(&client);
        } else {
            let started_epoch = match (&previous, present) {
                (Some(p), true) => p.started_epoch,
                _ => epoch,
            };
            self.sessions.insert(
                client.clone(),
                pb::SessionRecord {
                    client_id: c.client_id,
                    node_id: c.node_id,
                    epoch,
                    expiry_secs: c.expiry_secs,
                    connected: true,
                    disconnected_at_ms: 0,
                    will: c.will,
                    orphaned: false,
                    started_epoch,
                    // When the session came to this node: a reconnect to the same node
                    // keeps it (a node that held it before compares its kept copies with
                    // the move, not with the latest reconnect).
                    claimed_at_ms: match (&previous, present) {
                        (Some(p), true) if p.node_id == c.node_id && p.claimed_at_ms != 0 => {
                            p.claimed_at_ms
                        }
                        _ => c.at_ms,
                    },
                    claimed_at_index: match (&previous, present) {
                        (Some(p), true) if p.node_id == c.node_id && p.claimed_at_index != 0 => {
                            p.claimed_at_index
                        }
                        // Known only where the claim brought the session's routes.
                        _ if c.with_routes => index,
                        _ => 0,
                    },
                },
            );
        }
        let moved = present && previous.as_ref().is_some_and(|p| p.node_id != c.node_id);
        if c.with_routes && moved {
            // The session's routes come to its new node in this very entry: a copy routed
            // at this index or later reaches the new node, one routed before reaches the
            // old (whose routes are still there), and each node knows which it has
            // (`ForwardedMessage.routed_at`).
            let filters: Vec<String> = self
                .subscriptions
                .get(&client)
                .map(|subs| subs.keys().cloned().collect())
                .unwrap_or_default();
            // Plain filters only: a share group's message goes to one node of the group, and
            // the new node joins the group when its member is in its router (its own
            // `RouteAdd`), as a new member does.
            for raw in filters {
                if let Ok(f) = topic::parse_filter(&raw, usize::MAX) {
                    if f.group.is_none() {
                        self.add_route(String::new(), f.filter.to_owned(), c.node_id, ops);
                    }
                }
            }
        }
        let p = previous.unwrap_or_default();
        pb::Outcome {
            result: Some(pb::outcome::Result::Claimed(pb::Claimed {
                epoch,
                session_present: present,
                previous_node_id: p.node_id,
                previous_epoch: p.epoch,
                previous_connected: p.connected,
            })),
        }
    }

    /// Moves the routes of this state (decoded from a snapshot) into `table`, the node's
    /// shared one, which this state then holds.
    pub fn move_routes_to(&mut self, table: &Arc<RouteTable>) {
        table.replace_from(
            &self.routes,
            self.last_applied.map(|l| l.index).unwrap_or(0),
        );
        self.routes = table.clone();
    }

    /// Whether a change made by the session of `client` at `epoch` still applies: its
    /// record has that epoch (0: a change of the first version, always applied).
    fn epoch_is(&self, client: &str, epoch: u64) -> bool {
        epoch == 0 || self.sessions.get(client).is_some_and(|r| r.epoch == epoch)
    }

    fn end_session(&mut self, client: &Arc<str>) {
        self.sessions.remove(client);
        self.subscriptions.remove(client);
    }

    /// The state and the retained messages (topic, stored encoding) as snapshot bytes:
    /// length-delimited records, the header first.
    pub fn encode_snapshot(&self, retained: &[(String, Bytes)]) -> Vec<u8> {
        use pb::snapshot_record::Record;
        let mut out = Vec::new();
        let mut put = |r: Record| {
            pb::SnapshotRecord { record: Some(r) }
                .encode_length_delimited(&mut out)
                .expect("a Vec grows");
        };
        put(Record::Header(pb::SnapshotHeader {
            format: SNAPSHOT_FORMAT,
            next_epoch: self.next_epoch,
        }));
        for m in self.members.values() {
            put(Record::Member(m.clone()));
        }
        self.routes.visit(|group, filter, nodes| {
            for n in nodes {
                put(Record::Route(pb::Route {
                    filter: filter.to_owned(),
                    share_group: group.to_owned(),
                    node_id: *n,
                }));
            }
        });
        for s in self.sessions.values() {
            put(Record::Session(s.clone()));
        }
        for subs in self.subscriptions.values() {
            for s in subs.values() {
                put(Record::Subscription(s.clone()));
            }
        }
        for r in self.replaced_wills.values() {
            put(Record::ReplacedWill(r.clone()));
        }
        for (topic, message) in retained {
            put(Record::Retained(pb::RetainSet {
                topic: topic.clone(),
                message: message.clone(),
            }));
        }
        out
    }

    /// Rebuilds the state and the retained messages from snapshot bytes (the applied log id
    /// and membership come from the snapshot's meta).
    pub fn decode_snapshot(
        mut bytes: &[u8],
        meta: &SnapshotMeta,
    ) -> io::Result<(ClusterState, Vec<pb::RetainSet>)> {
        use pb::snapshot_record::Record;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut st = ClusterState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            ..ClusterState::default()
        };
        let mut header = false;
        let mut retained = Vec::new();
        let table = st.routes.clone();
        let mut routes = table.bulk();
        while !bytes.is_empty() {
            let rec = pb::SnapshotRecord::decode_length_delimited(&mut bytes)
                .map_err(|_| bad("bad snapshot record"))?;
            match rec.record {
                Some(Record::Header(h)) => {
                    if h.format != SNAPSHOT_FORMAT {
                        return Err(bad("snapshot of a format this version does not read"));
                    }
                    st.next_epoch = h.next_epoch;
                    header = true;
                }
                Some(Record::Member(m)) => {
                    st.members.insert(m.node_id, m);
                }
                Some(Record::Route(r)) => {
                    routes.add(&r.share_group, &r.filter, r.node_id);
                }
                Some(Record::Session(s)) => {
                    st.sessions.insert(s.client_id.as_str().into(), s);
                }
                Some(Record::Subscription(s)) => {
                    st.subscriptions
                        .entry(s.client_id.as_str().into())
                        .or_default()
                        .insert(s.filter.clone(), s);
                }
                Some(Record::Retained(r)) => retained.push(r),
                Some(Record::ReplacedWill(r)) => {
                    st.replaced_wills
                        .insert((r.client_id.as_str().into(), r.epoch), r);
                }
                // A record kind of a newer version: skipped (the format would have changed
                // if skipping it were wrong).
                None => {}
            }
        }
        drop(routes);
        if !header {
            return Err(bad("snapshot without a header"));
        }
        Ok((st, retained))
    }
}

fn meta_pb(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        vote: None,
        last_log_id: meta.last_log_id.as_ref().map(raft::log_id_pb),
        last_membership: Some(raft::stored_membership_pb(&meta.last_membership)),
    }
}

fn meta_from_pb(p: pb::SnapshotMeta) -> io::Result<SnapshotMeta> {
    Ok(SnapshotMeta {
        last_log_id: raft::opt_log_id(p.last_log_id),
        last_membership: raft::stored_membership(p.last_membership)?,
    })
}

/// Something applied that this node must act on.
#[derive(Debug)]
pub enum Effect {
    /// Another node claimed `client_id` at `epoch`: a connection here of an older epoch goes
    /// (DISCONNECT 0x8E).
    ClaimedElsewhere {
        client_id: Arc<str>,
        epoch: u64,
        node_id: u64,
    },
}

/// Replaces the replicated retained messages of `store` with `messages` (a snapshot's).
fn replace_retained(store: &SharedRetained, messages: Vec<pb::RetainSet>) {
    let clock = Clock::now();
    store.update(|r| {
        r.clear_replicated();
        for m in messages {
            if let Some(d) = value::delivery(&m.message, &clock) {
                if !d.msg.is_expired(clock.now) {
                    r.set(d.msg);
                }
            }
        }
    });
}

/// The replicated retained messages of `store`, encoded for a snapshot (expired ones left
/// out).
fn encoded_retained(store: &SharedRetained) -> Vec<(String, Bytes)> {
    let messages = store.read().replicated();
    let clock = Clock::now();
    messages
        .into_iter()
        .filter(|m| !m.is_expired(clock.now))
        .filter_map(|m| {
            let v = value::message(&m, m.qos, true, &[], &clock).ok()?;
            Some((m.topic.to_string(), v))
        })
        .collect()
}

/// The last snapshot saved in the store.
fn saved_snapshot(store: &Store) -> io::Result<Option<Snapshot>> {
    let Some((meta, data)) = store.load_raft_snapshot().map_err(io::Error::other)? else {
        return Ok(None);
    };
    let meta = pb::SnapshotMeta::decode(meta.as_slice())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "snapshot meta"))?;
    Ok(Some(Snapshot {
        meta: meta_from_pb(meta)?,
        snapshot: data,
    }))
}

/// The state machine openraft drives; cheap to clone (shared state).
#[derive(Clone)]
pub struct StateMachine {
    me: u64,
    state: Arc<RwLock<ClusterState>>,
    /// The node's retained messages: the replicated ones are applied here.
    retained: Arc<SharedRetained>,
    /// The route table the publish path matches against (`ClusterState::routes`).
    routes: Arc<RouteTable>,
    store: Store,
    applied: watch::Sender<u64>,
    effects: mpsc::UnboundedSender<Effect>,
    /// Snapshots built or installed since start (for metrics).
    snapshots: Arc<std::sync::atomic::AtomicU64>,
    /// What other nodes did with the wills of this node's connections.
    taken_wills: Arc<TakenWills>,
}

/// What became of the wills of this node's connections that other nodes acted on, as this
/// node applied it: a claim elsewhere kept one aside (`ClusterState::replaced_wills`; also
/// found in an installed snapshot), or another node's `WillFired` published one (the leader,
/// while this node seemed dead). A connection that has a will asks here once, as it closes,
/// whether or not it publishes the will ([`TakenWills::take`]). The replicated state alone
/// cannot say: the leader may have fired and removed a kept will already, and a record fired
/// while its connection lived on here looks like any disconnected one. Not replicated, and
/// only for connections of this process: epochs from its first claim on
/// ([`TakenWills::claimed`]), so that commands applied again after a restart note nothing.
/// An entry nobody asks for (a connection that closed just before the claim that kept its
/// will was applied here) stays for the life of the process: a few bytes each, as rare as
/// that race.
#[derive(Default)]
pub struct TakenWills {
    map: std::sync::Mutex<HashMap<WillKey, Taken>>,
    /// The epoch of this process's first claim (0: none yet).
    first: std::sync::atomic::AtomicU64,
}

/// A connection's will: (client id, epoch).
type WillKey = (Arc<str>, u64);

/// See [`TakenWills`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Kept aside by a claim elsewhere: published once through `WillFired` of its epoch.
    Kept,
    /// Published by another node already: not again.
    FiredElsewhere,
}

impl TakenWills {
    /// This process claimed a client id at `epoch`: its connections have that epoch or a
    /// later one.
    pub fn claimed(&self, epoch: u64) {
        use std::sync::atomic::Ordering;
        let _ = self
            .first
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                (f == 0 || epoch < f).then_some(epoch)
            });
    }

    fn insert(&self, taken: Taken, keys: impl IntoIterator<Item = WillKey>) {
        let first = self.first.load(std::sync::atomic::Ordering::Acquire);
        if first == 0 {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.extend(
            keys.into_iter()
                .filter(|k| k.1 >= first)
                .map(|k| (k, taken)),
        );
    }

    /// What became of the will of `client_id`'s connection at `epoch` (asked once).
    pub fn take(&self, client_id: &str, epoch: u64) -> Option<Taken> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return None;
        }
        map.remove(&(Arc::<str>::from(client_id), epoch))
    }
}

impl StateMachine {
    /// Loads the last saved snapshot, if any. Effects of applied entries on node `me` go to
    /// the receiver.
    pub fn open(
        store: Store,
        me: u64,
        retained: Arc<SharedRetained>,
        routes: Arc<RouteTable>,
    ) -> io::Result<(StateMachine, mpsc::UnboundedReceiver<Effect>)> {
        let (mut state, messages) = match saved_snapshot(&store)? {
            Some(s) => ClusterState::decode_snapshot(&s.snapshot, &s.meta)?,
            None => (ClusterState::default(), Vec::new()),
        };
        replace_retained(&retained, messages);
        state.move_routes_to(&routes);
        let applied = state.last_applied.map(|l| l.index).unwrap_or(0);
        let (effects, rx) = mpsc::unbounded_channel();
        let sm = StateMachine {
            me,
            state: Arc::new(RwLock::new(state)),
            retained,
            routes,
            store,
            applied: watch::channel(applied).0,
            effects,
            snapshots: Arc::default(),
            taken_wills: Arc::default(),
        };
        Ok((sm, rx))
    }

    /// Reads the state (never held across an await; apply waits for it).
    /// Snapshots built or installed since start.
    pub fn snapshot_count(&self) -> u64 {
        self.snapshots.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn read(&self) -> RwLockReadGuard<'_, ClusterState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, ClusterState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`TakenWills`].
    pub fn taken_wills(&self) -> &TakenWills {
        &self.taken_wills
    }

    /// The route table it writes.
    pub fn routes(&self) -> &Arc<RouteTable> {
        &self.routes
    }

    /// The index of the last applied entry, as it changes.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Applies one command and tells this node what it must act on.
    fn apply_one(
        &self,
        st: &mut ClusterState,
        cmd: pb::Command,
        ops: &mut Vec<RouteOp>,
    ) -> pb::Outcome {
        match &cmd.cmd {
            Some(pb::command::Cmd::RetainSet(r)) => {
                let clock = Clock::now();
                match value::delivery(&r.message, &clock) {
                    Some(d)
                        if !d.msg.is_expired(clock.now) && &*d.msg.topic == r.topic.as_str() =>
                    {
                        self.retained.update(|store| store.set(d.msg))
                    }
                    // Expired on the way (or unreadable): the topic is cleared all the same,
                    // as it would have been by the message.
                    _ => {
                        self.retained.update(|store| store.remove(&r.topic));
                    }
                }
            }
            Some(pb::command::Cmd::RetainClear(r)) => {
                self.retained.update(|store| store.remove(&r.topic));
            }
            _ => {}
        }
        let claim_from = match &cmd.cmd {
            Some(pb::command::Cmd::Claim(c)) if c.node_id != self.me => {
                Some((c.client_id.clone(), c.node_id))
            }
            _ => None,
        };
        // Another node (the leader) publishes the will of a connection of this node's that
        // it took for dead.
        let fired_here = match &cmd.cmd {
            Some(pb::command::Cmd::WillFired(w))
                if w.node_id != self.me
                    && st.sessions.get(w.client_id.as_str()).is_some_and(|r| {
                        r.epoch == w.epoch && r.node_id == self.me && r.connected
                    }) =>
            {
                Some((Arc::<str>::from(w.client_id.as_str()), w.epoch))
            }
            _ => None,
        };
        let index = st.last_applied.map(|l| l.index).unwrap_or(0);
        let arriving = match &cmd.cmd {
            Some(pb::command::Cmd::Claim(c)) if c.node_id == self.me && c.with_routes => {
                Some(c.client_id.clone())
            }
            _ => None,
        };
        let outcome = st.apply_at(cmd, index, ops);
        if let (Some(key), Some(pb::outcome::Result::Done(_))) = (fired_here, &outcome.result) {
            self.taken_wills.insert(Taken::FiredElsewhere, [key]);
        }
        if let (Some(client_id), Some(pb::outcome::Result::Claimed(c))) =
            (arriving, &outcome.result)
        {
            if c.session_present && c.previous_epoch != 0 && c.previous_node_id != self.me {
                // A session moves here: its routes are in, it is not in the router yet.
                let filters = st
                    .subscriptions
                    .get(client_id.as_str())
                    .map(|subs| {
                        subs.keys()
                            .filter(|f| !f.starts_with(crate::router::topic::SHARE_PREFIX))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                self.routes.expect(client_id.into(), index, filters);
            }
        }
        if let (Some((client_id, node_id)), Some(pb::outcome::Result::Claimed(c))) =
            (claim_from, &outcome.result)
        {
            if c.previous_node_id == self.me {
                let key = (Arc::<str>::from(client_id.as_str()), c.previous_epoch);
                if st.replaced_wills.contains_key(&key) {
                    self.taken_wills.insert(Taken::Kept, [key]);
                }
            }
            let _ = self.effects.send(Effect::ClaimedElsewhere {
                client_id: client_id.into(),
                epoch: c.epoch,
                node_id,
            });
        }
        outcome
    }

    fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
        self.store
            .save_raft_snapshot(&meta_pb(meta).encode_to_vec(), data)
            .map_err(io::Error::other)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let (meta, data) = {
            // Held while the retained store is read: nothing is applied meanwhile.
            let st = self.read();
            let meta = SnapshotMeta {
                last_log_id: st.last_applied,
                last_membership: st.membership.clone(),
            };
            (meta, st.encode_snapshot(&encoded_retained(&self.retained)))
        };
        let this = self.clone();
        let (meta, data) =
            tokio::task::spawn_blocking(move || this.save(&meta, &data).map(|()| (meta, data)))
                .await
                .map_err(io::Error::other)??;
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            bytes = data.len(),
            "raft snapshot built"
        );
        self.snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let st = self.read();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut last = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let outcome = {
                let mut st = self.write();
                st.last_applied = Some(entry.log_id);
                let mut ops = Vec::new();
                let outcome = match entry.payload {
                    EntryPayload::Blank => pb::BatchOutcome::default(),
                    EntryPayload::Normal(batch) => pb::BatchOutcome {
                        outcomes: batch
                            .0
                            .commands
                            .into_iter()
                            .map(|c| self.apply_one(&mut st, c, &mut ops))
                            .collect(),
                    },
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(entry.log_id), m);
                        pb::BatchOutcome::default()
                    }
                };
                // The entry's route changes and its index reach the table at once.
                self.routes.apply(&ops, entry.log_id.index);
                outcome
            };
            last = Some(entry.log_id.index);
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        if let Some(i) = last {
            self.applied.send_replace(i);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: Vec<u8>) -> io::Result<()> {
        let (mut st, messages) = ClusterState::decode_snapshot(&data, meta)?;
        let this = self.clone();
        let saved = meta.clone();
        tokio::task::spawn_blocking(move || this.save(&saved, &data))
            .await
            .map_err(io::Error::other)??;
        let applied = st.last_applied.map(|l| l.index).unwrap_or(0);
        // Claims this node did not apply one by one: its connections they replaced ask here
        // as they close.
        self.taken_wills.insert(
            Taken::Kept,
            st.replaced_wills
                .iter()
                .filter(|(_, r)| r.node_id == self.me)
                .map(|(key, _)| key.clone()),
        );
        let mut state = self.write();
        st.move_routes_to(&self.routes);
        *state = st;
        replace_retained(&self.retained, messages);
        drop(state);
        self.applied.send_replace(applied);
        tracing::info!(last_log_id = ?meta.last_log_id, "raft snapshot installed");
        self.snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || saved_snapshot(&this.store))
            .await
            .map_err(io::Error::other)?
    }
}

#[cfg(test)]
#[path = "sm_test.rs"]
mod tests;
