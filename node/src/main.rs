//! The `petrel` binary: CLI → config → tracing → runtime → bind → start → wait for a signal →
//! graceful shutdown. Exit codes: 0 after a signal, 64 for a bad CLI or config, 74 after a
//! failed storage write (restart it: it recovers from the WAL), 1 otherwise.
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use petrel_node::config::{Config, LogFormat};
use petrel_node::{Listeners, Node};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Exit code for a bad command line or configuration (BSD `EX_USAGE`).
const EXIT_USAGE: u8 = 64;
/// Exit code after a failed storage write (BSD `EX_IOERR`).
const EXIT_IOERR: u8 = 74;
/// How long connections get to drain after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long connections get to drain after a failed storage write.
const STORAGE_FAILURE_GRACE: Duration = Duration::from_secs(5);

/// Petrel MQTT broker node. Settings come from defaults < --config file < PETREL_<SECTION>__<FIELD>
/// environment variables < these flags.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML config file; see --print-default-config for every setting
    #[arg(long, env = "PETREL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// MQTT listen address (overrides mqtt.addr)
    #[arg(long, env = "PETREL_MQTT_ADDR", value_name = "HOST:PORT")]
    mqtt_addr: Option<SocketAddr>,
    /// MQTT over TLS listen address (overrides mqtt.mqtts_addr)
    #[arg(long, env = "PETREL_MQTTS_ADDR", value_name = "HOST:PORT")]
    mqtts_addr: Option<SocketAddr>,
    /// MQTT over WebSocket listen address (overrides mqtt.ws_addr)
    #[arg(long, env = "PETREL_WS_ADDR", value_name = "HOST:PORT")]
    ws_addr: Option<SocketAddr>,
    /// MQTT over secure WebSocket listen address (overrides mqtt.wss_addr)
    #[arg(long, env = "PETREL_WSS_ADDR", value_name = "HOST:PORT")]
    wss_addr: Option<SocketAddr>,
    /// PEM server certificate chain (overrides tls.cert_file)
    #[arg(long, env = "PETREL_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM server private key (overrides tls.key_file)
    #[arg(long, env = "PETREL_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Admin HTTP listen address (overrides admin.addr)
    #[arg(long, env = "PETREL_ADMIN_ADDR", value_name = "HOST:PORT")]
    admin_addr: Option<SocketAddr>,
    /// Read-write bearer token for the admin API (overrides admin.token)
    #[arg(
        long,
        env = "PETREL_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// File of admin API tokens, `read-only|read-write <token>` per line (overrides admin.token_file)
    #[arg(long, env = "PETREL_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// This node's id in the cluster (overrides cluster.node_id)
    #[arg(long, env = "PETREL_NODE_ID", value_name = "N")]
    node_id: Option<u64>,
    /// gRPC listen address for Raft and node-to-node traffic (overrides cluster.grpc_addr)
    #[arg(long, env = "PETREL_GRPC_ADDR", value_name = "HOST:PORT")]
    grpc_addr: Option<SocketAddr>,
    /// gRPC address other nodes dial to reach this one (overrides cluster.advertise_addr)
    #[arg(long, env = "PETREL_ADVERTISE_ADDR", value_name = "HOST:PORT")]
    advertise_addr: Option<String>,
    /// gRPC addresses of members to join, comma-separated (overrides cluster.join)
    #[arg(long, env = "PETREL_JOIN", value_name = "HOST:PORT[,HOST:PORT]")]
    join: Option<String>,
    /// Data directory (overrides storage.data_dir)
    #[arg(long, env = "PETREL_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Once listening, atomically write {"mqtt":..,"admin":..,"pid":..} JSON to this file
    #[arg(long, env = "PETREL_READY_FILE", value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Log format, text or json (overrides log.format)
    #[arg(long, env = "PETREL_LOG_FORMAT", value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// Print the default configuration as commented TOML and exit
    #[arg(long)]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Add, change or delete users of a password file (like mosquitto_passwd)
    Passwd(petrel_node::auth::PasswdArgs),
    /// Show the cluster's members, or remove a dead one, through any member
    Cluster(petrel_node::cluster::cli::ClusterArgs),
    /// The admin REST API from the command line: sessions, retained messages, the cluster
    Ctl(petrel_node::ctl::CtlArgs),
}

