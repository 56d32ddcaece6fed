//! The cluster's control plane: one openraft group over gRPC replicating members, routes,
//! session ownership, persistent subscriptions and retained messages.
//!
//! ```text
//!  connection code ── Cluster::propose(cmd) ──> proposer task: batch (what queued, ≤ 256)
//!                                                  leader?  raft.client_write(batch)
//!                                                  else     Cluster.Propose to the leader
//!  Raft (log in RocksDB, fsync) ──> sm::StateMachine::apply ──> ClusterState (every node)
//!  gRPC listener: server.rs (Raft service for openraft, Cluster service for members/CLI)
//! ```
//!
//! A node with no seeds and an empty data dir starts a cluster of one: the zero-config node
//! is a one-member cluster, on the same code path as a bigger one. Every `openraft::` name
//! lives in this module (and in the storage crate's Raft store).

pub mod cli;
pub mod forward;
pub mod handover;
mod network;
mod packed;
pub mod raft;
mod server;
mod settle;
pub mod sm;
mod wills;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use petrel_cluster_proto::pb;
use petrel_cluster_proto::pb::cluster_client::ClusterClient;
use petrel_storage::Store;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use self::raft::{Batch, Codec, Raft, RaftNode, TypeConfig};
use self::settle::Settle;
use self::sm::{Effect, StateMachine};
use crate::config::ClusterConfig;
use crate::control::{
    BoxFuture, ClaimError, ClaimRequest, ClaimedElsewhere, ControlPlane, Grant, ReplicaSubscription,
};
use crate::router::SharedRetained;
use crate::session::Epoch;

/// Most commands in one log entry.
const BATCH_MAX: usize = 256;
/// Pause between two rounds of asking the seeds to join.
const JOIN_RETRY: Duration = Duration::from_millis(500);

/// Why a proposal failed.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known, or it did not answer in time: no quorum on this side.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The node is shutting down.
    #[error("the cluster plane is shutting down")]
    Stopped,
}

/// What a committed proposal answered, and the log index it was applied at.
#[derive(Debug, Clone)]
pub struct Proposed {
    pub outcome: pb::Outcome,
    pub index: u64,
}

struct Proposal {
    cmd: pb::Command,
    /// Its place in the queue (see `settle`).
    mark: u64,
    reply: oneshot::Sender<Result<Proposed, ProposeError>>,
}

/// The proposal queue's sender and the mark of the last proposal sent, under one lock so
/// that marks follow the queue's order.
struct Queue {
    tx: mpsc::UnboundedSender<Proposal>,
    last: u64,
}

/// How often the peers' applied-index streams are checked against the membership.
const PEER_CHECK: Duration = Duration::from_secs(1);
/// Pause before an applied-index stream to a peer is opened again.
const PEER_RETRY: Duration = Duration::from_millis(500);
/// Pause before a failed proposal is submitted again.
const SUBMIT_RETRY: Duration = Duration::from_millis(100);
/// How often settling looks at lagging peers again.
const SETTLE_TICK: Duration = Duration::from_millis(50);

/// Milliseconds since the Unix epoch (the clock carried by commands).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How this node presents itself to the cluster.
#[derive(Clone, Debug)]
pub struct Identity {
    pub node_id: u64,
    /// gRPC address other members dial.
    pub grpc_addr: String,
    /// MQTT address clients reach it on.
    pub mqtt_addr: String,
    pub version: String,
    /// The wire level it announces (`cluster.wire_level`; see `wire.rs`).
    pub wire_level: u32,
}

/// The admin API's calls this node answers for other members (`rpc Admin`).
pub trait LocalAdmin: Send + Sync + 'static {
    fn call(&self, op: String, args: Vec<u8>)
        -> crate::control::BoxFuture<'static, pb::AdminReply>;
}

/// The running control plane of one node.
pub struct Cluster {
    me: Identity,
    voters: usize,
    raft: Raft,
    sm: StateMachine,
    /// Unbounded, so that a change is queued at once, in order, by a caller that holds a
    /// lock (route changes); what waits in it is bounded by what waits for an answer
    /// (CONNECTs, within the propose timeout) and by the node's subscriptions.
    proposals: Mutex<Queue>,
    /// Which queued changes every live member has applied.
    settle: Settle,
    /// When an append from a leader last arrived (ms since `started`; 0: never).
    leader_contact: AtomicU64,
    /// The log index of this node's announcement since it started (`MemberUp`, committed
    /// after everything the cluster committed while it was down): it is not caught up
    /// before it has applied that far. `u64::MAX` until the announcement commits.
    announced_at: AtomicU64,
    started: Instant,
    /// Cancelled when the control plane stops (ends the peers' streams).
    stop: CancellationToken,
    /// The node's sessions, for hand-overs (set once the node has built them).
    host: std::sync::OnceLock<Arc<dyn crate::control::SessionHost>>,
    /// The node's admin API, for calls other members make (set once the node has it).
    admin: std::sync::OnceLock<Arc<dyn LocalAdmin>>,
    /// A route change failed to commit: the routes are reconciled again soon.
    routes_dirty: Arc<AtomicBool>,
    /// Cluster clients by address, reused (one HTTP/2 connection per peer).
    clients: Mutex<HashMap<String, ClusterClient<Channel>>>,
    /// Membership changes take turns on the leader (openraft refuses overlapping ones).
    membership: tokio::sync::Mutex<()>,
    /// What applied entries ask this node to do, until the node takes the receiver.
    effects: Mutex<Option<mpsc::UnboundedReceiver<Effect>>>,
    /// How long a proposal may take before it fails (no quorum).
    propose_timeout: Duration,
    /// How long a leader counts as leading without hearing from a quorum.
    lease: Duration,
    /// The data plane: publishes forwarded to the other members.
    forward: Arc<forward::Forwarder>,
    /// This cluster, for futures that outlive a borrow of it.
    this: std::sync::Weak<Cluster>,
    /// Commands queued for Raft since start (for metrics).
    proposed: AtomicU64,
}

