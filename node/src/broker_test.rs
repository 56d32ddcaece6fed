//! The publish path against a real store: what a refused message leaves behind.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use petrel_storage::{keys, Cf, Store, StoreOptions};

use super::Broker;
use crate::auth::AuthGate;
use crate::codec::decode::MAX_REMAINING_LENGTH;
use crate::codec::{MqttStr, QoS, RetainHandling, SubscriptionOptions};
use crate::config::Config;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::router::topic::parse_filter;
use crate::session::{Session, SessionId};

fn broker(dir: &std::path::Path) -> Arc<Broker> {
    broker_with(dir, crate::broker::Planes::alone())
}

fn broker_with(dir: &std::path::Path, planes: crate::broker::Planes) -> Arc<Broker> {
    let cfg = Config::default();
    let store = Store::open(StoreOptions {
        path: dir.join("db"),
        fsync: false,
    })
    .expect("open store");
    let auth = AuthGate::from_config(&cfg.auth).expect("no auth files");
    Broker::new(cfg, Metrics::new(), auth, store, planes)
}

fn subscribe(b: &Broker, s: &Arc<Session>, filter: &str, id: Option<u32>) {
    let f = parse_filter(filter, 16).expect("valid filter");
    let o = SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        no_local: false,
        retain_as_published: true,
        retain_handling: RetainHandling::SendAtSubscribe,
    };
    b.subscribe(s, &f, o, id, crate::router::AclStamp::UNDECIDED);
}

fn message(topic: &'static str, payload: Bytes) -> Arc<Message> {
    Arc::new(Message {
        topic: MqttStr::from_static(topic),
        payload,
        qos: QoS::ExactlyOnce,
        retain: true,
        props: None,
        expires_at: None,
        origin: SessionId(99),
        owned: true,
        received: crate::message::Stamp::NONE,
        routed_at: Default::default(),
    })
}

fn rows(store: &Store, cf: Cf) -> Vec<Box<[u8]>> {
    store.scan(cf).map(|r| r.expect("row").0).collect()
}

#[test]
fn message_too_large_to_store_is_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path());
    let stored = Arc::new(Session::new(SessionId(1), "stored".into(), 3600));
    stored.set_persistent(true);
    let clean = Session::new_for_test("clean");
    subscribe(&b, &stored, "t/#", Some(7));
    subscribe(&b, &clean, "t/+", None);

    // Exactly at the MQTT limit as stored without identifiers (topic length 2 + "t/x" +
    // packet id 2 + property length 1 + payload); the subscription identifier tips it over.
    let big = message("t/x", Bytes::from(vec![0u8; MAX_REMAINING_LENGTH - 8]));
    let routed = b.publish(big, &mut Vec::new(), Some(("stored", 5)));
    assert!(routed.unstorable, "refused");
    assert_eq!((routed.delivered, routed.ticket), (0, None));
    assert_eq!(stored.queue_len() + clean.queue_len(), 0, "routed nowhere");
    assert_eq!(b.retained_count(), 0, "not retained");
    let dropped = b
        .metrics
        .queue_dropped
        .with_label_values(&["too_large"])
        .get();
    assert_eq!(dropped, 1, "counted");

    // The next publish commits only its own writes: nothing of the refused one was left in
    // the pending batch.
    let small = message("t/y", Bytes::from_static(b"small"));
    let routed = b.publish(small, &mut Vec::new(), Some(("stored", 6)));
    assert!(!routed.unstorable);
    assert_eq!(stored.queue_len(), 1);
    let ticket = routed.ticket.expect("stored");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), b.store.wait(ticket)).await
    })
    .expect("in time")
    .expect("durable");
    assert_eq!(
        rows(&b.store, Cf::Inbound),
        vec![keys::inbound_key("stored", 6).into()]
    );
    assert_eq!(rows(&b.store, Cf::Queue).len(), 1);
    // Retained through the control plane (here `LocalControl`, at once), not the store.
    assert!(rows(&b.store, Cf::Retained).is_empty());
    assert_eq!(b.retained_count(), 1);
}

