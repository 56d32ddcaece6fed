//! TLS acceptor tests: handshakes (TLS 1.2 and 1.3), client certificates, CN, reload, bad files.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ProtocolVersion, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::test_pki::{localhost, Pki};
use super::{peer_common_name, TlsAcceptorHandle, TlsSettings, TransportError};

const TLS12: &SupportedProtocolVersion = &rustls::version::TLS12;
const TLS13: &SupportedProtocolVersion = &rustls::version::TLS13;
const VERSIONS: [(&SupportedProtocolVersion, ProtocolVersion); 2] = [
    (TLS12, ProtocolVersion::TLSv1_2),
    (TLS13, ProtocolVersion::TLSv1_3),
];

type Handshake = (
    io::Result<server::TlsStream<DuplexStream>>,
    io::Result<client::TlsStream<DuplexStream>>,
);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

/// Runs both sides of one handshake over an in-memory pipe.
async fn handshake(acceptor: TlsAcceptor, client: Arc<ClientConfig>) -> Handshake {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let connector = TlsConnector::from(client);
    tokio::join!(acceptor.accept(s), connector.connect(localhost(), c))
}

/// Sends a few bytes each way, proving the session carries data.
async fn exchange<A, B>(server: &mut A, client: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = [0u8; 4];
    client.write_all(b"ping").await.expect("client write");
    client.flush().await.expect("client flush");
    server.read_exact(&mut buf).await.expect("server read");
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.expect("server write");
    server.flush().await.expect("server flush");
    client.read_exact(&mut buf).await.expect("client read");
    assert_eq!(&buf, b"pong");
}

fn served_cert(client: &client::TlsStream<DuplexStream>) -> CertificateDer<'static> {
    client
        .get_ref()
        .1
        .peer_certificates()
        .expect("server sent certificates")[0]
        .clone()
        .into_owned()
}

#[tokio::test]
async fn handshake_works_with_tls12_and_tls13() {
    let pki = Pki::new("test ca");
    let server_cert = pki.server(1);
    let handle = TlsAcceptorHandle::load(pki.settings(&server_cert, false, false)).expect("load");
    for (version, expected) in VERSIONS {
        let (server, client) = within(handshake(
            handle.acceptor(),
            pki.client_config(version, None),
        ))
        .await;
        let (mut server, mut client) = (
            server.expect("server handshake"),
            client.expect("client handshake"),
        );
        assert_eq!(client.get_ref().1.protocol_version(), Some(expected));
        assert_eq!(served_cert(&client), server_cert.cert_der);
        assert_eq!(peer_common_name(server.get_ref().1), None);
        within(exchange(&mut server, &mut client)).await;
    }
}

#[tokio::test]
async fn client_offering_alpn_mqtt_is_accepted() {
    let pki = Pki::new("test ca");
    let handle = TlsAcceptorHandle::load(pki.settings(&pki.server(1), false, false)).expect("load");
    let mut config = (*pki.client_config(TLS13, None)).clone();
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    let (server, client) = within(handshake(handle.acceptor(), Arc::new(config))).await;
    within(exchange(
        &mut server.expect("server handshake"),
        &mut client.expect("client handshake"),
    ))
    .await;
}

#[tokio::test]
async fn required_client_cert_rejects_a_client_without_one() {
    let pki = Pki::new("test ca");
    let handle = TlsAcceptorHandle::load(pki.settings(&pki.server(1), true, true)).expect("load");
    for (version, _) in VERSIONS {
        let (server, _client) = within(handshake(
            handle.acceptor(),
            pki.client_config(version, None),
        ))
        .await;
        assert!(
            server.is_err(),
            "{version:?}: handshake without client certificate must fail"
        );
    }
}

#[tokio::test]
async fn client_cert_from_another_ca_is_rejected() {
    let pki = Pki::new("test ca");
    let other = Pki::new("other ca");
    let stranger = other.client("stranger");
    let handle = TlsAcceptorHandle::load(pki.settings(&pki.server(1), true, false)).expect("load");
    for (version, _) in VERSIONS {
        let (server, _client) = within(handshake(
            handle.acceptor(),
            pki.client_config(version, Some(&stranger)),
        ))
        .await;
        assert!(
            server.is_err(),
            "{version:?}: certificate of an unknown ca must be refused"
        );
    }
}

