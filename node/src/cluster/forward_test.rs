use super::*;
use crate::codec::MqttStr;
use crate::metrics::Metrics;
use crate::session::SessionId;

fn msg(qos: QoS, payload: &'static [u8]) -> Arc<Message> {
    Arc::new(Message {
        topic: MqttStr::from_static("t/1"),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        props: None,
        expires_at: None,
        origin: SessionId(7),
        owned: true,
        received: crate::message::Stamp::NONE,
        routed_at: Default::default(),
    })
}

fn plain(node: u64) -> Target {
    Target {
        node,
        plain: true,
        shared: Vec::new(),
    }
}

fn store(dir: &tempfile::TempDir) -> Store {
    Store::open(petrel_storage::StoreOptions {
        path: dir.path().join("db"),
        fsync: false,
    })
    .expect("open store")
}

/// An address that takes TCP connections and never answers (a peer that is stalled: its
/// link waits, neither failing nor acknowledging).
fn silent_peer() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    std::mem::forget(l);
    addr
}

fn peers() -> HashMap<u64, String> {
    static ADDR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let addr = ADDR.get_or_init(silent_peer).clone();
    HashMap::from([(2, addr.clone()), (3, addr)])
}

/// A forwarder of node 1 with links to nodes 2 and 3 (stalled peers: nothing is ever
/// acknowledged unless the test says so), on `store`.
fn forwarder_on(store: Store, outbox: usize) -> Arc<Forwarder> {
    let f = Forwarder::new(
        1,
        store,
        Limits {
            ack_timeout: Duration::from_millis(100),
            window: outbox / 4,
            outbox,
            wire_level: wire::LEVEL,
        },
        Metrics::new().forward,
    )
    .expect("forwarder");
    let f = Arc::new(f);
    f.set_peers(&peers());
    f
}

fn forwarder(outbox: usize) -> Arc<Forwarder> {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = forwarder_on(store(&dir), outbox);
    // The store stays open (the directory goes when the test ends).
    std::mem::forget(dir);
    f
}

fn mark(f: &Forwarder, m: Arc<Message>, to: &[Target]) -> u64 {
    f.forward(&m, to).mark
}

/// Waits (a little) until the forwarding watermark reaches `m`.
async fn settles(f: &Forwarder, m: u64) {
    let mut rx = f.forwarded();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| *s >= m))
        .await
        .expect("settled in time")
        .expect("forwarder alive");
}

fn stored_keys(store: &Store) -> Vec<(u64, u64)> {
    store
        .scan(Cf::Outbox)
        .map(|kv| keys::parse_outbox_key(&kv.expect("scan").0).expect("outbox key"))
        .collect()
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
    let m1 = mark(&f, msg(QoS::AtLeastOnce, b"a"), &[plain(2), plain(3)]);
    let m2 = mark(&f, msg(QoS::AtLeastOnce, b"b"), &[plain(2)]);
    assert_eq!((m1, m2), (1, 2));
    assert_eq!(f.forwarded_now(), 0);
    f.acked(&link(&f, 2), 2);
    assert_eq!(f.forwarded_now(), 0, "node 3 still holds the first");
    f.acked(&link(&f, 3), 1);
    assert_eq!(f.forwarded_now(), 2);
    assert_eq!(
        mark(&f, msg(QoS::AtMostOnce, b"c"), &[plain(2)]),
        0,
        "QoS 0 waits for nothing"
    );
    f.stop();
}

