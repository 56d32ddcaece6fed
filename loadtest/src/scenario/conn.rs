//! `conn`: open N connections (at most --concurrency attempts at once, optionally paced to
//! --rate per second; with --subscribe each also subscribes to a filter of its own), hold them
//! idle for --duration, answer keep-alive, close.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::topology::Role;
use super::traffic::join_all;
use super::Settings;
use crate::cli::ConnArgs;
use crate::client::codec;
use crate::client::conn::{Conn, Read};
use crate::clock::{self, now_ns, CpuTime};
use crate::progress::{self, Progress, Show};
use crate::report::{self, BrokerUse, ConnectStats, CpuReport, Report};
use crate::stats::Latency;

/// Buffer capacity of an idle connection (CONNACK and PINGRESP only).
const IDLE_BUF: usize = 256;

/// How one connection went.
enum Outcome {
    /// Connected (latency in ns); `dropped` if the broker closed it while idle.
    Held {
        latency_ns: u64,
        dropped: bool,
    },
    Failed(String),
}

pub async fn run(settings: Settings, a: &ConnArgs) -> anyhow::Result<Report> {
    let fd_limit = clock::raise_fd_limit();
    if let Some(limit) = fd_limit.filter(|l| *l < u64::from(a.clients) + 64) {
        eprintln!(
            "warning: open-files limit {limit} is below {} connections",
            a.clients
        );
    }
    let settings = Arc::new(settings);
    let progress = Progress::new(0);
    let permits = Arc::new(Semaphore::new(a.concurrency as usize));
    let hold = CancellationToken::new();
    let ticker_done = CancellationToken::new();
    if !settings.output.quiet {
        progress::spawn_ticker(progress.clone(), Show::Connections, ticker_done.clone());
    }
    let cpu0 = CpuTime::now();
    let t0 = Instant::now();
    let t0_tokio = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(a.clients as usize);
    for i in 0..a.clients {
        if let Some(rate) = a.rate.filter(|r| *r > 0.0) {
            tokio::time::sleep_until(t0_tokio + Duration::from_secs_f64(f64::from(i) / rate)).await;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let broker = settings.layout().broker(Role::Publisher, i);
        let addr = settings.brokers[broker].clone();
        let opts = settings.client_options('c', i, None);
        let (progress, hold) = (progress.clone(), hold.clone());
        let filter = a.subscribe.then(|| format!("{}/c{i}", settings.prefix));
        handles.push(tokio::spawn(async move {
            let start = now_ns();
            let conn = match Conn::connect(&addr, &opts, IDLE_BUF).await {
                Ok(conn) => match filter {
                    Some(filter) => subscribe(conn, &filter).await,
                    None => Ok(conn),
                },
                Err(e) => Err(e),
            };
            drop(permit);
            match conn {
                Ok(conn) => {
                    let latency_ns = now_ns() - start;
                    progress.connected.fetch_add(1, Relaxed);
                    let dropped = hold_idle(conn, opts.keepalive_secs, &hold).await;
                    Outcome::Held {
                        latency_ns,
                        dropped,
                    }
                }
                Err(e) => {
                    progress.failed.fetch_add(1, Relaxed);
                    Outcome::Failed(format!("connection {i}: {e:#}"))
                }
            }
        }));
    }
    // Every attempt has ended once all permits are back.
    let all = permits
        .acquire_many(a.concurrency)
        .await
        .expect("the semaphore is never closed");
    drop(all);
    let connect_phase_s = t0.elapsed().as_secs_f64();
    let succeeded = progress.connected.load(Relaxed);
    settings
        .write_ready_file(&serde_json::json!({ "scenario": "conn", "connections": succeeded }))?;
    tokio::select! {
        _ = tokio::time::sleep(a.duration) => {}
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted: closing"),
    }
    hold.cancel();
    let outcomes = join_all(handles).await;
    let elapsed_s = t0.elapsed().as_secs_f64();
    let cpu = CpuTime::now().since(cpu0);
    ticker_done.cancel();

    let mut latency = Latency::new();
    let mut stats = ConnectStats {
        attempted: u64::from(a.clients),
        connect_phase_s,
        ..ConnectStats::default()
    };
    let mut errors = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Held {
                latency_ns,
                dropped,
            } => {
                stats.succeeded += 1;
                stats.dropped += u64::from(dropped);
                latency.record(latency_ns);
            }
            Outcome::Failed(e) => {
                stats.failed += 1;
                errors.push(e);
            }
        }
    }
    stats.per_sec = report::rate(stats.succeeded, connect_phase_s);
    stats.latency = latency.summary();
    let brokers = settings
        .brokers
        .iter()
        .enumerate()
        .map(|(b, addr)| BrokerUse {
            addr: addr.clone(),
            connections: (0..a.clients)
                .filter(|&i| settings.layout().broker(Role::Publisher, i) == b)
                .count(),
            ..BrokerUse::default()
        })
        .collect();
    Ok(Report {
        scenario: "conn".into(),
        mqtt_version: settings.version_label().into(),
        tls: settings.tls.is_some(),
        placement: format!("{:?}", settings.placement).to_lowercase(),
        brokers,
        elapsed_s,
        connects: Some(stats),
        cpu: CpuReport::new(cpu, elapsed_s, 0),
        errors,
        ..Report::default()
    })
}

/// Subscribes `conn` to `filter` at QoS 1 and waits for a SUBACK that grants it.
async fn subscribe(mut conn: Conn, filter: &str) -> anyhow::Result<Conn> {
    codec::encode_subscribe(&mut conn.wbuf, conn.version, 1, filter, 1);
    conn.flush().await?;
    loop {
        let f = conn.read_frame().await?;
        let body = f.body(&conn.rbuf).to_vec();
        conn.rbuf.advance(f.packet_len());
        if f.kind != codec::kind::SUBACK {
            continue;
        }
        // The last byte is the reason code of the one filter (after a v5 property block).
        match body.last() {
            Some(&rc) if rc < 0x80 => return Ok(conn),
            rc => anyhow::bail!("SUBACK refused {filter}: {rc:?}"),
        }
    }
}

/// Keeps a connection open until `hold` fires, sending PINGREQ when it is due; returns true
/// if the broker closed it first.
async fn hold_idle(mut conn: Conn, keepalive_secs: u16, hold: &CancellationToken) -> bool {
    let every = conn
        .keepalive(keepalive_secs)
        .unwrap_or(Duration::from_secs(86_400 * 365));
    let mut next_ping = tokio::time::Instant::now() + every;
    loop {
        tokio::select! {
            _ = hold.cancelled() => {
                codec::encode_disconnect(&mut conn.wbuf, conn.version, false);
                let _ = conn.flush().await;
                return false;
            }
            _ = tokio::time::sleep_until(next_ping) => {
                codec::encode_pingreq(&mut conn.wbuf);
                if conn.flush().await.is_err() {
                    return true;
                }
                next_ping += every;
            }
            // WRITABLE only while TLS records are pending (a reply rustls queued on a read).
            ready = conn.stream.ready(conn.interest()) => {
                let Ok(ready) = ready else { return true };
                if ready.is_readable() {
                    match conn.try_read() {
                        Ok(Read::Closed) | Err(_) => return true,
                        // PINGRESP (or anything else): nothing to keep.
                        Ok(_) => conn.rbuf.clear(),
                    }
                }
                if ready.is_writable() && conn.try_write().is_err() {
                    return true;
                }
            }
        }
    }
}
