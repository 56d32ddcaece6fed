//! The control plane as the MQTT side sees it: the service below `connection/` that makes
//! this node the owner of a client id (with an epoch that only grows), hears when the
//! owner's connection or session ends, and learns which filters this node has subscribers
//! for (the route table).
//!
//! In the node it is the cluster (`cluster::Cluster`): a claim is a Raft command, so the
//! epoch is cluster-wide and a claim on another node kicks the connection here (DISCONNECT
//! 0x8E). Without a quorum a claim fails within `cluster.propose_timeout_ms`: CONNACK 0x88.
//! Tests that run connections without a cluster (the fuzzer, unit tests) use
//! [`LocalControl`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use crate::session::Epoch;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a CONNECT asks for.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    pub client_id: Arc<str>,
    pub clean_start: bool,
    /// Session expiry interval in seconds; 0: the session ends with its connection.
    pub expiry_secs: u32,
    /// The CONNECT's will (the stored-message encoding) and its delay in seconds: part of
    /// the ownership record, so that another node can publish it if this one dies.
    pub will: Option<(Bytes, u32)>,
}

/// A successful claim.
#[derive(Debug)]
pub struct Grant {
    pub epoch: Epoch,
    /// Another node owned the client id before (it closes its connection itself, and hands
    /// over what it held of a persistent session).
    pub previous_node: Option<u64>,
    /// The cluster holds a session for the client id that this claim resumes (not a clean
    /// start, not expired): its subscriptions are in the replicated state.
    pub session_present: bool,
    /// A resumed session that another node held: what it is made of here.
    pub moved: Option<Box<Moved>>,
    /// The log index of the claim, if it moved the session here and brought its routes
    /// (`Session::set_arrived_at`); 0 otherwise.
    pub arrived_at: u64,
}

/// Another node's claim of a session this node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimedElsewhere {
    pub node: u64,
    /// The log index of the claim that took the session to `node`, if it brought the
    /// session's routes there (0: it did not, or a record of an earlier version).
    pub index: u64,
    /// When that claim was made (ms since the Unix epoch, by the claiming node's clock; 0 if
    /// unknown): the cut for copies of senders of an earlier version.
    pub at_ms: u64,
}

impl ClaimedElsewhere {
    /// Whether a copy routed at log index `routed_at` (0: by an earlier version) and
    /// published at `published_at_ms` (0: here, now) belongs to the copy of the session
    /// this node still holds: it was routed before the claim, so the claiming node did
    /// not get it.
    pub fn before(&self, routed_at: u64, published_at_ms: u64) -> bool {
        match (self.index, routed_at) {
            (0, _) | (_, 0) => published_at_ms != 0 && published_at_ms < self.at_ms,
            (claim, routed) => routed < claim,
        }
    }
}

/// A persistent session resumed on this node that another node held.
#[derive(Debug, Default)]
pub struct Moved {
    /// Its subscriptions, from the replicated state.
    pub subscriptions: Vec<ReplicaSubscription>,
    /// What the old owner held of it; `None`: it could not be reached (it hands the
    /// messages over when it is back).
    pub handed: Option<HandedOver>,
}

/// A subscription of a persistent session as the cluster replicates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSubscription {
    /// As the client sent it (`$share/group/` included).
    pub filter: String,
    /// The SUBSCRIBE's options byte.
    pub options: u8,
    /// v5 subscription identifier; 0: none.
    pub subscription_id: u32,
    /// The ACL allowed it only in part (every message is checked at delivery).
    pub acl_filtered: bool,
}

/// A message of a handed-over session queue.
#[derive(Clone, Debug)]
pub struct HandedMessage {
    /// The stored-message encoding.
    pub message: Bytes,
    /// In flight to the client under this packet id; 0: not sent.
    pub packet_id: u16,
    /// A QoS 2 message whose PUBREC came (PUBREL sent).
    pub released: bool,
}

/// What one node held of a persistent session: its queue and in-flight state.
#[derive(Clone, Debug, Default)]
pub struct HandedOver {
    pub from_node: u64,
    /// The epoch the old owner held it at: a hand-over is taken at most once per (client id,
    /// from_epoch).
    pub from_epoch: u64,
    /// In order, in-flight messages first.
    pub queued: Vec<HandedMessage>,
    /// Inbound QoS 2 packet ids whose PUBREL has not come.
    pub inbound_qos2: Vec<u16>,
    /// The subscriptions the old owner held (empty from a node of an earlier version).
    pub subscriptions: Vec<ReplicaSubscription>,
}

