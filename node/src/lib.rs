//! Petrel node: one MQTT broker process.
//!
//! - [`codec`]: MQTT 3.1 / 3.1.1 / 5.0 packets, strict decoder, allocation-free publish encoder.
//! - [`config`]: the settings tree (defaults < TOML < `PETREL_*` env < flags).
//! - [`listener`]: bound sockets and the accept loop.
//! - [`connection`]: one task per connection: CONNECT, the event loop, will and session on close.
//! - [`limit`]: connection admission (caps per node and listener, rate per address), token buckets.
//! - [`session`]: what outlives a connection: queue, in-flight window, subscriptions.
//! - [`router`]: topic filters, the subscription trie, retained messages.
//! - [`broker`]: shared state and the publish path; delayed wills and session expiry.
//! - [`control`]: the control plane as the MQTT side sees it (claims, routes, retained
//!   messages, marks); [`cluster`]: the control plane (Raft) that implements it.
//! - [`takeover`]: claims and takeovers, and sessions moving between nodes.
//! - [`persist`]: sessions, retained messages and wills in `petrel-storage`; recovery.
//! - [`sys`]: `$SYS` topics. [`metrics`]: Prometheus metrics. [`admin`]: the admin API backend.
//! - [`node`]: `Node::start` and `NodeHandle`.
//! - `fuzz` (tests and the `fuzzing` feature): whole connections fuzzed in process.

pub mod admin;
pub mod auth;
pub mod broker;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod connection;
pub mod control;
pub mod ctl;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod limit;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod node;
pub mod persist;
pub mod router;
pub mod session;
pub mod sys;
pub mod takeover;
pub mod transport;

use std::net::SocketAddr;

pub use listener::Listeners;
pub use node::{Node, NodeHandle};

/// Errors of starting a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} listener address {addr:?} is not HOST:PORT")]
    BadAddr { what: &'static str, addr: String },
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("read local address of a listener")]
    LocalAddr(#[source] std::io::Error),
    #[error(transparent)]
    Storage(#[from] petrel_storage::Error),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cluster: {0}")]
    Cluster(#[source] cluster::StartError),
    #[error("admin API: {0}")]
    Admin(String),
}