fn main() -> ExitCode {
    let mut cli = Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { EXIT_USAGE.into() } else { 0 })
    });
    match cli.command.take() {
        Some(Command::Passwd(args)) => {
            return match petrel_node::auth::passwd_cmd::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("petrel passwd: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Ctl(args)) => {
            return match petrel_node::ctl::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("petrel ctl: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Cluster(args)) => {
            return match petrel_node::cluster::cli::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("petrel cluster: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    if cli.print_default_config {
        print!("{}", Config::to_toml_string());
        return ExitCode::SUCCESS;
    }
    let cfg = match load_config(&cli) {
        Ok(cfg) => cfg,
        Err(problems) => {
            for problem in problems {
                eprintln!("petrel: config: {problem}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&cfg.log.level))
        .with_ansi(std::io::stdout().is_terminal());
    match cfg.log.format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // Before the runtime starts its threads: see limit/files.rs.
    petrel_node::limit::files::prepare_logged(cfg.limits.max_connections);
    let result = tokio::runtime::Runtime::new() // multi-thread, all drivers enabled
        .context("build tokio runtime")
        .and_then(|rt| rt.block_on(run(cfg, cli.ready_file)));
    match result {
        Ok(Stopped::Signal) => ExitCode::SUCCESS,
        Ok(Stopped::StorageFailed) => {
            eprintln!("petrel: a storage write failed; exiting with status {EXIT_IOERR}");
            ExitCode::from(EXIT_IOERR)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "petrel failed");
            eprintln!("petrel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why a running node stopped.
enum Stopped {
    Signal,
    /// Logged and counted by the node already.
    StorageFailed,
}

/// Config from file and environment, then the flag overrides, then validation.
fn load_config(cli: &Cli) -> Result<Config, Vec<String>> {
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())));
    let mut cfg = Config::load(cli.config.as_deref(), env).map_err(|e| e.problems())?;
    cfg.mqtt.addr = cli.mqtt_addr.unwrap_or(cfg.mqtt.addr);
    for (flag, slot) in [
        (cli.mqtts_addr, &mut cfg.mqtt.mqtts_addr),
        (cli.ws_addr, &mut cfg.mqtt.ws_addr),
        (cli.wss_addr, &mut cfg.mqtt.wss_addr),
    ] {
        if let Some(addr) = flag {
            *slot = addr.to_string();
        }
    }
    cfg.tls.cert_file = cli.tls_cert.clone().unwrap_or(cfg.tls.cert_file);
    cfg.tls.key_file = cli.tls_key.clone().unwrap_or(cfg.tls.key_file);
    cfg.admin.addr = cli.admin_addr.unwrap_or(cfg.admin.addr);
    if let Some(t) = &cli.admin_token {
        cfg.admin.token = t.clone();
    }
    if let Some(f) = &cli.admin_token_file {
        cfg.admin.token_file = f.clone();
    }
    cfg.storage.data_dir = cli.data_dir.clone().unwrap_or(cfg.storage.data_dir);
    cfg.log.format = cli.log_format.unwrap_or(cfg.log.format);
    cfg.cluster.node_id = cli.node_id.unwrap_or(cfg.cluster.node_id);
    cfg.cluster.grpc_addr = cli.grpc_addr.unwrap_or(cfg.cluster.grpc_addr);
    if let Some(a) = &cli.advertise_addr {
        cfg.cluster.advertise_addr = a.clone();
    }
    if let Some(j) = &cli.join {
        cfg.cluster.join = j.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

async fn run(cfg: Config, ready_file: Option<PathBuf>) -> anyhow::Result<Stopped> {
    // Installed before the ready file exists, so an early SIGTERM is a graceful shutdown.
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let listeners = Listeners::bind(&cfg).await.context("bind listeners")?;
    let handle = Node::start(cfg, listeners).await.context("start node")?;
    let a = handle.addrs();
    info!(mqtt = %a.mqtt, mqtts = ?a.mqtts, ws = ?a.ws, wss = ?a.wss, admin = ?a.admin, grpc = %a.grpc, "listening");
    let ready = serde_json::json!({
        "mqtt": a.mqtt, "mqtts": a.mqtts, "ws": a.ws, "wss": a.wss, "admin": a.admin,
        "grpc": a.grpc, "pid": std::process::id()
    });
    if let Some(Err(e)) = ready_file.map(|path| write_atomically(&path, &ready.to_string())) {
        handle.shutdown(SHUTDOWN_GRACE).await;
        return Err(e);
    }
    let signal = tokio::select! {
        _ = sigterm.recv() => Some("SIGTERM"),
        _ = sigint.recv() => Some("SIGINT"),
        () = handle.storage_failed() => None,
    };
    let Some(signal) = signal else {
        handle.shutdown(STORAGE_FAILURE_GRACE).await;
        return Ok(Stopped::StorageFailed);
    };
    info!(signal, "shutting down");
    handle.shutdown(SHUTDOWN_GRACE).await;
    Ok(Stopped::Signal)
}

/// Writes a temporary sibling, then renames it over `path`, so readers never see half a file.
/// Blocking, but small and once per process.
fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, contents).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}