#[tokio::test]
async fn an_unanswered_copy_stops_holding_after_the_timeout_but_stays_queued() {
    let f = forwarder(1 << 20);
    let m = mark(&f, msg(QoS::ExactlyOnce, b"a"), &[plain(2)]);
    f.expire(Instant::now());
    assert_eq!(f.forwarded_now(), 0, "not yet");
    f.expire(Instant::now() + Duration::from_millis(150));
    settles(&f, m).await;
    assert_eq!(
        outbox_seqs(&f, 2),
        vec![1],
        "still sent when the peer is back"
    );
    let m2 = mark(&f, msg(QoS::AtLeastOnce, b"b"), &[plain(2)]);
    assert_eq!(
        f.forwarded_now(),
        m2,
        "a peer that is behind holds no new publisher"
    );
    assert_eq!(outbox_seqs(&f, 2), vec![1, 2]);
    f.acked(&link(&f, 2), 1);
    assert_eq!(outbox_seqs(&f, 2), vec![2]);
    assert_eq!(f.forwarded_now(), m2, "a late ack releases nothing twice");
    let m3 = mark(&f, msg(QoS::AtLeastOnce, b"c"), &[plain(2)]);
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
    let m = mark(&f, msg(QoS::AtLeastOnce, b"a"), &[plain(9)]);
    assert_eq!(f.forwarded_now(), m);
    f.stop();
}

#[tokio::test]
async fn a_full_outbox_drops_its_oldest_and_qos0_early() {
    let f = forwarder(1 << 20);
    static BIG: [u8; 300_000] = [0; 300_000];
    for _ in 0..5 {
        mark(&f, msg(QoS::AtLeastOnce, &BIG), &[plain(2)]);
    }
    // 1 MiB holds three of them.
    assert_eq!(outbox_seqs(&f, 2), vec![3, 4, 5]);
    assert_eq!(f.forwarded_now(), 2, "the dropped ones hold nothing");
    let dropped = &f.metrics.dropped;
    assert_eq!(dropped.with_label_values(&["outbox_full"]).get(), 2);
    mark(&f, msg(QoS::AtMostOnce, b"x"), &[plain(2)]);
    assert_eq!(dropped.with_label_values(&["slow_peer"]).get(), 1);
    assert_eq!(outbox_seqs(&f, 2), vec![3, 4, 5]);
    // A share group's QoS 0 copy passed on to it is not queued either, and says so (the
    // broker counts it dropped, not handed on); a QoS 1 one is.
    let shared = |qos| f.pass_shared(&msg(qos, b"y"), 2, "g", "t/+", false);
    assert!(shared(QoS::AtMostOnce).is_none());
    assert_eq!(dropped.with_label_values(&["slow_peer"]).get(), 2);
    assert!(shared(QoS::AtLeastOnce).is_some());
    f.stop();
}

#[tokio::test]
async fn a_full_window_pauses_publishers_until_the_peer_acknowledges_or_is_behind() {
    // A window of 256 KiB (a quarter of the outbox).
    let f = forwarder(1 << 20);
    static MID: [u8; 100_000] = [0; 100_000];
    let full = |f: &Forwarder, qos| f.forward(&msg(qos, &MID), &[plain(2)]).full.is_some();
    assert!(!full(&f, QoS::AtLeastOnce));
    assert!(!full(&f, QoS::AtLeastOnce));
    assert!(full(&f, QoS::AtLeastOnce), "past 256 KiB unacknowledged");
    assert_eq!(f.metrics.window_full.get(), 1);
    let other = f.forward(&msg(QoS::AtLeastOnce, b"x"), &[plain(3)]);
    assert!(other.full.is_none(), "another peer's window is its own");
    // QoS 0 never pauses anyone: dropped instead.
    assert!(!full(&f, QoS::AtMostOnce));
    let dropped = &f.metrics.dropped;
    assert_eq!(dropped.with_label_values(&["slow_peer"]).get(), 1);

    // A paused publisher waits until its deadline while nothing moves...
    let window = f
        .forward(&msg(QoS::AtLeastOnce, b"y"), &[plain(2)])
        .full
        .expect("full");
    let started = Instant::now();
    window
        .clone()
        .wait_room(started + Duration::from_millis(50))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    // ...and wakes as soon as the peer acknowledges enough.
    let l = link(&f, 2);
    let waiter = tokio::spawn(
        window
            .clone()
            .wait_room(Instant::now() + Duration::from_secs(30)),
    );
    tokio::task::yield_now().await;
    f.acked(&l, 2);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by the acknowledgement")
        .expect("task");
    // A peer that is behind holds nobody: its waiters go at once.
    for _ in 0..3 {
        f.forward(&msg(QoS::AtLeastOnce, &MID), &[plain(2)]);
    }
    let window = f
        .forward(&msg(QoS::AtLeastOnce, &MID), &[plain(2)])
        .full
        .expect("full");
    let waiter = tokio::spawn(window.wait_room(Instant::now() + Duration::from_secs(30)));
    tokio::task::yield_now().await;
    f.expire(Instant::now() + Duration::from_secs(1));
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken: the peer is behind")
        .expect("task");
    assert!(
        f.forward(&msg(QoS::AtLeastOnce, &MID), &[plain(2)])
            .full
            .is_none(),
        "nor does it pause new publishers"
    );
    f.stop();
}

