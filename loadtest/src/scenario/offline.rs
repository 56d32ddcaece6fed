//! `offline`: persistent sessions that go away, get messages queued, and drain them.
//!
//! ```text
//!  subscribers connect (persistent) + SUBACK ──> DISCONNECT, broker closes
//!  publishers send --count each, every QoS 1/2 message acknowledged ──> disconnect
//!  subscribers reconnect (same ids, no SUBSCRIBE) ──> drain until all arrived
//!  or nothing new for --drain-ms ──> end the sessions ──> report
//! ```

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::role::{self, Leave, PublisherSignals, SetupRx, SubscriberTask};
use super::traffic::{self, base_report, join_all, secs_since};
use super::{Load, Settings, Topology};
use crate::client::codec::Version;
use crate::client::conn::Conn;
use crate::client::subscriber::{SubscriberResult, SubscriberSpec};
use crate::clock::{now_ns, CpuTime};
use crate::progress::{self, Progress, Show};
use crate::report::{self, CpuReport, OfflineStats, Report};

/// Messages per publisher when --count is not given.
const DEFAULT_COUNT: u64 = 1000;

pub async fn run(settings: Settings, mut load: Load, topo: Topology) -> anyhow::Result<Report> {
    if load.count.is_none() {
        load.count = Some(DEFAULT_COUNT);
        load.duration = None;
    }
    let progress = Progress::new(topo.publishers.len());
    let setup_deadline = settings.connect_timeout + Duration::from_secs(5);
    let persistent = Settings {
        persistent: true,
        ..settings.clone()
    };

    // 1. Create the sessions and take them offline.
    let first_stop = CancellationToken::new();
    let (subs, mut rx) = traffic::spawn_subscribers(
        &persistent,
        &load,
        &topo,
        &progress,
        &first_stop,
        Leave::Disconnect,
    );
    let setup = role::await_setup(&mut rx, subs.len(), setup_deadline).await;
    first_stop.cancel();
    let first: Vec<SubscriberResult> = join_all(subs).await.into_iter().map(|(r, _)| r).collect();
    setup?;
    if let Some(e) = first.iter().find_map(|r| r.error.clone()) {
        anyhow::bail!("taking the sessions offline: {e}");
    }

    // 2. Publish while they are away.
    let signals = PublisherSignals::default();
    let (pubs, mut rx) = traffic::spawn_publishers(&settings, &load, &topo, &progress, &signals);
    if let Err(e) = role::await_setup(&mut rx, pubs.len(), setup_deadline).await {
        signals.abort.cancel();
        return Err(e);
    }
    let ticker_done = CancellationToken::new();
    if !settings.output.quiet {
        progress::spawn_ticker(progress.clone(), Show::Messages, ticker_done.clone());
    }
    let cpu0 = CpuTime::now();
    let t0 = Instant::now();
    let t0_ns = now_ns();
    signals.go.cancel();
    traffic::send_phase(&load, &progress, pubs.len(), 0, &signals.stop).await;
    signals.stop.cancel();
    let acks_timed_out = traffic::drain_phase(&load, &topo, &progress, pubs.len(), false).await;
    signals.abort.cancel();
    let pub_results = join_all(pubs).await;

    // 3. Come back and drain.
    settings
        .write_ready_file(&serde_json::json!({ "scenario": "offline", "phase": "reconnect" }))?;
    let stop = CancellationToken::new();
    let reconnect_ns = now_ns();
    let (subs, mut rx) = spawn_resumers(&persistent, &topo, &progress, &stop);
    let setup = role::await_setup(&mut rx, subs.len(), setup_deadline).await;
    let drain_timed_out =
        setup.is_err() || traffic::drain_phase(&load, &topo, &progress, 0, true).await;
    stop.cancel();
    let elapsed_s = t0.elapsed().as_secs_f64();
    let cpu = CpuTime::now().since(cpu0);
    ticker_done.cancel();
    let resumed = join_all(subs).await;
    if settings.version == Version::V311 {
        end_311_sessions(&persistent, topo.subscribers.len()).await;
    }

    let mut report = base_report(&settings, &load, &topo);
    let sessions_resumed = resumed
        .iter()
        .filter(|(_, present)| *present == Some(true))
        .count() as u64;
    let sub_results: Vec<SubscriberResult> = resumed.into_iter().map(|(r, _)| r).collect();
    report.elapsed_s = elapsed_s;
    report.drain_timed_out = acks_timed_out || drain_timed_out;
    report::account(
        &mut report,
        &topo,
        &settings.brokers,
        &pub_results,
        &sub_results,
    );
    report.errors.extend(setup.err().map(|e| format!("{e:#}")));
    report.send_s = secs_since(t0_ns, pub_results.iter().map(|p| p.last_send_ns).max());
    report.send_rate = report::rate(report.sent, report.send_s);
    report.receive_s = secs_since(
        reconnect_ns,
        sub_results.iter().map(|s| s.last_receive_ns).max(),
    );
    report.receive_rate = report::rate(report.totals.distinct, report.receive_s);
    report.offline = Some(OfflineStats {
        published_while_offline: report.sent,
        sessions_resumed,
        sessions_not_present: topo.subscribers.len() as u64 - sessions_resumed,
        drain_s: report.receive_s,
        drain_rate: report.receive_rate,
    });
    report.cpu = CpuReport::new(cpu, elapsed_s, report.sent + report.totals.received);
    Ok(report)
}

/// Subscribers reconnecting to their sessions: no SUBSCRIBE, they end the session on leave.
fn spawn_resumers(
    settings: &Settings,
    topo: &Topology,
    progress: &std::sync::Arc<Progress>,
    stop: &CancellationToken,
) -> (Vec<SubscriberTask>, SetupRx) {
    let (tx, rx) = tokio::sync::mpsc::channel(topo.subscribers.len().max(1));
    let handles = topo
        .subscribers
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            let id = i as u32;
            let spec = SubscriberSpec {
                id,
                subscribe: None,
                count: None,
                keepalive_secs: settings.keepalive,
            };
            let opts = settings.client_options('s', id, Some(true));
            let addr = settings.brokers[plan.broker].clone();
            role::spawn_subscriber(
                addr,
                opts,
                spec,
                progress.clone(),
                tx.clone(),
                stop.clone(),
                Leave::EndSession,
            )
        })
        .collect();
    (handles, rx)
}

/// 3.1.1 has no session expiry on DISCONNECT: a clean connect drops the stored session.
async fn end_311_sessions(settings: &Settings, n: usize) {
    for i in 0..n as u32 {
        let opts = settings.client_options('s', i, Some(false));
        let addr = &settings.brokers[settings
            .layout()
            .broker(super::topology::Role::Subscriber, i)];
        if let Ok(conn) = Conn::connect(addr, &opts, 256).await {
            let _ = conn.disconnect(false, Duration::from_secs(2)).await;
        }
    }
}
