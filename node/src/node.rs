//! Starting and stopping a node.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use petrel_storage::{Store, StoreOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::auth::{AuthGate, PasswordChecks};
use crate::broker::{Broker, Planes};
use crate::cluster::sm::Effect;
use crate::cluster::{Cluster, Identity, Shared};
use crate::config::Config;
use crate::limit::Admission;
use crate::listener::{accept_loop, AcceptCtx, Listeners};
use crate::metrics::Metrics;
use crate::persist::recover::recover;
use crate::router::{RouteTable, SharedRetained};
use crate::session::Kick;
use crate::takeover::{keep_sessions, Host};
use crate::transport::{TlsAcceptorHandle, TlsSettings};
use crate::{sys, Error};

pub struct Node;

/// The addresses the node listens on.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct BoundAddrs {
    pub mqtt: SocketAddr,
    pub mqtts: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub grpc: SocketAddr,
}

fn local(l: Option<&tokio::net::TcpListener>) -> Result<Option<SocketAddr>, Error> {
    l.map(|l| l.local_addr().map_err(Error::LocalAddr))
        .transpose()
}

/// The address other nodes and clients are told: `configured` if set, else `bound` with the
/// machine's host name in place of an unspecified IP.
fn advertised(configured: &str, bound: SocketAddr) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = hostname().unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", bound.port())
}

/// The machine's host name (a pod's name in Kubernetes, a container's in Compose).
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// How long a shutdown waits for the persistent sessions it drained to be claimed on other
/// nodes (each handed over with its queue while this node still answers).
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// How long a shutdown waits for another voter to take the leadership.
const LEADER_HANDOFF: Duration = Duration::from_secs(2);

/// How long a shutdown waits for its `MemberDrain` to commit.
const DRAIN_MARK: Duration = Duration::from_secs(1);

/// Tells every connected client to go (`why`), at most `rate` per second unless that would
/// take longer than `within`; returns how many were told.
pub async fn evict(broker: &Broker, rate: u32, within: Duration, why: Kick) -> usize {
    let sessions: Vec<Arc<crate::session::Session>> =
        broker.sessions.lock().values().cloned().collect();
    let connected = sessions.iter().filter(|s| s.is_connected()).count();
    if connected == 0 {
        return broker.sessions.kick_all(why);
    }
    let per_sec = (rate.max(1) as f64).max(connected as f64 / within.as_secs_f64().max(0.001));
    let step = Duration::from_secs_f64(1.0 / per_sec);
    let mut next = tokio::time::Instant::now();
    let mut told = 0;
    for s in sessions {
        if s.kick(why) {
            told += 1;
            next += step;
            if next > tokio::time::Instant::now() {
                tokio::time::sleep_until(next).await;
            }
        }
    }
    // Any that attached meanwhile.
    told + broker.sessions.kick_all(why)
}

/// How long proposals of the drained connections get to commit at shutdown.
const CLUSTER_FLUSH: Duration = Duration::from_secs(2);

/// Acts on what the cluster applied: a claim of a client id on another node closes the
/// connection here if it is older (DISCONNECT 0x8E).
async fn apply_effects(
    broker: Arc<Broker>,
    mut effects: tokio::sync::mpsc::UnboundedReceiver<Effect>,
    cancel: CancellationToken,
) {
    loop {
        let effect = tokio::select! {
            _ = cancel.cancelled() => return,
            e = effects.recv() => match e { Some(e) => e, None => return },
        };
        match effect {
            Effect::ClaimedElsewhere {
                client_id,
                epoch,
                node_id,
            } => {
                let Some(session) = broker.sessions.get(&client_id) else {
                    continue;
                };
                if session.epoch().0 < epoch && session.kick(Kick::TakenOver) {
                    broker.metrics.takeovers.inc();
                    tracing::info!(%client_id, by_node = node_id, epoch, "session taken over by another node");
                }
            }
        }
    }
}

/// How often the route table is checked (metrics, and a reconciliation after a failed route
/// change).
const ROUTE_CHECK: Duration = Duration::from_secs(2);

/// Keeps this node's entries of the route table equal to its subscriptions: once it is a
/// member with a leader (its recovered subscriptions' routes, and the removal of routes it
/// left behind before a crash), then after any route change that failed to commit. Also
/// updates the route metrics.
async fn keep_routes(broker: Arc<Broker>, cluster: Arc<Cluster>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(ROUTE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if cluster.is_caught_up() {
            cluster.announce_again_if_stale();
        }
        if cluster.routes_dirty() && cluster.is_caught_up() {
            let (added, removed) = broker.with_routes(|local| cluster.reconcile_routes(local));
            if added + removed > 0 {
                tracing::info!(
                    added,
                    removed,
                    "routes reconciled with this node's subscriptions"
                );
            }
        }
        let (total, unknown) = cluster.route_counts();
        broker.metrics.cluster_routes.set(total as i64);
        broker
            .metrics
            .cluster_routes_unknown_node
            .set(unknown as i64);
    }
}

