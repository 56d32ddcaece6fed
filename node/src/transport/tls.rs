//! TLS for the `mqtts` and `wss` listeners: a rustls acceptor built from PEM files.
//!
//! TLS 1.2 and 1.3 with the ring provider. With a client CA file, client certificates are
//! verified against it (required or optional); [`peer_common_name`] gives the verified
//! certificate's CN, usable as the MQTT username. No ALPN protocols are configured, so a
//! client offering any (`mqtt`, or `http/1.1` from a browser on `wss`) is accepted and none
//! is selected; rustls would refuse a client whose offer matched none of a configured list.
//!
//! Reloading: [`TlsAcceptorHandle::reload_if_changed`] re-reads the files and, when their
//! contents changed, builds a new `ServerConfig` that new handshakes use; connections already
//! up keep theirs. A set of files that fails to load leaves the previous config in place and is
//! reported once; it is tried again when any of the files changes. Contents are compared rather
//! than modification times: a file rewritten twice within the clock's resolution, or read while
//! half written, is still picked up once it is complete. The files are small, so reading them
//! every few seconds costs nothing worth measuring.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::TransportError;

/// Where the PEM files of one TLS listener are, and whether clients must present a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain, end-entity certificate first.
    pub cert_file: PathBuf,
    /// Private key of the server certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CAs that client certificates are verified against; `None`: no client certificates.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a valid certificate. Needs `client_ca_file`.
    pub require_client_cert: bool,
}

/// The current TLS configuration of a listener; clones share it, so one reload serves all.
#[derive(Clone)]
pub struct TlsAcceptorHandle {
    shared: Arc<Shared>,
}

struct Shared {
    settings: TlsSettings,
    state: RwLock<State>,
    /// Held for a whole reload, so concurrent reloads cannot install older files over newer.
    reloading: Mutex<()>,
}

struct State {
    config: Arc<ServerConfig>,
    /// The file contents `config` was built from.
    loaded: Sources,
    /// The last contents that failed to build, so a broken set of files is reported once.
    rejected: Option<Sources>,
}

/// The raw bytes of the configured files.
#[derive(PartialEq, Eq)]
struct Sources {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl TlsAcceptorHandle {
    /// Reads the files and builds the first configuration.
    pub fn load(settings: TlsSettings) -> Result<TlsAcceptorHandle, TransportError> {
        let sources = read_sources(&settings)?;
        let config = build_config(&settings, &sources)?;
        let state = State {
            config,
            loaded: sources,
            rejected: None,
        };
        Ok(TlsAcceptorHandle {
            shared: Arc::new(Shared {
                settings,
                state: RwLock::new(state),
                reloading: Mutex::new(()),
            }),
        })
    }

    /// An acceptor with the current configuration, for one handshake or a batch of them.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// The current server configuration.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.shared
            .state
            .read()
            .expect("tls state lock poisoned")
            .config
            .clone()
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.shared.settings
    }

    /// Re-reads the files; when they changed, swaps in a configuration built from them.
    ///
    /// `Ok(true)`: new handshakes use the new files. `Ok(false)`: nothing changed, or the
    /// files are the same ones that were already rejected. `Err`: the files could not be read
    /// or do not make a valid configuration; the previous configuration stays in use.
    /// Reads files and may parse keys: call it from a blocking context ([`Self::watch`] does).
    pub fn reload_if_changed(&self) -> Result<bool, TransportError> {
        let _reloading = self
            .shared
            .reloading
            .lock()
            .expect("tls reload lock poisoned");
        let settings = &self.shared.settings;
        let sources = read_sources(settings)?;
        {
            let state = self.shared.state.read().expect("tls state lock poisoned");
            if state.loaded == sources || state.rejected.as_ref() == Some(&sources) {
                return Ok(false);
            }
        }
        let built = build_config(settings, &sources);
        let mut state = self.shared.state.write().expect("tls state lock poisoned");
        match built {
            Ok(config) => {
                state.config = config;
                state.loaded = sources;
                state.rejected = None;
                Ok(true)
            }
            Err(e) => {
                state.rejected = Some(sources);
                Err(e)
            }
        }
    }

