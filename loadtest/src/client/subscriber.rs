//! The subscriber loop: subscribes (unless resuming a session), then reads, accounts every
//! stamped message in its publisher's stream and acknowledges in batches.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::bail;
use bytes::Buf;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{self, kind};
use super::conn::{Conn, Read, MAX_INBOUND};
use crate::clock::now_ns;
use crate::progress::Progress;
use crate::stats::{Arrival, Latency, SeqTracker};

/// Bytes handled in one go after which the loop yields to the other tasks.
const YIELD_BYTES: usize = 64 * 1024;
/// Publisher ids past this are treated as foreign (bounds the per-publisher table).
const MAX_PUBLISHER_ID: u32 = 1 << 20;

#[derive(Debug, Clone)]
pub struct SubscriberSpec {
    pub id: u32,
    /// `Some((filter, qos))` to subscribe first; `None` when a resumed session has it already.
    pub subscribe: Option<(String, u8)>,
    /// Stop after this many distinct messages.
    pub count: Option<u64>,
    pub keepalive_secs: u16,
}

/// One publisher's stream as this subscriber saw it.
#[derive(Debug, Clone, Default)]
pub struct StreamSeen {
    pub tracker: SeqTracker,
    /// QoS of the last delivery.
    pub qos: u8,
}

#[derive(Debug, Default)]
pub struct SubscriberResult {
    pub id: u32,
    /// Indexed by publisher id.
    pub streams: Vec<Option<StreamSeen>>,
    /// First-arrival latency, by delivered QoS.
    pub latency: [Option<Box<Latency>>; 3],
    /// Messages without a petrel-bench stamp.
    pub foreign: u64,
    pub granted: Option<u8>,
    pub last_receive_ns: u64,
    pub error: Option<String>,
}

/// Reports the outcome of the subscription (or of the resume) once on `setup`, then receives
/// until `stop` fires or `count` distinct messages arrived.
pub async fn run(
    conn: &mut Conn,
    spec: &SubscriberSpec,
    progress: &Progress,
    setup: mpsc::Sender<Result<(), String>>,
    stop: &CancellationToken,
) -> SubscriberResult {
    let mut r = SubscriberResult {
        id: spec.id,
        ..SubscriberResult::default()
    };
    let mut setup = Some(setup);
    if let Err(e) = drive(conn, spec, progress, &mut setup, stop, &mut r).await {
        let msg = format!("subscriber {}: {e:#}", spec.id);
        if let Some(tx) = setup.take() {
            let _ = tx.send(Err(msg.clone())).await;
        }
        progress.subscribers_done.fetch_add(1, Relaxed);
        r.error = Some(msg);
    }
    r
}

async fn drive(
    conn: &mut Conn,
    spec: &SubscriberSpec,
    progress: &Progress,
    setup: &mut Option<mpsc::Sender<Result<(), String>>>,
    stop: &CancellationToken,
    r: &mut SubscriberResult,
) -> anyhow::Result<()> {
    if let Some((filter, qos)) = &spec.subscribe {
        codec::encode_subscribe(&mut conn.wbuf, conn.version, 1, filter, *qos);
    } else if let Some(tx) = setup.take() {
        let _ = tx.send(Ok(())).await;
    }
    let keepalive = conn.keepalive(spec.keepalive_secs);
    let mut last_write = Instant::now();
    let ping_every = keepalive.unwrap_or(Duration::from_secs(86_400 * 365));
    let timer = tokio::time::sleep_until(last_write + ping_every);
    tokio::pin!(timer);
    let mut qos2_pending = vec![false; 65536];
    let mut distinct = 0u64;

    // Packets that came in with the CONNACK (a resumed session's queue) are already buffered.
    if !conn.rbuf.is_empty()
        && absorb(
            conn,
            spec,
            progress,
            setup,
            &mut qos2_pending,
            &mut distinct,
            r,
        )
        .await?
    {
        return Ok(());
    }
    loop {
        let interest = conn.interest();
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            ready = conn.stream.ready(interest) => {
                let ready = ready?;
                if ready.is_readable() {
                    if conn.try_read()? == Read::Closed {
                        bail!("connection closed by the broker");
                    }
                    let buffered = conn.rbuf.len();
                    if absorb(conn, spec, progress, setup, &mut qos2_pending, &mut distinct, r).await? {
                        return Ok(());
                    }
                    if conn.wants_write() {
                        conn.try_write()?;
                        last_write = Instant::now();
                    }
                    if buffered >= YIELD_BYTES {
                        // A big batch: let the other clients and the timers run.
                        tokio::task::yield_now().await;
                    }
                } else if conn.wants_write() {
                    conn.try_write()?;
                    last_write = Instant::now();
                }
            }
            _ = &mut timer => {
                if keepalive.is_some() && last_write.elapsed() >= ping_every {
                    codec::encode_pingreq(&mut conn.wbuf);
                    last_write = Instant::now();
                }
                timer.as_mut().reset(last_write + ping_every);
            }
        }
    }
}

