//! Marks that settle once every live member has applied a change.
//!
//! ```text
//!  Cluster::enqueue(cmd) ── mark n ──> proposer ── batch committed at index i ──> pending (n, i)
//!  own applied index + each peer's (Applied stream) ──> settled index s
//!  pending (n, i) with i <= s ──> settled mark n (watch) ──> acks waiting for marks <= n go
//! ```
//!
//! An acknowledgement that promises a replicated change (SUBACK: the route is known
//! everywhere; a retained message's PUBACK: every node has it) waits for the mark of the
//! last change its node queued. A member counts while its stream is up and it keeps up: one
//! whose applied index has not reached what this node had applied `bound` ago (stopped,
//! cut off, far behind) is left out until it does, so it never holds acknowledgements for
//! longer than that. A proposal that failed settles at once: nothing will be applied.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A peer as settling sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Its stream is up and it keeps up.
    Counted,
    /// Its stream is up but it has not kept up (stopped, overloaded, cut off).
    Lagging,
    /// No stream (not yet opened, or broken).
    Down,
}

pub struct Settle {
    inner: Mutex<Inner>,
    settled: watch::Sender<u64>,
    bound: Duration,
}

#[derive(Default)]
struct Inner {
    /// (mark, log index) of committed batches not settled yet, in order; index 0: failed.
    pending: VecDeque<(u64, u64)>,
    /// This node's applied index.
    applied: u64,
    peers: HashMap<u64, Peer>,
}

#[derive(Default, Debug)]
struct Peer {
    applied: u64,
    connected: bool,
    /// Since when its stream has been down (kept from the first failure until it is up).
    down_since: Option<Instant>,
    /// Since when it has been behind, and the index it must reach to count as keeping up.
    behind: Option<(Instant, u64)>,
}

impl Settle {
    pub fn new(bound: Duration) -> Settle {
        Settle {
            inner: Mutex::new(Inner::default()),
            settled: watch::channel(0).0,
            bound,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The batch holding marks up to `mark` was committed at `index` (`None`: it failed).
    pub fn committed(&self, mark: u64, index: Option<u64>) {
        let mut inner = self.lock();
        inner.pending.push_back((mark, index.unwrap_or(0)));
        self.recompute(&mut inner, Instant::now());
    }

    /// This node applied up to `index`.
    pub fn applied_here(&self, index: u64) {
        let mut inner = self.lock();
        inner.applied = index;
        self.recompute(&mut inner, Instant::now());
    }

    /// Peer `node` reported its applied index (`None`: its stream is down).
    pub fn peer(&self, node: u64, applied: Option<u64>) {
        let mut inner = self.lock();
        let p = inner.peers.entry(node).or_default();
        match applied {
            Some(i) => {
                p.applied = i;
                p.connected = true;
                p.down_since = None;
            }
            None => {
                p.connected = false;
                p.down_since.get_or_insert_with(Instant::now);
            }
        }
        self.recompute(&mut inner, Instant::now());
    }

    /// `node` left the cluster.
    pub fn forget_peer(&self, node: u64) {
        let mut inner = self.lock();
        inner.peers.remove(&node);
        self.recompute(&mut inner, Instant::now());
    }

    /// How long `node`'s applied-index stream has been down (None: up, or never tried).
    pub fn down_for(&self, node: u64) -> Option<Duration> {
        let inner = self.lock();
        let p = inner.peers.get(&node)?;
        p.down_since.map(|t| t.elapsed())
    }

    /// Looks again (a lagging peer's time may have run out).
    pub fn tick(&self) {
        self.tick_at(Instant::now());
    }

    fn tick_at(&self, now: Instant) {
        let mut inner = self.lock();
        if !inner.pending.is_empty() {
            self.recompute(&mut inner, now);
        }
    }

    pub fn settled(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    pub fn settled_now(&self) -> u64 {
        *self.settled.borrow()
    }

    /// How peer `node` looks now.
    pub fn peer_state(&self, node: u64) -> PeerState {
        let now = Instant::now();
        let inner = self.lock();
        match inner.peers.get(&node) {
            Some(p) if p.connected => match p.behind {
                Some((since, _)) if now.duration_since(since) > self.bound => PeerState::Lagging,
                _ => PeerState::Counted,
            },
            _ => PeerState::Down,
        }
    }

    /// Peers that count now (connected and keeping up).
    pub fn counted_peers(&self) -> Vec<u64> {
        self.counted_peers_at(Instant::now())
    }

    fn counted_peers_at(&self, now: Instant) -> Vec<u64> {
        let inner = self.lock();
        let mut v: Vec<u64> = inner
            .peers
            .iter()
            .filter(|(_, p)| {
                p.connected
                    && p.behind
                        .is_none_or(|(t, _)| now.duration_since(t) <= self.bound)
            })
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable();
        v
    }

    fn recompute(&self, inner: &mut Inner, now: Instant) {
        let here = inner.applied;
        let mut settled = here;
        for p in inner.peers.values_mut() {
            if !p.connected {
                continue;
            }
            if p.applied >= here {
                p.behind = None;
                continue;
            }
            match p.behind {
                // It reached what it had to: it keeps up; measure again from here.
                Some((_, target)) if p.applied >= target => p.behind = Some((now, here)),
                Some((since, _)) if now.duration_since(since) > self.bound => continue,
                Some(_) => {}
                None => p.behind = Some((now, here)),
            }
            settled = settled.min(p.applied);
        }
        let mut mark = None;
        while let Some(&(m, index)) = inner.pending.front() {
            if index > settled {
                break;
            }
            mark = Some(m);
            inner.pending.pop_front();
        }
        if let Some(m) = mark {
            self.settled.send_replace(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_settles_when_every_counted_member_has_applied_it() {
        let s = Settle::new(Duration::from_secs(60));
        s.peer(2, Some(0));
        s.peer(3, Some(0));
        s.committed(5, Some(10));
        s.applied_here(10);
        assert_eq!(s.settled_now(), 0, "peers still behind");
        s.peer(2, Some(10));
        assert_eq!(s.settled_now(), 0);
        s.peer(3, Some(12));
        assert_eq!(s.settled_now(), 5);
        // A failed batch settles at once, in order behind the ones before it.
        s.committed(7, Some(20));
        s.committed(9, None);
        assert_eq!(s.settled_now(), 5);
        s.applied_here(20);
        s.peer(2, Some(20));
        s.peer(3, Some(20));
        assert_eq!(s.settled_now(), 9);
    }

    #[test]
    fn a_disconnected_member_does_not_count() {
        let s = Settle::new(Duration::from_secs(60));
        s.peer(2, Some(0));
        s.committed(1, Some(4));
        s.applied_here(4);
        assert_eq!(s.settled_now(), 0);
        s.peer(2, None);
        assert_eq!(s.settled_now(), 1);
    }

    #[test]
    fn a_member_that_does_not_keep_up_stops_counting_after_the_bound() {
        let s = Settle::new(Duration::from_secs(1));
        s.peer(2, Some(0));
        s.committed(1, Some(4));
        s.applied_here(4);
        s.tick();
        assert_eq!(s.settled_now(), 0);
        assert_eq!(s.counted_peers(), vec![2]);
        let later = Instant::now() + Duration::from_millis(1500);
        s.tick_at(later);
        assert_eq!(s.settled_now(), 1, "left out once its time ran out");
        assert!(s.counted_peers_at(later).is_empty());
        // Caught up: it counts again.
        s.peer(2, Some(4));
        assert_eq!(s.counted_peers(), vec![2]);
    }
}