/// What the cluster shares with the rest of the node: the stores its state machine writes
/// (the broker reads them) and the data plane's metrics.
pub struct Shared {
    pub retained: Arc<SharedRetained>,
    pub routes: Arc<crate::router::RouteTable>,
    pub forward_metrics: forward::ForwardMetrics,
}

/// Why the cluster plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error(
        "this data dir belongs to node {recorded}, not to node {configured} (--node-id): \
         start it with --node-id {recorded}, or give node {configured} an empty data dir"
    )]
    NodeId { configured: u64, recorded: u64 },
}

impl Cluster {
    /// Opens the Raft log and state machine in `store`, serves gRPC on `listener`, and
    /// starts (bootstraps or joins) in the background; see [`Cluster::wait_member`].
    pub async fn start(
        cfg: &ClusterConfig,
        me: Identity,
        store: Store,
        shared: Shared,
        listener: tokio::net::TcpListener,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Arc<Cluster>, StartError> {
        let config = openraft::Config {
            cluster_name: "petrel".to_owned(),
            heartbeat_interval: cfg.heartbeat_interval_ms,
            election_timeout_min: cfg.election_timeout_ms,
            election_timeout_max: cfg.election_timeout_ms * 2,
            install_snapshot_timeout: 60_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_after_entries),
            max_in_snapshot_log_to_keep: cfg.snapshot_keep_entries,
            max_payload_entries: 256,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        match store.claim_raft_node_id(me.node_id) {
            Ok(Ok(())) => {}
            Ok(Err(recorded)) => {
                return Err(StartError::NodeId {
                    configured: me.node_id,
                    recorded,
                })
            }
            Err(e) => return Err(StartError::Storage(std::io::Error::other(e))),
        }
        let (sm, effects) =
            StateMachine::open(store.clone(), me.node_id, shared.retained, shared.routes)?;
        let forward = Arc::new(forward::Forwarder::new(
            me.node_id,
            store.clone(),
            forward::Limits {
                ack_timeout: Duration::from_millis(cfg.forward_ack_timeout_ms),
                // Room above the window for what waits for a peer that is behind.
                window: cfg.forward_window_bytes.min(cfg.forward_outbox_bytes / 2),
                outbox: cfg.forward_outbox_bytes,
                wire_level: cfg.wire_level,
            },
            shared.forward_metrics,
        )?);
        let log = store.raft_log::<TypeConfig, Codec>();
        let raft = Raft::new(
            me.node_id,
            Arc::new(config),
            network::Network,
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let cluster = Arc::new_cyclic(|this| Cluster {
            this: this.clone(),
            proposed: AtomicU64::new(0),
            me,
            voters: cfg.voters,
            raft,
            sm,
            proposals: Mutex::new(Queue { tx, last: 0 }),
            settle: Settle::new(Duration::from_millis(cfg.apply_wait_ms)),
            leader_contact: AtomicU64::new(0),
            announced_at: AtomicU64::new(u64::MAX),
            started: Instant::now(),
            stop: cancel.clone(),
            host: std::sync::OnceLock::new(),
            admin: std::sync::OnceLock::new(),
            routes_dirty: Arc::new(AtomicBool::new(true)),
            clients: Mutex::new(HashMap::new()),
            membership: tokio::sync::Mutex::new(()),
            effects: Mutex::new(Some(effects)),
            propose_timeout: Duration::from_millis(cfg.propose_timeout_ms),
            lease: Duration::from_millis(2 * cfg.election_timeout_ms),
            forward,
        });
        tracker.spawn(cluster.forward.clone().run_timers(cancel.clone()));
        tracker.spawn(server::serve(cluster.clone(), listener, cancel.clone()));
        tracker.spawn(cluster.clone().run_proposer(rx, cancel.clone()));
        tracker.spawn(cluster.clone().run_settle(cancel.clone()));
        tracker.spawn(cluster.clone().follow_peers(cancel.clone()));
        tracker.spawn(
            cluster
                .clone()
                .watch_wills(Duration::from_millis(cfg.will_grace_ms), cancel.clone()),
        );
        let seeds = cfg.seeds();
        tracker.spawn(cluster.clone().enter(seeds, cancel));
        Ok(cluster)
    }

    /// The data plane (the broker forwards through it; it delivers through the broker).
    /// Lets other members call this node's admin API.
    pub fn set_admin(&self, admin: Arc<dyn LocalAdmin>) {
        let _ = self.admin.set(admin);
    }

    /// Calls `op` of another member's admin API (`rpc Admin`).
    pub async fn admin_call(
        &self,
        grpc_addr: &str,
        op: &str,
        args: Vec<u8>,
        timeout: Duration,
    ) -> Result<pb::AdminReply, tonic::Status> {
        let mut client = self
            .client(grpc_addr)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(pb::AdminRequest {
            op: op.to_owned(),
            args_json: args.into(),
        });
        req.set_timeout(timeout);
        Ok(client.admin(req).await?.into_inner())
    }

    /// Commands proposed and snapshots built or installed, since start.
    pub fn raft_counts(&self) -> (u64, u64) {
        (
            self.proposed.load(Ordering::Relaxed),
            self.sm.snapshot_count(),
        )
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.me.node_id
    }

    /// The owner of a client id's session as the replica has it.
    pub fn owner_node(&self, client_id: &str) -> Option<u64> {
        self.sm.read().sessions.get(client_id).map(|r| r.node_id)
    }

    /// The route table as the replica holds it: (group, filter, node).
    pub fn route_entries(&self) -> Vec<(String, String, u64)> {
        self.sm.routes().entries()
    }

    /// Marks a member as draining (or not) in the replicated state.
    pub async fn propose_drain(&self, node_id: u64, draining: bool) -> Result<bool, ProposeError> {
        let cmd = pb::Command {
            cmd: Some(pb::command::Cmd::MemberDrain(pb::MemberDrain {
                node_id,
                draining,
            })),
        };
        let p = self.propose(cmd).await?;
        Ok(matches!(
            p.outcome.result,
            Some(pb::outcome::Result::Done(_))
        ))
    }

    /// If this node leads, asks the most up-to-date other voter to take over; returns the
    /// node asked, if any.
    pub async fn hand_leadership_away(&self) -> Option<u64> {
        let m = self.metrics();
        if m.current_leader != Some(self.me.node_id) {
            return None;
        }
        let replication = m.replication.clone().unwrap_or_default();
        let to = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != self.me.node_id)
            .max_by_key(|id| {
                replication
                    .get(id)
                    .cloned()
                    .flatten()
                    .map(|l| l.index)
                    .unwrap_or(0)
            })?;
        match self.raft.trigger().transfer_leader(to).await {
            Ok(()) => Some(to),
            Err(e) => {
                tracing::warn!(error = %e, to, "leadership transfer failed");
                None
            }
        }
    }

    /// Removes a node, on the leader (this node if it leads).
    pub async fn remove_via_leader(&self, node_id: u64) -> Result<(), tonic::Status> {
        if self.leader() == Some(self.me.node_id) {
            return self
                .remove(node_id)
                .await
                .map_err(tonic::Status::failed_precondition);
        }
        let addr = self
            .leader_addr()
            .ok_or_else(|| tonic::Status::unavailable("no leader"))?;
        let mut client = self
            .client(&addr)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(pb::RemoveRequest { node_id });
        req.set_timeout(Duration::from_secs(30));
        client.remove(req).await.map(|_| ())
    }

    pub fn forwarder(&self) -> &Arc<forward::Forwarder> {
        &self.forward
    }

    /// What applied entries ask this node to do (the first call gets the receiver).
    pub fn take_effects(&self) -> Option<mpsc::UnboundedReceiver<Effect>> {
        self.effects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Waits (at most `within`) until the proposals queued so far have been answered.
    pub async fn flush(&self, within: Duration) {
        // One more proposal, answered only after every one queued before it (an empty
        // command: applied as `Stale`, it changes nothing).
        let _ = tokio::time::timeout(within, self.propose_flush()).await;
    }

    async fn propose_flush(&self) -> Result<Proposed, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(pb::Command { cmd: None }, reply)
            .ok_or(ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Queues a proposal; returns its mark (`None`: the proposer has stopped).
    fn enqueue(
        &self,
        cmd: pb::Command,
        reply: oneshot::Sender<Result<Proposed, ProposeError>>,
    ) -> Option<u64> {
        let mut q = self.proposals.lock().unwrap_or_else(|e| e.into_inner());
        let mark = q.last + 1;
        q.tx.send(Proposal { cmd, mark, reply }).ok()?;
        q.last = mark;
        self.proposed.fetch_add(1, Ordering::Relaxed);
        Some(mark)
    }

    /// Stops Raft (after the connections are gone).
    pub async fn shutdown(&self) {
        self.forward.stop();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not stop cleanly");
        }
    }

    /// The current leader as this node sees it.
    pub fn leader(&self) -> Option<u64> {
        self.metrics().current_leader
    }

    /// Whether this node is in a cluster with a leader and has applied everything the
    /// leader had committed when this node last heard from it. A leader counts only while
    /// a quorum has answered it within two election timeouts (a leader cut off from the
    /// others still believes it leads until then).
    pub fn is_caught_up(&self) -> bool {
        let m = self.metrics();
        let applied = m.last_applied.map_or(0, |l| l.index);
        self.leads_or_follows(&m)
            && m.last_applied.map(|l| l.index) >= m.local_committed.map(|l| l.index)
            // Right after a restart a follower's committed index is what the leader has
            // told it so far; its own announcement is committed after all it missed.
            && applied >= self.announced_at.load(Ordering::Relaxed)
    }

    /// Announces this node again if its member record does not show its wire level: a
    /// `MemberUp` that went through a leader of an earlier version lost the field (the
    /// leader re-encodes what it proposes). Call it once caught up.
    pub fn announce_again_if_stale(&self) {
        let stale = self
            .sm
            .read()
            .members
            .get(&self.me.node_id)
            // (Not while it drains: an announcement clears that.)
            .is_some_and(|m| !m.draining && wire::level(m) != self.me.wire_level.max(1));
        if stale {
            tracing::debug!(
                wire_level = self.me.wire_level,
                "announcing this node's wire level again"
            );
            self.propose_detached(self.member_up());
        }
    }

    /// This node's announcement: its addresses, version and wire level.
    fn member_up(&self) -> pb::Command {
        pb::Command {
            cmd: Some(pb::command::Cmd::MemberUp(pb::MemberUp {
                node_id: self.me.node_id,
                grpc_addr: self.me.grpc_addr.clone(),
                mqtt_addr: self.me.mqtt_addr.clone(),
                version: self.me.version.clone(),
                wire_level: self.me.wire_level,
            })),
        }
    }

    /// Whether this node is a member with a leader that a quorum follows: the leader has
    /// heard from a quorum, or a follower from the leader, within two election timeouts (a
    /// node cut off from the others still believes in its leader until then).
    fn leads_or_follows(&self, m: &openraft::RaftMetrics<TypeConfig>) -> bool {
        use openraft::Instant as _;
        let fresh = match m.state {
            // The only voter is a quorum by itself (openraft keeps its quorum-acked time at
            // the moment it became leader).
            ServerState::Leader => {
                m.membership_config
                    .membership()
                    .voter_ids()
                    .eq([self.me.node_id])
                    || m.last_quorum_acked
                        .as_ref()
                        .is_some_and(|t| t.elapsed() < self.lease)
            }
            _ => {
                let at = self.leader_contact.load(Ordering::Relaxed);
                at > 0
                    && self
                        .started
                        .elapsed()
                        .saturating_sub(Duration::from_millis(at))
                        < self.lease
            }
        };
        fresh
            && m.current_leader.is_some()
            && m.membership_config
                .membership()
                .get_node(&self.me.node_id)
                .is_some()
    }

    /// Notes that an append from the leader arrived (heartbeats are appends).
    fn heard_from_leader(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.leader_contact.store(ms.max(1), Ordering::Relaxed);
    }

    /// Raft's metrics now.
    fn metrics(&self) -> openraft::RaftMetrics<TypeConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    // ---- proposing ------------------------------------------------------------------------

    /// Proposes one command; resolves once it is committed and applied on the leader (not
    /// necessarily here yet: see [`Cluster::wait_applied`]).
    pub async fn propose(&self, cmd: pb::Command) -> Result<Proposed, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(cmd, reply).ok_or(ProposeError::Stopped)?;
        match tokio::time::timeout(self.propose_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::NoQuorum("proposal timed out".to_owned())),
        }
    }