/// How long the admin server may take to stop once the connections have drained.
const ADMIN_STOP: Duration = Duration::from_secs(1);

/// A running node.
pub struct NodeHandle {
    broker: Arc<Broker>,
    cluster: Arc<Cluster>,
    /// The control plane stops after the connections (they tell it that they ended).
    cluster_stop: CancellationToken,
    cluster_tasks: TaskTracker,
    admin: Arc<Admin>,
    addrs: BoundAddrs,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The admin server stops last, so `/health/ready` (503) and `/metrics` answer while
    /// connections drain.
    admin_stop: CancellationToken,
    admin_task: Option<JoinHandle<()>>,
    /// Cancelled once a store write has failed and the node has logged and counted it.
    store_failed: CancellationToken,
}

impl Node {
    /// Starts serving on already-bound listeners.
    pub async fn start(cfg: Config, listeners: Listeners) -> Result<NodeHandle, Error> {
        let addrs = BoundAddrs {
            mqtt: listeners.mqtt.local_addr().map_err(Error::LocalAddr)?,
            mqtts: local(listeners.mqtts.as_ref())?,
            ws: local(listeners.ws.as_ref())?,
            wss: local(listeners.wss.as_ref())?,
            admin: local(listeners.admin.as_ref())?,
            grpc: listeners.grpc.local_addr().map_err(Error::LocalAddr)?,
        };
        let tls = if addrs.mqtts.is_some() || addrs.wss.is_some() {
            let t = &cfg.tls;
            let client_ca =
                (!t.client_ca_file.as_os_str().is_empty()).then(|| t.client_ca_file.clone());
            let settings = TlsSettings {
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
                client_ca_file: client_ca,
                require_client_cert: t.require_client_cert,
            };
            Some(TlsAcceptorHandle::load(settings)?)
        } else {
            None
        };
        let sys_on = cfg.mqtt.sys_interval_secs > 0;
        let store = Store::open(StoreOptions {
            path: cfg.storage.data_dir.join("db"),
            fsync: cfg.storage.fsync,
        })?;
        let metrics = Metrics::new();
        {
            let (seconds, writes) = (
                metrics.storage_commit_seconds.clone(),
                metrics.storage_commit_writes.clone(),
            );
            store.observe_commits(Box::new(move |took, n| {
                seconds.observe(took.as_secs_f64());
                writes.observe(n as f64);
            }));
        }
        if let Some(at) = tls.as_ref().and_then(|t| t.not_after_unix()) {
            for (listener, on) in [
                ("mqtts", addrs.mqtts.is_some()),
                ("wss", addrs.wss.is_some()),
            ] {
                if on {
                    metrics.tls_expiry.with_label_values(&[listener]).set(at);
                }
            }
        }
        let checks = PasswordChecks::new(
            &cfg.limits,
            metrics.password_checks_running.clone(),
            metrics.password_checks_waiting.clone(),
        );
        let auth = AuthGate::from_config(&cfg.auth)?.with_checks(checks);
        // The control plane first: the broker claims client ids through it. It has a token
        // and tasks of its own and stops after the connections, which still tell it that
        // they ended while they drain.
        let (clients, admin_listener, grpc_listener) = listeners.clients();
        let cluster_stop = CancellationToken::new();
        let cluster_tasks = TaskTracker::new();
        let me = Identity {
            node_id: cfg.cluster.node_id,
            grpc_addr: advertised(&cfg.cluster.advertise_addr, addrs.grpc),
            mqtt_addr: advertised("", addrs.mqtt),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            wire_level: cfg.cluster.wire_level,
        };
        let retained = Arc::new(SharedRetained::new(
            metrics.retained.clone(),
            metrics.retained_bytes.clone(),
        ));
        let routes = Arc::new(RouteTable::with_strategy(
            cfg.cluster.node_id,
            cfg.cluster.shared_strategy,
        ));
        let cluster = Cluster::start(
            &cfg.cluster,
            me,
            store.clone(),
            Shared {
                retained: retained.clone(),
                routes: routes.clone(),
                forward_metrics: metrics.forward.clone(),
            },
            grpc_listener,
            &cluster_tasks,
            cluster_stop.clone(),
        )
        .await
        .map_err(Error::Cluster)?;
        let control: Arc<dyn crate::control::ControlPlane> = cluster.clone();
        let broker = Broker::new(
            cfg,
            metrics,
            auth,
            store.clone(),
            Planes {
                control,
                retained,
                routes,
                forward: cluster.forwarder().clone(),
            },
        );
        let recovered = recover(&broker, &store)?;
        // Forwarded publishes are delivered from now on (the recovered sessions are here).
        cluster.forwarder().set_broker(broker.clone());
        tracing::info!(
            sessions = recovered.sessions,
            subscriptions = recovered.subscriptions,
            queued = recovered.queued,
            retained = recovered.retained,
            wills = recovered.wills,
            wills_of_crash = recovered.wills_of_crash,
            expired = recovered.expired,
            orphans = recovered.orphans,
            path = %store.path().display(),
            "storage opened"
        );
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        broker.auth.watch(&tracker, &cancel);
        if let Some(tls) = &tls {
            let every = Duration::from_secs(broker.cfg.tls.reload_interval_secs);
            tracker.spawn(tls.clone().watch(every, cancel.clone()));
        }
        if let Some(effects) = cluster.take_effects() {
            tracker.spawn(apply_effects(broker.clone(), effects, cancel.clone()));
        }
        tracker.spawn(keep_routes(broker.clone(), cluster.clone(), cancel.clone()));
        let host = Arc::new(Host {
            broker: broker.clone(),
            node_id: broker.cfg.cluster.node_id,
        });
        cluster.set_host(host.clone());
        tracker.spawn(keep_sessions(
            broker.clone(),
            cluster.clone(),
            host,
            cancel.clone(),
        ));
        let ctx = AcceptCtx {
            broker: broker.clone(),
            tls,
            admission: Arc::new(Admission::new(&broker.cfg.limits)),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        };
        for (kind, listener) in clients {
            tracker.spawn(accept_loop(kind, listener, ctx.clone()));
        }
        tracker.spawn(broker.clone().run_timers(cancel.clone()));
        let store_failed = CancellationToken::new();
        tracker.spawn(watch_store(
            broker.clone(),
            cancel.clone(),
            store_failed.clone(),
        ));
        if sys_on {
            tracker.spawn(sys::run(broker.clone(), cancel.clone()));
        }
        let admin = Arc::new(Admin::new(broker.clone(), cluster.clone()));
        cluster.set_admin(Arc::new(crate::admin::AdminCalls(admin.clone())));
        let admin_stop = CancellationToken::new();
        let admin_task = match admin_listener {
            None => None,
            Some(listener) => {
                let policy = crate::admin::token::policy(&broker.cfg).map_err(Error::Admin)?;
                let tls = admin_tls(&broker.cfg)?.map(|h| {
                    if let Some(at) = h.not_after_unix() {
                        broker
                            .metrics
                            .tls_expiry
                            .with_label_values(&["admin"])
                            .set(at);
                    }
                    h.config()
                });
                let app = petrel_admin_api::router(admin.clone(), policy);
                let stop = admin_stop.clone();
                // Awaited by `shutdown` after the tracker's tasks, not tracked with them.
                Some(tokio::spawn(async move {
                    let serve =
                        petrel_admin_api::serve::serve(listener, app, tls, stop.cancelled_owned());
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "admin server failed");
                    }
                }))
            }
        };
        admin.ready.store(true, Ordering::Release);
        Ok(NodeHandle {
            broker,
            cluster,
            cluster_stop,
            cluster_tasks,
            admin,
            addrs,
            cancel,
            tracker,
            admin_stop,
            admin_task,
            store_failed,
        })
    }
}

