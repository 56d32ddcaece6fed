//! One task per client: connect, report readiness on a setup channel, run the role's loop,
//! disconnect.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::conn::{ClientOptions, Conn};
use crate::client::publisher::{self, PublisherResult, PublisherSpec};
use crate::client::subscriber::{self, SubscriberResult, SubscriberSpec};
use crate::progress::Progress;

/// Read and write buffer capacity of a publisher or subscriber (one batch).
const BUF_CAPACITY: usize = 128 * 1024;
/// How long a client waits for the broker to close after its DISCONNECT.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Each client reports once: connected (and subscribed), or why not.
pub type Setup = mpsc::Sender<Result<(), String>>;
pub type SetupRx = mpsc::Receiver<Result<(), String>>;
/// A subscriber's result and whether the broker had its session (`None`: never connected).
pub type SubscriberTask = JoinHandle<(SubscriberResult, Option<bool>)>;

/// Signals a publisher task obeys.
#[derive(Debug, Clone, Default)]
pub struct PublisherSignals {
    /// Start sending.
    pub go: CancellationToken,
    /// Stop sending new messages; finish the window.
    pub stop: CancellationToken,
    /// Give up on the window.
    pub abort: CancellationToken,
}

pub fn spawn_publisher(
    addr: String,
    opts: ClientOptions,
    spec: PublisherSpec,
    progress: Arc<Progress>,
    setup: Setup,
    signals: PublisherSignals,
) -> JoinHandle<PublisherResult> {
    tokio::spawn(async move {
        let mut conn = match Conn::connect(&addr, &opts, BUF_CAPACITY).await {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("publisher {}: {e:#}", spec.id);
                progress.failed.fetch_add(1, Relaxed);
                progress.publishers_done.fetch_add(1, Relaxed);
                let _ = setup.send(Err(msg.clone())).await;
                return PublisherResult {
                    id: spec.id,
                    qos: spec.qos,
                    error: Some(msg),
                    ..PublisherResult::default()
                };
            }
        };
        progress.connected.fetch_add(1, Relaxed);
        let _ = setup.send(Ok(())).await;
        drop(setup);
        tokio::select! {
            _ = signals.go.cancelled() => {}
            _ = signals.abort.cancelled() => {
                progress.publishers_done.fetch_add(1, Relaxed);
                return PublisherResult { id: spec.id, qos: spec.qos, ..PublisherResult::default() };
            }
        }
        let r = publisher::run(&mut conn, &spec, &progress, &signals.stop, &signals.abort).await;
        if r.error.is_none() {
            let _ = conn.disconnect(false, CLOSE_WAIT).await;
        }
        progress.connected.fetch_sub(1, Relaxed);
        r
    })
}

/// How a subscriber leaves when told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// DISCONNECT; a persistent session stays on the broker.
    Disconnect,
    /// DISCONNECT ending the session (v5 Session Expiry 0); 3.1.1 sessions stay.
    EndSession,
}

pub fn spawn_subscriber(
    addr: String,
    opts: ClientOptions,
    spec: SubscriberSpec,
    progress: Arc<Progress>,
    setup: Setup,
    stop: CancellationToken,
    leave: Leave,
) -> SubscriberTask {
    tokio::spawn(async move {
        let mut conn = match Conn::connect(&addr, &opts, BUF_CAPACITY).await {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("subscriber {}: {e:#}", spec.id);
                progress.failed.fetch_add(1, Relaxed);
                progress.subscribers_done.fetch_add(1, Relaxed);
                let _ = setup.send(Err(msg.clone())).await;
                return (
                    SubscriberResult {
                        id: spec.id,
                        error: Some(msg),
                        ..SubscriberResult::default()
                    },
                    None,
                );
            }
        };
        let session_present = conn.connack.session_present;
        progress.connected.fetch_add(1, Relaxed);
        let mut r = subscriber::run(&mut conn, &spec, &progress, setup, &stop).await;
        if r.error.is_none() {
            if let Err(e) = conn
                .disconnect(leave == Leave::EndSession, CLOSE_WAIT)
                .await
            {
                r.error = Some(format!("subscriber {}: {e:#}", spec.id));
            }
        }
        progress.connected.fetch_sub(1, Relaxed);
        (r, Some(session_present))
    })
}

/// Waits for `n` setup reports; the errors, or a timeout, fail the setup.
pub async fn await_setup(rx: &mut SetupRx, n: usize, within: Duration) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    let wait = async {
        for _ in 0..n {
            match rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => errors.push(e),
                None => break,
            }
        }
    };
    if tokio::time::timeout(within, wait).await.is_err() {
        anyhow::bail!("clients not connected and subscribed within {within:?}");
    }
    if !errors.is_empty() {
        let n = errors.len();
        errors.truncate(5);
        anyhow::bail!("{n} clients failed to set up: {}", errors.join("; "));
    }
    Ok(())
}