    /// Waits until this node has applied the entry at `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.sm.applied();
        tokio::time::timeout(timeout, rx.wait_for(|&i| i >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn run_proposer(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Proposal>,
        cancel: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                p = rx.recv() => match p { Some(p) => p, None => return },
            };
            batch.push(first);
            // Group commit: no waiting for company. Whatever queued up while the previous
            // batch was being written goes into this one, so a lone claim pays one commit
            // and a storm of them pays one commit per batch.
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let mark = batch.last().map_or(0, |p: &Proposal| p.mark);
            let (cmds, replies): (Vec<_>, Vec<_>) =
                batch.drain(..).map(|p| (p.cmd, p.reply)).unzip();
            let n = cmds.len();
            let r = self
                .submit_retrying(pb::CommandBatch { commands: cmds })
                .await;
            self.settle.committed(
                mark,
                match &r {
                    Ok((outcomes, index)) if outcomes.len() == n => Some(*index),
                    _ => None,
                },
            );
            match r {
                Ok((outcomes, index)) if outcomes.len() == n => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(Proposed { outcome, index }));
                    }
                }
                Ok(_) => {
                    for reply in replies {
                        let _ = reply.send(Err(ProposeError::NoQuorum(
                            "the leader answered a different number of outcomes".to_owned(),
                        )));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, commands = n, "proposal failed");
                    for reply in replies {
                        let _ = reply.send(Err(ProposeError::NoQuorum(e.to_string())));
                    }
                }
            }
        }
    }

    /// [`Cluster::submit`], again and again (an election in progress, a leader that just
    /// died) until it succeeds or `cluster.propose_timeout_ms` has passed. A retry after an
    /// answer that was lost can commit a batch twice: every command applies idempotently or
    /// as a newer epoch.
    async fn submit_retrying(
        &self,
        batch: pb::CommandBatch,
    ) -> Result<(Vec<pb::Outcome>, u64), String> {
        let deadline = tokio::time::Instant::now() + self.propose_timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let e = match tokio::time::timeout(left, self.submit(batch.clone())).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => e,
                Err(_) => return Err("no answer in time".to_owned()),
            };
            if tokio::time::Instant::now() + SUBMIT_RETRY >= deadline {
                return Err(e);
            }
            tracing::debug!(error = %e, "proposal failed; retrying");
            tokio::time::sleep(SUBMIT_RETRY).await;
        }
    }

    /// Writes a batch through Raft here if this node leads, else through the leader.
    async fn submit(&self, batch: pb::CommandBatch) -> Result<(Vec<pb::Outcome>, u64), String> {
        // Between leaders (an election, or a node that is still joining): wait for one.
        let known = self
            .raft
            .wait(Some(self.propose_timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await;
        let leader = match known {
            Ok(m) => m.current_leader,
            Err(_) => return Err("no leader".to_owned()),
        };
        if leader == Some(self.me.node_id) {
            match tokio::time::timeout(
                self.propose_timeout,
                self.raft.client_write(Batch(batch.clone())),
            )
            .await
            {
                Ok(Ok(r)) => return Ok((r.data.outcomes, r.log_id.index)),
                Ok(Err(e)) => {
                    if e.forward_to_leader().is_none() {
                        return Err(e.to_string());
                    }
                }
                Err(_) => return Err("commit timed out".to_owned()),
            }
        }
        let addr = self.leader_addr().ok_or("no leader")?;
        let mut client = self.client(&addr).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(pb::ProposeRequest { batch: Some(batch) });
        req.set_timeout(self.propose_timeout);
        let reply = client
            .propose(req)
            .await
            .map_err(|s| s.message().to_owned())?;
        let reply = reply.into_inner();
        Ok((reply.outcome.unwrap_or_default().outcomes, reply.index))
    }

    /// The leader's gRPC address, from the membership.
    fn leader_addr(&self) -> Option<String> {
        let m = self.metrics();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.grpc_addr.clone())
    }

    fn client(&self, addr: &str) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let c = ClusterClient::new(network::channel(addr)?)
            .max_decoding_message_size(network::MAX_MESSAGE)
            .max_encoding_message_size(network::MAX_MESSAGE);
        clients.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    // ---- membership -----------------------------------------------------------------------

    /// Gets this node into a cluster: nothing to do if its log says it is in one; else
    /// bootstrap (no seeds, or the lowest id of all seeds) or join through a seed. Then
    /// records its addresses and version (MemberUp).
    async fn enter(self: Arc<Self>, seeds: Vec<String>, cancel: CancellationToken) {
        let initialized = self.raft.is_initialized().await.unwrap_or(false);
        if initialized {
            // The only voter needs nobody's vote: lead now, not after an election timeout
            // (a restarted single node takes CONNECTs at once).
            let m = self.metrics().membership_config;
            let voters: Vec<u64> = m.membership().voter_ids().collect();
            if voters == [self.me.node_id] {
                let _ = self.raft.trigger().elect(false).await;
            }
        } else {
            loop {
                match self.try_enter(&seeds).await {
                    Ok(()) => break,
                    Err(why) => tracing::info!(%why, "not in a cluster yet; retrying"),
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(JOIN_RETRY) => {}
                }
            }
        }
        // Announce this node's addresses and version (also after every restart).
        let up = self.member_up();
        loop {
            match self.propose(up.clone()).await {
                Ok(p) => {
                    self.announced_at.store(p.index, Ordering::Relaxed);
                    break;
                }
                Err(ProposeError::Stopped) => return,
                Err(e) => tracing::debug!(error = %e, "announcing this node failed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(JOIN_RETRY) => {}
            }
        }
        tracing::info!(node_id = self.me.node_id, leader = ?self.leader(), "member of the cluster");
    }

    /// One round of bootstrapping or joining.
    async fn try_enter(&self, seeds: &[String]) -> Result<(), String> {
        let others: Vec<&String> = seeds.iter().filter(|s| **s != self.me.grpc_addr).collect();
        if others.is_empty() {
            return self.bootstrap().await;
        }
        // Join through any seed that is in a cluster; note the ids of those that are not.
        let mut lowest = true;
        let mut missing = Vec::new();
        for seed in &others {
            let mut client = match self.client(seed) {
                Ok(c) => c,
                Err(e) => {
                    missing.push(format!("{seed} ({e})"));
                    continue;
                }
            };
            let mut status = tonic::Request::new(pb::StatusRequest {});
            status.set_timeout(Duration::from_secs(2));
            let st = match client.status(status).await {
                Ok(st) => st.into_inner(),
                Err(s) => {
                    missing.push(format!("{seed} ({})", s.message()));
                    continue;
                }
            };
            if st.node_id == self.me.node_id {
                return Err(format!("seed {seed} has this node's id {}", st.node_id));
            }
            if st.leader_id.is_some() {
                let mut join = tonic::Request::new(pb::JoinRequest {
                    node_id: self.me.node_id,
                    grpc_addr: self.me.grpc_addr.clone(),
                    mqtt_addr: self.me.mqtt_addr.clone(),
                    version: self.me.version.clone(),
                });
                join.set_timeout(Duration::from_secs(30));
                return match client.join(join).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        tracing::info!(via = %seed, voter = r.voter, "joined the cluster");
                        Ok(())
                    }
                    Err(s) => Err(format!("join through {seed}: {}", s.message())),
                };
            }
            if st.node_id < self.me.node_id {
                lowest = false;
            }
        }
        if !missing.is_empty() {
            return Err(format!(
                "waiting for seeds to answer: {}",
                missing.join(", ")
            ));
        }
        if lowest {
            self.bootstrap().await
        } else {
            Err("waiting for the seed with the lowest id to start the cluster".to_owned())
        }
    }

    async fn bootstrap(&self) -> Result<(), String> {
        let mut members = BTreeMap::new();
        members.insert(
            self.me.node_id,
            RaftNode {
                grpc_addr: self.me.grpc_addr.clone(),
            },
        );
        match self.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(node_id = self.me.node_id, "started a new cluster");
                Ok(())
            }
            Err(e) => Err(format!("bootstrap: {e}")),
        }
    }

    /// Leader side of a join: the node becomes a learner, then a voter while the cluster
    /// has fewer voters than configured.
    async fn admit(&self, req: &pb::JoinRequest) -> Result<bool, String> {
        let _turn = self.membership.lock().await;
        let id = req.node_id;
        let node = RaftNode {
            grpc_addr: req.grpc_addr.clone(),
        };
        let current = self.metrics().membership_config;
        let known = current.membership().get_node(&id).cloned();
        if known.as_ref() != Some(&node) {
            // Blocking: returns once the learner has caught up with the log.
            self.raft
                .add_learner(id, node, true)
                .await
                .map_err(|e| e.to_string())?;
        }
        let m = self.metrics().membership_config;
        let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        let voter = if voters.contains(&id) {
            true
        } else if voters.len() < self.voters {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
                .await
                .map_err(|e| e.to_string())?;
            true
        } else {
            false
        };
        Ok(voter)
    }

    /// Removes a node for good: out of the Raft membership, its routes and ownerships out
    /// of the state; then promotes a learner if the cluster lacks voters.
    pub async fn remove(&self, id: u64) -> Result<(), String> {
        {
            let _turn = self.membership.lock().await;
            let m = self.metrics().membership_config;
            let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
            if voters.contains(&id) {
                if voters.len() == 1 {
                    return Err("the last voter cannot be removed".to_owned());
                }
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| e.to_string())?;
            } else if m.membership().get_node(&id).is_some() {
                self.raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let rm = pb::Command {
            cmd: Some(pb::command::Cmd::MemberRemove(pb::MemberRemove {
                node_id: id,
                at_ms: now_ms(),
            })),
        };
        self.propose(rm).await.map_err(|e| e.to_string())?;
        self.promote_learners().await
    }

    /// Promotes learners (lowest ids first) while there are fewer voters than configured.
    async fn promote_learners(&self) -> Result<(), String> {
        let _turn = self.membership.lock().await;
        let m = self.metrics().membership_config;
        let voters = m.membership().voter_ids().count();
        let learners: Vec<u64> = m.membership().learner_ids().collect();
        let want = self.voters.saturating_sub(voters);
        let promote: BTreeSet<u64> = learners.into_iter().take(want).collect();
        if promote.is_empty() {
            return Ok(());
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(promote), true)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> pb::StatusReply {
        let m = self.metrics();
        let role = |id: u64| -> &'static str {
            if m.current_leader == Some(id) {
                "leader"
            } else if m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == id)
            {
                "follower"
            } else {
                "learner"
            }
        };
        let my_role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Follower => "follower",
            ServerState::Shutdown => "shutdown",
        };
        let st = self.sm.read();
        let routes: BTreeMap<u64, u64> = self
            .sm
            .routes()
            .node_counts()
            .into_iter()
            .map(|(n, c)| (n, c as u64))
            .collect();
        let routes_unknown_node = routes
            .iter()
            .filter(|(n, _)| !st.members.contains_key(n))
            .map(|(_, c)| c)
            .sum();
        let mut ids: BTreeSet<u64> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        ids.extend(st.members.keys().copied());
        let members = ids
            .into_iter()
            .map(|id| {
                let info = st.members.get(&id).cloned().unwrap_or_default();
                let grpc = m
                    .membership_config
                    .membership()
                    .get_node(&id)
                    .map(|n| n.grpc_addr.clone())
                    .unwrap_or(info.grpc_addr);
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|l| l.index)
                    .unwrap_or(0);
                pb::MemberStatus {
                    node_id: id,
                    grpc_addr: grpc,
                    mqtt_addr: info.mqtt_addr,
                    version: info.version,
                    draining: info.draining,
                    role: match m.membership_config.membership().get_node(&id) {
                        Some(_) => role(id).to_owned(),
                        None => "removed".to_owned(),
                    },
                    matched_index: matched,
                    routes: routes.get(&id).copied().unwrap_or(0),
                }
            })
            .collect();
        pb::StatusReply {
            node_id: self.me.node_id,
            leader_id: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: m.local_committed.map(|l| l.index).unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            role: my_role.to_owned(),
            members,
            routes_unknown_node,
        }
    }

    /// Maps a write error for a gRPC answer.
    fn write_status(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> tonic::Status {
        match e.forward_to_leader() {
            Some(_) => tonic::Status::unavailable(format!("not the leader: {e}")),
            None => tonic::Status::internal(e.to_string()),
        }
    }
}