#[tokio::test]
async fn batches_send_qos0_once_and_everything_else_again_after_a_reconnect() {
    let f = forwarder(1 << 20);
    mark(&f, msg(QoS::AtLeastOnce, b"a"), &[plain(2)]);
    mark(&f, msg(QoS::AtMostOnce, b"b"), &[plain(2)]);
    let mut t = plain(2);
    t.shared.push(("g".into(), "t/+".into()));
    mark(&f, msg(QoS::AtLeastOnce, b"c"), &[t]);
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
    let m = mark(&f, msg(QoS::AtLeastOnce, b"a"), &[plain(2), plain(3)]);
    f.acked(&link(&f, 3), 1);
    f.set_peers(&HashMap::from([(3, peers()[&3].clone())]));
    assert_eq!(f.forwarded_now(), m);
    let dropped = f.metrics.dropped.with_label_values(&["peer_removed"]).get();
    assert_eq!(dropped, 1);
    f.stop();
}

#[tokio::test]
async fn copies_acknowledged_without_their_peer_are_stored_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = store(&dir);
    let f = forwarder_on(st.clone(), 1 << 20);
    let m1 = mark(&f, msg(QoS::AtLeastOnce, b"a"), &[plain(2)]);
    mark(&f, msg(QoS::AtMostOnce, b"q0"), &[plain(2)]);
    assert!(
        stored_keys(&st).is_empty(),
        "a peer that keeps up: nothing stored"
    );
    f.expire(Instant::now() + Duration::from_millis(150));
    settles(&f, m1).await;
    assert_eq!(
        stored_keys(&st),
        vec![(2, 1)],
        "stored before its publisher was released"
    );
    // Behind now: the next copy is stored at once and its publisher waits for that write.
    let fw = f.forward(&msg(QoS::ExactlyOnce, b"b"), &[plain(2)]);
    let ticket = fw.ticket.expect("stored");
    st.wait(ticket).await.expect("written");
    assert_eq!(stored_keys(&st), vec![(2, 1), (2, 2)]);
    f.stop();
    drop(f);
    eprintln!("--- a restart: the stored copies come first, to the same peer");
    let f = forwarder_on(st.clone(), 1 << 20);
    let l = link(&f, 2);
    let b = f.take_batch(&l).expect("restored");
    let payloads: Vec<Vec<u8>> = b
        .messages
        .iter()
        .map(|m| {
            let d = value::delivery(&m.message, &Clock::now()).expect("decodes");
            d.msg.payload.to_vec()
        })
        .collect();
    assert_eq!(payloads, vec![b"a".to_vec(), b"b".to_vec()]);
    let m = mark(&f, msg(QoS::AtLeastOnce, b"c"), &[plain(2)]);
    assert_eq!(f.forwarded_now(), m, "still behind: holds nobody");
    f.acked(&l, 3);
    let ticket = st.append(|_| {});
    st.wait(ticket).await.expect("written");
    assert!(stored_keys(&st).is_empty(), "taken: deleted");
    f.stop();
}

