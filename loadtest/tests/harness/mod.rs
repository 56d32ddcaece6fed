//! A real Petrel node for the scenario tests: the `petrel` binary on 127.0.0.1:0, found
//! through its ready file, killed on drop; optionally with a TLS listener serving a
//! certificate from [`TestPki`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the node may take to write its ready file.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Bound on every scenario test.
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);

pub struct Node {
    child: Child,
    dir: TempDir,
    pub mqtt: String,
    /// The TLS listener, when started with one.
    pub mqtts: Option<String>,
}

/// `PETREL_BIN`, else `$CARGO_TARGET_DIR/debug/petrel`, else `<workspace>/target/debug/petrel`.
fn petrel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PETREL_BIN") {
        return p.into();
    }
    let mut tried = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        tried.push(Path::new(&dir).join("debug/petrel"));
    }
    tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/petrel"));
    match tried.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "no petrel binary at {tried:?}: run `cargo build -p petrel-node` or set PETREL_BIN"
        ),
    }
}

impl Node {
    pub fn start() -> Node {
        Node::spawn(Vec::new())
    }

    /// A node with a TLS listener too, serving `pki`'s server certificate.
    pub fn start_tls(pki: &TestPki) -> Node {
        let args = vec![
            "--mqtts-addr".into(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            pki.cert.clone().into(),
            "--tls-key".into(),
            pki.key.clone().into(),
        ];
        let node = Node::spawn(args);
        assert!(node.mqtts.is_some(), "ready file without \"mqtts\"");
        node
    }

    fn spawn(extra_args: Vec<OsString>) -> Node {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let ready = dir.path().join("ready.json");
        let log =
            std::fs::File::create(dir.path().join("petrel.log")).expect("create the log file");
        let mut cmd = Command::new(petrel_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PETREL_") {
                cmd.env_remove(&k);
            }
        }
        cmd.args([
            "--mqtt-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log);
        let child = cmd.spawn().expect("spawn petrel");
        let mut node = Node {
            child,
            dir,
            mqtt: String::new(),
            mqtts: None,
        };
        let v = node.wait_ready(&ready);
        node.mqtt = v["mqtt"]
            .as_str()
            .expect("ready file has \"mqtt\"")
            .to_owned();
        node.mqtts = v["mqtts"].as_str().map(str::to_owned);
        node
    }

    /// Polls for the ready file (and for an early exit) until the deadline.
    fn wait_ready(&mut self, ready: &Path) -> serde_json::Value {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(text) = std::fs::read_to_string(ready) {
                return serde_json::from_str(&text).expect("ready file is JSON");
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "petrel exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "petrel not ready within {START_DEADLINE:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> &str {
        self.mqtt.rsplit(':').next().expect("host:port")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("petrel.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- petrel log\n{}", self.log());
        }
    }
}

/// A test CA and a server certificate it signed for "localhost" and 127.0.0.1, as PEM files
/// in a temporary directory.
pub struct TestPki {
    _dir: TempDir,
    /// The CA certificate (for `--ca-file`).
    pub ca: PathBuf,
    /// The server certificate chain and its key (for petrel's `--tls-cert`, `--tls-key`).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::new()).expect("empty san list");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "petrel-bench test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("generate the CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca, ca_key);

        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("valid names");
        server
            .distinguished_name
            .push(DnType::CommonName, "petrel-bench test server");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("generate the server key");
        let cert = server
            .signed_by(&key, &issuer)
            .expect("sign the server certificate");

        let dir = tempfile::tempdir().expect("create a temp dir");
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        TestPki {
            ca: write("ca.pem", ca_cert.pem()),
            cert: write("server.pem", cert.pem()),
            key: write("server.key", key.serialize_pem()),
            _dir: dir,
        }
    }
}
