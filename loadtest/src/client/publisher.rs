//! The publisher loop: closed loop at QoS 1/2 (a window of unacknowledged messages), a
//! fixed per-client rate, or flat out; batched writes, no allocation per message.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::bail;
use bytes::Buf;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{self, kind, Stamp};
use super::conn::{Conn, Read, MAX_INBOUND};
use crate::clock::now_ns;
use crate::progress::Progress;

/// Bytes encoded before each write.
const BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct PublisherSpec {
    pub id: u32,
    pub topic: String,
    pub qos: u8,
    pub size: usize,
    pub count: Option<u64>,
    /// Messages per second; flat out when `None`.
    pub rate: Option<f64>,
    pub inflight: u16,
    pub keepalive_secs: u16,
}

#[derive(Debug, Clone, Default)]
pub struct PublisherResult {
    pub id: u32,
    pub qos: u8,
    /// Messages written (first transmissions).
    pub sent: u64,
    /// QoS 1/2 handshakes completed.
    pub completed: u64,
    /// Acks with a failure reason code (v5).
    pub rejected: u64,
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    pub error: Option<String>,
}

/// Packet-id states of the in-flight window.
const FREE: u8 = 0;
const AWAIT_PUBACK: u8 = 1;
const AWAIT_PUBREC: u8 = 2;
const AWAIT_PUBCOMP: u8 = 3;

struct Window {
    state: Vec<u8>,
    next: u16,
    inflight: usize,
    limit: usize,
}

impl Window {
    fn new(qos: u8, limit: usize) -> Window {
        let state = if qos == 0 {
            Vec::new()
        } else {
            vec![FREE; 65536]
        };
        Window {
            state,
            next: 0,
            inflight: 0,
            limit: if qos == 0 { usize::MAX } else { limit },
        }
    }

    fn open(&self) -> bool {
        self.inflight < self.limit
    }

    /// A free packet id, marked `st`. The window is at most 65535 wide, so one is free.
    fn take(&mut self, st: u8) -> u16 {
        loop {
            self.next = self.next % u16::MAX + 1;
            let slot = &mut self.state[usize::from(self.next)];
            if *slot == FREE {
                *slot = st;
                self.inflight += 1;
                return self.next;
            }
        }
    }

    /// Moves `pid` from `from` to `to` (FREE closes it); false if it was not in `from`.
    fn advance(&mut self, pid: u16, from: u8, to: u8) -> bool {
        match self.state.get_mut(usize::from(pid)) {
            Some(slot) if *slot == from => {
                *slot = to;
                if to == FREE {
                    self.inflight -= 1;
                }
                true
            }
            _ => false,
        }
    }
}

/// Runs until `count` messages are sent and acknowledged, or `stop` fires and the window has
/// drained, or `abort` fires. Errors end up in the result.
pub async fn run(
    conn: &mut Conn,
    spec: &PublisherSpec,
    progress: &Progress,
    stop: &CancellationToken,
    abort: &CancellationToken,
) -> PublisherResult {
    let mut r = PublisherResult {
        id: spec.id,
        qos: spec.qos,
        ..PublisherResult::default()
    };
    let mut done_sending = false;
    if let Err(e) = drive(conn, spec, progress, stop, abort, &mut r, &mut done_sending).await {
        r.error = Some(format!("publisher {}: {e:#}", spec.id));
    }
    if !done_sending {
        progress.publishers_done.fetch_add(1, Relaxed);
    }
    r
}