#[tokio::test]
async fn common_name_of_the_verified_client_cert() {
    let pki = Pki::new("test ca");
    let device = pki.client("device-42");
    for require in [true, false] {
        let handle =
            TlsAcceptorHandle::load(pki.settings(&pki.server(1), true, require)).expect("load");
        for (version, _) in VERSIONS {
            let (server, client) = within(handshake(
                handle.acceptor(),
                pki.client_config(version, Some(&device)),
            ))
            .await;
            let (mut server, mut client) = (
                server.expect("server handshake"),
                client.expect("client handshake"),
            );
            within(exchange(&mut server, &mut client)).await;
            assert_eq!(
                peer_common_name(server.get_ref().1).as_deref(),
                Some("device-42"),
                "{version:?}"
            );
        }
    }
}

#[tokio::test]
async fn optional_client_cert_accepts_a_client_without_one() {
    let pki = Pki::new("test ca");
    let handle = TlsAcceptorHandle::load(pki.settings(&pki.server(1), true, false)).expect("load");
    for (version, _) in VERSIONS {
        let (server, client) = within(handshake(
            handle.acceptor(),
            pki.client_config(version, None),
        ))
        .await;
        let (mut server, mut client) = (
            server.expect("server handshake"),
            client.expect("client handshake"),
        );
        within(exchange(&mut server, &mut client)).await;
        assert_eq!(peer_common_name(server.get_ref().1), None);
    }
}

#[tokio::test]
async fn reload_serves_the_rewritten_certificate() {
    let pki = Pki::new("test ca");
    let (first, second) = (pki.server(1), pki.server(2));
    let handle = TlsAcceptorHandle::load(pki.settings(&first, false, false)).expect("load");
    let other_clone = handle.clone();
    assert!(!handle.reload_if_changed().expect("unchanged files reload"));

    tracing::info!("--- rewrite the files, expect the new certificate");
    pki.settings(&second, false, false);
    assert!(handle.reload_if_changed().expect("reload"));
    assert!(!handle.reload_if_changed().expect("second reload"));
    for acceptor in [handle.acceptor(), other_clone.acceptor()] {
        let (server, client) = within(handshake(acceptor, pki.client_config(TLS13, None))).await;
        server.expect("server handshake");
        assert_eq!(
            served_cert(&client.expect("client handshake")),
            second.cert_der
        );
    }
}

#[tokio::test]
async fn failed_reload_keeps_the_previous_certificate() {
    let pki = Pki::new("test ca");
    let (first, second) = (pki.server(1), pki.server(2));
    let settings = pki.settings(&first, false, false);
    let handle = TlsAcceptorHandle::load(settings.clone()).expect("load");

    tracing::info!("--- a key that does not match, expect an error and the old certificate");
    pki.write("server.pem", &second.cert_pem);
    let err = handle
        .reload_if_changed()
        .expect_err("mismatched key must fail");
    assert!(matches!(err, TransportError::KeyMismatch { .. }), "{err}");
    assert!(!handle
        .reload_if_changed()
        .expect("the same rejected files are reported once"));
    let (_, client) = within(handshake(handle.acceptor(), pki.client_config(TLS12, None))).await;
    assert_eq!(
        served_cert(&client.expect("client handshake")),
        first.cert_der
    );

    tracing::info!("--- a missing file, expect an error every time");
    std::fs::remove_file(&settings.key_file).expect("remove key");
    assert!(matches!(
        handle.reload_if_changed(),
        Err(TransportError::FileMissing {
            what: "private key",
            ..
        })
    ));
    assert!(matches!(
        handle.reload_if_changed(),
        Err(TransportError::FileMissing { .. })
    ));

    tracing::info!("--- the matching key arrives, expect the new certificate");
    pki.write("server.key", &second.key_pem);
    assert!(handle.reload_if_changed().expect("reload"));
    let (_, client) = within(handshake(handle.acceptor(), pki.client_config(TLS12, None))).await;
    assert_eq!(
        served_cert(&client.expect("client handshake")),
        second.cert_der
    );
}

