//! A real Petrel node for the scenario tests: the `petrel` binary on 127.0.0.1:0, found
//! through its ready file, killed on drop.

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
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log);
        let child = cmd.spawn().expect("spawn petrel");
        let mut node = Node {
            child,
            dir,
            mqtt: String::new(),
        };
        node.mqtt = node.wait_ready(&ready);
        node
    }

    /// Polls for the ready file (and for an early exit) until the deadline.
    fn wait_ready(&mut self, ready: &Path) -> String {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(text) = std::fs::read_to_string(ready) {
                let v: serde_json::Value = serde_json::from_str(&text).expect("ready file is JSON");
                return v["mqtt"]
                    .as_str()
                    .expect("ready file has \"mqtt\"")
                    .to_owned();
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