impl Cluster {
    /// Queues a proposal without waiting for the outcome (a connection that ended: nobody
    /// waits).
    fn propose_detached(&self, cmd: pb::Command) -> u64 {
        let (reply, _) = oneshot::channel();
        self.enqueue(cmd, reply).unwrap_or(0)
    }

    /// Queues the addition (`add`) or removal of this node's route to `filter` in `group`;
    /// if it fails to commit, the routes are reconciled again.
    fn propose_route(&self, add: bool, group: Option<&str>, filter: &str) {
        let route = Some(pb::Route {
            filter: filter.to_owned(),
            share_group: group.unwrap_or("").to_owned(),
            node_id: self.me.node_id,
        });
        let cmd = pb::Command {
            cmd: Some(match add {
                true => pb::command::Cmd::RouteAdd(pb::RouteAdd { route }),
                false => pb::command::Cmd::RouteDel(pb::RouteDel { route }),
            }),
        };
        let (reply, rx) = oneshot::channel();
        if self.enqueue(cmd, reply).is_none() {
            return;
        }
        let dirty = self.routes_dirty.clone();
        tokio::spawn(async move {
            if !matches!(rx.await, Ok(Ok(_))) {
                dirty.store(true, Ordering::Relaxed);
            }
        });
    }

    /// Makes this node's entries of the replicated route table equal to `local` (its
    /// filters with subscribers): adds the missing, removes the stale. Call it with the
    /// subscription trie held (`Broker::with_routes`), so that no route change of a
    /// connection is queued between the comparison and the proposals. Returns (added,
    /// removed).
    pub fn reconcile_routes(&self, local: &[(Option<String>, String)]) -> (usize, usize) {
        self.routes_dirty.store(false, Ordering::Relaxed);
        let me = self.me.node_id;
        let routes = self.sm.routes();
        // A claim in flight may bring routes whose subscribers are not counted yet: no
        // route is removed meanwhile (the next round does it).
        let may_remove = !routes.claims_in_flight();
        let mut want: BTreeSet<(String, String)> = local
            .iter()
            .map(|(g, f)| (g.clone().unwrap_or_default(), f.clone()))
            .collect();
        // Sessions on their way here: a claim brought their routes, the router does not
        // have them yet.
        want.extend(
            routes
                .arriving_filters()
                .into_iter()
                .map(|f| (String::new(), f)),
        );
        let have: BTreeSet<(String, String)> = routes.routes_of(me).into_iter().collect();
        let (mut added, mut removed) = (0, 0);
        for (g, f) in want.difference(&have) {
            self.propose_route(true, (!g.is_empty()).then_some(g.as_str()), f);
            added += 1;
        }
        for (g, f) in have.difference(&want) {
            if !may_remove {
                self.routes_dirty.store(true, Ordering::Relaxed);
                break;
            }
            self.propose_route(false, (!g.is_empty()).then_some(g.as_str()), f);
            removed += 1;
        }
        (added, removed)
    }

