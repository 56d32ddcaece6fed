use super::*;
use crate::codec::MqttStr;
use crate::metrics::Metrics;
use crate::session::SessionId;

fn msg(qos: QoS, payload: &'static [u8]) -> Message {
    Message {
        topic: MqttStr::from_static("t/1"),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        props: None,
        expires_at: None,
        origin: SessionId(7),
        owned: true,
    }
}

fn plain(node: u64) -> Target {
    Target {
        node,
        plain: true,
        shared: Vec::new(),
    }
}

/// A forwarder of node 1 with links to nodes 2 and 3 (whose addresses refuse connections,
/// so nothing is ever acknowledged unless the test says so).
fn forwarder(outbox: usize) -> Arc<Forwarder> {
    let f = Arc::new(Forwarder::new(
        1,
        Duration::from_millis(100),
        outbox,
        Metrics::new().forward,
    ));
    let peers = HashMap::from([(2, "127.0.0.1:1".to_owned()), (3, "127.0.0.1:1".to_owned())]);
    f.set_peers(&peers);
    f
}

fn link(f: &Forwarder, node: u64) -> Arc<Link> {
    f.links.read().unwrap()[&node].clone()
}

fn outbox_seqs(f: &Forwarder, node: u64) -> Vec<u64> {
    let l = link(f, node);
    let o = lock(&l.outbox);
    o.entries.iter().map(|e| e.msg.seq).collect()
}

#[tokio::test]
async fn a_mark_settles_once_every_target_acknowledged() {
    let f = forwarder(1 << 20);
    let m1 = f.forward(&msg(QoS::AtLeastOnce, b"a"), &[plain(2), plain(3)]);
    let m2 = f.forward(&msg(QoS::AtLeastOnce, b"b"), &[plain(2)]);
    assert_eq!((m1, m2), (1, 2));
    assert_eq!(f.forwarded_now(), 0);
    f.acked(&link(&f, 2), 2);
    assert_eq!(f.forwarded_now(), 0, "node 3 still holds the first");
    f.acked(&link(&f, 3), 1);
    assert_eq!(f.forwarded_now(), 2);
    assert_eq!(
        f.forward(&msg(QoS::AtMostOnce, b"c"), &[plain(2)]),
        0,
        "QoS 0 waits for nothing"
    );
    f.stop();
}

#[tokio::test]
async fn an_unanswered_copy_stops_holding_after_the_timeout_but_stays_queued() {
    let f = forwarder(1 << 20);
    let m = f.forward(&msg(QoS::ExactlyOnce, b"a"), &[plain(2)]);
    f.expire(Instant::now());
    assert_eq!(f.forwarded_now(), 0, "not yet");
    f.expire(Instant::now() + Duration::from_millis(150));
    assert_eq!(f.forwarded_now(), m);
    assert_eq!(
        outbox_seqs(&f, 2),
        vec![1],
        "still sent when the peer is back"
    );
    let m2 = f.forward(&msg(QoS::AtLeastOnce, b"b"), &[plain(2)]);
    assert_eq!(
        f.forwarded_now(),
        m2,
        "a peer that is behind holds no new publisher"
    );
    assert_eq!(outbox_seqs(&f, 2), vec![1, 2]);
    f.acked(&link(&f, 2), 1);
    assert_eq!(outbox_seqs(&f, 2), vec![2]);
    assert_eq!(f.forwarded_now(), m2, "a late ack releases nothing twice");
    let m3 = f.forward(&msg(QoS::AtLeastOnce, b"c"), &[plain(2)]);
    assert_eq!(
        f.forwarded_now(),
        m2,
        "caught up: it holds publishers again"
    );
    f.acked(&link(&f, 2), 3);
    assert_eq!(f.forwarded_now(), m3);
    f.stop();
}

#[tokio::test]
async fn unknown_nodes_hold_nothing() {
    let f = forwarder(1 << 20);
    let m = f.forward(&msg(QoS::AtLeastOnce, b"a"), &[plain(9)]);
    assert_eq!(f.forwarded_now(), m);
    f.stop();
}

#[tokio::test]
async fn a_full_outbox_drops_its_oldest_and_qos0_early() {
    let f = forwarder(1 << 20);
    static BIG: [u8; 300_000] = [0; 300_000];
    for _ in 0..5 {
        f.forward(&msg(QoS::AtLeastOnce, &BIG), &[plain(2)]);
    }
    // 1 MiB holds three of them.
    assert_eq!(outbox_seqs(&f, 2), vec![3, 4, 5]);
    assert_eq!(f.forwarded_now(), 2, "the dropped ones hold nothing");
    let dropped = &f.metrics.dropped;
    assert_eq!(dropped.with_label_values(&["outbox_full"]).get(), 2);
    f.forward(&msg(QoS::AtMostOnce, b"x"), &[plain(2)]);
    assert_eq!(dropped.with_label_values(&["slow_peer"]).get(), 1);
    assert_eq!(outbox_seqs(&f, 2), vec![3, 4, 5]);
    f.stop();
}

#[tokio::test]
async fn batches_send_qos0_once_and_everything_else_again_after_a_reconnect() {
    let f = forwarder(1 << 20);
    f.forward(&msg(QoS::AtLeastOnce, b"a"), &[plain(2)]);
    f.forward(&msg(QoS::AtMostOnce, b"b"), &[plain(2)]);
    let mut t = plain(2);
    t.shared.push(("g".into(), "t/+".into()));
    f.forward(&msg(QoS::AtLeastOnce, b"c"), &[t]);
    let l = link(&f, 2);
    let b = f.take_batch(&l).expect("a batch");
    assert_eq!(b.node_id, 1);
    let seqs: Vec<u64> = b.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(b.messages[2].shared[0].filter, "t/+");
    assert!(f.take_batch(&l).is_none(), "all sent");
    assert_eq!(outbox_seqs(&f, 2), vec![1, 3], "QoS 0 is not kept");
    lock(&l.outbox).sent = 0;
    let again: Vec<u64> = f
        .take_batch(&l)
        .unwrap()
        .messages
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(again, vec![1, 3]);
    f.stop();
}

#[tokio::test]
async fn a_removed_peer_takes_its_outbox_with_it() {
    let f = forwarder(1 << 20);
    let m = f.forward(&msg(QoS::AtLeastOnce, b"a"), &[plain(2), plain(3)]);
    f.acked(&link(&f, 3), 1);
    f.set_peers(&HashMap::from([(3, "127.0.0.1:1".to_owned())]));
    assert_eq!(f.forwarded_now(), m);
    let dropped = f.metrics.dropped.with_label_values(&["peer_removed"]).get();
    assert_eq!(dropped, 1);
    f.stop();
}
