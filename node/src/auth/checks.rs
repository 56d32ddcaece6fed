//! Password checks: a few threads of their own, and a bounded waiting room.
//!
//! One argon2id verification with the default cost allocates about 19 MiB and works on it
//! for tens of milliseconds. Run on tokio's blocking pool, a storm of CONNECTs with
//! passwords (every client reconnecting after a restart) runs one per blocking thread, up
//! to 512 at once: gigabytes. Bounding how many run at once is not enough on the blocking
//! pool either: each check may land on a different thread, and the allocator keeps freed
//! memory per thread (glibc arenas), so the node still grew by 760 MiB for 100 checks run
//! two at a time. So checks run on at most `limits.max_concurrent_password_checks` threads
//! of their own (by default one per core: the work is CPU-bound, more at once would not
//! finish sooner), started when a check would otherwise wait, and each thread reuses its
//! argon2 memory (`password.rs`); at most `limits.max_waiting_password_checks`
//! CONNECTs wait for one of them; past that a CONNECT is refused at once with CONNACK 0x97
//! Quota exceeded (3.x: 3 Server unavailable), which a client treats like a full server.
//!
//! A check whose CONNECT went away while it waited is skipped; one already running finishes
//! on its thread, so memory stays bounded whatever clients do.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use prometheus::IntGauge;
use tokio::sync::oneshot;

use crate::config::LimitsConfig;

/// `petrel_limit_hits_total` label of a CONNECT refused because too many checks wait.
pub const PASSWORD_CHECKS: &str = "password_checks";

/// Every check thread is busy and the waiting room is full: the CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

pub struct PasswordChecks {
    queue: Arc<Queue>,
}

struct Queue {
    state: Mutex<State>,
    /// Signalled when a job is queued or the checks are dropped.
    ready: Condvar,
    /// Most check threads.
    max_threads: usize,
    max_waiting: usize,
    running: IntGauge,
    waiting: IntGauge,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Check threads started.
    threads: usize,
    /// Threads running a check.
    busy: usize,
    closed: bool,
}

type Check = Box<dyn FnOnce() -> bool + Send>;

struct Job {
    check: Check,
    verdict: oneshot::Sender<bool>,
}

impl PasswordChecks {
    /// Bounds from `limits` (0 threads: one per core); the gauges report checks running and
    /// waiting.
    pub fn new(limits: &LimitsConfig, running: IntGauge, waiting: IntGauge) -> PasswordChecks {
        let threads = match limits.max_concurrent_password_checks {
            0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            n => n,
        };
        PasswordChecks {
            queue: Arc::new(Queue {
                state: Mutex::default(),
                ready: Condvar::new(),
                max_threads: threads,
                max_waiting: limits.max_waiting_password_checks,
                running,
                waiting,
            }),
        }
    }

    /// Default bounds, with gauges nobody reads.
    pub fn unobserved() -> PasswordChecks {
        let gauge = || IntGauge::new("unobserved", "unobserved").expect("valid gauge");
        PasswordChecks::new(&LimitsConfig::default(), gauge(), gauge())
    }

    /// Runs `check` on a check thread when one is free, or says [`Busy`] at once when every
    /// thread is taken and the waiting room is full.
    pub async fn run<F>(&self, check: F) -> Result<bool, Busy>
    where
        F: FnOnce() -> bool + Send + 'static,
    {
        let (verdict, rx) = oneshot::channel();
        self.queue.submit(Job {
            check: Box::new(check),
            verdict,
        })?;
        // A panicked check is a failed one.
        Ok(rx.await.unwrap_or(false))
    }
}

impl Drop for PasswordChecks {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(self: &Arc<Self>, job: Job) -> Result<(), Busy> {
        let mut state = self.lock();
        // One more thread when this job would wait, up to the bound: a node that sees one
        // CONNECT at a time keeps one thread (and one check's memory).
        if state.jobs.len() >= state.threads - state.busy
            && state.threads < self.max_threads
            && self.start_thread(state.threads)
        {
            state.threads += 1;
        }
        // The free threads take the first jobs at once; the rest wait.
        let free = state.threads - state.busy;
        if state.threads == 0 || state.jobs.len() >= free + self.max_waiting {
            return Err(Busy);
        }
        state.jobs.push_back(job);
        self.waiting.inc();
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Starts check thread number `n`; false if it could not be started (fewer threads
    /// check more slowly; with none, every password CONNECT is refused with 0x97).
    fn start_thread(self: &Arc<Self>, n: usize) -> bool {
        let queue = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("petrel-auth-{n}"))
            .spawn(move || queue.work());
        if let Err(e) = &spawned {
            tracing::error!(error = %e, "could not start a password check thread");
        }
        spawned.is_ok()
    }

