//! Wire types for Petrel's cluster plane.
//!
//! This crate will hold the `.proto` files (package `petrel.cluster.v1`) and the tonic/prost
//! code generated from them: Raft RPCs, the publish-forwarding stream and session handover.
//! It is intentionally empty until the cluster lands; see ARCHITECTURE.md.

/// Protobuf package name every cluster message lives in.
pub const PROTO_PACKAGE: &str = "petrel.cluster.v1";
