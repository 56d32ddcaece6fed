//! Durable storage for Petrel.
//!
//! This crate will own RocksDB: the Raft log and vote, the replicated state machine, persistent
//! sessions (subscriptions, queued messages, in-flight QoS 1/2 state) and retained messages.
//! Until it lands, the node keeps this state in memory; the seams are the `SessionStore` and
//! `RetainedStore` users in `petrel-node`. See ARCHITECTURE.md.

/// On-disk format version written into every data directory.
pub const FORMAT_VERSION: u32 = 1;