#[test]
fn a_receiver_skips_retransmits_and_copies_it_had_before_the_sender_restarted() {
    let m = |seq, first_incarnation, first_seq| pb::ForwardedMessage {
        seq,
        first_incarnation,
        first_seq,
        ..Default::default()
    };
    let mut r = Received::default();
    r.restart(100);
    assert!(r.is_new(&m(1, 0, 0)));
    assert!(r.is_new(&m(2, 100, 2)), "stored, first sent now");
    assert!(!r.is_new(&m(2, 100, 2)), "a retransmit");
    assert!(r.is_new(&m(3, 0, 0)));
    r.restart(200);
    assert!(!r.is_new(&m(1, 100, 2)), "delivered before the restart");
    assert!(r.is_new(&m(2, 100, 4)), "never delivered");
    assert!(r.is_new(&m(3, 0, 0)));
    assert!(!r.is_new(&m(3, 0, 0)));
}

#[tokio::test]
async fn an_unreachable_peer_holds_nobody() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = store(&dir);
    let f = Arc::new(
        Forwarder::new(
            1,
            st.clone(),
            Limits {
                ack_timeout: Duration::from_secs(30),
                window: 1 << 18,
                outbox: 1 << 20,
                wire_level: wire::LEVEL,
            },
            Metrics::new().forward,
        )
        .expect("forwarder"),
    );
    // Nothing listens there: the link fails at once.
    f.set_peers(&HashMap::from([(2, "127.0.0.1:1".to_owned())]));
    let m = mark(&f, msg(QoS::AtLeastOnce, b"a"), &[plain(2)]);
    settles(&f, m).await;
    assert_eq!(stored_keys(&st), vec![(2, 1)], "kept for when it is back");
    f.stop();
}

#[test]
fn marks_settle_in_order_whatever_order_their_copies_are_released_in() {
    let mut m = Marks::default();
    let (a, b, c) = (m.take(2), m.take(1), m.take(1));
    assert_eq!((a, b, c), (1, 2, 3));
    assert_eq!(m.settled(), 0);
    m.release(c);
    m.release(b);
    assert_eq!(m.settled(), 0, "the first still holds");
    m.release(a);
    assert_eq!(m.settled(), 0, "one copy of the first is still out");
    m.release(a);
    assert_eq!(m.settled(), 3);
    m.release(a);
    m.release(9);
    assert_eq!(m.settled(), 3, "unknown and settled marks are ignored");
    let d = m.take(1);
    assert_eq!(m.settled(), 3);
    m.release(d);
    assert_eq!(m.settled(), 4);
}

/// What a batch reads as on the receiving side, message by message: (seq, topic, payload,
/// QoS, retain, sent in the stored encoding).
fn read_back(mut b: pb::ForwardBatch) -> Vec<(u64, String, Vec<u8>, QoS, bool, bool)> {
    Messages::of(&mut b)
        .expect("reads")
        .map(|r| {
            let (m, fields) = r.expect("reads");
            let encoded = fields.is_none();
            assert_eq!(encoded, !m.message.is_empty());
            let r = received_message(&m, fields, &Clock::now()).expect("reads");
            assert!(!r.owned, "slices of the batch");
            let (topic, payload) = (r.topic.to_string(), r.payload.to_vec());
            (m.seq, topic, payload, r.qos, r.retain, encoded)
        })
        .collect()
}

fn lives(l: &Link) -> Vec<bool> {
    let o = lock(&l.outbox);
    o.entries
        .iter()
        .map(|e| {
            assert_eq!(e.live.is_some(), e.msg.message.is_empty());
            e.live.is_some()
        })
        .collect()
}

