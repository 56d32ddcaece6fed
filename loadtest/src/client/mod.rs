//! The load generator's own MQTT client: codec, connection (plain or TLS), and the publisher
//! and subscriber loops.

pub mod codec;
pub mod conn;
pub mod publisher;
pub mod subscriber;
pub mod tls;
