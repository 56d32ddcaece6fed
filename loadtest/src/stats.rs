//! Message accounting: which sequence numbers of a stream arrived (lost, duplicated,
//! out-of-order) and how late (an HDR histogram).
//!
//! A stream is what one publisher sent as seen by one receiver: a subscriber, or a whole
//! shared-subscription group (its members' trackers are [`SeqTracker::merge`]d at the end).

use std::collections::VecDeque;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Sequence numbers further than this past the oldest gap are not tracked (a foreign or
/// corrupt payload must not make the bitmap grow without bound): 2^28 bits, 32 MiB.
const MAX_SPAN: u64 = 1 << 28;

/// How one message fits its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First time seen, and nothing later was seen before it.
    InOrder,
    /// First time seen, but a higher sequence number arrived before it.
    OutOfOrder,
    /// Seen before.
    Duplicate,
    /// Too far ahead of the oldest gap to track; counted, not placed.
    OutOfRange,
}

/// The set of sequence numbers seen so far, as a bitmap that forgets its full prefix.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// Words before this index are all ones: every sequence below `64 * base` was seen.
    base: u64,
    words: VecDeque<u64>,
    /// One past the highest sequence seen.
    end: u64,
    received: u64,
    distinct: u64,
    duplicates: u64,
    out_of_order: u64,
    out_of_range: u64,
}

/// The counts of one stream once its expected length is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StreamCounts {
    /// Messages the publisher sent on this stream; `None` when the publisher is elsewhere.
    pub expected: Option<u64>,
    /// Every delivery, duplicates included.
    pub received: u64,
    /// Sequence numbers received at least once.
    pub distinct: u64,
    /// Sequence numbers below `max(expected, highest seen + 1)` never received.
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Sequence numbers beyond the tracked span (corrupt or foreign).
    pub out_of_range: u64,
}

impl StreamCounts {
    pub fn add(&mut self, o: &StreamCounts) {
        self.expected = match (self.expected, o.expected) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.received += o.received;
        self.distinct += o.distinct;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.out_of_range += o.out_of_range;
    }
}

impl SeqTracker {
    pub fn record(&mut self, seq: u64) -> Arrival {
        self.received += 1;
        let word = seq / 64;
        if word < self.base {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        if seq - self.base * 64 >= MAX_SPAN {
            self.out_of_range += 1;
            return Arrival::OutOfRange;
        }
        let idx = (word - self.base) as usize;
        if idx >= self.words.len() {
            self.words.resize(idx + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        if self.words[idx] & bit != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.words[idx] |= bit;
        self.distinct += 1;
        let arrival = if seq + 1 < self.end {
            self.out_of_order += 1;
            Arrival::OutOfOrder
        } else {
            Arrival::InOrder
        };
        self.end = self.end.max(seq + 1);
        self.compact();
        arrival
    }

    /// Drops the leading full words (keeps one so `end` stays addressable).
    fn compact(&mut self) {
        while self.words.len() > 1 && self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 1;
        }
    }

    fn word(&self, w: u64) -> u64 {
        if w < self.base {
            return u64::MAX;
        }
        self.words
            .get((w - self.base) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Adds what another receiver of the same stream saw (a shared-subscription group):
    /// a sequence number both saw counts as a duplicate.
    pub fn merge(&mut self, other: &SeqTracker) {
        let lo = self.base.min(other.base);
        let hi = (self.base + self.words.len() as u64).max(other.base + other.words.len() as u64);
        let mut overlap = 64 * lo;
        let mut words = VecDeque::with_capacity((hi - lo) as usize);
        for w in lo..hi {
            let (a, b) = (self.word(w), other.word(w));
            overlap += u64::from((a & b).count_ones());
            words.push_back(a | b);
        }
        self.base = lo;
        self.words = words;
        self.end = self.end.max(other.end);
        self.received += other.received;
        self.distinct = self.distinct + other.distinct - overlap;
        self.duplicates += other.duplicates + overlap;
        self.out_of_order += other.out_of_order;
        self.out_of_range += other.out_of_range;
        self.compact();
    }

    pub fn counts(&self, expected: Option<u64>) -> StreamCounts {
        let span = expected.unwrap_or(0).max(self.end);
        StreamCounts {
            expected,
            received: self.received,
            distinct: self.distinct,
            lost: span - self.distinct,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            out_of_range: self.out_of_range,
        }
    }
}

/// Latencies in nanoseconds, 3 significant digits, up to an hour.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

/// Percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        let h =
            Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static histogram bounds");
        Latency(h)
    }

    pub fn record(&mut self, nanos: u64) {
        self.0.saturating_record(nanos.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        self.0.add(&other.0).expect("histograms share their bounds");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

#[cfg(test)]
#[path = "stats_test.rs"]
mod tests;
