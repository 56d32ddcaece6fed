//! TLS to the brokers (`--tls`): the rustls client configuration of a run, built once and
//! shared by every connection, and the server name each connection asks for.
//!
//! The ring provider is passed explicitly, so no process-wide default provider is needed.
//! [`Conn`](super::conn::Conn) drives a sans-IO `rustls::ClientConnection` over its socket.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What TLS connections use: one configuration per run, and the name to ask for.
#[derive(Clone)]
pub struct TlsOptions {
    pub config: Arc<ClientConfig>,
    /// SNI and the name the certificate must hold (`--server-name`); `None`: the host part of
    /// each broker address.
    pub server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsOptions {
    /// The server name of a connection to `addr`.
    pub fn server_name_for(&self, addr: &str) -> anyhow::Result<ServerName<'static>> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => server_name_of(addr),
        }
    }
}

/// Whom the broker certificates are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The CA certificates of a PEM file (`--ca-file`).
    CaFile(PathBuf),
    /// Any certificate (`--insecure`): no chain or name check; the handshake signatures are
    /// still verified, so the server holds the key of the certificate it sent.
    AnyCertificate,
}

/// Builds the client configuration of a run.
pub fn client_config(trust: &Trust) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions of the ring provider")?;
    let config = match trust {
        Trust::CaFile(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        Trust::AnyCertificate => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { algorithms }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The CA certificates of a PEM file; an unreadable file, bad PEM or no certificate at all
/// is an error naming the path.
fn load_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read CA certificates from {shown}"))?;
    for (i, cert) in certs.enumerate() {
        let cert = cert.with_context(|| format!("read CA certificates from {shown}"))?;
        roots
            .add(cert)
            .with_context(|| format!("add CA certificate {} of {shown}", i + 1))?;
    }
    if roots.is_empty() {
        bail!("--ca-file {shown}: no PEM certificate (BEGIN CERTIFICATE) in it");
    }
    Ok(roots)
}

/// The host part of `host:port` (`[v6]:port` too) as a server name.
pub fn server_name_of(addr: &str) -> anyhow::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    server_name(host).with_context(|| format!("TLS server name of --broker {addr}"))
}

/// A DNS name or an IP address, as SNI and certificate name.
pub fn server_name(name: &str) -> anyhow::Result<ServerName<'static>> {
    ServerName::try_from(name)
        .map(|n| n.to_owned())
        .with_context(|| format!("{name:?} is not a DNS name or IP address"))
}

/// `--insecure`: accepts every certificate chain and name, but checks the handshake
/// signatures with the provider's algorithms.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_host_part() {
        let check = |addr: &str, want: &str| {
            let name = server_name_of(addr).expect(addr);
            assert_eq!(name.to_str(), want, "{addr}");
        };
        check("localhost:8883", "localhost");
        check("broker.example.com:8883", "broker.example.com");
        check("127.0.0.1:8883", "127.0.0.1");
        check("[::1]:8883", "::1");
        check("broker.example.com", "broker.example.com");
        assert!(matches!(
            server_name_of("127.0.0.1:1").expect("an ip"),
            ServerName::IpAddress(_)
        ));
        let err = server_name_of("bad_name!:8883").expect_err("not a name");
        assert!(format!("{err:#}").contains("bad_name!"), "{err:#}");
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pem");
        let err = client_config(&Trust::CaFile(missing.clone())).expect_err("missing");
        let msg = format!("{err:#}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").expect("write");
        let err = client_config(&Trust::CaFile(empty.clone())).expect_err("empty");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&empty.display().to_string()) && msg.contains("no PEM certificate"),
            "{msg}"
        );

        assert!(client_config(&Trust::AnyCertificate).is_ok());
    }
}
