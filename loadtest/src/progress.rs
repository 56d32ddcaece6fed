//! Live counters shared by the client tasks and the coordinator, and the once-a-second
//! progress line on stderr. Tasks add to them once per read or write batch, not per message.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct Progress {
    /// Messages written, per publisher id.
    pub sent_by: Box<[AtomicU64]>,
    /// QoS 1/2 messages whose handshake completed.
    pub acked: AtomicU64,
    /// Distinct messages received (a duplicate does not count).
    pub received: AtomicU64,
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    /// Publishers that stopped sending (count reached, stopped or failed).
    pub publishers_done: AtomicU64,
    /// Subscribers that reached their --count (or failed).
    pub subscribers_done: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    pub connected: u64,
    pub failed: u64,
}

impl Progress {
    pub fn new(publishers: usize) -> Arc<Progress> {
        let sent_by = (0..publishers).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Progress {
            sent_by,
            ..Progress::default()
        })
    }

    pub fn add_sent(&self, publisher: u32, n: u64) {
        if let Some(c) = self.sent_by.get(publisher as usize) {
            c.fetch_add(n, Relaxed);
        }
    }

    pub fn sent_of(&self, publisher: u32) -> u64 {
        self.sent_by
            .get(publisher as usize)
            .map_or(0, |c| c.load(Relaxed))
    }

    pub fn totals(&self) -> Totals {
        Totals {
            sent: self.sent_by.iter().map(|c| c.load(Relaxed)).sum(),
            acked: self.acked.load(Relaxed),
            received: self.received.load(Relaxed),
            connected: self.connected.load(Relaxed),
            failed: self.failed.load(Relaxed),
        }
    }
}

/// What the progress line shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Messages,
    Connections,
}

/// Prints one line a second on stderr until `done` is cancelled.
pub fn spawn_ticker(
    progress: Arc<Progress>,
    show: Show,
    done: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let mut last = progress.totals();
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = progress.totals();
            let t = start.elapsed().as_secs_f64();
            match show {
                Show::Messages => eprintln!(
                    "[{t:6.1}s] sent {} ({}/s)  acked {}  received {} ({}/s)  clients {}{}",
                    now.sent,
                    si(now.sent - last.sent),
                    now.acked,
                    now.received,
                    si(now.received - last.received),
                    now.connected,
                    failed_note(now.failed),
                ),
                Show::Connections => eprintln!(
                    "[{t:6.1}s] connected {} ({}/s){}",
                    now.connected,
                    si(now.connected.saturating_sub(last.connected)),
                    failed_note(now.failed),
                ),
            }
            last = now;
        }
    })
}

fn failed_note(failed: u64) -> String {
    if failed == 0 {
        String::new()
    } else {
        format!("  FAILED {failed}")
    }
}

/// 1234567 -> "1.23M".
pub fn si(n: u64) -> String {
    let f = n as f64;
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", f / 1e3),
        _ => format!("{:.2}M", f / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_the_publishers() {
        let p = Progress::new(3);
        p.add_sent(0, 5);
        p.add_sent(2, 7);
        p.add_sent(9, 100); // unknown publisher: ignored
        assert_eq!(p.totals().sent, 12);
        assert_eq!(p.sent_of(2), 7);
        assert_eq!(si(999), "999");
        assert_eq!(si(12_345), "12.3k");
        assert_eq!(si(1_234_567), "1.23M");
    }
}
