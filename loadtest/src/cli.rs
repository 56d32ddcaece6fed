//! The command line: one subcommand per scenario, shared option groups.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::codec::{Version, STAMP_LEN};

#[derive(Debug, Parser)]
#[command(
    name = "petrel-bench",
    version,
    about = "MQTT load generator: scenarios, loss accounting, latency percentiles"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// N connections opened at a target rate, then held idle (connects/s, connect latency).
    Conn(ConnArgs),
    /// Publishers only (ingest rate; against `sink`, the generator's own push rate).
    Pub(PubArgs),
    /// Subscribers only, on a filter fed from elsewhere (another petrel-bench `pub`).
    Sub(SubArgs),
    /// P publishers, one wildcard subscriber on `<prefix>/+`.
    Fanin(FaninArgs),
    /// One publisher, S subscribers on its topic.
    Fanout(FanoutArgs),
    /// N publisher/subscriber pairs, one topic each.
    P2p(P2pArgs),
    /// P publishers, a shared-subscription group of K subscribers.
    Shared(SharedArgs),
    /// Persistent subscribers go offline, get messages queued, reconnect and drain.
    Offline(OfflineArgs),
    /// A TCP server that answers CONNECT/SUBSCRIBE/PUBLISH minimally and discards the rest.
    Sink(SinkArgs),
}

/// How publishers and subscribers are spread over the `--broker` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Publishers and subscribers both round-robin over every broker, from the first.
    Same,
    /// Publishers round-robin over the even-indexed brokers, subscribers over the odd ones
    /// (so with two or more brokers no subscriber shares a broker with a publisher).
    Spread,
}

/// Options every client scenario takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Broker address; repeat for a list (see --placement).
    #[arg(
        long = "broker",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:1883"
    )]
    pub brokers: Vec<String>,
    #[arg(long, value_enum, default_value_t = Placement::Same)]
    pub placement: Placement,
    /// 3 (3.1.1) or 5.
    #[arg(long = "mqtt-version", value_name = "3|5", value_parser = parse_version, default_value = "3")]
    pub version: Version,
    /// Keep-alive in seconds (0 = none); a PINGREQ goes out when a client has been quiet this long.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub keepalive: u16,
    /// Clean sessions (the default).
    #[arg(long, conflicts_with = "persistent")]
    pub clean: bool,
    /// Persistent sessions (3.1.1 clean_session=0; v5 clean start 0 + --session-expiry).
    #[arg(long)]
    pub persistent: bool,
    /// v5 Session Expiry Interval of persistent sessions.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub session_expiry: u32,
    /// MQTT over TLS (the brokers' TLS port, e.g. 8883); needs --ca-file or --insecure.
    #[arg(long)]
    pub tls: bool,
    /// PEM file of the CA certificates that broker certificates are verified against.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Accept any broker certificate: no chain or name check (handshake signatures are
    /// still verified). For test brokers only.
    #[arg(long)]
    pub insecure: bool,
    /// TLS server name (SNI, and the name the certificate must hold); default: the host
    /// part of each --broker.
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    /// Topic prefix; default `petrel-bench/<run id>`, unique per run.
    #[arg(long, value_name = "PREFIX")]
    pub topic_prefix: Option<String>,
    /// Time allowed for TCP connect + CONNACK (and SUBACK).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    #[command(flatten)]
    pub output: Output,
}

/// Output and runtime options (also taken by `sink`).
#[derive(Debug, Clone, Args)]
pub struct Output {
    /// Print the final report as JSON on stdout instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Runtime threads: 1 = a current-thread runtime (easy to pin with taskset).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,
    /// Written (JSON, atomically) once every client is connected and subscribed.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Exit with status 2 if any QoS 1/2 message was lost, any QoS 2 one duplicated, or a
    /// client failed.
    #[arg(long)]
    pub check: bool,
}

