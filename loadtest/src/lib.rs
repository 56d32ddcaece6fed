//! petrel-bench: an MQTT load generator with its own lean client, so it measures the broker
//! from the outside.
//!
//! - `cli`: the subcommands and their options.
//! - `client/`: `codec` (MQTT 3.1.1/5.0 wire format, only what a generator needs), `conn`
//!   (socket + read/write buffers, optionally through rustls), `tls` (the run's rustls
//!   configuration, `--ca-file` / `--insecure`, server names), `publisher` and `subscriber`
//!   (the per-connection loops).
//! - `scenario/`: `topology` (who publishes and subscribes where, placement over brokers),
//!   `traffic` (the send/drain coordinator of pub, sub, fanin, fanout, p2p, shared),
//!   `offline`, `conn`, `role` (one task per client), `settings`.
//! - `stats`: per-stream sequence accounting (lost, duplicates, out-of-order) and latency.
//! - `progress`: shared counters and the line-a-second progress output.
//! - `report`: the final report, human or JSON.
//! - `sink`: the discard server for measuring the generator itself.
//! - `clock`: monotonic send stamps and the generator's CPU time.
//!
//! Library use (tests, scripts): [`run_args`] parses a command line and returns the report.

pub mod cli;
pub mod client;
pub mod clock;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod sink;
pub mod stats;

use std::io::Write;

use clap::Parser;

pub use cli::{Cli, Command};
pub use report::Report;

/// Exit status when `--check` finds a problem.
pub const EXIT_CHECK_FAILED: i32 = 2;

/// Runs `petrel-bench <args>` (without the program name) on the current runtime and returns
/// the report of a client scenario.
pub async fn run_args<I, S>(args: I) -> anyhow::Result<Report>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let argv = std::iter::once("petrel-bench".into()).chain(args.into_iter().map(Into::into));
    let cli = Cli::try_parse_from(argv)?;
    scenario::run(cli.command).await
}

/// The binary: builds the runtime (`--threads`), runs the command, prints the report and
/// returns the exit status.
pub fn main_with(cli: Cli) -> anyhow::Result<i32> {
    let output = match &cli.command {
        Command::Conn(a) => a.common.output.clone(),
        Command::Pub(a) => a.common.output.clone(),
        Command::Sub(a) => a.common.output.clone(),
        Command::Fanin(a) => a.common.output.clone(),
        Command::Fanout(a) => a.common.output.clone(),
        Command::P2p(a) => a.common.output.clone(),
        Command::Shared(a) => a.common.output.clone(),
        Command::Offline(a) => a.common.output.clone(),
        Command::Sink(a) => a.output.clone(),
    };
    let runtime = if output.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(output.threads))
            .enable_all()
            .build()
    }?;
    let mut out = std::io::stdout().lock();
    if let Command::Sink(a) = &cli.command {
        let report = runtime.block_on(sink::run_cli(a))?;
        if output.json {
            serde_json::to_writer_pretty(&mut out, &report)?;
            writeln!(out)?;
        } else {
            report.write_human(&mut out)?;
        }
        return Ok(0);
    }
    let report = runtime.block_on(scenario::run(cli.command))?;
    if output.json {
        report.write_json(&mut out)?;
    } else {
        report.write_human(&mut out)?;
    }
    let failures = report.check_failures();
    if output.check && !failures.is_empty() {
        eprintln!("check failed: {}", failures.join("; "));
        return Ok(EXIT_CHECK_FAILED);
    }
    Ok(0)
}
