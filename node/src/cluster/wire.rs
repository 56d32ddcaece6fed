//! Wire levels: what a node understands of what other nodes send it, so that a cluster can
//! run two versions side by side during a rolling upgrade.
//!
//! Each node announces its level in `MemberUp` (every start). A feature of a higher level
//! changes what one node sends or what every node computes from the log; it is used only
//! once every member has announced that level, so a node of the previous version never
//! meets it (it would ignore a field it does not know and do the wrong thing). Until then
//! the cluster works as the previous version did. Levels only grow; a node may announce a
//! lower one (`cluster.wire_level`) to keep the newer features off, for example before
//! going back to the previous version.
//!
//! | level | what it adds |
//! | --- | --- |
//! | 1 | (the versions before wire levels, which announce none) |
//! | 2 | `Claim.with_routes`: a claim that moves a session adds its routes for the new node in the same entry; `ForwardedMessage.routed_at` cuts a moving session's copies by that entry's index, and `ForwardedMessage.client_id` passes the old node's copies on |
//! | 3 | `ForwardBatch.packed`: a forwarded batch's messages in the packed form (`packed.rs`), a message without properties or expiry as its fields rather than in the stored encoding |
//! | 4 | `Claim.keep_replaced_will`: a claim that replaces another node's connected record with a will still due keeps that record aside until a `WillFired` of its epoch (`sm.rs`, `wills.rs`); snapshots carry them (`SnapshotRecord.replaced_will`); `SessionDisconnected.drained` drops one of a drained connection (an earlier version ignores the field: it keeps no such records) |
//!
//! Level 3 concerns only one forwarding stream, so it is agreed per stream rather than by
//! the members: the receiver answers the stream with its level in the [`STREAM_LEVEL`]
//! header (versions before level 3 send none), and the sender uses the lower of that and
//! its own `cluster.wire_level`. What the sender's outbox keeps past a stream (stored
//! entries, copies for a peer that is behind) is in the stored encoding, which every level
//! reads, so a peer that comes back as an earlier version loses nothing.
//!
//! Additions that a node of an earlier version can ignore without harm take no level (a
//! hand-over's `SessionHandover.subscriptions`: an old receiver keeps the replica's;
//! `ForwardedMessage.share_redirected`: an old receiver never sends a forwarded copy on,
//! which is what the mark asks).

use petrel_cluster_proto::pb;

/// The highest level this version knows (the default of `cluster.wire_level`).
pub const LEVEL: u32 = 4;

/// Forwarded batches packed (`ForwardBatch.packed`).
pub const PACKED: u32 = 3;

/// The response header of `Forward.Stream` in which the receiver announces its level.
pub const STREAM_LEVEL: &str = "petrel-wire-level";

/// The level a stream's receiver announced in `headers` (none: a version before level 3).
pub fn stream_level(headers: &tonic::metadata::MetadataMap) -> u32 {
    headers
        .get(STREAM_LEVEL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(CLAIM_ROUTES)
}

/// A claim that moves a session brings its routes (`Claim.with_routes`).
pub const CLAIM_ROUTES: u32 = 2;

/// A claim keeps the will of the record it replaces (`Claim.keep_replaced_will`).
pub const KEEP_WILLS: u32 = 4;

/// The level a member announced (the first versions announced none: 1).
pub fn level(m: &pb::Member) -> u32 {
    m.wire_level.max(1)
}
