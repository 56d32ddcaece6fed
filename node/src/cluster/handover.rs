//! Moving a persistent session between nodes.
//!
//! ```text
//!  new owner N                                   old owner P
//!  CONNECT, claim committed (session present,
//!  previous node P) ── Handover(client, epoch, claim index) ──> applies the claim, closes
//!                                                              the connection (0x8E), takes
//!                                                              the session out of its router
//!                   <── queue + in-flight + inbound QoS 2 ───  and keeps the stored copy
//!  subscriptions from the replica, messages
//!  stored here, CONNACK (session present)
//!  ── HandoverDone(client, from epoch) ─────────────────────>  deletes its copy
//! ```
//!
//! P unreachable (down, cut off): the claim still succeeds and N resumes the session from
//! the replica's subscriptions; P pushes what it held (`PushSession`) once it is back and
//! sees that N owns the session, and N appends those messages to the queue (after any newer
//! ones). A hand-over is taken at most once per (client id, from epoch), so a push after a
//! lost `HandoverDone` adds nothing twice.

use std::sync::Arc;

use petrel_cluster_proto::pb;
use tonic::Status;

use super::settle::PeerState;
use super::Cluster;

/// How long a member's stream must have been down for [`Cluster::peers_drained`] not to wait
/// for it.
const PEER_GONE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a CONNECT waits for an old owner whose applied-index stream is down.
const HANDOVER_TRY: std::time::Duration = std::time::Duration::from_secs(1);
use crate::control::{HandedMessage, HandedOver, Moved, ReplicaSubscription, SessionHost};

pub(super) fn replica_sub(s: &pb::Subscription) -> ReplicaSubscription {
    ReplicaSubscription {
        filter: s.filter.clone(),
        options: s.options as u8,
        subscription_id: s.subscription_id,
        acl_filtered: s.acl_filtered,
    }
}

fn handed_pb(client_id: &str, h: HandedOver) -> pb::SessionHandover {
    pb::SessionHandover {
        client_id: client_id.to_owned(),
        from_node: h.from_node,
        from_epoch: h.from_epoch,
        queued: h
            .queued
            .into_iter()
            .map(|m| pb::QueuedMessage {
                message: m.message,
                packet_id: u32::from(m.packet_id),
                released: m.released,
            })
            .collect(),
        inbound_qos2: h.inbound_qos2.into_iter().map(u32::from).collect(),
        subscriptions: h
            .subscriptions
            .into_iter()
            .map(|s| pb::Subscription {
                client_id: client_id.to_owned(),
                filter: s.filter,
                options: u32::from(s.options),
                subscription_id: s.subscription_id,
                acl_filtered: s.acl_filtered,
                epoch: 0,
            })
            .collect(),
    }
}

fn handed_from_pb(h: pb::SessionHandover) -> HandedOver {
    HandedOver {
        from_node: h.from_node,
        from_epoch: h.from_epoch,
        queued: h
            .queued
            .into_iter()
            .map(|m| HandedMessage {
                message: m.message,
                // A packet id is 16 bits; anything else is not one.
                packet_id: u16::try_from(m.packet_id).unwrap_or(0),
                released: m.released,
            })
            .collect(),
        inbound_qos2: h
            .inbound_qos2
            .into_iter()
            .filter_map(|id| u16::try_from(id).ok().filter(|id| *id != 0))
            .collect(),
        subscriptions: h.subscriptions.iter().map(replica_sub).collect(),
    }
}

/// Who owns a client id's session, as the replicated state says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub node: u64,
    /// The epoch of its latest claim.
    pub epoch: u64,
    /// The epoch of the claim that started the session.
    pub started_epoch: u64,
    /// When the session came to its node (ms since the Unix epoch; 0: unknown).
    pub claimed_at_ms: u64,
    /// The log index of the claim that brought it to its node with its routes (0: unknown,
    /// or that claim did not bring them).
    pub claimed_at_index: u64,
}