async fn drive(
    conn: &mut Conn,
    spec: &PublisherSpec,
    progress: &Progress,
    stop: &CancellationToken,
    abort: &CancellationToken,
    r: &mut PublisherResult,
    done_sending: &mut bool,
) -> anyhow::Result<()> {
    let server_max = conn.connack.receive_maximum.unwrap_or(u16::MAX);
    let mut window = Window::new(spec.qos, usize::from(spec.inflight.min(server_max).max(1)));
    let keepalive = conn.keepalive(spec.keepalive_secs);
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let start = Instant::now();
    let start_ns = now_ns();
    r.first_send_ns = start_ns;
    let mut last_write = Instant::now();
    let mut ping_at = keepalive.map_or(far, |k| last_write + k);
    let timer = tokio::time::sleep_until(ping_at);
    tokio::pin!(timer);
    if !conn.rbuf.is_empty() {
        handle_packets(conn, &mut window, r)?; // arrived with the CONNACK
    }

    loop {
        // Encode what the window, the rate and the count allow, up to one batch.
        let mut rate_wait = None;
        if !*done_sending {
            let mut budget = spec.count.map_or(u64::MAX, |c| c - r.sent);
            if let Some(rate) = spec.rate {
                let due = (start.elapsed().as_secs_f64() * rate) as u64 + 1;
                if due <= r.sent {
                    rate_wait = Some(start + Duration::from_secs_f64(r.sent as f64 / rate));
                }
                budget = budget.min(due.saturating_sub(r.sent));
            }
            let before = r.sent;
            while budget > 0 && conn.wbuf.len() < BATCH_BYTES && window.open() {
                let pid = match spec.qos {
                    0 => 0,
                    1 => window.take(AWAIT_PUBACK),
                    _ => window.take(AWAIT_PUBREC),
                };
                let stamp = Stamp {
                    publisher: spec.id,
                    seq: r.sent,
                    sent_ns: now_ns(),
                };
                codec::encode_publish(
                    &mut conn.wbuf,
                    conn.version,
                    spec.topic.as_bytes(),
                    spec.qos,
                    pid,
                    stamp,
                    spec.size,
                );
                r.sent += 1;
                budget -= 1;
            }
            if r.sent > before {
                progress.add_sent(spec.id, r.sent - before);
                r.last_send_ns = now_ns();
            }
            if spec.count == Some(r.sent) || stop.is_cancelled() {
                *done_sending = true;
                progress.publishers_done.fetch_add(1, Relaxed);
            }
        }
        if *done_sending && window.inflight == 0 && !conn.wants_write() {
            return Ok(());
        }
        let desired = rate_wait.map_or(ping_at, |w| w.min(ping_at));
        if timer.deadline() != desired {
            timer.as_mut().reset(desired);
        }
        // A full batch means we could go on without ever waiting: after writing it, let the
        // other clients, the timers and the coordinator run (one batch per poll).
        let full_batch = conn.wbuf.len() >= BATCH_BYTES;
        let interest = conn.interest();
        tokio::select! {
            biased;
            _ = abort.cancelled() => return Ok(()),
            _ = stop.cancelled(), if !*done_sending => {}
            ready = conn.stream.ready(interest) => {
                let ready = ready?;
                if ready.is_readable() {
                    if conn.try_read()? == Read::Closed {
                        bail!("connection closed by the broker");
                    }
                    let acked = handle_packets(conn, &mut window, r)?;
                    if acked > 0 {
                        progress.acked.fetch_add(acked, Relaxed);
                    }
                }
                if ready.is_writable() && conn.wants_write() {
                    conn.try_write()?;
                    last_write = Instant::now();
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if let Some(k) = keepalive.filter(|k| now >= last_write + *k) {
                    codec::encode_pingreq(&mut conn.wbuf);
                    last_write = now;
                    ping_at = now + k;
                } else if let Some(k) = keepalive {
                    ping_at = last_write + k;
                }
            }
        }
        if full_batch {
            tokio::task::yield_now().await;
        }
    }
}

/// Handles every complete packet in the read buffer; returns handshakes completed.
fn handle_packets(
    conn: &mut Conn,
    window: &mut Window,
    r: &mut PublisherResult,
) -> anyhow::Result<u64> {
    let mut pos = 0;
    let mut completed = 0;
    while let Some(f) = codec::frame(&conn.rbuf[pos..], MAX_INBOUND)? {
        let body = f.body(&conn.rbuf[pos..]);
        match f.kind {
            kind::PUBACK => {
                let (pid, code) = codec::parse_ack(body)?;
                if window.advance(pid, AWAIT_PUBACK, FREE) {
                    completed += 1;
                    r.rejected += u64::from(code >= 0x80);
                }
            }
            kind::PUBREC => {
                let (pid, code) = codec::parse_ack(body)?;
                if code >= 0x80 {
                    // A failed PUBREC ends the exchange (v5): no PUBREL.
                    if window.advance(pid, AWAIT_PUBREC, FREE) {
                        completed += 1;
                        r.rejected += 1;
                    }
                } else if window.advance(pid, AWAIT_PUBREC, AWAIT_PUBCOMP)
                    || window.state[usize::from(pid)] == AWAIT_PUBCOMP
                {
                    // (A repeated PUBREC gets its PUBREL again.)
                    codec::encode_ack(&mut conn.wbuf, kind::PUBREL, pid);
                }
            }
            kind::PUBCOMP => {
                let (pid, _) = codec::parse_ack(body)?;
                if window.advance(pid, AWAIT_PUBCOMP, FREE) {
                    completed += 1;
                }
            }
            kind::PUBLISH => {
                // Not subscribed, but acknowledge anything that arrives so the broker never stalls.
                let p = codec::parse_publish(conn.version, f.flags, body)?;
                match p.qos {
                    1 => codec::encode_ack(&mut conn.wbuf, kind::PUBACK, p.pid),
                    2 => codec::encode_ack(&mut conn.wbuf, kind::PUBREC, p.pid),
                    _ => {}
                }
            }
            kind::PUBREL => {
                let (pid, _) = codec::parse_ack(body)?;
                codec::encode_ack(&mut conn.wbuf, kind::PUBCOMP, pid);
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
    r.completed += completed;
    Ok(completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_hands_out_free_ids_and_wraps() {
        let mut w = Window::new(1, 3);
        assert_eq!(
            [
                w.take(AWAIT_PUBACK),
                w.take(AWAIT_PUBACK),
                w.take(AWAIT_PUBACK)
            ],
            [1, 2, 3]
        );
        assert!(!w.open());
        assert!(w.advance(2, AWAIT_PUBACK, FREE));
        assert!(
            !w.advance(2, AWAIT_PUBACK, FREE),
            "an ack for a free id is ignored"
        );
        assert!(w.open());
        w.next = u16::MAX - 1;
        assert_eq!(w.take(AWAIT_PUBACK), u16::MAX);
        assert!(w.advance(u16::MAX, AWAIT_PUBACK, FREE));
        // Wraps to 1, which is busy, then 2 (freed above).
        assert_eq!(w.take(AWAIT_PUBACK), 2);
        assert_eq!(w.inflight, 3);
        assert!(Window::new(0, 3).open(), "QoS 0 has no window");
    }
}
