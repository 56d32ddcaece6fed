//! The resolved options of a run: connection settings ([`Settings`]) and message flow
//! ([`Load`]).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{Common, Output, Placement, SubArgs, Traffic};
use crate::client::codec::Version;
use crate::client::conn::ClientOptions;
use crate::client::tls::{self, TlsOptions, Trust};
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
    /// `--tls`: one client configuration for every connection of the run.
    pub tls: Option<TlsOptions>,
    pub output: Output,
}

impl Settings {
    pub fn new(scenario: &'static str, c: &Common) -> anyhow::Result<Settings> {
        if c.brokers.is_empty() {
            bail!("no --broker given");
        }
        let tls = tls_options(c)?;
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
            tls,
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
            tls: self.tls.clone(),
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

/// Checks the TLS options and builds the run's client configuration (`None` without --tls).
fn tls_options(c: &Common) -> anyhow::Result<Option<TlsOptions>> {
    if !c.tls {
        let stray = [
            ("--ca-file", c.ca_file.is_some()),
            ("--insecure", c.insecure),
            ("--server-name", c.server_name.is_some()),
        ];
        if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
            bail!("{flag} applies to TLS connections only: add --tls");
        }
        return Ok(None);
    }
    let trust = match (&c.ca_file, c.insecure) {
        (Some(path), false) => Trust::CaFile(path.clone()),
        (None, true) => Trust::AnyCertificate,
        (Some(_), true) => bail!("--ca-file and --insecure exclude each other"),
        (None, false) => bail!(
            "--tls needs --ca-file PATH (the CA certificates that broker certificates are \
             verified against) or --insecure (accept any certificate)"
        ),
    };
    let server_name = match &c.server_name {
        Some(name) => Some(tls::server_name(name).context("--server-name")?),
        None => {
            // Every broker's host must make a server name: fail now, not per connection.
            for addr in &c.brokers {
                tls::server_name_of(addr)?;
            }
            None
        }
    };
    Ok(Some(TlsOptions {
        config: tls::client_config(&trust)?,
        server_name,
    }))
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// `Settings::new` of `pub <args>`: the error text, or "" when it builds.
    fn settings_error(args: &[&str]) -> String {
        let argv = ["petrel-bench", "pub"].iter().chain(args);
        let cli = Cli::try_parse_from(argv).expect("the command line parses");
        let Command::Pub(a) = cli.command else {
            panic!("pub expected")
        };
        match Settings::new("pub", &a.common) {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn tls_options_are_checked_together() {
        let check = |args: &[&str], want: &str| {
            let got = settings_error(args);
            if want.is_empty() {
                assert_eq!(got, "", "{args:?}");
            } else {
                assert!(got.contains(want), "{args:?}: {got:?} lacks {want:?}");
            }
        };
        check(&[], "");
        check(&["--tls", "--insecure"], "");
        check(&["--tls", "--insecure", "--server-name", "broker.test"], "");
        check(&["--tls"], "--tls needs --ca-file PATH");
        check(
            &["--insecure"],
            "--insecure applies to TLS connections only",
        );
        check(
            &["--ca-file", "ca.pem"],
            "--ca-file applies to TLS connections only",
        );
        check(
            &["--server-name", "x"],
            "--server-name applies to TLS connections only",
        );
        check(
            &["--tls", "--insecure", "--ca-file", "ca.pem"],
            "--ca-file and --insecure exclude each other",
        );
        check(
            &["--tls", "--insecure", "--server-name", "not a name"],
            "--server-name",
        );
        check(
            &["--tls", "--insecure", "--broker", "bad_host!:8883"],
            "--broker bad_host!:8883",
        );
        check(
            &["--tls", "--ca-file", "/nonexistent/petrel-ca.pem"],
            "read CA certificates from /nonexistent/petrel-ca.pem",
        );
    }

    #[test]
    fn every_client_gets_the_runs_tls_configuration() {
        let cli =
            Cli::try_parse_from(["petrel-bench", "pub", "--tls", "--insecure"]).expect("parses");
        let Command::Pub(a) = cli.command else {
            panic!("pub expected")
        };
        let s = Settings::new("pub", &a.common).expect("settings");
        let one = s.client_options('p', 0, None).tls.expect("tls");
        let two = s.client_options('s', 1, None).tls.expect("tls");
        assert!(std::sync::Arc::ptr_eq(&one.config, &two.config));
        let plain = Cli::try_parse_from(["petrel-bench", "pub"]).expect("parses");
        let Command::Pub(a) = plain.command else {
            panic!("pub expected")
        };
        let s = Settings::new("pub", &a.common).expect("settings");
        assert!(s.client_options('p', 0, None).tls.is_none());
    }
}
