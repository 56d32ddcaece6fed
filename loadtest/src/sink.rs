//! `sink`: a TCP server that speaks just enough MQTT (CONNACK, SUBACK, PUBACK/PUBREC/PUBCOMP,
//! PINGRESP) to keep a client going, and discards everything else. `petrel-bench pub
//! --broker <sink> --qos 0` against it measures what the generator itself can push.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::cli::SinkArgs;
use crate::client::codec::{self, kind, Version};
use crate::clock::CpuTime;
use crate::progress::si;
use crate::report::CpuReport;
use crate::scenario::settings::write_atomically;

const BUF: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct SinkCounters {
    pub connections: AtomicU64,
    pub publishes: AtomicU64,
    pub bytes: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    pub listen: String,
    pub connections: u64,
    pub publishes: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    /// Publishes per second from the start to the last one-second tick that saw new ones
    /// (coarse: the generator's own report is the precise figure).
    pub publish_rate: f64,
    pub cpu: CpuReport,
}

pub struct Sink {
    listener: TcpListener,
    counters: Arc<SinkCounters>,
}

impl Sink {
    pub async fn bind(addr: &str) -> anyhow::Result<Sink> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind sink to {addr}"))?;
        Ok(Sink {
            listener,
            counters: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn counters(&self) -> Arc<SinkCounters> {
        self.counters.clone()
    }

    /// Accepts and serves connections until `stop` fires.
    pub async fn serve(self, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = self.listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let (counters, stop) = (self.counters.clone(), stop.clone());
            counters.connections.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = serve_one(stream, &counters) => {}
                }
            });
        }
    }
}

/// One client: answer what needs an answer, count PUBLISHes, drop the rest.
async fn serve_one(mut stream: TcpStream, counters: &SinkCounters) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut rbuf = BytesMut::with_capacity(BUF);
    let mut wbuf = BytesMut::with_capacity(BUF);
    let mut version = Version::V311;
    let mut qos = Vec::new();
    loop {
        rbuf.reserve(BUF);
        let n = stream.read_buf(&mut rbuf).await?;
        if n == 0 {
            return Ok(());
        }
        counters.bytes.fetch_add(n as u64, Relaxed);
        let mut pos = 0;
        let mut publishes = 0;
        let mut disconnected = false;
        while let Some(f) = codec::frame(&rbuf[pos..], codec::MAX_REMAINING_LENGTH)? {
            let body = f.body(&rbuf[pos..]);
            match f.kind {
                kind::CONNECT => {
                    version = codec::parse_connect_version(body)?;
                    codec::encode_connack(&mut wbuf, version, 0);
                }
                kind::PUBLISH => {
                    publishes += 1;
                    let p = codec::parse_publish(version, f.flags, body)?;
                    match p.qos {
                        1 => codec::encode_ack(&mut wbuf, kind::PUBACK, p.pid),
                        2 => codec::encode_ack(&mut wbuf, kind::PUBREC, p.pid),
                        _ => {}
                    }
                }
                kind::PUBREL => {
                    codec::encode_ack(&mut wbuf, kind::PUBCOMP, codec::parse_ack(body)?.0)
                }
                kind::SUBSCRIBE => {
                    let pid = codec::parse_subscribe(version, body, &mut qos)?;
                    codec::encode_suback(&mut wbuf, version, pid, &qos);
                }
                kind::PINGREQ => codec::encode_pingresp(&mut wbuf),
                kind::DISCONNECT => {
                    disconnected = true;
                    break;
                }
                _ => {}
            }
            pos += f.packet_len();
        }
        rbuf.advance(pos);
        if publishes > 0 {
            counters.publishes.fetch_add(publishes, Relaxed);
        }
        if disconnected {
            return Ok(());
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
    }
}

/// `petrel-bench sink`: serve until --duration, SIGINT or SIGTERM (then print the report),
/// with a progress line a second.
pub async fn run_cli(a: &SinkArgs) -> anyhow::Result<SinkReport> {
    let sink = Sink::bind(&a.listen).await?;
    let addr = sink.local_addr()?;
    eprintln!("sink listening on {addr}");
    if let Some(path) = &a.output.ready_file {
        write_atomically(
            path,
            &serde_json::json!({ "mqtt": addr.to_string() }).to_string(),
        )?;
    }
    let counters = sink.counters();
    let stop = CancellationToken::new();
    let server = tokio::spawn(sink.serve(stop.clone()));
    let cpu0 = CpuTime::now();
    let start = Instant::now();
    let mut last_change = (0u64, start);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let deadline = a.duration.map(|d| tokio::time::Instant::now() + d);
    let mut prev = 0;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    loop {
        let until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = until => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let n = counters.publishes.load(Relaxed);
        if n != last_change.0 {
            last_change = (n, Instant::now());
        }
        if !a.output.quiet {
            let conns = counters.connections.load(Relaxed);
            eprintln!(
                "[{:6.1}s] publishes {n} ({}/s)  connections {conns}",
                start.elapsed().as_secs_f64(),
                si(n - prev)
            );
        }
        prev = n;
    }
    stop.cancel();
    let _ = server.await;
    let elapsed_s = start.elapsed().as_secs_f64();
    let cpu = CpuTime::now().since(cpu0);
    let publishes = counters.publishes.load(Relaxed);
    let busy_s = last_change.1.duration_since(start).as_secs_f64();
    Ok(SinkReport {
        listen: addr.to_string(),
        connections: counters.connections.load(Relaxed),
        publishes,
        bytes: counters.bytes.load(Relaxed),
        elapsed_s,
        publish_rate: if busy_s > 0.0 {
            publishes as f64 / busy_s
        } else {
            0.0
        },
        cpu: CpuReport::new(cpu, elapsed_s, publishes),
    })
}

impl SinkReport {
    pub fn write_human(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "petrel-bench sink on {}: {} connections",
            self.listen, self.connections
        )?;
        writeln!(
            out,
            "  received {} publishes, {} bytes, ~{:.0} publishes/s while busy",
            self.publishes, self.bytes, self.publish_rate
        )?;
        writeln!(
            out,
            "  sink CPU {:.2} s over {:.2} s = {:.0}% of a core",
            self.cpu.time.total_s,
            self.elapsed_s,
            self.cpu.utilisation * 100.0
        )
    }
}
