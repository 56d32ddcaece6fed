//! Wills, exactly once in the cluster.
//!
//! ```text
//!  CONNECT with a will ── Claim{will} ──> ownership record keeps it
//!  connection ends (not a normal DISCONNECT) ── SessionDisconnected{keep_will} ──> kept
//!  the will is due here (now, or after its delay) ── WillFired(client, epoch) ──> Done: publish
//!                                                                               Stale: not
//!  a node unreachable for `cluster.will_grace_ms`: the leader ── WillFired ──> Done: publish
//!    (for each of its records with a will, once the will's delay has passed too, and each
//!    of its records that a claim elsewhere replaced with the will due)
//!  a claim of another node replaces a connected record, will due ── kept aside ──>
//!    the old node closes the connection ── WillFired(old epoch) ──> Done: publish
//! ```
//!
//! `WillFired` is Done for the first proposer of an epoch only, and never once the client has
//! claimed its id again (a new epoch), so a will is published once whoever proposes it: the
//! node of the connection, a node restarted after a crash (it finds the will armed in its
//! store), or the leader for a node that stays away.
//!
//! A client whose node died reconnects elsewhere, often before the grace has passed (a fleet
//! behind a load balancer): its claim replaces the dead node's record, and with it the will
//! that was due when the connection died. From wire level 4 such a claim keeps the replaced
//! record aside (`ClusterState::replaced_wills`, while the will is due: no delay, or the
//! session does not go on), and `WillFired` of the old epoch fires it once: the leader's once
//! the old node has been away for the grace, the old node's on restart (armed in its store),
//! or, if the old node is alive (a takeover), its own as it closes the connection
//! ([`super::sm::TakenWills`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use petrel_cluster_proto::pb;
use tokio_util::sync::CancellationToken;

use super::{now_ms, Cluster};
use crate::control::BoxFuture;

/// The (client id, epoch) wills being confirmed now.
type Firing = HashSet<(Arc<str>, u64)>;

/// How often the leader looks for wills of unreachable nodes.
const WILL_CHECK: Duration = Duration::from_secs(1);
/// How long to wait before proposing again when there is no quorum.
const RETRY: Duration = Duration::from_millis(500);

impl Cluster {
    /// [`crate::control::ControlPlane::fire_will`]: with an epoch, the `WillFired` is queued
    /// now (ahead of what the caller queues next); on failure it is proposed again.
    pub(super) fn will_fired(
        &self,
        client_id: &str,
        epoch: Option<u64>,
    ) -> BoxFuture<'static, bool> {
        let Some(this) = self.this.upgrade() else {
            return Box::pin(std::future::ready(false));
        };
        let client_id = client_id.to_owned();
        let Some(epoch) = epoch else {
            return Box::pin(async move { this.win_will(&client_id, None).await });
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        let queued = self
            .enqueue(self.will_fired_cmd(&client_id, epoch), reply)
            .is_some();
        Box::pin(async move {
            if queued {
                // No timeout of its own: the proposer answers (committed, or failed after
                // its retries); giving up earlier and proposing again would find the will
                // already fired by the first proposal, and publish it nowhere.
                if let Ok(Ok(p)) = rx.await {
                    return matches!(p.outcome.result, Some(pb::outcome::Result::Done(_)));
                }
            }
            this.win_will(&client_id, Some(epoch)).await
        })
    }

    fn will_fired_cmd(&self, client_id: &str, epoch: u64) -> pb::Command {
        pb::Command {
            cmd: Some(pb::command::Cmd::WillFired(pb::WillFired {
                client_id: client_id.to_owned(),
                epoch,
                node_id: self.me.node_id,
                at_ms: now_ms(),
            })),
        }
    }

    /// Whether this node publishes the will of `client_id` at `epoch` (`None`: the epoch of
    /// the ownership record, if this node owns it): proposes `WillFired`, retrying while the
    /// cluster cannot commit, until the node stops.
    pub(super) async fn win_will(&self, client_id: &str, epoch: Option<u64>) -> bool {
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            // The record must be current before it is read (a node that just restarted).
            if epoch.is_some() || self.is_caught_up() {
                let epoch = match epoch {
                    Some(e) => e,
                    None => match self.session_owner(client_id) {
                        Some(o) if o.node == self.me.node_id => o.epoch,
                        // Claimed elsewhere since, or ended: not this node's will.
                        _ => return false,
                    },
                };
                match self.propose(self.will_fired_cmd(client_id, epoch)).await {
                    Ok(p) => return matches!(p.outcome.result, Some(pb::outcome::Result::Done(_))),
                    Err(e) => {
                        tracing::debug!(%client_id, error = %e, "will not confirmed yet; retrying")
                    }
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// On the leader: publishes the wills of clients of nodes that have been unreachable for
    /// `grace` (or are no longer members), once each will's delay has passed as well.
    pub(super) async fn watch_wills(self: Arc<Self>, grace: Duration, cancel: CancellationToken) {
        let firing: Arc<Mutex<Firing>> = Arc::default();
        let mut tick = tokio::time::interval(WILL_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.leader() != Some(self.me.node_id) || !self.is_caught_up() {
                continue;
            }
            let Some(host) = self.host.get().cloned() else {
                continue;
            };
            let members = self.metrics().membership_config;
            let now = now_ms();
            let due: Vec<(Arc<str>, u64, bytes::Bytes)> = {
                let st = self.sm.read();
                // How long the node of `r` has been away, if for the grace at least.
                let away = |r: &pb::SessionRecord| {
                    if r.node_id == self.me.node_id {
                        return None;
                    }
                    let down = match members.membership().get_node(&r.node_id) {
                        Some(_) => self.settle.down_for(r.node_id)?,
                        None => Duration::MAX,
                    };
                    (down >= grace).then_some(down)
                };
                // Records that a claim replaced with their wills due: at once.
                let replaced = st
                    .replaced_wills
                    .iter()
                    .filter(|(_, r)| away(r).is_some())
                    .filter_map(|((client, epoch), r)| {
                        Some((client.clone(), *epoch, r.will.as_ref()?.message.clone()))
                    });
                st.sessions
                    .iter()
                    .filter_map(|(client, r)| {
                        let will = r.will.as_ref()?;
                        let down = away(r)?;
                        // The delay never outlasts the session (MQTT 5, 3.1.3.2.2).
                        let delay = u64::from(will.delay_secs.min(r.expiry_secs)) * 1000;
                        let ready = match r.connected {
                            // Gone with its node: the delay counts from the grace's end.
                            true => down.as_millis() as u64 >= grace.as_millis() as u64 + delay,
                            false => now >= r.disconnected_at_ms.saturating_add(delay),
                        };
                        ready.then(|| (client.clone(), r.epoch, will.message.clone()))
                    })
                    .chain(replaced)
                    .collect()
            };
            for (client_id, epoch, message) in due {
                let key = (client_id.clone(), epoch);
                if !firing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key.clone())
                {
                    continue;
                }
                let (this, host, firing) = (self.clone(), host.clone(), firing.clone());
                tokio::spawn(async move {
                    if this.win_will(&client_id, Some(epoch)).await {
                        tracing::info!(%client_id, "publishing the will of a client of an unreachable node");
                        host.publish_will(message);
                    }
                    firing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                });
            }
        }
    }
}