    /// Wills kept aside by claims that replaced their records (`ClusterState::replaced_wills`).
    pub fn replaced_wills(&self) -> usize {
        self.sm.read().replaced_wills.len()
    }

    /// The lowest wire level a member announced (1 for one that has not announced
    /// itself yet): the features up to it are on.
    pub fn wire_level(&self) -> u32 {
        let st = self.sm.read();
        let level = st
            .membership
            .membership()
            .nodes()
            .map(|(id, _)| st.members.get(id).map_or(1, wire::level))
            .min()
            .unwrap_or(1);
        level
    }

    // ---- settling ----------------------------------------------------------------------

    /// Feeds this node's applied index to settling, and lets it look at lagging peers.
    async fn run_settle(self: Arc<Self>, cancel: CancellationToken) {
        let mut applied = self.sm.applied();
        let mut tick = tokio::time::interval(SETTLE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = applied.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let index = *applied.borrow_and_update();
                    self.settle.applied_here(index);
                }
                _ = tick.tick() => self.settle.tick(),
            }
        }
    }

    /// Keeps one applied-index stream open to every other member of the Raft membership.
    async fn follow_peers(self: Arc<Self>, cancel: CancellationToken) {
        let mut following: HashMap<u64, (String, CancellationToken)> = HashMap::new();
        // Changes with the membership (and the server state); the tick is a safety net.
        let mut server = self.raft.server_metrics();
        let mut tick = tokio::time::interval(PEER_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
                r = server.changed() => if r.is_err() { return },
            }
            let m = self.metrics().membership_config;
            let peers: HashMap<u64, String> = m
                .membership()
                .nodes()
                .filter(|(id, _)| **id != self.me.node_id)
                .map(|(id, n)| (*id, n.grpc_addr.clone()))
                .collect();
            self.forward.set_peers(&peers);
            following.retain(|id, (addr, stop)| {
                let keep = peers.get(id) == Some(addr);
                if !keep {
                    stop.cancel();
                    self.settle.forget_peer(*id);
                }
                keep
            });
            for (id, addr) in peers {
                if following.contains_key(&id) {
                    continue;
                }
                let stop = cancel.child_token();
                tokio::spawn(self.clone().follow_peer(id, addr.clone(), stop.clone()));
                following.insert(id, (addr, stop));
            }
        }
    }

    /// Reads peer `id`'s applied index from its stream, reconnecting until `cancel`.
    async fn follow_peer(self: Arc<Self>, id: u64, addr: String, cancel: CancellationToken) {
        loop {
            let follow = async {
                let mut client = self.client(&addr).map_err(|e| e.to_string())?;
                let mut stream = client
                    .applied(pb::AppliedRequest {
                        node_id: self.me.node_id,
                    })
                    .await
                    .map_err(|s| s.message().to_owned())?
                    .into_inner();
                while let Some(a) = stream.message().await.map_err(|s| s.message().to_owned())? {
                    self.settle.peer(id, Some(a.index));
                }
                Ok::<(), String>(())
            };
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = follow => r,
            };
            self.settle.peer(id, None);
            if let Err(e) = r {
                tracing::debug!(peer = id, error = %e, "applied-index stream ended");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PEER_RETRY) => {}
            }
        }
    }

    /// Peers whose applied index counts for settling now (for tests and status).
    pub fn counted_peers(&self) -> Vec<u64> {
        self.settle.counted_peers()
    }

    /// Whether a route change failed since the last reconciliation.
    pub fn routes_dirty(&self) -> bool {
        self.routes_dirty.load(Ordering::Relaxed)
    }

    /// (routes in the table, routes whose node is not a member).
    pub fn route_counts(&self) -> (usize, usize) {
        let counts = self.sm.routes().node_counts();
        let st = self.sm.read();
        let mut total = 0;
        let mut unknown = 0;
        for (n, c) in counts {
            total += c;
            if !st.members.contains_key(&n) {
                unknown += c;
            }
        }
        (total, unknown)
    }
}

