//! WebSocket tests: a tokio-tungstenite client against `accept_ws` and `WsStream`, plain and over TLS.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::test_pki::{localhost, Pki};
use super::{accept_ws, peer_common_name, TlsAcceptorHandle, TransportError, WsStream};

/// An MQTT 3.1.1 CONNECT (client id "a", keepalive 60) and a PINGREQ, as a client sends them.
const CONNECT: [u8; 15] = [
    0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a',
];
const PINGREQ: [u8; 2] = [0xC0, 0];

type Upgrade<S> = (
    Result<WsStream<S>, TransportError>,
    Result<(WebSocketStream<S>, Response), WsError>,
);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

fn request(url: &str, subprotocols: Option<&str>) -> Request {
    let mut request = url.into_client_request().expect("valid url");
    if let Some(p) = subprotocols {
        request
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, p.parse().expect("valid header"));
    }
    request
}

/// Runs both sides of the upgrade on `(client, server)` streams.
async fn upgrade<S>(client: S, server: S, request: Request) -> Upgrade<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::join!(
        accept_ws(server, "/mqtt"),
        tokio_tungstenite::client_async(request, client)
    )
}

async fn plain_upgrade(request: Request) -> Upgrade<DuplexStream> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    upgrade(client, server, request).await
}

/// An upgraded pair over an in-memory pipe, subprotocol "mqtt".
async fn connected() -> (WsStream<DuplexStream>, WebSocketStream<DuplexStream>) {
    let (server, client) =
        within(plain_upgrade(request("ws://localhost/mqtt", Some("mqtt")))).await;
    let (client, response) = client.expect("client upgrade");
    assert_eq!(
        response
            .headers()
            .get(SEC_WEBSOCKET_PROTOCOL)
            .expect("subprotocol chosen"),
        "mqtt"
    );
    (server.expect("server upgrade"), client)
}

/// Reads binary messages until `len` bytes came; fails on anything else.
async fn receive<S>(client: &mut WebSocketStream<S>, len: usize) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut got = Vec::new();
    while got.len() < len {
        match client.next().await {
            Some(Ok(Message::Binary(data))) => got.extend_from_slice(&data),
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
    got
}

/// Packets split across frames and packed into one frame reach the broker as one byte stream,
/// and what the broker writes reaches the client.
async fn exchange_mqtt_bytes<S, C>(server: &mut WsStream<S>, client: &mut WebSocketStream<C>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    client
        .send(Message::binary(CONNECT[..5].to_vec()))
        .await
        .expect("send first part");
    client
        .send(Message::binary(CONNECT[5..].to_vec()))
        .await
        .expect("send second part");
    client
        .send(Message::binary([PINGREQ, PINGREQ].concat()))
        .await
        .expect("send two packets");
    let mut got = vec![0u8; CONNECT.len() + 2 * PINGREQ.len()];
    server.read_exact(&mut got).await.expect("server read");
    assert_eq!(got, [&CONNECT[..], &PINGREQ, &PINGREQ].concat());

    let connack_and_pingresps = [0x20, 2, 0, 0, 0xD0, 0, 0xD0, 0];
    server
        .write_all(&connack_and_pingresps)
        .await
        .expect("server write");
    server.flush().await.expect("server flush");
    assert_eq!(
        receive(client, connack_and_pingresps.len()).await,
        connack_and_pingresps
    );
}

#[tokio::test]
async fn bytes_flow_both_ways_across_frames() {
    let (mut server, mut client) = connected().await;
    within(exchange_mqtt_bytes(&mut server, &mut client)).await;
}

#[tokio::test]
async fn large_writes_arrive_whole() {
    let (mut server, mut client) = connected().await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        server.write_all(&sent).await.expect("server write");
        server.flush().await.expect("server flush");
        server
    });
    assert_eq!(within(receive(&mut client, payload.len())).await, payload);
    within(writer).await.expect("writer task");
}

