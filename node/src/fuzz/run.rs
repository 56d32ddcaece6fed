//! Runs a script against a fresh broker core and checks what must hold afterwards.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use petrel_storage::{Store, StoreOptions};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::after::{bystander, check_sessions};
use super::client::{Client, Server, DEADLINE};
use super::coverage::COVERAGE;
use super::panics;
use super::script::{encode_connect, First, Flush, Op, Script, SLOTS};
use super::view::View;
use crate::auth::AuthGate;
use crate::broker::Broker;
use crate::codec::Packet;
use crate::metrics::Metrics;
use crate::session::Kick;

/// Runs `data` as a script of client connections against one broker core in this process, then
/// checks that no task panicked, that every connection answered and closed in time, that a
/// fresh client is still served, and that no session or subscription is left over. Panics
/// when one of these fails.
pub fn fuzz_connection(data: &[u8]) {
    panics::install();
    let script = Script::parse(data);
    // One thread runs every task: a case replays the same way, and a panic in a spawned
    // task (caught by the runtime) is counted on this thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a runtime");
    let before = panics::count();
    runtime.block_on(run(script));
    drop(runtime);
    assert_eq!(
        panics::count(),
        before,
        "a broker task panicked: {}",
        panics::last()
    );
}

/// One store per process: opening RocksDB for every case would cost more than the case.
fn store() -> Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let base = std::env::temp_dir();
            remove_stale_stores(&base);
            let path = base.join(format!("petrel-fuzz-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            Store::open(StoreOptions { path, fsync: false }).expect("open the fuzz store")
        })
        .clone()
}

/// Stores left by fuzzing processes that are gone (Linux: no /proc entry).
fn remove_stale_stores(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("petrel-fuzz-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !PathBuf::from("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

struct Harness {
    broker: Arc<Broker>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    socket_buffer: usize,
    slots: [Option<Client>; SLOTS],
    closed: Vec<Client>,
}

async fn run(script: Script) {
    let broker = Broker::new(
        script.config,
        Metrics::new(),
        AuthGate::open(),
        store(),
        crate::broker::Planes::alone(),
    );
    let mut h = Harness {
        broker: broker.clone(),
        cancel: CancellationToken::new(),
        tracker: TaskTracker::new(),
        permits: Arc::new(Semaphore::new(1024)),
        socket_buffer: script.socket_buffer,
        slots: Default::default(),
        closed: Vec::new(),
    };
    for op in script.ops {
        h.apply(op).await;
        h.settle().await;
    }
    h.finish().await;
    COVERAGE.add(&broker.metrics);
    bystander(&broker).await;
    check_sessions(&broker);
}

impl Harness {
    fn server(&self) -> Server<'_> {
        Server {
            broker: &self.broker,
            cancel: &self.cancel,
            tracker: &self.tracker,
            permits: &self.permits,
            socket_buffer: self.socket_buffer,
        }
    }

    async fn apply(&mut self, op: Op) {
        match op {
            Op::Connect {
                slot,
                first,
                refused,
                cert_cn,
                flush,
            } => {
                if let Some(mut old) = self.slots[slot].take() {
                    old.close().await;
                    self.closed.push(old);
                }
                let max_inflight = self.broker.cfg.mqtt.max_inflight_messages;
                let connect = match &first {
                    First::Connect(c) => Some(&**c),
                    _ => None,
                };
                let view = View::new(slot, connect, max_inflight);
                let mut c = Client::open(slot, &self.server(), refused, cert_cn, view);
                match first {
                    First::Connect(connect) => c.queue(&Packet::Connect(connect)),
                    First::Mutated(connect, m) => {
                        let mut wire = encode_connect(&connect);
                        m.apply(&mut wire);
                        c.queue_raw(&wire);
                    }
                    First::Raw(bytes) => c.queue_raw(&bytes),
                    First::Nothing => {}
                }
                c.flush(&flush).await;
                self.slots[slot] = Some(c);
            }
            Op::Send {
                slot,
                packet,
                flush,
            } => {
                if let Some(c) = &mut self.slots[slot] {
                    c.queue(&packet);
                    c.flush(&flush).await;
                }
            }
            Op::Mutated {
                slot,
                packet,
                mutation,
                flush,
            } => {
                if let Some(c) = &mut self.slots[slot] {
                    let mut wire = super::script::encode(&packet, c.protocol());
                    mutation.apply(&mut wire);
                    c.queue_raw(&wire);
                    c.flush(&flush).await;
                }
            }
            Op::Raw { slot, bytes, flush } => {
                if let Some(c) = &mut self.slots[slot] {
                    c.queue_raw(&bytes);
                    c.flush(&flush).await;
                }
            }
            Op::Settle { sleep } => {
                if sleep {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            Op::AutoAck { slot, on } => {
                if let Some(c) = &mut self.slots[slot] {
                    c.view.auto_ack = on;
                }
            }
            Op::Close { slot, abrupt } => {
                if let Some(mut c) = self.slots[slot].take() {
                    if abrupt {
                        c.abort();
                    } else {
                        c.close().await;
                        self.closed.push(c);
                    }
                }
            }
            Op::Shutdown => {
                self.cancel.cancel();
                self.broker.sessions.kick_all(Kick::Shutdown);
            }
        }
    }

    /// Lets the broker's tasks run, with the store caught up in between: between two steps
    /// every store write is committed, so a case replays the same way (within one step, a
    /// write racing the commit still happens as it would on a loaded node).
    async fn settle(&mut self) {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let store = &self.broker.store;
        let last = store.append(|_| {});
        match tokio::time::timeout(DEADLINE, store.wait(last)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("store failed: {e}"),
            Err(_) => panic!("store did not commit within {DEADLINE:?}"),
        }
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        self.absorb().await;
    }

    async fn absorb(&mut self) {
        for c in self.slots.iter_mut().flatten().chain(&mut self.closed) {
            c.absorb().await;
        }
    }

    /// Every open connection that the view follows must still answer a PINGREQ (and so
    /// everything it was asked before); then every connection is closed and must end.
    async fn finish(&mut self) {
        for c in self.slots.iter_mut().flatten() {
            c.flush(&Flush::Now).await;
            c.absorb().await;
            if c.eof || !c.view.connected() || !c.view.followed {
                continue;
            }
            c.view.auto_ack = true;
            c.queue(&Packet::PingReq);
            c.flush(&Flush::Now).await;
            if !c.wait_for(View::answered).await {
                panic!(
                    "slot {}: connection open but unanswered for {DEADLINE:?}: {}",
                    c.slot,
                    c.view.unanswered()
                );
            }
        }
        let mut all: Vec<Client> = self.slots.iter_mut().filter_map(Option::take).collect();
        all.append(&mut self.closed);
        for c in &mut all {
            c.close().await;
        }
        for c in &mut all {
            c.wait_closed().await;
        }
        self.tracker.close();
        if tokio::time::timeout(DEADLINE, self.tracker.wait())
            .await
            .is_err()
        {
            panic!("connection tasks still running {DEADLINE:?} after every client closed");
        }
        assert_eq!(
            self.broker.metrics.connections.get(),
            0,
            "connections gauge"
        );
    }
}