impl ControlPlane for Cluster {
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Grant, ClaimError>> {
        // (`ClaimRequest::will` goes into the ownership record.)
        Box::pin(async move {
            let clean_start = req.clean_start;
            let level = self.wire_level();
            // Its epoch is at least the next one this replica knows of.
            let next = self.sm.read().next_epoch.max(1);
            self.sm.taken_wills().claimed(next);
            let cmd = pb::Command {
                cmd: Some(pb::command::Cmd::Claim(pb::Claim {
                    client_id: req.client_id.to_string(),
                    node_id: self.me.node_id,
                    clean_start: req.clean_start,
                    expiry_secs: req.expiry_secs,
                    will: req.will.map(|(message, delay_secs)| pb::Will {
                        message,
                        delay_secs,
                    }),
                    at_ms: now_ms(),
                    with_routes: level >= wire::CLAIM_ROUTES,
                    keep_replaced_will: level >= wire::KEEP_WILLS,
                })),
            };
            let with_routes = matches!(&cmd.cmd, Some(pb::command::Cmd::Claim(c)) if c.with_routes);
            // Until it is applied here, a forwarded copy routed past this node's index may be
            // for the session it moves here (`RouteTable::ready_for`), and this node's routes
            // stay (`RouteTable::removal_must_wait`). A clean start moves nothing.
            let in_flight =
                (with_routes && !clean_start).then(|| self.sm.routes().claim_proposed());
            let p = self.propose(cmd).await;
            let applied = match &p {
                Ok(p) => self.wait_applied(p.index, self.propose_timeout).await,
                Err(_) => false,
            };
            drop(in_flight);
            let p = p.map_err(|e| ClaimError::NoQuorum(e.to_string()))?;
            let Some(pb::outcome::Result::Claimed(c)) = p.outcome.result else {
                return Err(ClaimError::NoQuorum(format!(
                    "unexpected outcome {:?}",
                    p.outcome
                )));
            };
            // Read what was written: this node applies the claim before it answers.
            if !applied {
                return Err(ClaimError::NoQuorum(
                    "the claim was not applied here in time".into(),
                ));
            }
            let previous_node = (c.previous_epoch != 0 && c.previous_node_id != self.me.node_id)
                .then_some(c.previous_node_id);
            let moved = match (c.session_present, previous_node) {
                (true, Some(from)) => {
                    let m = self
                        .moved_session(&req.client_id, c.epoch, p.index, from)
                        .await;
                    // The hand-over took time: a newer claim (on another node) may have been
                    // applied meanwhile, and with no session here yet nothing was kicked.
                    // (A resumed session always has a record: none means a newer claim.)
                    if self
                        .session_owner(&req.client_id)
                        .is_none_or(|o| o.epoch != c.epoch)
                    {
                        // The routes this claim brought here may have no session.
                        self.recheck_routes();
                        let _ = self.sm.routes().arrived(&req.client_id);
                        return Err(ClaimError::NoQuorum(
                            "claimed again elsewhere while the session moved".into(),
                        ));
                    }
                    Some(Box::new(m))
                }
                _ => None,
            };
            let arrived_at = match (&moved, with_routes) {
                (Some(_), true) => p.index,
                _ => 0,
            };
            Ok(Grant {
                epoch: Epoch(c.epoch),
                previous_node,
                session_present: c.session_present,
                moved,
                arrived_at,
            })
        })
    }

