//! Transports under MQTT: TLS (rustls) and WebSocket, for the listeners to wrap accepted sockets in.
//!
//! - [`tls`]: a rustls acceptor built from PEM files, optional client certificates (mTLS),
//!   the client certificate's common name, reloading the files without a restart.
//! - [`ws`]: MQTT over WebSocket: the HTTP upgrade (path and subprotocol "mqtt") and
//!   [`WsStream`], a byte stream over binary frames that `connection::serve` takes like a socket.
//!
//! Both work over any `AsyncRead + AsyncWrite` stream, so `wss` is [`accept_ws`] over the
//! stream that [`TlsAcceptorHandle::acceptor`] returns.

mod error;
pub mod tls;
pub mod ws;

pub use error::TransportError;
pub use tls::{peer_common_name, TlsAcceptorHandle, TlsSettings};
pub use ws::{accept_ws, accept_ws_with_limit, WsStream};

#[cfg(test)]
mod test_pki;
#[cfg(test)]
mod tls_test;
#[cfg(test)]
mod ws_test;