/// What the cluster asks of this node's sessions (the node implements it; see
/// `takeover.rs`).
pub trait SessionHost: Send + Sync + 'static {
    /// Gives up this node's session of `client_id` if it is older than `epoch` (another
    /// node claimed it): its connection closed, its subscriptions out of the router, and
    /// what it held returned. The stored copy stays until [`SessionHost::forget`]. Asked
    /// again, it returns the same.
    ///
    /// `moved_at`: the log index of the claim if it brought the session's routes to
    /// `to_node` (0: it did not): copies routed at it or later are left out (the new owner
    /// has its own), and those routed before it that still come here are passed on.
    fn surrender(
        &self,
        client_id: &str,
        epoch: u64,
        moved_at: u64,
        to_node: u64,
    ) -> BoxFuture<'_, Option<HandedOver>>;

    /// The new owner stored what was handed over at `from_epoch`: the copy here goes.
    fn forget(&self, client_id: &str, from_epoch: u64);

    /// Publishes the will of a client of a node that died (this node won its WillFired):
    /// `message` is the stored-message encoding.
    fn publish_will(&self, message: Bytes);

    /// Another node pushes what it held of a session this node owns (it was down when the
    /// session moved, or its hand-over was not confirmed): the messages join the session's
    /// queue. Returns whether the sender may delete its copy (taken, taken before, or the
    /// session is gone).
    fn absorb(&self, client_id: &str, handed: HandedOver) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The cluster could not be reached in time (no leader, no quorum on this side).
    #[error("no quorum: {0}")]
    NoQuorum(String),
}

/// [`ControlPlane::will_elsewhere`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WillElsewhere {
    /// Nothing: this node publishes it as before.
    Nothing,
    /// A claim of another node that took the connection over kept the will aside: it is
    /// published through [`ControlPlane::fire_will`] with the connection's epoch, by this
    /// node or by the leader (if this node seemed dead), once.
    Kept,
    /// Another node published it (the leader, while this node seemed dead): not again.
    Fired,
}

pub trait ControlPlane: Send + Sync + 'static {
    /// Makes this node the owner of the client id, with a new epoch.
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Grant, ClaimError>>;

    /// The connection that claimed `client_id` at `epoch` ended; a session with an expiry
    /// stays (owned here) until it expires. `will_pending`: its will is to be published (now
    /// or after its delay, through [`ControlPlane::fire_will`]), so the record keeps it.
    /// Does not wait.
    /// `expiry_secs`: the session expiry interval the connection ended with (an MQTT 5
    /// DISCONNECT may have changed it). `drained`: the node told it to go (shutdown or
    /// drain); its will waits for the grace and goes if the client connects elsewhere.
    fn disconnected(
        &self,
        client_id: &Arc<str>,
        epoch: Epoch,
        will_pending: bool,
        expiry_secs: u32,
        drained: bool,
    );

    /// Whether this node may publish the will of `client_id` claimed at `epoch` (`None`:
    /// the epoch the ownership record has, if this node owns it): true for exactly one
    /// caller in the cluster, and never once the client has connected again. With an epoch,
    /// the question is queued before this returns (so it is decided before any change this
    /// node queues afterwards, such as the session's end); the answer waits for the cluster
    /// (retrying while there is no quorum).
    fn fire_will(&self, client_id: &Arc<str>, epoch: Option<Epoch>) -> BoxFuture<'static, bool>;

    /// Whether [`ControlPlane::fire_will`] must be asked (a cluster); without one a due
    /// will is published at once.
    fn wills_need_agreement(&self) -> bool {
        true
    }

    /// What other nodes did with the will of `client_id`'s connection at `epoch`, as this
    /// node applied it; asked once, as the connection closes (a claim elsewhere that closes
    /// it is applied here first).
    fn will_elsewhere(&self, _client_id: &str, _epoch: Epoch) -> WillElsewhere {
        WillElsewhere::Nothing
    }

    /// The session claimed at `epoch` ended (expired). Does not wait.
    fn ended(&self, client_id: &Arc<str>, epoch: Epoch);

    /// This node got its first subscriber to `filter` (in share group `group`): the other
    /// nodes forward matching publishes here from now on. Called with the subscription
    /// trie locked, so route changes are queued in the order they happened; does not wait.
    fn route_added(&self, group: Option<&str>, filter: &str);

    /// This node lost its last subscriber to `filter` (in `group`); as `route_added`.
    fn route_removed(&self, group: Option<&str>, filter: &str);

    /// This node's routes may differ from its subscriptions (a claim brought a session's
    /// routes here, and the session did not come): they are compared again soon.
    fn recheck_routes(&self) {}

    /// Retains `message` (the stored-message encoding) under `topic`, or clears the topic
    /// (`None`), on every node: the change is applied to each node's retained store (the
    /// one the broker reads). Does not wait; returns the mark to wait for (see `settled`).
    fn retain(&self, topic: &str, message: Option<Bytes>) -> u64;

    /// A mark that is settled once every change this node has queued so far (routes,
    /// retained messages) is applied on every live member: an acknowledgement that promises
    /// such a change (SUBACK, UNSUBACK, a retained message's PUBACK) waits for it.
    fn barrier(&self) -> u64;

    /// The highest settled mark, as it moves.
    fn settled(&self) -> watch::Receiver<u64>;

    /// The highest settled mark now.
    fn settled_now(&self) -> u64;

    /// Whether a change proposed now can commit: the node is in a cluster whose leader hears
    /// from a quorum. Without one, a SUBSCRIBE that needs a new route is refused.
    fn has_quorum(&self) -> bool;

    /// A persistent session (claimed at `epoch`) subscribed: replicated, so that another
    /// node can resume it. Does not wait.
    fn subscription_put(&self, client_id: &Arc<str>, epoch: Epoch, sub: ReplicaSubscription);

    /// A persistent session unsubscribed from `filter`. Does not wait.
    fn subscription_del(&self, client_id: &Arc<str>, epoch: Epoch, filter: &str);

    /// What `from_node` handed over (at `from_epoch`) is stored here: it may delete its
    /// copy. Does not wait.
    fn handover_taken(&self, client_id: &Arc<str>, from_node: u64, from_epoch: u64);

    /// Whether another node owns `client_id` at a later epoch than `epoch`: this node's
    /// session of it is a stale copy (it is surrendered soon), which takes no new message
    /// (the owner's node gets its own copy of each).
    fn owned_elsewhere(&self, client_id: &str, epoch: Epoch) -> bool {
        self.claimed_elsewhere(client_id, epoch).is_some()
    }

    /// The claim by which another node took `client_id` at a later epoch than `epoch`, if
    /// one did.
    fn claimed_elsewhere(&self, client_id: &str, epoch: Epoch) -> Option<ClaimedElsewhere>;
}