#[tokio::test]
async fn ping_is_answered_while_reading() {
    let (mut server, mut client) = connected().await;
    client
        .send(Message::Ping(Bytes::from_static(b"hi")))
        .await
        .expect("send ping");
    client
        .send(Message::binary(PINGREQ.to_vec()))
        .await
        .expect("send packet");
    let mut got = [0u8; 2];
    within(server.read_exact(&mut got))
        .await
        .expect("server read");
    assert_eq!(got, PINGREQ);
    match within(client.next()).await {
        Some(Ok(Message::Pong(data))) => assert_eq!(&data[..], b"hi"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[tokio::test]
async fn text_frame_fails_the_read_and_closes() {
    let (mut server, mut client) = connected().await;
    client
        .send(Message::text("CONNECT"))
        .await
        .expect("send text");
    let err = within(server.read(&mut [0u8; 16]))
        .await
        .expect_err("text frame must fail the read");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    match within(client.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Unsupported),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn close_frame_reads_as_end_of_file() {
    let (mut server, mut client) = connected().await;
    client
        .send(Message::binary(PINGREQ.to_vec()))
        .await
        .expect("send packet");
    client.close(None).await.expect("send close");
    let mut got = Vec::new();
    within(server.read_to_end(&mut got))
        .await
        .expect("read to end of file");
    assert_eq!(got, PINGREQ);
    match within(client.next()).await {
        Some(Ok(Message::Close(_))) | None => {}
        other => panic!("expected the close reply, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_sends_a_close_frame() {
    let (mut server, mut client) = connected().await;
    within(server.shutdown()).await.expect("shutdown");
    match within(client.next()).await {
        Some(Ok(Message::Close(_))) => {}
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_path_gets_404() {
    let (server, client) = within(plain_upgrade(request(
        "ws://localhost/other?x=1",
        Some("mqtt"),
    )))
    .await;
    assert!(
        matches!(server, Err(TransportError::WsPathNotFound { ref path }) if path == "/other"),
        "{server:?}"
    );
    match client {
        Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::NOT_FOUND),
        other => panic!("expected an http error, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_mqtt_subprotocol_gets_400() {
    for offered in [None, Some("chat, superchat")] {
        let (server, client) = within(plain_upgrade(request("ws://localhost/mqtt", offered))).await;
        assert!(
            matches!(server, Err(TransportError::WsNoSubprotocol { .. })),
            "{offered:?}: {server:?}"
        );
        match client {
            Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::BAD_REQUEST),
            other => panic!("{offered:?}: expected an http error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn subprotocol_choice_echoes_an_offered_one() {
    let cases = [
        ("mqttv3.1", "mqttv3.1"),
        ("mqttv3.1, mqtt", "mqtt"),
        ("chat,mqtt", "mqtt"),
    ];
    for (offered, chosen) in cases {
        let (server, client) =
            within(plain_upgrade(request("ws://localhost/mqtt", Some(offered)))).await;
        server.expect("server upgrade");
        let (_, response) = client.expect("client upgrade");
        assert_eq!(
            response
                .headers()
                .get(SEC_WEBSOCKET_PROTOCOL)
                .expect("subprotocol chosen"),
            chosen,
            "{offered}"
        );
    }
}

#[tokio::test]
async fn websocket_over_tls_carries_mqtt_and_the_client_cn() {
    let pki = Pki::new("test ca");
    let device = pki.client("device-7");
    let handle = TlsAcceptorHandle::load(pki.settings(&pki.server(1), true, true)).expect("load");
    let client_config = pki.client_config(&rustls::version::TLS13, Some(&device));
    let (client, server) = tokio::io::duplex(64 * 1024);

    let server = async move {
        let tls = handle
            .acceptor()
            .accept(server)
            .await
            .expect("server tls handshake");
        accept_ws(tls, "/mqtt").await
    };
    let client = async move {
        let tls = TlsConnector::from(client_config)
            .connect(localhost(), client)
            .await
            .expect("client tls handshake");
        tokio_tungstenite::client_async(request("wss://localhost/mqtt", Some("mqtt")), tls).await
    };
    let (server, client) = within(async { tokio::join!(server, client) }).await;
    let (mut server, mut client) = (
        server.expect("server upgrade"),
        client.expect("client upgrade").0,
    );
    within(exchange_mqtt_bytes(&mut server, &mut client)).await;
    assert_eq!(
        peer_common_name(server.get_ref().get_ref().1).as_deref(),
        Some("device-7")
    );
}

#[test]
fn upgrade_future_is_send() {
    fn send<T: Send>(_: &T) {}
    let (_, stream) = tokio::io::duplex(16);
    let future = accept_ws(stream, "/mqtt");
    send(&future);
}