    fn disconnected(
        &self,
        client_id: &Arc<str>,
        epoch: Epoch,
        will_pending: bool,
        expiry_secs: u32,
        drained: bool,
    ) {
        self.propose_detached(pb::Command {
            cmd: Some(pb::command::Cmd::SessionDisconnected(
                pb::SessionDisconnected {
                    client_id: client_id.to_string(),
                    epoch: epoch.0,
                    at_ms: now_ms(),
                    will: None,
                    keep_will: will_pending,
                    expiry_secs: Some(expiry_secs),
                    drained,
                },
            )),
        });
    }

    fn fire_will(&self, client_id: &Arc<str>, epoch: Option<Epoch>) -> BoxFuture<'static, bool> {
        self.will_fired(client_id, epoch.map(|e| e.0))
    }

    fn will_elsewhere(&self, client_id: &str, epoch: Epoch) -> crate::control::WillElsewhere {
        use crate::control::WillElsewhere;
        match self.sm.taken_wills().take(client_id, epoch.0) {
            None => WillElsewhere::Nothing,
            Some(sm::Taken::Kept) => WillElsewhere::Kept,
            Some(sm::Taken::FiredElsewhere) => WillElsewhere::Fired,
        }
    }

    fn ended(&self, client_id: &Arc<str>, epoch: Epoch) {
        self.propose_detached(pb::Command {
            cmd: Some(pb::command::Cmd::SessionEnd(pb::SessionEnd {
                client_id: client_id.to_string(),
                epoch: epoch.0,
            })),
        });
    }

    fn route_added(&self, group: Option<&str>, filter: &str) {
        self.propose_route(true, group, filter);
    }

    fn route_removed(&self, group: Option<&str>, filter: &str) {
        self.propose_route(false, group, filter);
    }

    fn recheck_routes(&self) {
        self.routes_dirty.store(true, Ordering::Relaxed);
    }

    fn retain(&self, topic: &str, message: Option<Bytes>) -> u64 {
        let topic = topic.to_owned();
        self.propose_detached(pb::Command {
            cmd: Some(match message {
                Some(message) => pb::command::Cmd::RetainSet(pb::RetainSet { topic, message }),
                None => pb::command::Cmd::RetainClear(pb::RetainClear { topic }),
            }),
        })
    }

    fn barrier(&self) -> u64 {
        self.proposals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
    }

    fn settled(&self) -> watch::Receiver<u64> {
        self.settle.settled()
    }

    fn settled_now(&self) -> u64 {
        self.settle.settled_now()
    }

    fn has_quorum(&self) -> bool {
        // Just started (an election may be under way): not known to be cut off yet.
        self.started.elapsed() < self.lease || self.leads_or_follows(&self.metrics())
    }

    fn subscription_put(&self, client_id: &Arc<str>, epoch: Epoch, sub: ReplicaSubscription) {
        self.propose_detached(pb::Command {
            cmd: Some(pb::command::Cmd::SubPut(pb::SubPut {
                sub: Some(pb::Subscription {
                    client_id: client_id.to_string(),
                    filter: sub.filter,
                    options: u32::from(sub.options),
                    subscription_id: sub.subscription_id,
                    acl_filtered: sub.acl_filtered,
                    epoch: epoch.0,
                }),
            })),
        });
    }

    fn subscription_del(&self, client_id: &Arc<str>, epoch: Epoch, filter: &str) {
        self.propose_detached(pb::Command {
            cmd: Some(pb::command::Cmd::SubDel(pb::SubDel {
                client_id: client_id.to_string(),
                filter: filter.to_owned(),
                epoch: epoch.0,
            })),
        });
    }

    fn handover_taken(&self, client_id: &Arc<str>, from_node: u64, from_epoch: u64) {
        self.send_handover_done(client_id, from_node, from_epoch);
    }

    fn claimed_elsewhere(&self, client_id: &str, epoch: Epoch) -> Option<ClaimedElsewhere> {
        self.session_owner(client_id)
            .filter(|o| o.node != self.me.node_id && o.epoch > epoch.0)
            .map(|o| ClaimedElsewhere {
                node: o.node,
                index: o.claimed_at_index,
                at_ms: o.claimed_at_ms,
            })
    }
}
