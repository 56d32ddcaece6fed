//! One task per MQTT connection: it owns the socket and, while connected, the session state.
//!
//! ```text
//!  accept ─> handshake (CONNECT within connect_timeout, claim the client id, CONNACK)
//!         ─> Conn::run: select! { session woken (queue, takeover or shutdown kick)
//!                                 | socket write | socket read | keep-alive deadline
//!                                 | pause over | store watermark moved }
//!         ─> finish: will (now or delayed), park or end the session
//!         ─> close: last bytes, half-close, read and discard until the client closes (bounded)
//! ```

mod close;
mod conn;
mod error;
mod handshake;
mod inbound;
mod outbound;

pub use error::ConnError;
pub use handshake::{serve, ConnInfo};