/// The data plane as the broker sees it: a publish that matches routes of other nodes is
/// forwarded there (in the node: `cluster::forward::Forwarder`).
pub trait DataPlane: Send + Sync + 'static {
    /// Forwards `msg` to `targets` (one per node), stamped with the log index it was
    /// routed at (`msg.routed_at`). Does not wait; returns what a QoS 1/2 publisher's
    /// acknowledgement waits for.
    fn forward(
        &self,
        msg: &Arc<crate::message::Message>,
        targets: &[crate::router::Target],
    ) -> Forwarded;

    /// Passes a copy routed to a session of this node before another node's claim took it
    /// (at `msg.routed_at`) on to that node, for that client only. Stored in the outbox at
    /// once: the returned ticket is all the sender's acknowledgement waits for.
    fn push_on(&self, msg: &Arc<crate::message::Message>, node: u64, client_id: &str) -> Forwarded;

    /// Gives a share group's copy to `node`, which has a member of (`group`, `filter`):
    /// a copy whose member here ended under it, or (`redirected`) one forwarded here that
    /// found no member left. Stored in the outbox at once, as [`DataPlane::push_on`].
    /// `None`: not queued (the copy is lost: too large, or an unknown node; counted as dropped).
    fn pass_shared(
        &self,
        msg: &Arc<crate::message::Message>,
        node: u64,
        group: &str,
        filter: &str,
        redirected: bool,
    ) -> Option<Forwarded>;

    /// The highest settled forwarding mark, as it moves.
    fn forwarded(&self) -> watch::Receiver<u64>;

    /// The highest settled forwarding mark now.
    fn forwarded_now(&self) -> u64;
}

/// What a forwarded publish's acknowledgement waits for.
#[derive(Default)]
pub struct Forwarded {
    /// Every target has acknowledged its copy, or has not within the acknowledgement
    /// timeout and its copy waits in the node's stored outbox; 0: nothing to wait for.
    pub mark: u64,
    /// Copies for targets that are behind are stored in the outbox at once: this store
    /// write.
    pub ticket: Option<petrel_storage::Ticket>,
    /// A peer whose window (unacknowledged bytes) is full: the publisher stops reading
    /// until it has room, as it does for a congested local subscriber.
    pub full: Option<std::sync::Arc<dyn Window>>,
}

/// A peer's forwarding window, as a paused publisher sees it.
pub trait Window: Send + Sync {
    /// Resolves once the window has room again (or the peer is known to be behind: its
    /// copies then wait in the outbox without holding anyone), or at `until`.
    fn wait_room(self: std::sync::Arc<Self>, until: std::time::Instant) -> BoxFuture<'static, ()>;
}

