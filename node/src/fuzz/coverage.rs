//! What the fuzz cases reached, summed over the process: the budget driver prints it, to show
//! that inputs get past the handshake and into the broker.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::Metrics;

pub(super) static COVERAGE: Coverage = Coverage {
    cases: AtomicU64::new(0),
    connections: AtomicU64::new(0),
    received: AtomicU64::new(0),
    sent: AtomicU64::new(0),
    takeovers: AtomicU64::new(0),
    wills: AtomicU64::new(0),
    bad_packets: AtomicU64::new(0),
};

pub(super) struct Coverage {
    cases: AtomicU64,
    connections: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    takeovers: AtomicU64,
    wills: AtomicU64,
    bad_packets: AtomicU64,
}

impl Coverage {
    pub fn add(&self, m: &Metrics) {
        let bad: f64 = prometheus::core::Collector::collect(&m.bad_packets)
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|metric| metric.get_counter().get_value())
            .sum();
        for (total, n) in [
            (&self.cases, 1),
            (&self.connections, m.connections_total.get()),
            (&self.received, m.messages_received.get()),
            (&self.sent, m.messages_sent.get()),
            (&self.takeovers, m.takeovers.get()),
            (&self.wills, m.wills_published.get()),
            (&self.bad_packets, bad as u64),
        ] {
            total.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Averages per case.
    pub fn summary(&self) -> String {
        let cases = self.cases.load(Ordering::Relaxed).max(1) as f64;
        let per = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / cases;
        format!(
            "per case: {:.1} connections, {:.1} PUBLISHes in, {:.1} out, {:.2} takeovers, \
             {:.2} wills, {:.1} bad packets",
            per(&self.connections),
            per(&self.received),
            per(&self.sent),
            per(&self.takeovers),
            per(&self.wills),
            per(&self.bad_packets)
        )
    }
}