/// Message flow options.
#[derive(Debug, Clone, Args)]
pub struct Traffic {
    /// QoS of the publishers, e.g. `1` or `0,1,2` (publisher i uses the (i mod n)-th).
    #[arg(long, value_delimiter = ',', default_value = "0", value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: Vec<u8>,
    /// Payload bytes (at least the 24-byte stamp: magic, publisher, sequence, send time).
    #[arg(long, value_name = "BYTES", default_value_t = 64, value_parser = parse_size)]
    pub size: usize,
    /// Messages per publisher; the run ends when all are sent (and --duration, if given, caps it).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Sending time (e.g. 10s, 500ms, 2m); 10s when neither --count nor --duration is given.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Messages per second per publisher; flat out when absent.
    #[arg(long, value_name = "MSGS_PER_S")]
    pub rate: Option<f64>,
    /// QoS 1/2 messages a publisher may have unacknowledged (capped by a v5 server's
    /// Receive Maximum). 64 keeps a loopback pipe full without hitting brokers' usual
    /// inbound limits (Petrel 128 at QoS 2).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// After sending ends, wait until everything expected has arrived, or until nothing new
    /// has arrived (and no ack) for this long; then count.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub drain_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(short = 'c', long = "clients", default_value_t = 1000)]
    pub clients: u32,
    /// Connection attempts per second; flat out (bounded by --concurrency) when absent.
    #[arg(long, value_name = "CONNS_PER_S")]
    pub rate: Option<f64>,
    /// Connection attempts under way at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// How long to hold the connections open once all are up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Each connection also subscribes, at QoS 1, to a filter of its own
    /// (`<prefix>/c<i>`) and counts as up once its SUBACK is in: a subscribe storm of new
    /// routes (a clustered broker makes each known cluster-wide).
    #[arg(long)]
    pub subscribe: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PubArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Publishers.
    #[arg(short = 'c', long = "clients", default_value_t = 1)]
    pub clients: u32,
}

#[derive(Debug, Clone, Args)]
pub struct SubArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscribers.
    #[arg(short = 'c', long = "clients", default_value_t = 1)]
    pub clients: u32,
    /// Filter to subscribe to; default `<prefix>/#`.
    #[arg(long)]
    pub topic: Option<String>,
    /// Subscription QoS.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Stop once each subscriber has this many distinct messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Listening time; 10s when neither --count nor --duration is given.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
pub struct FaninArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    #[arg(long, default_value_t = 8)]
    pub publishers: u32,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    #[arg(long, default_value_t = 16)]
    pub subscribers: u32,
}

#[derive(Debug, Clone, Args)]
pub struct P2pArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Publisher/subscriber pairs.
    #[arg(short = 'c', long = "clients", default_value_t = 8)]
    pub clients: u32,
}

#[derive(Debug, Clone, Args)]
pub struct SharedArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    #[arg(long, default_value_t = 4)]
    pub publishers: u32,
    /// Members of the shared-subscription group.
    #[arg(long, default_value_t = 4)]
    pub subscribers: u32,
    #[arg(long, default_value = "bench")]
    pub group: String,
}

#[derive(Debug, Clone, Args)]
pub struct OfflineArgs {
    #[command(flatten)]
    pub common: Common,
    /// --count is the number of messages each publisher sends while the subscribers are
    /// away (default 1000).
    #[command(flatten)]
    pub traffic: Traffic,
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    #[arg(long, default_value_t = 1)]
    pub subscribers: u32,
}

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:1884")]
    pub listen: String,
    /// Stop after this long (else at Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub output: Output,
}

pub fn parse_version(s: &str) -> Result<Version, String> {
    match s {
        "3" | "4" | "3.1.1" | "311" => Ok(Version::V311),
        "5" | "5.0" => Ok(Version::V5),
        other => Err(format!("unknown MQTT version {other:?} (want 3 or 5)")),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n < STAMP_LEN {
        return Err(format!(
            "at least {STAMP_LEN} bytes: the payload carries publisher, sequence and send time"
        ));
    }
    Ok(n)
}

/// `10s`, `500ms`, `2m`, `1h` or a bare number of seconds (fractions allowed).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent_and_parses_a_typical_line() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "petrel-bench",
            "fanin",
            "--qos",
            "0,1",
            "--publishers",
            "3",
            "--broker",
            "a:1",
            "--broker",
            "b:2",
            "--placement",
            "spread",
            "--mqtt-version",
            "5",
            "--count",
            "10",
            "--json",
        ])
        .expect("parses");
        let Command::Fanin(a) = cli.command else {
            panic!("fanin expected")
        };
        assert_eq!(a.traffic.qos, [0, 1]);
        assert_eq!(a.common.brokers, ["a:1", "b:2"]);
        assert_eq!(a.common.version, Version::V5);
        assert_eq!(a.common.placement, Placement::Spread);
        assert!(a.common.output.json);
        assert!(
            Cli::try_parse_from(["petrel-bench", "pub", "--size", "8"]).is_err(),
            "payload too small"
        );
        assert!(Cli::try_parse_from(["petrel-bench", "pub", "--qos", "3"]).is_err());
    }
}
