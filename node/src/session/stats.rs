//! Counts over every session of a node, kept up to date as sessions change, so that reading
//! them (for `$SYS`) walks nothing and takes no lock.
//!
//! - connected sessions: one atomic, changed once per connection (attach and release);
//! - queued messages: changed on the publish path, once per delivery queued, so a single
//!   atomic would be one cache line bounced between every core that publishes. It is sharded:
//!   each thread adds to its own cache-padded slot and a read sums them. A sum taken while
//!   messages move can be off by what is in flight between two slots; at rest it is exact.

use std::cell::Cell;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

pub struct SessionStats {
    connected: AtomicUsize,
    queued: ShardedCount,
}

impl Default for SessionStats {
    fn default() -> Self {
        SessionStats {
            connected: AtomicUsize::new(0),
            queued: ShardedCount::new(),
        }
    }
}

impl SessionStats {
    /// Sessions with a connection attached.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Messages queued over all sessions.
    pub fn queued(&self) -> usize {
        self.queued.sum().max(0) as usize
    }

    pub(super) fn attached(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn released(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// `added` messages joined some queue and `removed` left one.
    pub(super) fn queue_changed(&self, added: usize, removed: usize) {
        let delta = added as isize - removed as isize;
        if delta != 0 {
            self.queued.add(delta);
        }
    }
}

/// One slot per cache line (128 bytes: adjacent-line prefetching pairs 64-byte lines).
#[repr(align(128))]
struct Slot(AtomicIsize);

/// A counter split over slots; a thread always adds to the same one.
struct ShardedCount {
    slots: Box<[Slot]>,
}

/// Threads are numbered as they first count; the number picks the slot. (A process-wide
/// numbering of threads, not a count: each node's counters live in its own `SessionStats`.)
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_NO: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn thread_no() -> usize {
    THREAD_NO.with(|n| {
        if n.get() == usize::MAX {
            n.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
        }
        n.get()
    })
}

impl ShardedCount {
    fn new() -> ShardedCount {
        // One slot per core, rounded up: the async workers are one thread per core.
        let n = std::thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .next_power_of_two()
            .clamp(1, 64);
        ShardedCount {
            slots: (0..n).map(|_| Slot(AtomicIsize::new(0))).collect(),
        }
    }

    fn add(&self, delta: isize) {
        let slot = &self.slots[thread_no() & (self.slots.len() - 1)];
        slot.0.fetch_add(delta, Ordering::Relaxed);
    }

    fn sum(&self) -> isize {
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;

    use crate::config::QueueOverflow;
    use crate::session::{Delivery, QueueLimits, Session, SessionId};

    fn delivery() -> Delivery {
        Delivery::for_test(0)
    }

    #[test]
    fn sessions_keep_the_counts() {
        let stats = Arc::new(SessionStats::default());
        let limits = QueueLimits {
            max_messages: 2,
            max_bytes: 0,
            overflow: QueueOverflow::DropOldest,
            qos0_offline: false,
            congested_at: 0,
        };
        let a = Session::new(SessionId(1), "a".into(), 60).with_stats(stats.clone());
        for _ in 0..3 {
            let _ = a.enqueue(delivery(), &limits, None);
        }
        assert_eq!(stats.queued(), 2, "drop-oldest made room: still 2");
        let state = a.attach(7, crate::session::Epoch(1)).expect("free");
        assert_eq!(stats.connected(), 1);
        let mut out = Vec::new();
        a.drain(10, 1, &mut out, 0);
        assert_eq!(stats.queued(), 1, "one taken");
        assert!(a.release(7, state, None, false).is_none());
        assert_eq!(
            (stats.connected(), stats.queued()),
            (0, 1),
            "parked with its queue"
        );
        let _ = a.end();
        assert_eq!(stats.queued(), 0, "an ended session's queue is gone");

        let queue: VecDeque<Delivery> = (0..2).map(|_| delivery()).collect();
        let b = Session::restore(SessionId(2), "b".into(), 60, Box::default(), queue, 3)
            .with_stats(stats.clone());
        assert_eq!(stats.queued(), 2, "a restored queue counts");
        let state = b.attach(8, crate::session::Epoch(2)).expect("free");
        assert!(b.release(8, state, None, true).is_some());
        assert_eq!(
            (stats.connected(), stats.queued()),
            (0, 0),
            "ended on release"
        );
    }

    #[test]
    fn sums_over_threads() {
        let stats = Arc::new(SessionStats::default());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        stats.queue_changed(3, 1);
                    }
                    // Messages queued on one thread are often drained on another.
                    if i % 2 == 0 {
                        stats.queue_changed(0, 2000);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(stats.queued(), 4 * 2000);
        stats.queue_changed(0, 4 * 2000);
        assert_eq!(stats.queued(), 0);
    }
}
