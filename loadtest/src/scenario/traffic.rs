//! The message scenarios (`pub`, `sub`, `fanin`, `fanout`, `p2p`, `shared`):
//!
//! ```text
//!  subscribers connect + SUBACK ──> publishers connect ──> ready file ──> go
//!  send phase:  until every publisher sent --count, or --duration / Ctrl-C
//!  drain phase: until received == expected and every window is acked,
//!               or nothing moved for --drain-ms
//!  stop subscribers ──> account every (publisher, receiver) stream ──> report
//! ```

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::role::{self, Leave, PublisherSignals, SetupRx, SubscriberTask};
use super::{Load, Settings, Topology};
use crate::client::publisher::{PublisherResult, PublisherSpec};
use crate::client::subscriber::{SubscriberResult, SubscriberSpec};
use crate::clock::{now_ns, CpuTime};
use crate::progress::{self, Progress, Show};
use crate::report::{self, BrokerUse, CpuReport, Report};

/// How often the coordinator looks at the counters.
const POLL: Duration = Duration::from_millis(5);

pub async fn run(settings: Settings, load: Load, topo: Topology) -> anyhow::Result<Report> {
    let progress = Progress::new(topo.publishers.len());
    let signals = PublisherSignals::default();
    let sub_stop = CancellationToken::new();
    let setup_deadline = settings.connect_timeout + Duration::from_secs(5);

    let subs = spawn_subscribers(
        &settings,
        &load,
        &topo,
        &progress,
        &sub_stop,
        Leave::EndSession,
    );
    let (subs, mut setup_rx) = subs;
    let pubs = spawn_publishers(&settings, &load, &topo, &progress, &signals);
    let (pubs, mut pub_setup_rx) = pubs;
    let setup = async {
        role::await_setup(&mut setup_rx, subs.len(), setup_deadline).await?;
        role::await_setup(&mut pub_setup_rx, pubs.len(), setup_deadline).await
    };
    if let Err(e) = setup.await {
        signals.abort.cancel();
        sub_stop.cancel();
        return Err(e);
    }
    settings.write_ready_file(&serde_json::json!({
        "scenario": settings.scenario, "publishers": pubs.len(), "subscribers": subs.len(),
        "topic_prefix": settings.prefix,
    }))?;

    let ticker_done = CancellationToken::new();
    if !settings.output.quiet {
        progress::spawn_ticker(progress.clone(), Show::Messages, ticker_done.clone());
    }
    let cpu0 = CpuTime::now();
    let t0 = Instant::now();
    let t0_ns = now_ns();
    signals.go.cancel();

    send_phase(&load, &progress, pubs.len(), subs.len(), &signals.stop).await;
    signals.stop.cancel();
    let drain_timed_out = drain_phase(&load, &topo, &progress, pubs.len(), true).await;
    signals.abort.cancel();
    sub_stop.cancel();
    let elapsed_s = t0.elapsed().as_secs_f64();
    let cpu = CpuTime::now().since(cpu0);
    ticker_done.cancel();

    let pub_results = join_all(pubs).await;
    let sub_results: Vec<SubscriberResult> =
        join_all(subs).await.into_iter().map(|(r, _)| r).collect();
    let mut report = base_report(&settings, &load, &topo);
    report.elapsed_s = elapsed_s;
    report.drain_timed_out = drain_timed_out;
    report::account(
        &mut report,
        &topo,
        &settings.brokers,
        &pub_results,
        &sub_results,
    );
    report.send_s = secs_since(t0_ns, pub_results.iter().map(|p| p.last_send_ns).max());
    report.receive_s = secs_since(t0_ns, sub_results.iter().map(|s| s.last_receive_ns).max());
    report.send_rate = report::rate(report.sent, report.send_s);
    report.receive_rate = report::rate(report.totals.distinct, report.receive_s);
    report.cpu = CpuReport::new(cpu, elapsed_s, report.sent + report.totals.received);
    Ok(report)
}

/// Seconds from `t0_ns` to `end_ns` (0 when nothing happened).
pub fn secs_since(t0_ns: u64, end_ns: Option<u64>) -> f64 {
    end_ns
        .filter(|&e| e > t0_ns)
        .map_or(0.0, |e| (e - t0_ns) as f64 / 1e9)
}