impl Owner {
    /// Whether what a node held of the client id at `epoch` belongs to this session (not to
    /// one a clean start ended).
    pub fn continues(&self, epoch: u64) -> bool {
        epoch >= self.started_epoch
    }
}

impl Cluster {
    /// Lets the cluster reach this node's sessions (once, when the node has built them).
    pub fn set_host(&self, host: Arc<dyn SessionHost>) {
        let _ = self.host.set(host);
    }

    /// The gRPC address of member `id`.
    fn member_addr(&self, id: u64) -> Option<String> {
        self.metrics()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.grpc_addr.clone())
    }

    /// Whether every other member has delivered here what it kept for this node while it
    /// was away (see `Forwarder::has_drained`), leaving out a member whose stream has been
    /// down for `PEER_GONE` (it is away too: nothing comes from it now).
    pub fn peers_drained(&self) -> bool {
        let m = self.metrics();
        let ids: Vec<u64> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter(|&id| id != self.me.node_id)
            .all(|id| {
                self.forward.has_drained(id)
                    || self.settle.down_for(id).is_some_and(|d| d >= PEER_GONE)
            })
    }

    /// The owner of `client_id`'s session in the replicated state.
    pub fn session_owner(&self, client_id: &str) -> Option<Owner> {
        self.sm.read().sessions.get(client_id).map(|r| Owner {
            node: r.node_id,
            epoch: r.epoch,
            started_epoch: r.started_epoch,
            claimed_at_ms: r.claimed_at_ms,
            claimed_at_index: r.claimed_at_index,
        })
    }

    /// What a claim at `epoch` (committed at `claim_index`) that resumed a session node
    /// `from` held is made of here.
    pub(super) async fn moved_session(
        &self,
        client_id: &str,
        epoch: u64,
        claim_index: u64,
        from: u64,
    ) -> Moved {
        let subscriptions = self
            .sm
            .read()
            .subscriptions
            .get(client_id)
            .map(|subs| subs.values().map(replica_sub).collect())
            .unwrap_or_default();
        let handed = match self.pull(from, client_id, epoch, claim_index).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%client_id, from_node = from, error = %e, "session resumed without its messages; the old owner hands them over when it is back");
                None
            }
        };
        Moved {
            subscriptions,
            handed,
        }
    }

    async fn pull(
        &self,
        from: u64,
        client_id: &str,
        epoch: u64,
        claim_index: u64,
    ) -> Result<Option<HandedOver>, String> {
        // A member that is stopped or cut off would make the CONNECT wait for a timeout; one
        // whose stream is down gets a short try (it may be up and just not followed yet;
        // a dead one refuses at once).
        let within = match self.settle.peer_state(from) {
            PeerState::Counted => self.propose_timeout,
            PeerState::Down => HANDOVER_TRY.min(self.propose_timeout),
            PeerState::Lagging => return Err("the old owner does not keep up".to_owned()),
        };
        let addr = self
            .member_addr(from)
            .ok_or("the old owner is not a member")?;
        let mut client = self.client(&addr).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(pb::HandoverRequest {
            client_id: client_id.to_owned(),
            epoch,
            claim_index,
            node_id: self.me.node_id,
        });
        req.set_timeout(within);
        let reply = client
            .handover(req)
            .await
            .map_err(|s| s.message().to_owned())?;
        Ok(reply.into_inner().session.map(handed_from_pb))
    }

    /// Old owner's side of `Handover`.
    pub(super) async fn serve_handover(
        &self,
        req: pb::HandoverRequest,
    ) -> Result<Option<pb::SessionHandover>, Status> {
        let host = self
            .host
            .get()
            .ok_or_else(|| Status::unavailable("the node is starting"))?;
        if !self
            .wait_applied(req.claim_index, self.propose_timeout)
            .await
        {
            return Err(Status::unavailable("the claim is not applied here yet"));
        }
        // The index of the claim if it brought the session's routes to the new owner: the
        // copies routed here before it are still this node's to pass on.
        let moved_at = self
            .session_owner(&req.client_id)
            .filter(|o| o.epoch == req.epoch)
            .map_or(0, |o| o.claimed_at_index);
        let handed = host
            .surrender(&req.client_id, req.epoch, moved_at, req.node_id)
            .await;
        if let Some(h) = &handed {
            tracing::info!(client_id = %req.client_id, to_node = req.node_id, messages = h.queued.len(), "session handed over");
        }
        Ok(handed.map(|h| handed_pb(&req.client_id, h)))
    }

    /// Old owner's side of `HandoverDone`.
    pub(super) fn handover_done(&self, client_id: &str, from_epoch: u64) {
        if let Some(host) = self.host.get() {
            host.forget(client_id, from_epoch);
        }
    }

    /// Owner's side of `PushSession`.
    pub(super) fn take_pushed(&self, h: pb::SessionHandover) -> Result<bool, Status> {
        let host = self
            .host
            .get()
            .ok_or_else(|| Status::unavailable("the node is starting"))?;
        let client_id = h.client_id.clone();
        match self.session_owner(&client_id) {
            // Ended cluster-wide, or started anew (clean start) since: nothing to give the
            // messages to.
            None => Ok(true),
            Some(o) if !o.continues(h.from_epoch) => Ok(true),
            Some(o) if o.node == self.me.node_id => Ok(host.absorb(&client_id, handed_from_pb(h))),
            // Not the owner (any more, or not yet as this node sees it): ask again later.
            Some(_) => Ok(false),
        }
    }

    /// Pushes what this node held of `client_id`'s session to its owner `node`; returns
    /// whether the owner took it (the copy here may go).
    pub async fn push_session(
        &self,
        node: u64,
        client_id: &str,
        handed: HandedOver,
    ) -> Result<bool, String> {
        let addr = self.member_addr(node).ok_or("not a member")?;
        let mut client = self.client(&addr).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(handed_pb(client_id, handed));
        req.set_timeout(self.propose_timeout);
        let reply = client
            .push_session(req)
            .await
            .map_err(|s| s.message().to_owned())?;
        Ok(reply.into_inner().taken)
    }

    /// Tells `from_node` that its hand-over is stored here (best effort: if this is lost,
    /// it pushes the session again and the push is recognised).
    pub(super) fn send_handover_done(&self, client_id: &str, from_node: u64, from_epoch: u64) {
        let Some(addr) = self.member_addr(from_node) else {
            return;
        };
        let Ok(mut client) = self.client(&addr) else {
            return;
        };
        let mut req = tonic::Request::new(pb::HandoverDoneRequest {
            client_id: client_id.to_owned(),
            from_epoch,
        });
        req.set_timeout(self.propose_timeout);
        let client_id = client_id.to_owned();
        tokio::spawn(async move {
            if let Err(s) = client.handover_done(req).await {
                tracing::debug!(%client_id, from_node, error = %s.message(), "hand-over confirmation not delivered");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_over_keeps_its_messages_and_subscriptions_on_the_wire() {
        let h = HandedOver {
            from_node: 2,
            from_epoch: 9,
            queued: vec![HandedMessage {
                message: bytes::Bytes::from_static(b"m"),
                packet_id: 7,
                released: true,
            }],
            inbound_qos2: vec![3, 4],
            subscriptions: vec![ReplicaSubscription {
                filter: "$share/g/a/+".into(),
                options: 0b0000_0110,
                subscription_id: 5,
                acl_filtered: false,
            }],
        };
        let back = handed_from_pb(handed_pb("dev", h.clone()));
        assert_eq!(back.subscriptions, h.subscriptions);
        assert_eq!((back.from_node, back.from_epoch), (2, 9));
        assert_eq!(back.inbound_qos2, [3, 4]);
        assert_eq!(back.queued[0].packet_id, 7);
        assert!(back.queued[0].released);
        // From a node of an earlier version: none, and the replica's are used.
        let mut old = handed_pb("dev", h);
        old.subscriptions.clear();
        assert!(handed_from_pb(old).subscriptions.is_empty());
    }
}