    fn work(&self) {
        let mut state = self.lock();
        loop {
            if let Some(Job { check, verdict }) = state.jobs.pop_front() {
                state.busy += 1;
                drop(state);
                self.waiting.dec();
                let ok = self.execute(check, &verdict);
                state = self.lock();
                state.busy -= 1;
                // Answered once this thread counts as free again: the next CONNECT, sent
                // as soon as this one is answered, finds it free.
                if let Some(ok) = ok {
                    let _ = verdict.send(ok);
                }
                continue;
            }
            if state.closed {
                return;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Runs a check; `None` if its CONNECT is gone (nobody waits for the answer).
    fn execute(&self, check: Check, verdict: &oneshot::Sender<bool>) -> Option<bool> {
        if verdict.is_closed() {
            return None;
        }
        self.running.inc();
        let ok = catch_unwind(AssertUnwindSafe(check)).unwrap_or(false);
        self.running.dec();
        Some(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn checks(threads: usize, waiting: usize) -> PasswordChecks {
        let limits = LimitsConfig {
            max_concurrent_password_checks: threads,
            max_waiting_password_checks: waiting,
            ..LimitsConfig::default()
        };
        let gauge = |name| IntGauge::new(name, "test").expect("gauge");
        PasswordChecks::new(&limits, gauge("running"), gauge("waiting"))
    }

    fn gauges(c: &PasswordChecks) -> (i64, i64) {
        (c.queue.running.get(), c.queue.waiting.get())
    }

    async fn until(c: &PasswordChecks, want: (i64, i64)) {
        while gauges(c) != want {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn past_the_threads_and_the_waiting_room_busy_at_once() {
        let c = Arc::new(checks(1, 1));
        let (release, held) = mpsc::channel::<()>();
        let first = tokio::spawn({
            let c = c.clone();
            async move { c.run(move || held.recv().is_ok()).await }
        });
        until(&c, (1, 0)).await;
        let second = tokio::spawn({
            let c = c.clone();
            async move { c.run(|| true).await }
        });
        until(&c, (1, 1)).await;
        assert_eq!(c.run(|| true).await, Err(Busy), "no room left");
        release.send(()).expect("the first check runs");
        assert_eq!(first.await.expect("first"), Ok(true));
        assert_eq!(second.await.expect("second"), Ok(true));
        until(&c, (0, 0)).await;
        assert_eq!(c.run(|| false).await, Ok(false), "room again");
    }

    #[tokio::test]
    async fn a_check_whose_connect_left_keeps_its_thread_or_is_skipped() {
        let c = Arc::new(checks(1, 1));
        let (release, held) = mpsc::channel::<()>();
        let running = tokio::spawn({
            let c = c.clone();
            async move { c.run(move || held.recv().is_ok()).await }
        });
        until(&c, (1, 0)).await;
        let (ran_tx, ran) = mpsc::channel::<()>();
        let waiting = tokio::spawn({
            let c = c.clone();
            async move { c.run(move || ran_tx.send(()).is_ok()).await }
        });
        until(&c, (1, 1)).await;
        running.abort();
        waiting.abort();
        let _ = (running.await, waiting.await);
        assert_eq!(
            c.run(|| true).await,
            Err(Busy),
            "the running check keeps going"
        );
        release.send(()).expect("the first check runs");
        until(&c, (0, 0)).await;
        assert!(
            ran.try_recv().is_err(),
            "the abandoned waiting check was skipped"
        );
        assert_eq!(c.run(|| true).await, Ok(true));
    }

    #[tokio::test]
    async fn a_panicking_check_fails() {
        let c = checks(1, 0);
        assert_eq!(c.run(|| panic!("bad hash")).await, Ok(false));
        assert_eq!(c.run(|| true).await, Ok(true), "the thread survives");
    }
}
