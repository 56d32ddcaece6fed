//! openraft glue: the type configuration, the log codec (protobuf, `petrel.cluster.v1`) and
//! the conversions between openraft's types and the wire types. With `network.rs`, `sm.rs`
//! and `server.rs`, the only place that names `openraft::`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;

use openraft::entry::RaftEntry;
use openraft::vote::leader_id_std;
use openraft::vote::RaftLeaderId;
use openraft::EntryPayload;
use petrel_cluster_proto::{pb, ENTRY_FORMAT};
use prost::Message as _;

/// A batch of state-machine commands: the application data of one log entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch(pub pb::CommandBatch);

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch of {} commands", self.0.commands.len())
    }
}

/// How Raft reaches a member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftNode {
    pub grpc_addr: String,
}

openraft::declare_raft_types!(
    /// Petrel's Raft types: u64 node ids and terms, one leader per term.
    pub TypeConfig:
        D = Batch,
        R = pb::BatchOutcome,
        NodeId = u64,
        Node = RaftNode,
        LeaderId = leader_id_std::LeaderId<u64, u64>,
);

pub type LeaderId = leader_id_std::LeaderId<u64, u64>;
pub type CommittedLeaderId = leader_id_std::CommittedLeaderId<u64>;
pub type LogId = openraft::LogId<CommittedLeaderId>;
pub type Vote = openraft::impls::Vote<LeaderId>;
pub type Entry = openraft::Entry<CommittedLeaderId, EntryPayload<Batch, u64, RaftNode>>;
pub type Membership = openraft::Membership<u64, RaftNode>;
pub type StoredMembership = openraft::StoredMembership<CommittedLeaderId, u64, RaftNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<CommittedLeaderId, u64, RaftNode>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Vec<u8>>;
pub type Raft = openraft::Raft<TypeConfig, super::sm::StateMachine>;

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad {what} in the raft log"),
    )
}

// ---- openraft -> wire -------------------------------------------------------------------

pub fn log_id_pb(id: &LogId) -> pb::LogId {
    pb::LogId {
        term: id.leader_id.term,
        index: id.index,
    }
}

pub fn vote_pb(v: &Vote) -> pb::Vote {
    pb::Vote {
        leader_id: Some(pb::LeaderId {
            term: v.leader_id.term,
            node_id: v.leader_id.voted_for,
        }),
        committed: v.committed,
    }
}

pub fn membership_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeIdSet {
                ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| {
                (
                    *id,
                    pb::RaftNode {
                        grpc_addr: n.grpc_addr.clone(),
                    },
                )
            })
            .collect(),
    }
}

pub fn stored_membership_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: m.log_id().as_ref().map(log_id_pb),
        membership: Some(membership_pb(m.membership())),
    }
}

pub fn entry_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(b) => pb::entry::Payload::Commands(b.0.clone()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_pb(m)),
    };
    pb::Entry {
        format: ENTRY_FORMAT,
        log_id: Some(log_id_pb(&e.log_id)),
        payload: Some(payload),
    }
}

// ---- wire -> openraft -------------------------------------------------------------------

pub fn log_id(p: pb::LogId) -> LogId {
    LogId::new(CommittedLeaderId::new(p.term), p.index)
}

pub fn opt_log_id(p: Option<pb::LogId>) -> Option<LogId> {
    p.map(log_id)
}

pub fn vote(p: Option<pb::Vote>) -> io::Result<Vote> {
    let p = p.ok_or_else(|| bad("vote"))?;
    let l = p.leader_id.ok_or_else(|| bad("vote"))?;
    let leader = LeaderId::new(l.term, l.node_id);
    Ok(match p.committed {
        true => Vote::new_committed(leader.term, leader.voted_for),
        false => Vote::new(leader.term, leader.voted_for),
    })
}

pub fn membership(p: Option<pb::Membership>) -> io::Result<Membership> {
    let p = p.ok_or_else(|| bad("membership"))?;
    let configs: Vec<BTreeSet<u64>> = p
        .configs
        .into_iter()
        .map(|c| c.ids.into_iter().collect())
        .collect();
    let nodes: BTreeMap<u64, RaftNode> = p
        .nodes
        .into_iter()
        .map(|(id, n)| {
            (
                id,
                RaftNode {
                    grpc_addr: n.grpc_addr,
                },
            )
        })
        .collect();
    Membership::new(configs, nodes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn stored_membership(p: Option<pb::StoredMembership>) -> io::Result<StoredMembership> {
    let p = p.ok_or_else(|| bad("stored membership"))?;
    Ok(StoredMembership::new(
        opt_log_id(p.log_id),
        membership(p.membership)?,
    ))
}

pub fn entry(p: pb::Entry) -> io::Result<Entry> {
    if p.format != ENTRY_FORMAT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "raft log entry of format {} (this version reads format {ENTRY_FORMAT}): \
                 written by a newer Petrel",
                p.format
            ),
        ));
    }
    let id = log_id(p.log_id.ok_or_else(|| bad("entry log id"))?);
    let payload = match p.payload.ok_or_else(|| bad("entry payload"))? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Commands(b) => EntryPayload::Normal(Batch(b)),
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership(Some(m))?),
    };
    Ok(Entry::new(id, payload))
}

/// The Raft log's byte format: protobuf messages of `petrel.cluster.v1`.
pub struct Codec;

impl petrel_storage::RaftCodec<TypeConfig> for Codec {
    fn encode_entry(e: &Entry) -> Vec<u8> {
        entry_pb(e).encode_to_vec()
    }

    fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
        entry(pb::Entry::decode(bytes).map_err(|_| bad("entry"))?)
    }

    fn encode_vote(v: &Vote) -> Vec<u8> {
        vote_pb(v).encode_to_vec()
    }

    fn decode_vote(bytes: &[u8]) -> io::Result<Vote> {
        vote(Some(pb::Vote::decode(bytes).map_err(|_| bad("vote"))?))
    }

    fn encode_log_id(id: &LogId) -> Vec<u8> {
        log_id_pb(id).encode_to_vec()
    }

    fn decode_log_id(bytes: &[u8]) -> io::Result<LogId> {
        Ok(log_id(pb::LogId::decode(bytes).map_err(|_| bad("log id"))?))
    }
}

pub type LogStore = petrel_storage::RaftLogStore<TypeConfig, Codec>;

#[cfg(test)]
#[path = "raft_test.rs"]
mod tests;
