//! Wire types for Petrel's cluster plane: the prost messages and tonic services generated
//! from `proto/petrel/cluster/v1/*.proto`.
//!
//! - `raft.proto`: the Raft log entry, vote, membership and the `Raft` service (vote, append,
//!   snapshot stream, leader transfer);
//! - `state.proto`: the state machine's commands, outcomes, snapshot records and the
//!   `Cluster` service (forwarded proposals, join, remove, status);
//! - `forward.proto`: the data plane's `Forward` service (publishes forwarded between nodes
//!   in batches, acknowledged cumulatively).
//!
//! Everything in the Raft log and on the wire between nodes is one of these messages, so
//! nodes of versions N and N+1 understand each other (the compatibility rules are at the top
//! of `raft.proto`). This crate knows nothing of openraft or RocksDB.

#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("petrel.cluster.v1");
}

pub use v1 as pb;

/// Protobuf package name every cluster message lives in.
pub const PROTO_PACKAGE: &str = "petrel.cluster.v1";

/// Format of [`pb::Entry`] this version writes and reads.
pub const ENTRY_FORMAT: u32 = 1;

/// Format of a snapshot ([`pb::SnapshotHeader::format`]) this version writes and reads.
pub const SNAPSHOT_FORMAT: u32 = 1;
