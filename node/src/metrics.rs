//! The node's Prometheus metrics, registered in a per-node registry (no global state, so
//! several nodes can live in one test process).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub bad_packets: IntCounterVec,
    pub connect_timeouts: IntCounter,
    pub keepalive_timeouts: IntCounter,
    pub messages_received: IntCounter,
    pub messages_sent: IntCounter,
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
            messages_received: counter(&r, "petrel_mqtt_messages_received_total", "PUBLISH packets received"),
            messages_sent: counter(&r, "petrel_mqtt_messages_sent_total", "PUBLISH packets sent"),
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
                outbox_messages: gauge(&r, "petrel_forward_outbox_messages", "Forwarded copies not yet acknowledged by their peer"),
                outbox_bytes: gauge(&r, "petrel_forward_outbox_bytes", "Bytes of forwarded copies not yet acknowledged by their peer"),
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
                "Share-group messages whose member's session ended before its client acknowledged them, by outcome: local (another member here), forwarded (a member on another node), dropped (no member left)",
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

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