/// MQTT 5 section 4.8.2, in the gap between a publish's match and its queue: a share group
/// picked a member whose session ended meanwhile (its subscriptions not yet out of the
/// router): the copy goes to another member, not nowhere.
#[test]
fn a_shared_copy_that_finds_its_member_ended_goes_to_another_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path());
    let gone = Session::new_for_test("gone");
    let live = Session::new_for_test("live");
    subscribe(&b, &gone, "$share/g/t/+", None);
    subscribe(&b, &live, "$share/g/t/+", None);
    // Ended, still in the router: what a publish that matched just before the end sees.
    let _ = gone.end();
    assert!(gone.is_ended());
    let mut sent = 0;
    for topic in ["t/1", "t/2", "t/3", "t/4"] {
        let mut msg = message(topic, Bytes::from_static(b"x"));
        Arc::get_mut(&mut msg).expect("fresh").retain = false;
        let routed = b.publish(msg, &mut Vec::new(), None);
        sent += 1;
        assert_eq!(routed.delivered, 1, "{topic}: one member took it");
    }
    assert_eq!(live.queue_len(), sent, "every copy reached the live member");
    assert_eq!(gone.queue_len(), 0);
    assert_eq!(
        redelivered(&b, "local"),
        0,
        "the pick passed over the ended member"
    );

    // Every member here ended: the pick falls back to one of them, its copy finds it
    // ended, and with no other node in the group it is dropped, counted.
    let _ = live.end();
    b.publish(
        message("t/5", Bytes::from_static(b"x")),
        &mut Vec::new(),
        None,
    );
    assert_eq!(redelivered(&b, "dropped"), 1);
}

fn redelivered(b: &Broker, outcome: &str) -> u64 {
    b.metrics
        .shared_redelivered
        .with_label_values(&[outcome])
        .get()
}

/// What a broker gave other nodes' share groups: (node, group, filter, redirected); and the
/// copies it passed on to sessions that moved: (node, client id).
#[derive(Default)]
struct SharedOut {
    given: std::sync::Mutex<Vec<(u64, String, String, bool)>>,
    pushed: std::sync::Mutex<Vec<(u64, String)>>,
    settled: std::sync::OnceLock<tokio::sync::watch::Sender<u64>>,
}

impl crate::control::DataPlane for SharedOut {
    fn forward(&self, _: &Arc<Message>, _: &[crate::router::Target]) -> crate::control::Forwarded {
        Default::default()
    }

    fn push_on(&self, _: &Arc<Message>, node: u64, client_id: &str) -> crate::control::Forwarded {
        self.pushed
            .lock()
            .expect("lock")
            .push((node, client_id.to_owned()));
        Default::default()
    }

    fn pass_shared(
        &self,
        _: &Arc<Message>,
        node: u64,
        group: &str,
        filter: &str,
        redirected: bool,
    ) -> Option<crate::control::Forwarded> {
        self.given.lock().expect("lock").push((
            node,
            group.to_owned(),
            filter.to_owned(),
            redirected,
        ));
        Some(Default::default())
    }

    fn forwarded(&self) -> tokio::sync::watch::Receiver<u64> {
        self.settled
            .get_or_init(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn forwarded_now(&self) -> u64 {
        0
    }
}

/// A member of share group `g` on `t/+` that has ended, its subscription still in the
/// router (what a publish that matched just before the end sees).
fn ended_member(b: &Broker) -> Arc<Session> {
    let gone = Session::new_for_test("gone");
    subscribe(b, &gone, "$share/g/t/+", None);
    let _ = gone.end();
    gone
}

/// A copy another node forwarded to share group `g` on `t/+` (`redirected`: sent on once
/// already).
fn to_group(b: &Broker, msg: Arc<Message>, redirected: bool) -> super::Routed {
    b.deliver_forwarded(
        msg,
        false,
        [("g", "t/+")],
        0,
        "",
        redirected,
        &mut Vec::new(),
    )
}

/// Node 1 of a cluster whose node 2 has a member of `$share/g/t/+`, as node 1's route table
/// says.
fn node_one(dir: &std::path::Path) -> (Arc<Broker>, Arc<SharedOut>) {
    let out = Arc::new(SharedOut::default());
    let mut planes = crate::broker::Planes::alone();
    planes.routes = Arc::new(crate::router::RouteTable::new(1));
    // Both nodes are in the group (node 1's route not removed yet): local first.
    planes.routes.add("g", "t/+", 1);
    planes.routes.add("g", "t/+", 2);
    planes.forward = out.clone();
    (broker_with(dir, planes), out)
}

/// A share group's copy forwarded to a node whose last member of the group has just left
/// (the sender routed before that route's removal reached it) goes on to a node that has
/// one, once: marked redirected, and a redirected copy that finds no member is dropped
/// (counted), never sent on again.
#[test]
fn a_forwarded_shared_copy_with_no_member_here_goes_on_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (b, out) = node_one(dir.path());
    let msg = message("t/1", Bytes::from_static(b"x"));
    let routed = to_group(&b, msg.clone(), false);
    assert_eq!(routed.delivered, 0);
    assert_eq!(
        *out.given.lock().expect("lock"),
        vec![(2, "g".to_owned(), "t/+".to_owned(), true)],
        "sent on to node 2, marked"
    );
    assert_eq!(redelivered(&b, "forwarded"), 1);

    to_group(&b, msg.clone(), true);
    assert_eq!(
        out.given.lock().expect("lock").len(),
        1,
        "not sent on twice"
    );
    assert_eq!(redelivered(&b, "dropped"), 1);

    // A member here takes it, redirected or not.
    let here = Session::new_for_test("here");
    subscribe(&b, &here, "$share/g/t/+", None);
    let routed = to_group(&b, msg, true);
    assert_eq!((routed.delivered, here.queue_len()), (1, 1));
    assert_eq!(out.given.lock().expect("lock").len(), 1);
}

/// A forwarded copy whose member here ended under it (its subscriptions not out of the
/// router yet) goes on once, marked, like one that finds no member at all.
#[test]
fn a_forwarded_shared_copy_whose_member_here_ended_goes_on_marked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (b, out) = node_one(dir.path());
    let gone = ended_member(&b);
    let msg = message("t/1", Bytes::from_static(b"x"));
    to_group(&b, msg, false);
    assert_eq!(gone.queue_len(), 0);
    assert_eq!(
        *out.given.lock().expect("lock"),
        vec![(2, "g".to_owned(), "t/+".to_owned(), true)]
    );
}