/// Handles the buffered packets and publishes the counts; true once `count` is reached.
async fn absorb(
    conn: &mut Conn,
    spec: &SubscriberSpec,
    progress: &Progress,
    setup: &mut Option<mpsc::Sender<Result<(), String>>>,
    qos2_pending: &mut [bool],
    distinct: &mut u64,
    r: &mut SubscriberResult,
) -> anyhow::Result<bool> {
    let batch = handle_packets(conn, qos2_pending, r)?;
    if batch.subscribed {
        if let Some(tx) = setup.take() {
            let _ = tx.send(Ok(())).await;
        }
    }
    if batch.new == 0 {
        return Ok(false);
    }
    *distinct += batch.new;
    progress.received.fetch_add(batch.new, Relaxed);
    if spec.count.is_some_and(|c| *distinct >= c) {
        progress.subscribers_done.fetch_add(1, Relaxed);
        conn.try_write()?;
        return Ok(true);
    }
    Ok(false)
}

#[derive(Debug, Default)]
struct Batch {
    new: u64,
    subscribed: bool,
}

/// Handles every complete packet in the read buffer; acks go to the write buffer.
fn handle_packets(
    conn: &mut Conn,
    qos2_pending: &mut [bool],
    r: &mut SubscriberResult,
) -> anyhow::Result<Batch> {
    let mut pos = 0;
    let mut batch = Batch::default();
    while let Some(f) = codec::frame(&conn.rbuf[pos..], MAX_INBOUND)? {
        let body = f.body(&conn.rbuf[pos..]);
        match f.kind {
            kind::PUBLISH => {
                let p = codec::parse_publish(conn.version, f.flags, body)?;
                let fresh = match p.qos {
                    1 => {
                        codec::encode_ack(&mut conn.wbuf, kind::PUBACK, p.pid);
                        true
                    }
                    2 => {
                        // Until PUBREL, the same packet id is a resend of this message.
                        codec::encode_ack(&mut conn.wbuf, kind::PUBREC, p.pid);
                        !std::mem::replace(&mut qos2_pending[usize::from(p.pid)], true)
                    }
                    _ => true,
                };
                if fresh && account(r, p.qos, p.payload) {
                    batch.new += 1;
                }
            }
            kind::PUBREL => {
                let (pid, _) = codec::parse_ack(body)?;
                qos2_pending[usize::from(pid)] = false;
                codec::encode_ack(&mut conn.wbuf, kind::PUBCOMP, pid);
            }
            kind::SUBACK => {
                let (_, codes) = codec::parse_suback(conn.version, body)?;
                match codes.first() {
                    Some(&c) if c < 0x80 => {
                        r.granted = Some(c);
                        batch.subscribed = true;
                    }
                    other => bail!("subscription refused: SUBACK {other:?}"),
                }
            }
            kind::DISCONNECT => {
                let (code, why) = codec::parse_disconnect(conn.version, body)?;
                bail!(
                    "broker sent DISCONNECT 0x{code:02x} {}",
                    why.unwrap_or_default()
                );
            }
            _ => {}
        }
        pos += f.packet_len();
    }
    conn.rbuf.advance(pos);
    Ok(batch)
}

/// Places one delivery in its stream; true if it was new.
fn account(r: &mut SubscriberResult, qos: u8, payload: &[u8]) -> bool {
    let Some(stamp) = codec::parse_stamp(payload) else {
        r.foreign += 1;
        return false;
    };
    if stamp.publisher >= MAX_PUBLISHER_ID {
        r.foreign += 1;
        return false;
    }
    let idx = stamp.publisher as usize;
    if idx >= r.streams.len() {
        r.streams.resize_with(idx + 1, || None);
    }
    let stream = r.streams[idx].get_or_insert_with(StreamSeen::default);
    stream.qos = qos;
    match stream.tracker.record(stamp.seq) {
        Arrival::InOrder | Arrival::OutOfOrder => {
            let now = now_ns();
            r.last_receive_ns = now;
            let h =
                r.latency[usize::from(qos.min(2))].get_or_insert_with(|| Box::new(Latency::new()));
            h.record(now.saturating_sub(stamp.sent_ns));
            true
        }
        Arrival::Duplicate | Arrival::OutOfRange => false,
    }
}