/// Everything about the run that is known before it starts.
pub fn base_report(settings: &Settings, load: &Load, topo: &Topology) -> Report {
    let brokers = settings
        .brokers
        .iter()
        .enumerate()
        .map(|(i, addr)| BrokerUse {
            addr: addr.clone(),
            publishers: topo.publishers.iter().filter(|p| p.broker == i).count(),
            subscribers: topo.subscribers.iter().filter(|s| s.broker == i).count(),
            connections: 0,
        })
        .collect();
    Report {
        scenario: settings.scenario.to_owned(),
        mqtt_version: settings.version_label().to_owned(),
        tls: settings.tls.is_some(),
        qos: load.qos.clone(),
        payload_bytes: load.size,
        publishers: topo.publishers.len(),
        subscribers: topo.subscribers.len(),
        placement: format!("{:?}", settings.placement).to_lowercase(),
        brokers,
        topic_prefix: settings.prefix.clone(),
        ..Report::default()
    }
}

pub fn spawn_subscribers(
    settings: &Settings,
    load: &Load,
    topo: &Topology,
    progress: &Arc<Progress>,
    stop: &CancellationToken,
    leave: Leave,
) -> (Vec<SubscriberTask>, SetupRx) {
    let (tx, rx) = mpsc::channel(topo.subscribers.len().max(1));
    let handles = topo
        .subscribers
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            let id = i as u32;
            let spec = SubscriberSpec {
                id,
                subscribe: Some((plan.filter.clone(), plan.qos)),
                count: if topo.publishers.is_empty() {
                    load.count
                } else {
                    None
                },
                keepalive_secs: settings.keepalive,
            };
            let opts = settings.client_options('s', id, None);
            let addr = settings.brokers[plan.broker].clone();
            role::spawn_subscriber(
                addr,
                opts,
                spec,
                progress.clone(),
                tx.clone(),
                stop.clone(),
                leave,
            )
        })
        .collect();
    (handles, rx)
}

pub fn spawn_publishers(
    settings: &Settings,
    load: &Load,
    topo: &Topology,
    progress: &Arc<Progress>,
    signals: &PublisherSignals,
) -> (Vec<JoinHandle<PublisherResult>>, SetupRx) {
    let (tx, rx) = mpsc::channel(topo.publishers.len().max(1));
    let handles = topo
        .publishers
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            let id = i as u32;
            let spec = PublisherSpec {
                id,
                topic: plan.topic.clone(),
                qos: plan.qos,
                size: load.size,
                count: load.count,
                rate: load.rate,
                inflight: load.inflight,
                keepalive_secs: settings.keepalive,
            };
            let opts = settings.client_options('p', id, None);
            let addr = settings.brokers[plan.broker].clone();
            role::spawn_publisher(
                addr,
                opts,
                spec,
                progress.clone(),
                tx.clone(),
                signals.clone(),
            )
        })
        .collect();
    (handles, rx)
}

/// Until every publisher (or, with none, every subscriber) is done, or the duration ends,
/// or Ctrl-C.
pub async fn send_phase(
    load: &Load,
    progress: &Progress,
    pubs: usize,
    subs: usize,
    stop: &CancellationToken,
) {
    let deadline = load.duration.map(|d| tokio::time::Instant::now() + d);
    let all_done = async {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let done = if pubs > 0 {
                progress.publishers_done.load(Relaxed) as usize >= pubs
            } else {
                subs > 0 && progress.subscribers_done.load(Relaxed) as usize >= subs
            };
            if done {
                return;
            }
        }
    };
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = all_done => {}
        _ = until_deadline => {}
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted: stopping"),
        _ = stop.cancelled() => {}
    }
}

/// Until every publisher finished its window and (with `receipt`) every expected message
/// arrived, or nothing moved for `load.drain`. Returns true on the idle deadline.
pub async fn drain_phase(
    load: &Load,
    topo: &Topology,
    progress: &Progress,
    pubs: usize,
    receipt: bool,
) -> bool {
    let mut tick = tokio::time::interval(POLL);
    let mut last = (progress.totals(), Instant::now());
    loop {
        tick.tick().await;
        let now = progress.totals();
        let expected = if receipt {
            expected_deliveries(topo, progress)
        } else {
            0
        };
        let windows_done = progress.publishers_done.load(Relaxed) as usize >= pubs
            && now.acked >= acked_target(topo, progress);
        if windows_done && now.received >= expected {
            return false;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= load.drain {
            return true;
        }
    }
}

/// Deliveries the receivers should get for what was sent so far.
pub fn expected_deliveries(topo: &Topology, progress: &Progress) -> u64 {
    topo.receivers
        .iter()
        .filter_map(|r| r.publishers.as_ref())
        .flat_map(|ids| ids.iter().map(|&p| progress.sent_of(p)))
        .sum()
}

/// Messages of the QoS 1/2 publishers, all of which should be acknowledged.
fn acked_target(topo: &Topology, progress: &Progress) -> u64 {
    topo.publishers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.qos > 0)
        .map(|(i, _)| progress.sent_of(i as u32))
        .sum()
}

pub async fn join_all<T>(handles: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    out
}
