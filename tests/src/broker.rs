//! Spawning the `petrel` binary and reading its admin endpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{interval, Instant};

use crate::wait::{wait_until, WAIT};

/// How long the binary may take to write its ready file.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// Path of the `petrel` binary under test.
///
/// `PETREL_BIN`, else `$CARGO_TARGET_DIR/debug/petrel`, else the `petrel` next to this test
/// executable's directory (`target/debug/deps/it-*` -> `target/debug/petrel`), else
/// `target/debug/petrel` under the workspace root.
pub fn petrel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PETREL_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug").join("petrel"));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(debug_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(debug_dir.join("petrel"));
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join("target").join("debug").join("petrel"));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "petrel binary not found (looked at {candidates:?}); build it with \
         `cargo build -p petrel-node --bin petrel` or set PETREL_BIN"
    );
}

/// Environment the child starts from: ours minus every `PETREL_*` variable (so a developer's
/// shell cannot change what a test exercises), with `PETREL_LOG=debug,openraft=info` unless the
/// test sets it (openraft's debug output is a line per heartbeat).
fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PETREL_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("PETREL_LOG", "debug,openraft=info");
}

/// `PETREL_TEST_CLUSTER=N` (N of at least 2): [`Broker::start`] and [`Broker::start_with`]
/// start a cluster of N nodes instead of one broker, and each [`Broker::mqtt_addr`] call
/// names the next node, so a test's publisher, subscriber and resumed session land on
/// different nodes (see [`Broker`]). 1 otherwise.
pub fn test_cluster_size() -> usize {
    std::env::var("PETREL_TEST_CLUSTER")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n >= 2)
        .unwrap_or(1)
}

