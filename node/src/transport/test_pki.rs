//! Test certificates made at test time: a CA, server certificates for "localhost" and client
//! certificates with a chosen CN, written as PEM files into a temporary directory.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};

use super::TlsSettings;

/// A certificate and its key, as PEM and DER.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

impl Issued {
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("rcgen key is valid pem")
    }
}

/// A CA with a directory to write files into.
pub struct Pki {
    pub dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(ca_name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::new()).expect("empty san list");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, ca_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generate ca key");
        let cert = params.self_signed(&key).expect("self-sign ca");
        Pki {
            dir: tempfile::tempdir().expect("create temp dir"),
            issuer: Issuer::new(params, key),
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
        }
    }

    /// A server certificate for "localhost"; `serial` tells two of them apart.
    pub fn server(&self, serial: u64) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("valid san");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("petrel test server {serial}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(serial.into());
        self.issue(params)
    }

    /// A client certificate whose subject CN is `cn`.
    pub fn client(&self, cn: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::new()).expect("empty san list");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().expect("generate key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write test file");
        path
    }

    /// Writes `server` as server.pem/server.key (and this CA as ca.pem) and returns settings for them.
    pub fn settings(
        &self,
        server: &Issued,
        client_ca: bool,
        require_client_cert: bool,
    ) -> TlsSettings {
        TlsSettings {
            cert_file: self.write("server.pem", &server.cert_pem),
            key_file: self.write("server.key", &server.key_pem),
            client_ca_file: client_ca.then(|| self.write("ca.pem", &self.ca_pem)),
            require_client_cert,
        }
    }

    /// A client trusting this CA, speaking only `version`, presenting `identity` if given.
    pub fn client_config(
        &self,
        version: &'static SupportedProtocolVersion,
        identity: Option<&Issued>,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add test ca");
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .expect("ring supports tls 1.2 and 1.3")
                .with_root_certificates(roots);
        let config = match identity {
            Some(id) => builder
                .with_client_auth_cert(vec![id.cert_der.clone()], id.key_der())
                .expect("client identity"),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

pub fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("valid server name")
}