#[tokio::test]
async fn copies_go_as_fields_only_to_a_peer_that_reads_them_and_keeps_up() {
    let f = forwarder(1 << 20);
    let (l2, l3) = (link(&f, 2), link(&f, 3));
    // Node 2's stream agreed on level 3; node 3's on 2 (an earlier version).
    l2.level.store(wire::PACKED, Ordering::Relaxed);
    l3.level.store(wire::CLAIM_ROUTES, Ordering::Relaxed);
    let mut retained = msg(QoS::ExactlyOnce, b"a");
    Arc::get_mut(&mut retained).unwrap().retain = true;
    mark(&f, retained, &[plain(2), plain(3)]);
    assert_eq!(lives(&l2), vec![true]);
    assert_eq!(lives(&l3), vec![false], "encoded for an earlier version");
    let a = |encoded| {
        (
            1,
            "t/1".to_owned(),
            b"a".to_vec(),
            QoS::ExactlyOnce,
            true,
            encoded,
        )
    };
    let b = f.take_batch(&l2).expect("batch");
    assert!(b.messages.is_empty() && !b.packed.is_empty());
    assert_eq!(read_back(b), vec![a(false)]);
    let b = f.take_batch(&l3).expect("batch");
    assert!(!b.messages.is_empty() && b.packed.is_empty(), "listed");
    assert_eq!(read_back(b), vec![a(true)]);

    // A message with an expiry (a property the fields do not carry) is encoded, and goes
    // packed in that encoding.
    let mut expiring = msg(QoS::AtLeastOnce, b"e");
    Arc::get_mut(&mut expiring).unwrap().expires_at =
        Some(Instant::now() + Duration::from_secs(60));
    mark(&f, expiring, &[plain(2)]);
    assert_eq!(lives(&l2), vec![true, false]);
    let e = (
        2,
        "t/1".to_owned(),
        b"e".to_vec(),
        QoS::AtLeastOnce,
        false,
        true,
    );
    assert_eq!(
        read_back(f.take_batch(&l2).expect("batch")),
        vec![e.clone()]
    );

    // The stream breaks and the next one meets an earlier version: the live entry it
    // resends goes encoded, and stays so.
    lock(&l2.outbox).sent = 0;
    l2.level.store(wire::CLAIM_ROUTES, Ordering::Relaxed);
    let b = f.take_batch(&l2).expect("batch");
    assert!(b.packed.is_empty());
    assert_eq!(read_back(b), vec![a(true), e]);
    assert_eq!(lives(&l2), vec![false, false]);
    f.stop();
}

#[tokio::test]
async fn a_copy_that_waits_keeps_no_live_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = store(&dir);
    let f = forwarder_on(st.clone(), 1 << 20);
    let l = link(&f, 2);
    l.level.store(wire::PACKED, Ordering::Relaxed);
    let m1 = mark(&f, msg(QoS::AtLeastOnce, b"a"), &[plain(2)]);
    mark(&f, msg(QoS::AtMostOnce, b"b"), &[plain(2)]);
    assert_eq!(lives(&l), vec![true, true]);
    // The first one's timeout passes: stored (encoded), and the peer is behind, so the
    // QoS 0 one waits too: encoded as well.
    f.expire(Instant::now() + Duration::from_millis(150));
    settles(&f, m1).await;
    assert_eq!(lives(&l), vec![false, false]);
    // Behind: new copies are encoded at once.
    mark(&f, msg(QoS::AtMostOnce, b"c"), &[plain(2)]);
    assert_eq!(lives(&l), vec![false, false, false]);
    let stored: Vec<pb::ForwardedMessage> = st
        .scan(Cf::Outbox)
        .map(|kv| pb::ForwardedMessage::decode(&*kv.expect("scan").1).expect("decodes"))
        .collect();
    assert_eq!(stored.len(), 1);
    let d = value::delivery(&stored[0].message, &Clock::now()).expect("stored encoding");
    assert_eq!(&d.msg.payload[..], b"a");

    // A link whose stream broke (an unreachable peer) lets go of its live entries.
    let l3 = link(&f, 3);
    l3.level.store(wire::PACKED, Ordering::Relaxed);
    mark(&f, msg(QoS::AtMostOnce, b"d"), &[plain(3)]);
    assert_eq!(lives(&l3), vec![true]);
    f.let_go(std::slice::from_ref(&l3), None);
    assert_eq!(lives(&l3), vec![false]);
    f.stop();
}