impl NodeHandle {
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.addrs.mqtt
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.addrs.admin
    }

    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The persistent sessions with a connection now (client id and session), in a cluster
    /// with other members (else nobody could take them).
    fn persistent_connected(&self) -> Vec<(Arc<str>, crate::session::SessionId)> {
        let others = self
            .cluster
            .status()
            .members
            .iter()
            .filter(|m| m.role != "removed")
            .count()
            > 1;
        if !others || self.broker.store.committed_now().failed {
            return Vec::new();
        }
        let sessions = self.broker.sessions.lock();
        sessions
            .values()
            .filter(|s| s.is_connected() && s.is_persistent())
            .map(|s| (s.client_id().clone(), s.id()))
            .collect()
    }

    /// Waits (at most [`HANDOVER_WAIT`]) until the drained persistent sessions have left this
    /// node: their clients connected to another node, which took each session and its queue
    /// from here. A node that exited at once would leave them to a late hand-over after its
    /// restart, after the client had carried on elsewhere.
    async fn wait_handed_over(&self, moving: Vec<(Arc<str>, crate::session::SessionId)>) {
        if moving.is_empty() {
            return;
        }
        let until = tokio::time::Instant::now() + HANDOVER_WAIT;
        loop {
            let left = moving
                .iter()
                .filter(|(id, sid)| self.broker.sessions.get(id).is_some_and(|s| s.id() == *sid))
                .count();
            if left == 0 {
                tracing::info!(sessions = moving.len(), "drained sessions handed over");
                return;
            }
            if tokio::time::Instant::now() >= until {
                tracing::info!(left, "drained sessions not claimed elsewhere in time");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resolves once a store write has failed: acknowledgements that needed it were refused,
    /// the node reports not ready, and it must go down (`main` exits with status 74 after
    /// [`NodeHandle::shutdown`]; a restart recovers from the WAL).
    pub async fn storage_failed(&self) {
        self.store_failed.cancelled().await;
    }

    /// Stops accepting, tells connected clients the server is going away (v5 0x8B, or 0x80
    /// after a store failure) and waits up to `grace` for every task to finish. The admin
    /// endpoint answers (not ready) until then.
    pub async fn shutdown(self, grace: Duration) {
        // Not ready at once (load balancers and Kubernetes stop sending clients), no new
        // CONNECT, no new connection.
        self.admin.ready.store(false, Ordering::Release);
        self.broker.draining.store(true, Ordering::Relaxed);
        self.cancel.cancel();
        // Draining in the cluster's state before any client is told to go: a client that
        // reconnects elsewhere before its drained connection's end commits gets no will
        // kept for the leader to publish (its will waits for the grace; `sm.rs`).
        let me = self.cluster.node_id();
        match tokio::time::timeout(DRAIN_MARK, self.cluster.propose_drain(me, true)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "drain not recorded in the cluster state"),
            Err(_) => tracing::warn!("drain not recorded in the cluster state in time"),
        }
        if !self.broker.store.committed_now().failed {
            // Another voter leads before this one goes: no election gap.
            match tokio::time::timeout(LEADER_HANDOFF, self.cluster.hand_leadership_away()).await {
                Ok(Some(to)) => tracing::info!(to, "leadership handed away for the shutdown"),
                Ok(None) => {}
                Err(_) => tracing::warn!("leadership hand-off timed out"),
            }
        }
        // Connections wait on their session only (a smaller task per idle connection than
        // one that also waits on the token): tell each to go, at `admin.drain_rate_per_sec`
        // but within half the grace (a reconnect storm elsewhere is what the rate avoids;
        // running out of grace would cut connections without a word). Those still in the
        // handshake check the token once attached.
        let rate = self.broker.cfg.admin.drain_rate_per_sec;
        let moving = self.persistent_connected();
        let kicked = evict(&self.broker, rate, grace / 2, Kick::Shutdown).await;
        tracing::info!(connections = kicked, "shutting down");
        self.wait_handed_over(moving).await;
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period ran out with tasks still running");
        }
        self.admin_stop.cancel();
        if let Some(mut task) = self.admin_task {
            if tokio::time::timeout(ADMIN_STOP, &mut task).await.is_err() {
                task.abort();
            }
        }
        // What the drained connections proposed gets a moment to commit, then the control
        // plane stops.
        self.cluster.flush(CLUSTER_FLUSH).await;
        self.cluster_stop.cancel();
        self.cluster_tasks.close();
        let _ = tokio::time::timeout(ADMIN_STOP, self.cluster_tasks.wait()).await;
        self.cluster.shutdown().await;
        // Writes what the connections appended while closing, then stops the writer.
        let store = self.broker.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

/// The admin listener's TLS configuration, when `admin.tls_cert_file` is set.
fn admin_tls(cfg: &Config) -> Result<Option<crate::transport::tls::TlsAcceptorHandle>, Error> {
    let a = &cfg.admin;
    if a.tls_cert_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let handle =
        crate::transport::tls::TlsAcceptorHandle::load(crate::transport::tls::TlsSettings {
            cert_file: a.tls_cert_file.clone(),
            key_file: a.tls_key_file.clone(),
            client_ca_file: None,
            require_client_cert: false,
        })?;
    Ok(Some(handle))
}

/// Waits for a failed store write, then counts it and logs it (once, here, where it is
/// handled) and tells [`NodeHandle::storage_failed`]. Readiness needs no action: the admin
/// backend reads the store's state itself.
async fn watch_store(broker: Arc<Broker>, cancel: CancellationToken, failed: CancellationToken) {
    let mut committed = broker.store.committed();
    let seen = tokio::select! {
        _ = cancel.cancelled() => false,
        r = committed.wait_for(|c| c.failed) => r.is_ok(),
    };
    if !seen {
        return;
    }
    broker.metrics.storage_write_errors.inc();
    let (error, cause) = match broker.store.write_error() {
        Some(e) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            (e.to_string(), cause.unwrap_or_default())
        }
        None => ("rocksdb write batch".to_owned(), String::new()),
    };
    tracing::error!(
        %error,
        %cause,
        "storage write failed: acknowledgements waiting for it are refused, the node is not \
         ready and shuts down (a restart recovers from the write-ahead log)"
    );
    failed.cancel();
}