    /// Calls [`Self::reload_if_changed`] every `every` until cancelled, logging reloads and
    /// failures (each distinct failure once). A zero `every` is taken as 1 ms.
    pub async fn watch(self, every: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let cert_file = self.shared.settings.cert_file.clone();
        let mut last_failure: Option<String> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let handle = self.clone();
            let result = match tokio::task::spawn_blocking(move || handle.reload_if_changed()).await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "tls reload task failed");
                    continue;
                }
            };
            match result {
                Ok(reloaded) => {
                    if reloaded {
                        tracing::info!(cert_file = %cert_file.display(), "tls certificate reloaded");
                    }
                    last_failure = None;
                }
                Err(e) => {
                    let text = error_chain(&e);
                    if last_failure.as_deref() != Some(text.as_str()) {
                        tracing::error!(error = %text, "reload tls certificate failed, keeping the previous one");
                        last_failure = Some(text);
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for TlsAcceptorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptorHandle")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptorHandle {
    /// When the served (end-entity) certificate expires, in seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> Option<i64> {
        let state = self.shared.state.read().unwrap_or_else(|e| e.into_inner());
        let first = CertificateDer::pem_slice_iter(&state.loaded.cert)
            .next()?
            .ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
        Some(cert.validity().not_after.timestamp())
    }
}

/// The common name of the client certificate that the handshake on `conn` verified.
///
/// `None` when the client sent no certificate (or the listener asks for none), or when the
/// subject has no CN that is a string. With several CNs, the first one.
pub fn peer_common_name(conn: &ServerConnection) -> Option<String> {
    let end_entity = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

const CERT: &str = "certificate";
const KEY: &str = "private key";
const CLIENT_CA: &str = "client ca";

fn read_sources(settings: &TlsSettings) -> Result<Sources, TransportError> {
    if settings.require_client_cert && settings.client_ca_file.is_none() {
        return Err(TransportError::ClientCertWithoutCa);
    }
    Ok(Sources {
        cert: read_file(CERT, &settings.cert_file)?,
        key: read_file(KEY, &settings.key_file)?,
        client_ca: settings
            .client_ca_file
            .as_deref()
            .map(|p| read_file(CLIENT_CA, p))
            .transpose()?,
    })
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => TransportError::FileMissing {
            what,
            path: path.to_owned(),
        },
        _ => TransportError::FileUnreadable {
            what,
            path: path.to_owned(),
            source,
        },
    })
}

fn build_config(
    settings: &TlsSettings,
    sources: &Sources,
) -> Result<Arc<ServerConfig>, TransportError> {
    let certs = parse_certs(CERT, &settings.cert_file, &sources.cert)?;
    let key = parse_key(&settings.key_file, &sources.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TransportError::ProtocolVersions)?;
    let builder = match (&settings.client_ca_file, &sources.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in parse_certs(CLIENT_CA, path, pem)? {
                roots.add(ca).map_err(|source| TransportError::ClientCa {
                    path: path.clone(),
                    source,
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !settings.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|source| TransportError::ClientVerifier {
                    path: path.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|source| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TransportError::KeyMismatch {
                    cert: settings.cert_file.clone(),
                    key: settings.key_file.clone(),
                }
            }
            source => TransportError::CertifiedKey {
                cert: settings.cert_file.clone(),
                key: settings.key_file.clone(),
                source,
            },
        })?;
    Ok(Arc::new(config))
}

fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TransportError::BadPem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TransportError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        pem::Error::NoItemsFound => TransportError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TransportError::BadPem {
            what: KEY,
            path: path.to_owned(),
            source,
        },
    })
}

/// `e` and its sources, joined by ": ".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
