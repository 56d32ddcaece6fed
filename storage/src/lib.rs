//! Durable storage for Petrel, on RocksDB.
//!
//! - [`Store`]: the database, its column families ([`Cf`]) and a group-commit writer thread:
//!   operations appended from any thread become one WAL write; a [`Ticket`] resolves once its
//!   operations are durable.
//! - [`keys`]: key layout; everything of one client shares a prefix.
//!
//! Values are opaque bytes: this crate knows nothing about MQTT (the node encodes them).
//! - [`raft`]: the Raft log and vote (openraft's `RaftLogStorage`, written with fsync) and
//!   the last state-machine snapshot, as bytes a node-supplied [`RaftCodec`] makes.

pub mod error;
pub mod keys;
pub mod raft;
mod store;

pub use error::{Error, Result};
pub use keys::Cf;
pub use raft::{RaftCodec, RaftLogStore};
pub use store::{BatchWriter, CommitObserver, Committed, Store, StoreOptions, Ticket, Txn};

/// On-disk format version written into every data directory.
pub const FORMAT_VERSION: u32 = 1;

#[cfg(test)]
mod store_test;
