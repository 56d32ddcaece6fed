//! Deadlines and condition waits.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use tokio::time::{interval, Instant, MissedTickBehavior};

/// How long a positive wait (a packet, a metric, a state) may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Every end-to-end test runs under this bound.
const TEST_BUDGET: Duration = Duration::from_secs(60);

/// Runs `fut` and fails the test if it takes longer than 60 seconds.
pub async fn test_timeout<F: Future>(fut: F) -> F::Output {
    match tokio::time::timeout(TEST_BUDGET, fut).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {TEST_BUDGET:?}"),
    }
}

/// Polls `check` every 20 ms until it returns `Ok`, for at most `within`.
///
/// `Err(state)` describes what was observed instead; the last one is reported on timeout.
pub async fn wait_until<T, E, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    let mut tick = interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let last = match check().await {
            Ok(v) => return v,
            Err(state) => state,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting until {what}; last observed: {last:?}");
        }
    }
}

/// Lets `d` of wall-clock time pass.
///
/// Only for behaviour that is itself defined by elapsed time (message expiry, session expiry,
/// will delay): the condition waited on is "the interval is over", not some broker state.
pub async fn let_time_pass(d: Duration) {
    let deadline = Instant::now() + d;
    let mut tick = interval(Duration::from_millis(50));
    while Instant::now() < deadline {
        tick.tick().await;
    }
}