/// A copy published here whose member ended under it goes to the group's member on another
/// node, not marked (that node may redirect it once more).
#[test]
fn a_published_shared_copy_whose_members_here_ended_goes_to_another_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (b, out) = node_one(dir.path());
    let gone = ended_member(&b);
    // Routed as local first: the member here is picked, and found ended.
    let routed = b.publish(
        message("t/1", Bytes::from_static(b"x")),
        &mut Vec::new(),
        None,
    );
    assert_eq!(
        routed.delivered, 1,
        "handed on: the publisher is not told no one took it"
    );
    assert_eq!(gone.queue_len(), 0);
    assert_eq!(
        *out.given.lock().expect("lock"),
        vec![(2, "g".to_owned(), "t/+".to_owned(), false)]
    );
    assert_eq!(redelivered(&b, "forwarded"), 1);
}

/// A share group's copy that picked a member here which has just moved to another node
/// (surrendered, its subscriptions not out of the router yet) is the group's only copy:
/// it goes to the group's member on another node, never as an ordinary copy for the
/// client that moved (which holds no ordinary subscription to take it), and never dropped
/// as one the new owner got on its own, whether it was routed before the claim or after.
#[test]
fn a_shared_copy_for_a_member_that_moved_goes_to_the_group_not_to_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (b, out) = node_one(dir.path());
    let moved = Session::new_for_test("moved");
    subscribe(&b, &moved, "$share/g/t/+", None);
    // Claimed by node 2 at log index 5.
    assert!(moved.take_all(Some((5, 2))).is_some());
    let routed = b.publish(
        message("t/1", Bytes::from_static(b"x")),
        &mut Vec::new(),
        None,
    );
    assert_eq!(routed.delivered, 1, "handed on, not \"no subscribers\"");
    // Forwarded copies routed before the claim and after it.
    for routed_at in [3, 7] {
        let msg = message("t/1", Bytes::from_static(b"x"));
        msg.routed_at.set(routed_at);
        let routed = to_group(&b, msg, false);
        assert_eq!(routed.delivered, 1);
    }
    assert_eq!(moved.queue_len(), 0);
    assert!(
        out.pushed.lock().expect("lock").is_empty(),
        "not passed on as the client's own copy"
    );
    assert_eq!(
        *out.given.lock().expect("lock"),
        vec![
            (2, "g".to_owned(), "t/+".to_owned(), false),
            (2, "g".to_owned(), "t/+".to_owned(), true),
            (2, "g".to_owned(), "t/+".to_owned(), true),
        ],
        "each to the group on node 2; the forwarded ones marked"
    );
    assert_eq!(redelivered(&b, "forwarded"), 3);
}

/// An ordinary copy routed to a session here before the claim that moved it to another
/// node is passed on to that node for that client (the new owner did not get it), and
/// counted as delivered; one routed at or after the claim is dropped (the owner got its
/// own).
#[test]
fn a_copy_for_a_session_that_moved_is_passed_on_only_if_routed_before_the_claim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (b, out) = node_one(dir.path());
    let moved = Session::new_for_test("plain");
    subscribe(&b, &moved, "t/+", None);
    // Claimed by node 2 at log index 5.
    assert!(moved.take_all(Some((5, 2))).is_some());
    let mut delivered = Vec::new();
    for routed_at in [3, 5, 7] {
        let msg = message("t/1", Bytes::from_static(b"x"));
        msg.routed_at.set(routed_at);
        let routed = b.deliver_forwarded(msg, true, [], 0, "", false, &mut Vec::new());
        delivered.push(routed.delivered);
    }
    assert_eq!(delivered, [1, 0, 0]);
    assert_eq!(
        *out.pushed.lock().expect("lock"),
        vec![(2, "plain".to_owned())]
    );
    assert!(out.given.lock().expect("lock").is_empty());
}