/// A port free now, for addresses nodes must know before they start. Picked below the
/// kernel's ephemeral range, so that no outgoing connection (the nodes' own, to each other)
/// takes it before its node binds it; only another test's pick could, rarely.
pub fn free_port() -> u16 {
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    if low > 11_000 {
        use std::hash::{BuildHasher, Hasher};
        for _ in 0..200 {
            // A random pick: std's hasher is seeded at random per instance.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let port = 10_000 + (h.finish() % u64::from(low - 10_000)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs `petrel` to completion with `args` and `env` (no default flags) and returns its output.
pub async fn run_petrel(args: &[&str], env: &[(&str, &str)], within: Duration) -> Output {
    let mut cmd = Command::new(petrel_bin());
    scrub_env(&mut cmd);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(within, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("run petrel {args:?}: {e}"),
        Err(_) => panic!("petrel {args:?} did not exit within {within:?}"),
    }
}

/// Options for [`Broker`]; see [`Broker::builder`].
#[derive(Debug, Clone)]
pub struct BrokerBuilder {
    env: Vec<(String, String)>,
    args: Vec<String>,
    mqtt_addr_flag: bool,
    admin_addr_flag: bool,
    data_dir_flag: bool,
    config_toml: Option<String>,
}

impl BrokerBuilder {
    /// Sets an environment variable for the child.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Appends a command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Leaves out `--mqtt-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0` (the test then chooses
    /// the MQTT address itself; the gRPC one comes from `PETREL_GRPC_ADDR`, `127.0.0.1:0`
    /// unless the test sets it).
    pub fn without_mqtt_addr_flag(mut self) -> Self {
        self.mqtt_addr_flag = false;
        self
    }

    /// Leaves out `--admin-addr 127.0.0.1:0`.
    pub fn without_admin_addr_flag(mut self) -> Self {
        self.admin_addr_flag = false;
        self
    }

    /// Leaves out `--data-dir <tempdir>`.
    pub fn without_data_dir_flag(mut self) -> Self {
        self.data_dir_flag = false;
        self
    }

    /// Writes `toml` to `<tempdir>/petrel.toml` and passes `--config` with it.
    pub fn config_toml(mut self, toml: &str) -> Self {
        self.config_toml = Some(toml.to_owned());
        self
    }

    /// Spawns the binary without waiting for it to become ready.
    pub fn spawn(self) -> Spawned {
        let dir = tempfile::Builder::new()
            .prefix("petrel-e2e-")
            .tempdir()
            .expect("create temp dir");
        let log_path = dir.path().join("petrel.log");
        let ready_path = dir.path().join("ready.json");
        let log = std::fs::File::create(&log_path).expect("create log file");
        let log2 = log.try_clone().expect("clone log file handle");

        let mut cmd = Command::new(petrel_bin());
        scrub_env(&mut cmd);
        if self.mqtt_addr_flag {
            cmd.args(["--mqtt-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"]);
        } else if !self.env.iter().any(|(k, _)| k == "PETREL_GRPC_ADDR") {
            // Tests of how the MQTT address is chosen run side by side: keep them off the
            // default gRPC port.
            cmd.env("PETREL_GRPC_ADDR", "127.0.0.1:0");
        }
        if self.admin_addr_flag {
            cmd.args(["--admin-addr", "127.0.0.1:0"]);
        }
        if self.data_dir_flag {
            cmd.arg("--data-dir").arg(dir.path());
        }
        cmd.arg("--ready-file").arg(&ready_path);
        if let Some(toml) = &self.config_toml {
            let path = dir.path().join("petrel.toml");
            std::fs::write(&path, toml).expect("write config file");
            cmd.arg("--config").arg(&path);
        }
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", petrel_bin().display()));
        Spawned {
            child: Some(child),
            dir: Some(dir),
            log_path,
            ready_path,
        }
    }

    /// Spawns the binary and waits for its ready file.
    pub async fn start(self) -> Broker {
        let spawned = self.spawn();
        spawned.ready().await
    }
}

/// A spawned `petrel` that has not (yet) written its ready file.
pub struct Spawned {
    child: Option<Child>,
    dir: Option<TempDir>,
    log_path: PathBuf,
    ready_path: PathBuf,
}

impl Spawned {
    /// The broker's log so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The temp dir holding the data dir, config, ready file and log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("temp dir present").path()
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("child present");
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("wait for petrel: {e}"),
            Err(_) => panic!(
                "petrel did not exit within {within:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// Waits until the ready file holds the bound addresses, failing if the process exits.
    pub async fn ready(self) -> Broker {
        match self.try_ready().await {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Spawned::ready`], or why not (the process exited; its log is in the error).
    pub async fn try_ready(mut self) -> Result<Broker, String> {
        let deadline = Instant::now() + START_DEADLINE;
        let mut tick = interval(Duration::from_millis(20));
        let mut last;
        loop {
            tick.tick().await;
            let child = self.child.as_mut().expect("child present");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "petrel exited with {status} before becoming ready; log:\n{}",
                    self.log()
                ));
            }
            match std::fs::read_to_string(&self.ready_path) {
                Ok(text) => match parse_ready(&text) {
                    Ok(ready) => {
                        let pid = child.id().expect("running child has a pid");
                        return Ok(Broker {
                            child: self.child.take(),
                            dir: self.dir.take().expect("temp dir present"),
                            log_path: self.log_path.clone(),
                            ready,
                            pid,
                            peers: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                    }
                    Err(e) => last = format!("ready file {text:?}: {e}"),
                },
                Err(e) => last = format!("read {}: {e}", self.ready_path.display()),
            }
            if Instant::now() >= deadline {
                panic!(
                    "petrel not ready within {START_DEADLINE:?} ({last}); log:\n{}",
                    self.log()
                );
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "===== petrel log ({}) =====\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Contents of the ready file.
#[derive(Debug, Clone)]
pub struct Ready {
    pub mqtt: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub pid: u64,
}

fn parse_ready(text: &str) -> Result<Ready, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mqtt = v
        .get("mqtt")
        .and_then(|m| m.as_str())
        .ok_or("no string field mqtt")?
        .parse()
        .map_err(|e| format!("mqtt address: {e}"))?;
    let admin = match v.get("admin") {
        None => return Err("no field admin".into()),
        Some(serde_json::Value::Null) => None,
        Some(a) => Some(
            a.as_str()
                .ok_or("admin is neither null nor a string")?
                .parse()
                .map_err(|e| format!("admin address: {e}"))?,
        ),
    };
    let pid = v
        .get("pid")
        .and_then(|p| p.as_u64())
        .ok_or("no numeric field pid")?;
    Ok(Ready { mqtt, admin, pid })
}

/// A running `petrel` process, killed when dropped. Its log is printed if the test panics.
///
/// In a test cluster ([`test_cluster_size`]) it is node 0 and holds the other nodes:
/// [`Broker::mqtt_addr`] names the nodes in turn, the metric readers sum over them, and
/// everything else (the admin endpoint, signals, the data dir) is node 0's.
pub struct Broker {
    child: Option<Child>,
    dir: TempDir,
    log_path: PathBuf,
    ready: Ready,
    pid: u32,
    peers: Vec<Broker>,
    next: AtomicUsize,
}

impl Broker {
    /// A broker with default settings.
    /// (A cluster of such nodes under `PETREL_TEST_CLUSTER`.)
    pub async fn start() -> Broker {
        Broker::start_with(&[], &[]).await
    }

    /// A broker with extra environment variables and arguments (a cluster of such nodes
    /// under `PETREL_TEST_CLUSTER`).
    pub async fn start_with(env: &[(&str, &str)], extra_args: &[&str]) -> Broker {
        let n = test_cluster_size();
        if n > 1 {
            return Broker::start_cluster(n, env, extra_args).await;
        }
        let mut b = Broker::builder();
        for (k, v) in env {
            b = b.env(k, v);
        }
        for a in extra_args {
            b = b.arg(a);
        }
        b.start().await
    }

    /// `n` nodes that form one cluster, each with `env` and `extra_args`, every one ready
    /// (caught up, routes rebuilt); node 0 holds the others.
    async fn start_cluster(n: usize, env: &[(&str, &str)], extra_args: &[&str]) -> Broker {
        // A free port is free until someone binds it: another test's node may take one
        // first, and then this cluster starts again on other ports.
        let mut tries = 3;
        loop {
            match Broker::try_start_cluster(n, env, extra_args).await {
                Ok(b) => return b,
                Err(e) if tries > 1 && e.contains("Address already in use") => tries -= 1,
                Err(e) => panic!("{e}"),
            }
        }
    }

    async fn try_start_cluster(
        n: usize,
        env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Result<Broker, String> {
        let grpc: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let seeds = grpc.join(",");
        let spawned: Vec<Spawned> = (0..n)
            .map(|i| {
                let mut b = Broker::builder()
                    .without_mqtt_addr_flag()
                    .env("PETREL_MQTT_ADDR", "127.0.0.1:0")
                    .env("PETREL_GRPC_ADDR", &grpc[i])
                    .env("PETREL_NODE_ID", &i.to_string())
                    .env("PETREL_JOIN", &seeds);
                for (k, v) in env {
                    b = b.env(k, v);
                }
                for a in extra_args {
                    b = b.arg(a);
                }
                b.spawn()
            })
            .collect();
        let mut nodes = Vec::with_capacity(n);
        for s in spawned {
            nodes.push(s.try_ready().await?);
        }
        for node in &nodes {
            node.wait_ready(200).await;
        }
        // The data plane up too: each node streams to every other (node ids are indexes).
        for (i, node) in nodes.iter().enumerate() {
            let others: Vec<u64> = (0..n as u64).filter(|j| *j != i as u64).collect();
            node.wait_linked(&others).await;
        }
        let mut first = nodes.remove(0);
        first.peers = nodes;
        Ok(first)
    }

    /// Spawn options: `--mqtt-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --data-dir <tmp>
    /// --ready-file <tmp>/ready.json` unless switched off.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder {
            env: Vec::new(),
            args: Vec::new(),
            mqtt_addr_flag: true,
            admin_addr_flag: true,
            data_dir_flag: true,
            config_toml: None,
        }
    }

    /// The MQTT address; in a test cluster, the next node's at each call.
    pub fn mqtt_addr(&self) -> SocketAddr {
        if self.peers.is_empty() {
            return self.ready.mqtt;
        }
        match self.next.fetch_add(1, Ordering::Relaxed) % (self.peers.len() + 1) {
            0 => self.ready.mqtt,
            i => self.peers[i - 1].ready.mqtt,
        }
    }

    /// How many nodes this stands for (1, or the test cluster's size).
    pub fn nodes(&self) -> usize {
        self.peers.len() + 1
    }

    /// The admin address; panics if the admin endpoint is disabled.
    pub fn admin_addr(&self) -> SocketAddr {
        self.ready.admin.expect("admin endpoint is enabled")
    }

    /// The ready file as written by the broker.
    pub fn ready_info(&self) -> &Ready {
        &self.ready
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The temp dir holding the data dir, ready file and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's log so far (in a test cluster, every node's).
    pub fn log(&self) -> String {
        let own = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        if self.peers.is_empty() {
            return own;
        }
        let mut all = format!("===== node 0 =====\n{own}");
        for (i, p) in self.peers.iter().enumerate() {
            all.push_str(&format!("===== node {} =====\n{}", i + 1, p.log()));
        }
        all
    }

    /// `GET path` on the admin endpoint: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let addr = self.admin_addr();
        match tokio::time::timeout(WAIT, http_get(addr, path)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("GET http://{addr}{path}: {e:#}"),
            Err(_) => panic!("GET http://{addr}{path}: no response within {WAIT:?}"),
        }
    }

    /// The Prometheus text from `/metrics`.
    pub async fn metrics(&self) -> Metrics {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics status; body:\n{body}");
        Metrics(body)
    }

    /// One series, e.g. `petrel_session_queue_dropped_total{reason="queue_full"}`; 0 if absent.
    /// In a test cluster, the sum over the nodes.
    pub async fn metric(&self, series: &str) -> f64 {
        let mut v = self.metrics().await.get(series);
        for p in &self.peers {
            v += p.metrics().await.get(series);
        }
        v
    }

    /// Sum of every series of a metric family (all label values); 0 if absent. In a test
    /// cluster, over the nodes too.
    pub async fn metric_sum(&self, family: &str) -> f64 {
        let mut v = self.metrics().await.sum(family);
        for p in &self.peers {
            v += p.metrics().await.sum(family);
        }
        v
    }

    /// Waits until `series` satisfies `pred`, returning its value.
    pub async fn wait_metric(
        &self,
        series: &str,
        within: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let what = format!("metric {series} satisfies the condition");
        wait_until(&what, within, || async {
            let v = self.metric(series).await;
            if pred(v) {
                Ok(v)
            } else {
                Err(v)
            }
        })
        .await
    }

    /// Waits until `/health/ready` answers `status` (200: ready; 503: not ready).
    pub async fn wait_ready(&self, status: u16) {
        let what = format!("/health/ready to say {status}");
        wait_until(&what, WAIT, || async {
            match self.http_get("/health/ready").await {
                (got, _) if got == status => Ok(()),
                other => Err(other),
            }
        })
        .await
    }

    /// Waits until this node has opened a forwarding stream to each of `peers` (node ids):
    /// its first batch to a peer goes when the stream opens, so a count of batches says so.
    /// Until then a QoS 1/2 publish here may be acknowledged before such a peer has its copy
    /// (a peer whose stream is not up holds no publisher; the copy follows in order).
    pub async fn wait_linked(&self, peers: &[u64]) {
        for p in peers {
            let series = format!("petrel_forward_peer_batches_total{{peer=\"{p}\"}}");
            let what = format!("a forwarding stream to node {p}");
            wait_until(&what, WAIT, || async {
                match self.metrics().await.get(&series) {
                    v if v >= 1.0 => Ok(()),
                    v => Err(v),
                }
            })
            .await;
        }
    }

    /// Stops the process (SIGSTOP): it keeps its sockets and answers nothing.
    pub fn sigstop(&self) {
        self.signal("-STOP");
    }

    /// Lets a stopped process go on (SIGCONT).
    pub fn sigcont(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {} failed: {status}", self.pid);
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGINT (graceful shutdown).
    pub fn sigint(&self) {
        self.signal("-INT");
    }

    /// Sends SIGKILL and reaps the process.
    pub async fn kill9(&mut self) -> ExitStatus {
        self.signal("-KILL");
        self.wait_exit(WAIT).await
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("child present");
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("wait for petrel: {e}"),
            Err(_) => panic!(
                "petrel did not exit within {within:?}; log:\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== petrel log ({}) =====\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Tiny HTTP/1.0 GET over a plain TCP stream.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context as _;
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.context("send request")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.context("read response")?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response without end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body).context("decode chunked body")?;
    }
    Ok((
        status,
        String::from_utf8(body).context("body is not UTF-8")?,
    ))
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow::anyhow!("chunk size line"))?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(data.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

/// Sorted (name, value) label pairs.
type Labels = Vec<(String, String)>;

/// (name, sorted labels, value)
type Series = (String, Labels, f64);

impl Metrics {
    fn series(&self) -> Vec<Series> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (name, labels, rest) = parse_series_key(l)?;
                let value = rest.split_whitespace().next()?;
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse().ok()?,
                };
                Some((name, labels, value))
            })
            .collect()
    }

    /// Value of one series (`name` or `name{k="v",...}`, label order irrelevant); 0 if absent.
    pub fn get(&self, series: &str) -> f64 {
        self.find(series).unwrap_or(0.0)
    }

    /// Value of one series, `None` if absent.
    pub fn find(&self, series: &str) -> Option<f64> {
        let (name, labels, rest) =
            parse_series_key(series).unwrap_or_else(|| panic!("bad series {series:?}"));
        assert!(
            rest.trim().is_empty(),
            "series {series:?} has trailing text"
        );
        self.series()
            .into_iter()
            .find(|(n, l, _)| *n == name && *l == labels)
            .map(|(_, _, v)| v)
    }

    /// Sum over every series of a family; 0 if absent.
    pub fn sum(&self, family: &str) -> f64 {
        self.series()
            .into_iter()
            .filter(|(n, _, _)| n == family)
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether any series or TYPE line of the family is present.
    pub fn has_family(&self, family: &str) -> bool {
        self.series().iter().any(|(n, _, _)| n == family)
            || self
                .0
                .lines()
                .any(|l| l.starts_with(&format!("# TYPE {family} ")))
    }
}

/// Splits `name{a="x",b="y"} rest` into name, sorted labels and rest.
fn parse_series_key(line: &str) -> Option<(String, Labels, &str)> {
    let line = line.trim_start();
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end;
        loop {
            // skip separators
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let (i, c) = chars.next()?;
            if c == '}' {
                end = i + 1;
                break;
            }
            let mut key = String::from(c);
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key.trim().to_owned(), value));
        }
        rest = &after[end..];
    }
    labels.sort();
    Some((name, labels, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let m = Metrics(
            "# HELP a_total x\n# TYPE a_total counter\na_total{reason=\"queue_full\",x=\"1\"} 7\n\
             a_total{reason=\"expired\",x=\"1\"} 2\nb 3.5\nc{l=\"q\\\"}\"} 1\n"
                .into(),
        );
        assert_eq!(m.get(r#"a_total{x="1",reason="queue_full"}"#), 7.0);
        assert_eq!(m.get(r#"a_total{reason="too_large",x="1"}"#), 0.0);
        assert_eq!(m.sum("a_total"), 9.0);
        assert_eq!(m.get("b"), 3.5);
        assert_eq!(m.get(r#"c{l="q\"}"}"#), 1.0);
        assert!(m.has_family("a_total"));
        assert!(!m.has_family("d"));
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
    }
}
