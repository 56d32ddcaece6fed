//! The node's Prometheus metrics, registered in a per-node registry (no global state, so
//! several nodes can live in one test process).

mod scrape;

use std::sync::Arc;

use prometheus::{HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub use scrape::{PerQos, Snapshot};

pub struct Metrics {
    pub registry: Registry,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub bad_packets: IntCounterVec,
    pub connect_timeouts: IntCounter,
    pub keepalive_timeouts: IntCounter,
    /// PUBLISH packets received, by QoS (sharded; shown as `received_by_qos`).
    pub messages_received: PerQos,
    /// PUBLISH packets sent, by QoS (sharded; shown as `sent_by_qos`).
    pub messages_sent: PerQos,
    received_by_qos: IntCounterVec,
    sent_by_qos: IntCounterVec,
    received_payload_by_qos: IntCounterVec,
    sent_payload_by_qos: IntCounterVec,
    pub connections_closed: IntCounterVec,
    sessions_connected: IntGauge,
    sessions_offline: IntGauge,
    queued_messages: IntGauge,
    queued_bytes: IntGauge,
    inflight_messages: IntGauge,
    queue_depth: Arc<Snapshot>,
    raft_term: IntGauge,
    raft_leader_id: IntGauge,
    cluster_wire_level: IntGauge,
    cluster_wills_replaced: IntGauge,
    raft_role: IntGaugeVec,
    raft_commit_index: IntGauge,
    raft_applied_index: IntGauge,
    raft_apply_lag: IntGauge,
    raft_proposals: IntCounter,
    pub storage_commit_seconds: prometheus::Histogram,
    pub storage_commit_writes: prometheus::Histogram,
    pub delivery_latency: prometheus::Histogram,
    pub tls_expiry: IntGaugeVec,
    raft_snapshots: IntCounter,
    cluster_members: IntGauge,
    node_ready: IntGauge,
    node_info: IntGaugeVec,
    peer_outbox_messages: IntGaugeVec,
    peer_window_bytes: IntGaugeVec,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    pub queue_dropped: IntCounterVec,
    pub sessions: IntGauge,
    pub subscriptions: IntGauge,
    pub retained: IntGauge,
    pub retained_bytes: IntGauge,
    pub takeovers: IntCounter,
    pub claims_refused: IntCounter,
    pub subscribes_refused: IntCounter,
    pub retained_refused: IntCounter,
    pub handovers: IntCounterVec,
    pub cluster_routes: IntGauge,
    pub cluster_routes_unknown_node: IntGauge,
    pub forward: crate::cluster::forward::ForwardMetrics,
    pub sessions_expired: IntCounter,
    pub wills_published: IntCounter,
    pub wills_skipped: IntCounter,
    pub shared_redelivered: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub password_checks_running: IntGauge,
    pub password_checks_waiting: IntGauge,
    pub handshake_failures: IntCounterVec,
    pub limit_hits: IntCounterVec,
    pub acl_denied: IntCounterVec,
    pub storage_write_errors: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Histogram {
    let h = prometheus::Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

/// Registers a shared collector.
struct ArcCollector<C>(Arc<C>);

impl<C: prometheus::core::Collector> prometheus::core::Collector for ArcCollector<C> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            connections: gauge(&r, "petrel_mqtt_connections", "MQTT connections currently open"),
            connections_total: counter(&r, "petrel_mqtt_connections_total", "MQTT connections accepted"),
            bad_packets: counter_vec(
                &r,
                "petrel_mqtt_bad_packets_total",
                "Connections closed or refused because of bad input, by reason",
                "reason",
            ),
            connect_timeouts: counter(
                &r,
                "petrel_mqtt_connect_timeouts_total",
                "Connections dropped because no CONNECT came in time",
            ),
            keepalive_timeouts: counter(
                &r,
                "petrel_mqtt_keepalive_timeouts_total",
                "Connections closed after 1.5 times the keep alive without a packet",
            ),
            messages_received: PerQos::default(),
            messages_sent: PerQos::default(),
            received_by_qos: counter_vec(&r, "petrel_mqtt_messages_received_total", "PUBLISH packets received, by QoS", "qos"),
            sent_by_qos: counter_vec(&r, "petrel_mqtt_messages_sent_total", "PUBLISH packets sent (retransmissions included), by QoS", "qos"),
            received_payload_by_qos: counter_vec(&r, "petrel_mqtt_received_payload_bytes_total", "Payload bytes of the PUBLISH packets received, by QoS", "qos"),
            sent_payload_by_qos: counter_vec(&r, "petrel_mqtt_sent_payload_bytes_total", "Payload bytes of the PUBLISH packets sent (retransmissions included), by QoS", "qos"),
            connections_closed: counter_vec(
                &r,
                "petrel_mqtt_connections_closed_total",
                "MQTT connections that ended after CONNECT, by reason (client_disconnect, client_closed, keepalive_timeout, taken_over, admin, shutdown, protocol_error, io_error, store_failed)",
                "reason",
            ),
            sessions_connected: gauge(&r, "petrel_sessions_connected", "Sessions with a connection attached"),
            sessions_offline: gauge(&r, "petrel_sessions_offline", "Persistent sessions held without a connection"),
            queued_messages: gauge(&r, "petrel_session_queued_messages", "Messages queued for clients over all sessions, not yet sent"),
            queued_bytes: gauge(&r, "petrel_session_queued_bytes", "Bytes of the messages queued over all sessions"),
            inflight_messages: gauge(&r, "petrel_session_inflight_messages", "QoS 1/2 messages sent to clients and not yet acknowledged, over all sessions"),
            queue_depth: {
                let h = Arc::new(Snapshot::new(
                    HistogramOpts::new(
                        "petrel_session_queue_depth_messages",
                        "Sessions by the number of messages queued for them (at scrape time)",
                    )
                    .buckets(vec![0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]),
                ));
                r.register(Box::new(ArcCollector(h.clone()))).expect("metric registered once");
                h
            },
            raft_term: gauge(&r, "petrel_raft_term", "Current Raft term"),
            raft_leader_id: gauge(&r, "petrel_raft_leader_id", "Node id of the Raft leader this node knows (-1: none)"),
            cluster_wire_level: gauge(&r, "petrel_cluster_wire_level", "The wire level every member announced (the lowest): features of higher levels are off until it reaches theirs"),
            cluster_wills_replaced: gauge(&r, "petrel_cluster_wills_replaced", "Wills of connections that a claim on another node replaced (a takeover, or a reconnect after their node died), kept until published once"),
            raft_role: gauge_vec(&r, "petrel_raft_role", "This node's Raft role: 1 for the current one", &["role"]),
            raft_commit_index: gauge(&r, "petrel_raft_commit_index", "Raft log index this node knows committed"),
            raft_applied_index: gauge(&r, "petrel_raft_applied_index", "Raft log index this node has applied to its state"),
            raft_apply_lag: gauge(&r, "petrel_raft_apply_lag", "Committed Raft entries this node has not applied yet"),
            storage_commit_seconds: histogram(&r, "petrel_storage_commit_seconds", "Time each RocksDB group commit took (write-ahead log write; fsync if storage.fsync)",
                vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            storage_commit_writes: histogram(&r, "petrel_storage_commit_batch_writes", "Writes (puts and deletes) per RocksDB group commit",
                vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0]),
            delivery_latency: histogram(&r, "petrel_delivery_latency_seconds", "Time from a PUBLISH read (on this node, or on the node that forwarded it) to its copy written for a subscriber, sampled (about 1 publish in 16 per thread); copies written more than a minute after their publish (a session that was offline) are not counted",
                vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            tls_expiry: gauge_vec(&r, "petrel_tls_certificate_expiry_timestamp_seconds", "When the certificate a TLS listener serves expires (seconds since the Unix epoch), by listener", &["listener"]),
            raft_proposals: counter(&r, "petrel_raft_proposals_total", "Commands this node queued for Raft (claims, route changes, retained messages, ...)"),
            raft_snapshots: counter(&r, "petrel_raft_snapshots_total", "Raft snapshots this node built or installed"),
            cluster_members: gauge(&r, "petrel_cluster_members", "Members of the cluster (voters and learners)"),
            node_ready: gauge(&r, "petrel_node_ready", "1 while the node is ready for clients (as /readyz answers)"),
            node_info: gauge_vec(&r, "petrel_node_info", "Always 1: this node's id and software version", &["node_id", "version"]),
            peer_outbox_messages: gauge_vec(&r, "petrel_forward_peer_outbox_messages", "Forwarded copies a peer has not acknowledged yet, by peer", &["peer"]),
            peer_window_bytes: gauge_vec(&r, "petrel_forward_peer_window_bytes", "Bytes forwarded to a peer and not acknowledged yet, by peer (publishers pause past cluster.forward_window_bytes)", &["peer"]),
            bytes_received: counter(&r, "petrel_mqtt_received_bytes_total", "Bytes read from MQTT clients"),
            bytes_sent: counter(&r, "petrel_mqtt_sent_bytes_total", "Bytes written to MQTT clients"),
            queue_dropped: counter_vec(
                &r,
                "petrel_session_queue_dropped_total",
                "Messages dropped instead of delivered, by reason (queue_full, expired, too_large)",
                "reason",
            ),
            sessions: gauge(&r, "petrel_sessions", "Sessions held (connected or not)"),
            subscriptions: gauge(&r, "petrel_subscriptions", "Subscriptions held"),
            retained: gauge(&r, "petrel_retained_messages", "Retained messages held"),
            retained_bytes: gauge(
                &r,
                "petrel_retained_bytes",
                "Topic and payload bytes of the retained messages held",
            ),
            takeovers: counter(&r, "petrel_session_takeovers_total", "Connections closed by a newer connection with the same client id"),
            cluster_routes: gauge(&r, "petrel_cluster_routes", "Entries of the replicated route table (filter, node)"),
            forward: crate::cluster::forward::ForwardMetrics {
                messages: counter_vec(
                    &r,
                    "petrel_forward_messages_total",
                    "Publishes forwarded between nodes: out (copies sent to a peer, retransmits included), in (copies received and delivered here)",
                    "direction",
                ),
                dropped: counter_vec(
                    &r,
                    "petrel_forward_dropped_total",
                    "Copies not forwarded: outbox_full (oldest QoS 1/2 copies past cluster.forward_outbox_bytes), slow_peer (QoS 0 to a peer with a full window), unknown_node, peer_removed, too_large, unreadable",
                    "reason",
                ),
                duplicates: counter(&r, "petrel_forward_duplicates_total", "Retransmitted copies a receiving node had already delivered (skipped)"),
                ack_timeouts: counter(&r, "petrel_forward_ack_timeouts_total", "QoS 1/2 copies whose peer did not acknowledge within cluster.forward_ack_timeout_ms (the publisher was acknowledged; the copy stays in the outbox)"),
                window_full: counter(&r, "petrel_forward_window_full_total", "QoS 1/2 publishes after which their publisher paused reading because a peer had more than cluster.forward_window_bytes unacknowledged"),
                passed_on: counter(&r, "petrel_forward_passed_on_total", "Copies routed to a session of this node before another node's claim took it, passed on to that node"),
                outbox_messages: gauge(&r, "petrel_forward_outbox_messages", "Forwarded copies not yet acknowledged by their peer"),
                outbox_bytes: gauge(&r, "petrel_forward_outbox_bytes", "Bytes of forwarded copies not yet acknowledged by their peer"),
                peer_messages: counter_vec(&r, "petrel_forward_peer_messages_total", "Forwarded copies sent to a peer (retransmits included), by peer", "peer"),
                peer_bytes: counter_vec(&r, "petrel_forward_peer_bytes_total", "Bytes of forwarded messages sent to a peer (each in its stored encoding; gRPC framing not counted), by peer", "peer"),
                peer_batches: counter_vec(&r, "petrel_forward_peer_batches_total", "Forwarded batches sent to a peer, by peer", "peer"),
                peer_errors: counter_vec(&r, "petrel_forward_peer_errors_total", "Forwarding streams to a peer that failed or were refused, by peer", "peer"),
            },
            cluster_routes_unknown_node: gauge(&r, "petrel_cluster_routes_unknown_node", "Entries of the route table whose node is not a member (should be 0)"),
            claims_refused: counter(&r, "petrel_claims_refused_total", "CONNECTs refused (CONNACK 0x88 / 3) because the cluster could not confirm the claim in time"),
            handovers: counter_vec(
                &r,
                "petrel_session_handovers_total",
                "Persistent sessions moved between nodes: out (handed to the new owner), in (taken before CONNACK), late_in (pushed by a node that was away), resumed_without (the old owner was unreachable)",
                "direction",
            ),
            retained_refused: counter(&r, "petrel_retained_refused_total", "Retained PUBLISHes not retained (v5 QoS 1/2: PUBACK/PUBREC 0x80) because the node had no quorum"),
            subscribes_refused: counter(&r, "petrel_subscribes_refused_total", "Subscriptions refused (SUBACK 0x80) because they needed a new route while the node had no quorum"),
            sessions_expired: counter(&r, "petrel_sessions_expired_total", "Offline sessions ended by their expiry interval (mqtt.session_expiry_max_secs, persistent_session_expiry_secs)"),
            wills_published: counter(&r, "petrel_wills_published_total", "Will messages published"),
            shared_redelivered: counter_vec(
                &r,
                "petrel_shared_redelivered_total",
                "Share-group messages given to another member, by outcome: local (another member here), forwarded (a member on another node), dropped (no member left). Counted when the member's session ended before its client acknowledged them, or when a copy forwarded here found no member of its group left",
                "outcome",
            ),
            wills_skipped: counter(&r, "petrel_wills_skipped_total", "Due wills this node did not publish: another node did (it found this node unreachable), or the client had connected again"),
            auth_failures: counter_vec(
                &r,
                "petrel_auth_failures_total",
                "CONNECTs refused by authentication, by reason (bad_credentials, not_authorized)",
                "reason",
            ),
            password_checks_running: gauge(
                &r,
                "petrel_auth_password_checks_running",
                "Password hashes being verified now (at most limits.max_concurrent_password_checks)",
            ),
            password_checks_waiting: gauge(
                &r,
                "petrel_auth_password_checks_waiting",
                "CONNECTs waiting for a password check (at most limits.max_waiting_password_checks)",
            ),
            handshake_failures: counter_vec(
                &r,
                "petrel_listener_handshake_failures_total",
                "TLS handshakes and WebSocket upgrades that failed or timed out, by listener",
                "listener",
            ),
            limit_hits: counter_vec(
                &r,
                "petrel_limit_hits_total",
                "Connections, packets or messages refused because a configured limit was reached, by limit",
                "limit",
            ),
            acl_denied: counter_vec(
                &r,
                "petrel_acl_denied_total",
                "Publishes, subscriptions and deliveries the ACL refused, by action",
                "action",
            ),
            storage_write_errors: counter(
                &r,
                "petrel_storage_write_errors_total",
                "RocksDB writes that failed (disk full, I/O error); the node then exits with status 74",
            ),
            registry: r,
        };
        for reason in ["queue_full", "expired", "too_large"] {
            m.queue_dropped.with_label_values(&[reason]);
        }
        for qos in ["0", "1", "2"] {
            m.received_by_qos.with_label_values(&[qos]);
            m.sent_by_qos.with_label_values(&[qos]);
            m.received_payload_by_qos.with_label_values(&[qos]);
            m.sent_payload_by_qos.with_label_values(&[qos]);
        }
        for role in ["leader", "follower", "learner", "candidate"] {
            m.raft_role.with_label_values(&[role]);
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            m.registry
                .register(Box::new(pc))
                .expect("metric registered once");
        }
        for direction in ["out", "in", "late_in", "resumed_without"] {
            m.handovers.with_label_values(&[direction]);
        }
        m
    }

    pub fn bad_packet(&self, reason: &str) {
        self.bad_packets.with_label_values(&[reason]).inc();
    }

    /// Counts one refusal by a configured limit (`petrel_limit_hits_total{limit}`).
    pub fn limit_hit(&self, limit: &str) {
        self.limit_hits.with_label_values(&[limit]).inc();
    }
}

/// Brings the metrics that are computed when read up to date (called before each scrape).
pub fn refresh(broker: &crate::broker::Broker, cluster: &crate::cluster::Cluster, ready: bool) {
    let m = &broker.metrics;
    for q in 0..3u8 {
        let label = [["0", "1", "2"][usize::from(q)]];
        for (shards, shown, bytes) in [
            (
                &m.messages_received,
                &m.received_by_qos,
                &m.received_payload_by_qos,
            ),
            (&m.messages_sent, &m.sent_by_qos, &m.sent_payload_by_qos),
        ] {
            let c = shown.with_label_values(&label);
            c.inc_by(shards.of(q).saturating_sub(c.get()));
            let b = bytes.with_label_values(&label);
            b.inc_by(shards.bytes_of(q).saturating_sub(b.get()));
        }
    }
    let sessions: Vec<_> = broker.sessions.lock().values().cloned().collect();
    let (mut connected, mut offline, mut queued, mut bytes, mut inflight) =
        (0i64, 0i64, 0i64, 0i64, 0i64);
    let mut depths = Vec::with_capacity(sessions.len());
    for s in &sessions {
        let v = s.view(crate::session::Detail::Counts);
        if v.connected {
            connected += 1;
        } else if v.persistent {
            offline += 1;
        }
        queued += v.queued_messages as i64;
        bytes += v.queued_bytes as i64;
        inflight += v.inflight_messages as i64;
        depths.push(v.queued_messages as f64);
    }
    m.sessions_connected.set(connected);
    m.sessions_offline.set(offline);
    m.queued_messages.set(queued);
    m.queued_bytes.set(bytes);
    m.inflight_messages.set(inflight);
    m.queue_depth.set(depths);
    let st = cluster.status();
    m.raft_term.set(st.term as i64);
    // -1: no leader known (node ids start at 0).
    m.raft_leader_id.set(st.leader_id.map_or(-1, |l| l as i64));
    m.cluster_wire_level.set(i64::from(cluster.wire_level()));
    m.cluster_wills_replaced
        .set(cluster.replaced_wills() as i64);
    for role in ["leader", "follower", "learner", "candidate"] {
        m.raft_role
            .with_label_values(&[role])
            .set(i64::from(st.role == role));
    }
    m.raft_commit_index.set(st.committed_index as i64);
    m.raft_applied_index.set(st.applied_index as i64);
    m.raft_apply_lag
        .set(st.committed_index.saturating_sub(st.applied_index) as i64);
    let (proposed, snapshots) = cluster.raft_counts();
    m.raft_proposals
        .inc_by(proposed.saturating_sub(m.raft_proposals.get()));
    m.raft_snapshots
        .inc_by(snapshots.saturating_sub(m.raft_snapshots.get()));
    m.cluster_members
        .set(st.members.iter().filter(|x| x.role != "removed").count() as i64);
    m.node_ready.set(i64::from(ready));
    m.node_info
        .with_label_values(&[&st.node_id.to_string(), env!("CARGO_PKG_VERSION")])
        .set(1);
    m.peer_outbox_messages.reset();
    m.peer_window_bytes.reset();
    for (peer, msgs, bytes, _lagging) in cluster.forwarder().peers_view() {
        let p = peer.to_string();
        m.peer_outbox_messages
            .with_label_values(&[&p])
            .set(msgs as i64);
        m.peer_window_bytes
            .with_label_values(&[&p])
            .set(bytes as i64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