#[tokio::test]
async fn watch_reloads_until_cancelled() {
    let pki = Pki::new("test ca");
    let (first, second) = (pki.server(1), pki.server(2));
    let handle = TlsAcceptorHandle::load(pki.settings(&first, false, false)).expect("load");
    let cancel = CancellationToken::new();
    let watcher = tokio::spawn(
        handle
            .clone()
            .watch(Duration::from_millis(10), cancel.clone()),
    );

    pki.settings(&second, false, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, client) =
            within(handshake(handle.acceptor(), pki.client_config(TLS13, None))).await;
        let served = served_cert(&client.expect("client handshake"));
        if served == second.cert_der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "watch did not pick up the new certificate within 20s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    within(watcher)
        .await
        .expect("watch task ends when cancelled");
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let pki = Pki::new("test ca");
    let server = pki.server(1);
    let other = pki.server(2);
    let good = pki.settings(&server, true, true);
    let missing = pki.path("missing.pem");
    let key_only = pki.write("key-only.pem", &server.key_pem);
    let cert_only = pki.write("cert-only.pem", &server.cert_pem);
    let other_key = pki.write("other.key", &other.key_pem);
    let empty = pki.write("empty.pem", "");
    let broken = pki.write("broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
    let dir = pki.dir.path().to_owned();

    type Check = fn(&TransportError) -> bool;
    let cases: Vec<(&str, TlsSettings, Check)> = vec![
        (
            "missing cert",
            TlsSettings {
                cert_file: missing.clone(),
                ..good.clone()
            },
            |e| {
                matches!(
                    e,
                    TransportError::FileMissing {
                        what: "certificate",
                        ..
                    }
                )
            },
        ),
        (
            "missing key",
            TlsSettings {
                key_file: missing.clone(),
                ..good.clone()
            },
            |e| {
                matches!(
                    e,
                    TransportError::FileMissing {
                        what: "private key",
                        ..
                    }
                )
            },
        ),
        (
            "missing ca",
            TlsSettings {
                client_ca_file: Some(missing.clone()),
                ..good.clone()
            },
            |e| {
                matches!(
                    e,
                    TransportError::FileMissing {
                        what: "client ca",
                        ..
                    }
                )
            },
        ),
        (
            "unreadable cert",
            TlsSettings {
                cert_file: dir.clone(),
                ..good.clone()
            },
            |e| {
                matches!(
                    e,
                    TransportError::FileUnreadable {
                        what: "certificate",
                        ..
                    }
                )
            },
        ),
        (
            "no certificate",
            TlsSettings {
                cert_file: key_only.clone(),
                ..good.clone()
            },
            |e| {
                matches!(
                    e,
                    TransportError::NoCertificate {
                        what: "certificate",
                        ..
                    }
                )
            },
        ),
        (
            "empty cert file",
            TlsSettings {
                cert_file: empty.clone(),
                ..good.clone()
            },
            |e| {
                matches!(
                    e,
                    TransportError::NoCertificate {
                        what: "certificate",
                        ..
                    }
                )
            },
        ),
        (
            "no private key",
            TlsSettings {
                key_file: cert_only.clone(),
                ..good.clone()
            },
            |e| matches!(e, TransportError::NoPrivateKey { .. }),
        ),
        (
            "key mismatch",
            TlsSettings {
                key_file: other_key.clone(),
                ..good.clone()
            },
            |e| matches!(e, TransportError::KeyMismatch { .. }),
        ),
        (
            "empty ca",
            TlsSettings {
                client_ca_file: Some(empty.clone()),
                ..good.clone()
            },
            |e| {
                matches!(
                    e,
                    TransportError::NoCertificate {
                        what: "client ca",
                        ..
                    }
                )
            },
        ),
        (
            "broken pem",
            TlsSettings {
                cert_file: broken.clone(),
                ..good.clone()
            },
            |e| {
                matches!(
                    e,
                    TransportError::BadPem {
                        what: "certificate",
                        ..
                    }
                )
            },
        ),
        (
            "required without ca",
            TlsSettings {
                client_ca_file: None,
                ..good.clone()
            },
            |e| matches!(e, TransportError::ClientCertWithoutCa),
        ),
    ];
    for (name, settings, check) in cases {
        let err = TlsAcceptorHandle::load(settings.clone()).expect_err(name);
        assert!(check(&err), "{name}: unexpected error {err:?}");
        let text = err.to_string();
        let named = [&settings.cert_file, &settings.key_file]
            .into_iter()
            .chain(settings.client_ca_file.as_ref())
            .any(|p| text.contains(&p.display().to_string()));
        assert!(
            named || matches!(err, TransportError::ClientCertWithoutCa),
            "{name}: message names no file: {text}"
        );
    }
    TlsAcceptorHandle::load(good).expect("the good settings load");
}

#[test]
fn handle_and_errors_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<TlsAcceptorHandle>();
    send_sync::<TransportError>();
}
