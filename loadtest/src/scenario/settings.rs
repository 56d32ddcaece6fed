//! The resolved options of a run: connection settings ([`Settings`]) and message flow
//! ([`Load`]).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{Common, Output, Placement, SubArgs, Traffic};
use crate::client::codec::Version;
use crate::client::conn::ClientOptions;
use crate::clock::now_ns;

/// Sending time when neither a count nor a duration is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Settings {
    pub scenario: &'static str,
    pub brokers: Vec<String>,
    pub placement: Placement,
    pub version: Version,
    pub keepalive: u16,
    pub persistent: bool,
    pub session_expiry: u32,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Topic prefix of this run.
    pub prefix: String,
    /// Six hex digits, part of every client id.
    pub run_id: String,
    pub connect_timeout: Duration,
    pub output: Output,
}

impl Settings {
    pub fn new(scenario: &'static str, c: &Common) -> anyhow::Result<Settings> {
        if c.tls {
            bail!("--tls: petrel-bench is built without TLS support yet; use a plain TCP listener");
        }
        if c.brokers.is_empty() {
            bail!("no --broker given");
        }
        let run_id = format!(
            "{:06x}",
            (now_ns() ^ u64::from(std::process::id()).rotate_left(24)) & 0xff_ffff
        );
        let prefix = c
            .topic_prefix
            .clone()
            .unwrap_or_else(|| format!("petrel-bench/{run_id}"));
        Ok(Settings {
            scenario,
            brokers: c.brokers.clone(),
            placement: c.placement,
            version: c.version,
            keepalive: c.keepalive,
            persistent: c.persistent,
            session_expiry: c.session_expiry,
            username: c.username.clone(),
            password: c.password.clone(),
            prefix,
            run_id,
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            output: c.output.clone(),
        })
    }

    /// Options of client `idx` of `role` ('p' publisher, 's' subscriber, 'c' idle
    /// connection); `persistent` overrides --persistent.
    pub fn client_options(&self, role: char, idx: u32, persistent: Option<bool>) -> ClientOptions {
        let persistent = persistent.unwrap_or(self.persistent);
        ClientOptions {
            version: self.version,
            // "pb" + 6 + role + index: within 3.1.1's 23 characters up to a billion clients.
            client_id: format!("pb{}{role}{idx}", self.run_id),
            clean: !persistent,
            keepalive_secs: self.keepalive,
            session_expiry_secs: persistent.then_some(self.session_expiry),
            receive_maximum: None,
            username: self.username.clone(),
            password: self.password.clone(),
            connect_timeout: self.connect_timeout,
        }
    }

    pub fn version_label(&self) -> &'static str {
        match self.version {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }

    /// Writes `json` to the --ready-file, if any, atomically (temp file + rename).
    pub fn write_ready_file(&self, json: &serde_json::Value) -> anyhow::Result<()> {
        let Some(path) = &self.output.ready_file else {
            return Ok(());
        };
        write_atomically(path, &json.to_string())
    }
}

pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

#[derive(Debug, Clone)]
pub struct Load {
    pub qos: Vec<u8>,
    pub size: usize,
    /// Messages per publisher (for `sub`: distinct messages per subscriber).
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    pub rate: Option<f64>,
    pub inflight: u16,
    pub drain: Duration,
}

impl Load {
    pub fn new(t: &Traffic) -> Load {
        Load {
            qos: t.qos.clone(),
            size: t.size,
            count: t.count,
            duration: t.duration.or(t.count.is_none().then_some(DEFAULT_DURATION)),
            rate: t.rate.filter(|r| *r > 0.0),
            inflight: t.inflight,
            drain: Duration::from_millis(t.drain_ms),
        }
    }

    /// A `sub` run: no publishers; `count` and `duration` bound the listening.
    pub fn listen(a: &SubArgs) -> Load {
        Load {
            qos: vec![a.qos],
            size: 0,
            count: a.count,
            duration: a.duration.or(a.count.is_none().then_some(DEFAULT_DURATION)),
            rate: None,
            inflight: 1,
            drain: Duration::ZERO,
        }
    }
}
