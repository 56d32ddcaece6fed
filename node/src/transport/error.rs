//! Errors of setting up a transport: loading TLS files and accepting a WebSocket upgrade.

use std::path::PathBuf;

/// Why a TLS configuration could not be loaded or a WebSocket upgrade was refused.
///
/// `what` names the file's role: `"certificate"`, `"private key"` or `"client ca"`.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("read tls {what} file {}: file does not exist", path.display())]
    FileMissing { what: &'static str, path: PathBuf },
    #[error("read tls {what} file {}", path.display())]
    FileUnreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse pem in tls {what} file {}", path.display())]
    BadPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("load tls {what} file {}: no certificate found", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("load tls private key file {}: no private key found", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("load tls private key file {}: the key does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("load tls certificate {} with private key {}", cert.display(), key.display())]
    CertifiedKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("load tls client ca file {}", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("build tls client certificate verifier from {}", path.display())]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("require tls client certificates: no client ca file is configured")]
    ClientCertWithoutCa,
    #[error("select tls protocol versions")]
    ProtocolVersions(#[source] rustls::Error),
    #[error("accept websocket upgrade: path {path} not found")]
    WsPathNotFound { path: String },
    #[error("accept websocket upgrade: subprotocol mqtt not offered (offered: {offered:?})")]
    WsNoSubprotocol { offered: String },
    #[error("accept websocket upgrade")]
    WsHandshake(#[source] tokio_tungstenite::tungstenite::Error),
}
