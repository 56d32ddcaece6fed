//! MQTT over WebSocket, server side: the HTTP upgrade and a byte stream over binary frames.
//!
//! [`accept_ws`] answers the upgrade request: the path must be the listener's (`404`
//! otherwise) and the client must offer the subprotocol `mqtt` (or the older `mqttv3.1`),
//! which the response names; a client that offers neither gets `400`. RFC 6455 lets the
//! server only pick a subprotocol the client offered, so `mqtt` is preferred and
//! `mqttv3.1` is chosen only when it is the one offered.
//!
//! [`WsStream`] turns the message stream into bytes: MQTT packets may span frames and a
//! frame may hold several packets, so reads just concatenate binary payloads. A text frame
//! breaks MQTT's rule that packets travel in binary frames: the stream sends close code 1003
//! and the read fails. Pings are answered (by tungstenite, during reads); a close frame
//! reads as end of file. Each write is one binary frame.
//!
//! Frames and handshake come from tokio-tungstenite (only its `handshake` feature): it is
//! already the WebSocket client of the tests, is widely used, and a hand-written RFC 6455
//! codec would be the same few hundred lines with fewer users.
//! There is no timeout here: the caller runs the upgrade under the connect timeout.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::header::{self, HeaderMap, HeaderValue};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::TransportError;

/// Default bound on one incoming WebSocket message (all frames of it), see [`accept_ws_with_limit`].
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Subprotocols accepted, most preferred first.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Socket read buffer per connection; tungstenite allocates it eagerly (its default is 128 KiB).
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Performs the server side of the WebSocket upgrade on `stream` for the listener's `path`.
pub async fn accept_ws<S>(stream: S, path: &str) -> Result<WsStream<S>, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_ws_with_limit(stream, path, DEFAULT_MAX_MESSAGE_BYTES).await
}

/// [`accept_ws`] with a bound on one incoming message (a frame, or the frames of a fragmented
/// message); a larger one fails the read. It should be at least the MQTT maximum packet size.
pub async fn accept_ws_with_limit<S>(
    stream: S,
    path: &str,
    max_message_bytes: usize,
) -> Result<WsStream<S>, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let refused: OnceLock<TransportError> = OnceLock::new();
    #[allow(clippy::result_large_err)] // the error type is tungstenite's
    let callback =
        |request: &Request, response: Response| answer_upgrade(request, response, path, &refused);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes));
    match tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await {
        Ok(inner) => Ok(WsStream {
            inner,
            pending: Bytes::new(),
            eof: false,
        }),
        Err(e) => Err(refused
            .into_inner()
            .unwrap_or(TransportError::WsHandshake(e))),
    }
}

/// Checks the path and picks the subprotocol; on refusal records why in `refused`.
#[allow(clippy::result_large_err)] // the signature of tungstenite's `Callback`
fn answer_upgrade(
    request: &Request,
    mut response: Response,
    path: &str,
    refused: &OnceLock<TransportError>,
) -> Result<Response, ErrorResponse> {
    let requested = request.uri().path();
    if requested != path {
        let _ = refused.set(TransportError::WsPathNotFound {
            path: requested.to_owned(),
        });
        return Err(error_response(StatusCode::NOT_FOUND, "not found\n"));
    }
    let offered = offered_subprotocols(request.headers());
    let Some(chosen) = SUBPROTOCOLS
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p))
    else {
        let _ = refused.set(TransportError::WsNoSubprotocol {
            offered: offered.join(", "),
        });
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "websocket subprotocol \"mqtt\" required\n",
        ));
    };
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(chosen),
    );
    Ok(response)
}

/// The subprotocol tokens of all `Sec-WebSocket-Protocol` headers.
fn offered_subprotocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

fn error_response(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// An accepted WebSocket connection as a byte stream of MQTT packets.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    /// The peer closed the WebSocket (or the connection ended).
    eof: bool,
}

impl<S> std::fmt::Debug for WsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsStream")
            .field("pending", &self.pending.len())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<S> WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The stream under the WebSocket, e.g. a TLS stream to ask for the client certificate.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// Tells the peer why the connection ends; best effort, the caller drops the stream next.
    fn close_unsupported(&mut self, cx: &mut Context<'_>) {
        let frame = CloseFrame {
            code: CloseCode::Unsupported,
            reason: "mqtt packets need binary frames".into(),
        };
        let mut inner = Pin::new(&mut self.inner);
        if inner
            .as_mut()
            .start_send(Message::Close(Some(frame)))
            .is_ok()
        {
            let _ = inner.poll_flush(cx);
        }
    }
}

impl<S> AsyncRead for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Polling again after a ping or close lets tungstenite send the pong or close reply;
            // after a close it then ends the stream.
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(
                    Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_),
                )) => {}
                None => this.eof = true,
                Some(Ok(Message::Text(_))) => {
                    this.close_unsupported(cx);
                    this.eof = true;
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        "websocket text frame: mqtt needs binary frames",
                    );
                    return Poll::Ready(Err(e));
                }
                Some(Err(e)) => return Poll::Ready(Err(into_io(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut inner = Pin::new(&mut self.inner);
        ready!(inner.as_mut().poll_ready(cx)).map_err(into_io)?;
        inner
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(into_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(into_io)
    }

    /// Sends a close frame and flushes it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx).map_err(into_io)
    }
}

fn into_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::from(io::ErrorKind::BrokenPipe)
        }
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}
