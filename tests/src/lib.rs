//! Harness for the end-to-end tests.
//!
//! [`Broker`] spawns the real `petrel` binary on loopback ports chosen by the kernel and waits
//! for its ready file; [`V3Client`] and [`V5Client`] wrap rumqttc clients whose event loops run
//! in a task and feed a queue the test reads with deadlines; [`RawClient`] and [`pkt`] speak
//! hand-made bytes for the cases a well-behaved client library refuses to produce.
//!
//! Nothing here sleeps to synchronise: every wait names a condition and a deadline
//! ([`wait_until`]), and every test runs under [`test_timeout`]. A check that nothing (more)
//! arrives ends at a marker, not after a quiet period: a message of the client's own
//! ([`V3Client::publishes_before_marker`]) or, on a raw connection, a PINGRESP
//! ([`RawClient::ping`]).

mod broker;
mod client;
pub mod pkt;
mod raw;
mod wait;

pub use broker::{
    free_port, petrel_bin, run_petrel, test_cluster_size, Broker, BrokerBuilder, Metrics, Ready,
    Spawned,
};
pub use client::{V3Client, V3Event, V5Client, V5Event};
pub use raw::{RawClient, RawPacket, RawPublish, RawRead};
pub use wait::{let_time_pass, test_timeout, wait_until, WAIT};

pub use rumqttc;
