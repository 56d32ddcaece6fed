//! One task per MQTT connection: it owns the socket and, while connected, the session state.
//!
//! ```text
//!  accept ─> handshake (CONNECT within connect_timeout, claim the client id, CONNACK)
//!         ─> Conn::run: select! { socket read | socket write | session queue notified
//!                                 | keep-alive deadline | takeover kick | shutdown }
//!         ─> finish: will (now or delayed), park or end the session
//! ```

mod conn;
mod error;
mod handshake;
mod inbound;
mod outbound;

pub use error::ConnError;
pub use handshake::{serve, ConnInfo};
