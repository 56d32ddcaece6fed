//! Metrics computed when `/metrics` is read rather than on every event: counts over
//! sessions, the Raft figures, per-peer outboxes, and the per-QoS message counters that the
//! publish path keeps sharded.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts};

/// Message counters by QoS, split over cache-padded slots (one per thread, by number), so
/// that publishing threads never write one shared line. Summed when read.
pub struct PerQos {
    slots: Box<[QosSlot]>,
}

#[repr(align(128))]
#[derive(Default)]
struct QosSlot {
    messages: [AtomicU64; 3],
    bytes: [AtomicU64; 3],
}

const SLOTS: usize = 32;

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn slot() -> usize {
    SLOT.with(|n| {
        if n.get() == usize::MAX {
            n.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed) % SLOTS);
        }
        n.get()
    })
}

impl Default for PerQos {
    fn default() -> Self {
        PerQos {
            slots: (0..SLOTS).map(|_| QosSlot::default()).collect(),
        }
    }
}

impl PerQos {
    /// Counts one message of QoS `qos` (0, 1 or 2) with `payload` bytes of payload.
    pub fn inc(&self, qos: u8, payload: usize) {
        let q = usize::from(qos.min(2));
        let s = &self.slots[slot()];
        s.messages[q].fetch_add(1, Ordering::Relaxed);
        s.bytes[q].fetch_add(payload as u64, Ordering::Relaxed);
    }

    /// The count for one QoS.
    pub fn of(&self, qos: u8) -> u64 {
        let q = usize::from(qos.min(2));
        self.slots
            .iter()
            .map(|s| s.messages[q].load(Ordering::Relaxed))
            .sum()
    }

    /// The payload bytes for one QoS.
    pub fn bytes_of(&self, qos: u8) -> u64 {
        let q = usize::from(qos.min(2));
        self.slots
            .iter()
            .map(|s| s.bytes[q].load(Ordering::Relaxed))
            .sum()
    }

    /// The count over every QoS.
    pub fn get(&self) -> u64 {
        (0..3).map(|q| self.of(q)).sum()
    }
}

/// A histogram over the current sessions (not over time): rebuilt from the values of the
/// last refresh each time it is collected.
pub struct Snapshot {
    template: Histogram,
    opts: HistogramOpts,
    values: Mutex<Vec<f64>>,
}

impl Snapshot {
    pub fn new(opts: HistogramOpts) -> Snapshot {
        Snapshot {
            template: Histogram::with_opts(opts.clone()).expect("valid histogram"),
            opts,
            values: Mutex::new(Vec::new()),
        }
    }

    /// Replaces the values the next collection shows.
    pub fn set(&self, values: Vec<f64>) {
        *self.values.lock().unwrap_or_else(|e| e.into_inner()) = values;
    }
}

impl Collector for Snapshot {
    fn desc(&self) -> Vec<&Desc> {
        self.template.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let h = Histogram::with_opts(self.opts.clone()).expect("valid histogram");
        for v in self.values.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.observe(*v);
        }
        h.collect()
    }
}