/// A data plane with no other node: nothing is ever forwarded.
pub struct NoForwarding(watch::Sender<u64>);

impl Default for NoForwarding {
    fn default() -> Self {
        NoForwarding(watch::channel(0).0)
    }
}

impl DataPlane for NoForwarding {
    fn forward(
        &self,
        _msg: &Arc<crate::message::Message>,
        _targets: &[crate::router::Target],
    ) -> Forwarded {
        Forwarded::default()
    }

    fn push_on(
        &self,
        _msg: &Arc<crate::message::Message>,
        _node: u64,
        _client_id: &str,
    ) -> Forwarded {
        Forwarded::default()
    }

    fn pass_shared(
        &self,
        _msg: &Arc<crate::message::Message>,
        _node: u64,
        _group: &str,
        _filter: &str,
        _redirected: bool,
    ) -> Option<Forwarded> {
        None
    }

    fn forwarded(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }

    fn forwarded_now(&self) -> u64 {
        0
    }
}

/// The control plane of one process without a cluster: epochs from a counter, retained
/// messages set at once, every change settled at once.
#[cfg(any(test, feature = "fuzzing"))]
pub struct LocalControl {
    next: std::sync::atomic::AtomicU64,
    retained: Arc<crate::router::SharedRetained>,
    settled: watch::Sender<u64>,
}

#[cfg(any(test, feature = "fuzzing"))]
impl LocalControl {
    pub fn new(retained: Arc<crate::router::SharedRetained>) -> LocalControl {
        LocalControl {
            next: Default::default(),
            retained,
            settled: watch::channel(0).0,
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl ControlPlane for LocalControl {
    fn claim(&self, _req: ClaimRequest) -> BoxFuture<'_, Result<Grant, ClaimError>> {
        let epoch = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        Box::pin(std::future::ready(Ok(Grant {
            epoch: Epoch(epoch),
            previous_node: None,
            // No cluster to say otherwise: whatever this process holds is the session.
            session_present: true,
            moved: None,
            arrived_at: 0,
        })))
    }

    fn disconnected(
        &self,
        _client_id: &Arc<str>,
        _epoch: Epoch,
        _will_pending: bool,
        _expiry_secs: u32,
        _drained: bool,
    ) {
    }

    fn fire_will(&self, _client_id: &Arc<str>, _epoch: Option<Epoch>) -> BoxFuture<'static, bool> {
        Box::pin(std::future::ready(true))
    }

    fn wills_need_agreement(&self) -> bool {
        false
    }

    fn ended(&self, _client_id: &Arc<str>, _epoch: Epoch) {}

    fn route_added(&self, _group: Option<&str>, _filter: &str) {}

    fn route_removed(&self, _group: Option<&str>, _filter: &str) {}

    fn retain(&self, topic: &str, message: Option<Bytes>) -> u64 {
        let clock = crate::persist::value::Clock::now();
        match message.and_then(|m| crate::persist::value::delivery(&m, &clock)) {
            Some(d) => self.retained.update(|r| r.set(d.msg)),
            None => {
                self.retained.update(|r| r.remove(topic));
            }
        }
        0
    }

    fn barrier(&self) -> u64 {
        0
    }

    fn settled(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    fn settled_now(&self) -> u64 {
        0
    }

    fn has_quorum(&self) -> bool {
        true
    }

    fn subscription_put(&self, _client_id: &Arc<str>, _epoch: Epoch, _sub: ReplicaSubscription) {}

    fn subscription_del(&self, _client_id: &Arc<str>, _epoch: Epoch, _filter: &str) {}

    fn handover_taken(&self, _client_id: &Arc<str>, _from_node: u64, _from_epoch: u64) {}

    fn claimed_elsewhere(&self, _client_id: &str, _epoch: Epoch) -> Option<ClaimedElsewhere> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::ClaimedElsewhere;

    #[test]
    fn a_copy_is_the_old_node_s_when_routed_before_the_claim() {
        let c = ClaimedElsewhere {
            node: 2,
            index: 100,
            at_ms: 5_000,
        };
        assert!(c.before(99, 9_999), "by index, whatever the clocks");
        assert!(!c.before(100, 1), "routed with the claim's routes");
        // A copy of a sender of an earlier version: by its publish time.
        assert!(c.before(0, 4_999));
        assert!(!c.before(0, 5_000));
        assert!(!c.before(0, 0), "published here, now: after the claim");
        // A claim that did not bring the routes: by time too.
        let old = ClaimedElsewhere { index: 0, ..c };
        assert!(old.before(99, 4_000));
        assert!(!old.before(99, 6_000));
    }
}
