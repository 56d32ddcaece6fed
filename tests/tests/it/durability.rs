//! Issue 3, point 1: what a `kill -9` of the broker must not lose. The data directory outlives
//! the process; a second broker on the same directory must deliver every message the first
//! one acknowledged, QoS 2 exactly once, and keep retained messages and delayed wills.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use petrel_tests::rumqttc::{self, AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet};
use tokio::sync::mpsc;

use super::*;
use pkt::Connect;

fn opts(id: &str, broker: &Broker, clean: bool) -> MqttOptions {
    let a = broker.mqtt_addr();
    let mut o = MqttOptions::new(id, a.ip().to_string(), a.port());
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(32);
    o
}

/// Publishes `0..n` as payloads at `qos` as fast as the flow allows, reporting each
/// sequence number whose flow completed (PUBACK for QoS 1, PUBCOMP for QoS 2).
fn spawn_publisher(
    broker: &Broker,
    id: &str,
    topic: &'static str,
    qos: rumqttc::QoS,
    n: u32,
) -> mpsc::UnboundedReceiver<u32> {
    let (client, mut eventloop) = AsyncClient::new(opts(id, broker, false), 256);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for seq in 0..n {
            if client
                .publish(topic, qos, false, seq.to_be_bytes().to_vec())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut sent: HashMap<u16, u32> = HashMap::new();
        let mut next = 0u32;
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    sent.insert(pkid, next);
                    next += 1;
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if let Some(seq) = sent.remove(&a.pkid) {
                        let _ = tx.send(seq);
                    }
                }
                Ok(Event::Incoming(Packet::PubComp(c))) => {
                    if let Some(seq) = sent.remove(&c.pkid) {
                        let _ = tx.send(seq);
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    rx
}

/// Receives publishes on a persistent session until `want` are all seen or `within` passes;
/// returns every payload in arrival order (duplicates included: QoS 1 allows them).
async fn drain(eventloop: &mut EventLoop, want: &BTreeSet<u32>, within: Duration) -> Vec<u32> {
    let mut got = Vec::new();
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + within;
    while !want.is_subset(&seen) {
        let ev = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(ev)) => ev,
            Ok(Err(e)) => panic!("subscriber connection failed: {e}"),
            Err(_) => return got,
        };
        if let Event::Incoming(Packet::Publish(p)) = ev {
            let seq = u32::from_be_bytes(p.payload[..4].try_into().expect("4-byte payload"));
            got.push(seq);
            seen.insert(seq);
        }
    }
    got
}

async fn persistent_subscriber(
    broker: &Broker,
    id: &str,
    filter: &str,
    qos: rumqttc::QoS,
) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts(id, broker, false), 256);
    client
        .subscribe(filter, qos)
        .await
        .expect("queue SUBSCRIBE");
    loop {
        match eventloop.poll().await.expect("subscriber connects") {
            Event::Incoming(Packet::SubAck(_)) => return (client, eventloop),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn t3_kill9_loses_no_acknowledged_qos1_message() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = start_on(
            dir.path(),
            &[("PETREL_MQTT__MAX_QUEUED_MESSAGES", "100000")],
        )
        .await;
        eprintln!("--- a persistent QoS 1 subscriber goes offline");
        let (sub, sub_loop) =
            persistent_subscriber(&broker, "dur-sub-1", "dur1/#", rumqttc::QoS::AtLeastOnce).await;
        drop(sub);
        drop(sub_loop);
        eprintln!("--- publish a QoS 1 stream, kill -9 the broker in the middle");
        let mut acked = spawn_publisher(
            &broker,
            "dur-pub-1",
            "dur1/x",
            rumqttc::QoS::AtLeastOnce,
            100_000,
        );
        let mut acks = BTreeSet::new();
        while acks.len() < 2_000 {
            acks.insert(
                acked
                    .recv()
                    .await
                    .expect("publisher acknowledged 2000 messages"),
            );
        }
        broker.kill9().await;
        while let Ok(seq) = acked.try_recv() {
            acks.insert(seq);
        }
        eprintln!(
            "--- {} acknowledged before the kill; restart on the same data directory",
            acks.len()
        );
        let broker = start_on(
            dir.path(),
            &[("PETREL_MQTT__MAX_QUEUED_MESSAGES", "100000")],
        )
        .await;
        let (sub, mut sub_loop) = {
            let (client, mut eventloop) = AsyncClient::new(opts("dur-sub-1", &broker, false), 256);
            match eventloop.poll().await.expect("resubscribe") {
                Event::Incoming(Packet::ConnAck(c)) => {
                    assert!(c.session_present, "the session survived the kill")
                }
                other => panic!("expected CONNACK, got {other:?}"),
            }
            (client, eventloop)
        };
        let got = drain(&mut sub_loop, &acks, Duration::from_secs(30)).await;
        drop(sub);
        let seen: BTreeSet<u32> = got.iter().copied().collect();
        let missing: Vec<u32> = acks.difference(&seen).copied().take(10).collect();
        assert!(
            missing.is_empty(),
            "{} acknowledged messages lost, first: {missing:?}",
            acks.difference(&seen).count()
        );
        eprintln!(
            "--- all {} acknowledged messages delivered ({} deliveries)",
            acks.len(),
            got.len()
        );
    })
    .await;
}

/// Reads acknowledgements of `kind` until one has come for every id in `ids`; anything else
/// (or a second one for an id) fails.
async fn expect_acks(raw: &mut RawClient, k: u8, ids: impl IntoIterator<Item = u16>, what: &str) {
    let mut want: BTreeSet<u16> = ids.into_iter().collect();
    while !want.is_empty() {
        let p = raw.expect_packet(WAIT, what).await;
        assert!(
            p.kind == k && want.remove(&p.pkid()),
            "{what}: got {p:?} while waiting for ids {want:?}"
        );
    }
}

fn qos2_publish(id: u16, dup: bool) -> Vec<u8> {
    pkt::publish(
        false,
        "dur2/x",
        id.to_string().as_bytes(),
        2,
        id,
        false,
        dup,
        &[],
    )
}

#[tokio::test]
async fn t3_kill9_keeps_qos2_exactly_once() {
    test_timeout(async {
        // Packet ids of the publisher's QoS 2 flows, by how far each got before the kill:
        let completed = 1..=20u16; //       PUBLISH, PUBREC, PUBREL, PUBCOMP
        let released_after = 21..=40u16; // PUBLISH, PUBREC; PUBREL after the restart
        let rec_lost = 41..=60u16; //       PUBLISH, PUBREC (as if lost): PUBLISH again, DUP
        let in_flight = 61..=70u16; //      PUBLISH written just before the kill: again, DUP
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = start_on(dir.path(), &[]).await;
        let sub_connect = Connect::v311("dur-sub-2").clean(false);
        let pub_connect = Connect::v311("dur-pub-2").clean(false);

        eprintln!("--- a persistent QoS 2 subscriber goes offline");
        {
            let (mut sub, _) = RawClient::handshake(broker.mqtt_addr(), &sub_connect).await;
            sub.send(&pkt::subscribe(false, 1, &[("dur2/#", 2)], &[]))
                .await;
            let ack = sub.expect_kind(kind::SUBACK, WAIT).await.0;
            assert_eq!(ack.suback_codes(false), vec![2]);
        }
        wait_connections(&broker, 0).await;

        eprintln!("--- the publisher gets each group of flows to its stage, then kill -9");
        let (mut publ, _) = RawClient::handshake(broker.mqtt_addr(), &pub_connect).await;
        for id in completed.clone() {
            publ.send(&qos2_publish(id, false)).await;
        }
        expect_acks(&mut publ, kind::PUBREC, completed.clone(), "PUBREC").await;
        for id in completed.clone() {
            publ.send(&pkt::pubrel(id)).await;
        }
        expect_acks(&mut publ, kind::PUBCOMP, completed.clone(), "PUBCOMP").await;
        for id in released_after.clone().chain(rec_lost.clone()) {
            publ.send(&qos2_publish(id, false)).await;
        }
        // PUBREC promises the message is stored: every one of these is durable now.
        let recorded = released_after.clone().chain(rec_lost.clone());
        expect_acks(&mut publ, kind::PUBREC, recorded, "PUBREC").await;
        let burst: Vec<u8> = in_flight
            .clone()
            .flat_map(|id| qos2_publish(id, false))
            .collect();
        publ.send(&burst).await;
        broker.kill9().await;
        drop(publ);

        eprintln!("--- restart; the publisher finishes its flows as a client does after a crash");
        let broker = start_on(dir.path(), &[]).await;
        let (mut publ, ack) = RawClient::handshake(broker.mqtt_addr(), &pub_connect).await;
        assert_eq!(ack.connack(), (true, 0), "the publisher's session survived");
        for id in released_after.clone() {
            publ.send(&pkt::pubrel(id)).await;
        }
        expect_acks(&mut publ, kind::PUBCOMP, released_after.clone(), "PUBCOMP").await;
        let resent = rec_lost.clone().chain(in_flight.clone());
        for id in resent.clone() {
            publ.send(&qos2_publish(id, true)).await;
        }
        expect_acks(&mut publ, kind::PUBREC, resent.clone(), "PUBREC of a DUP").await;
        for id in resent.clone() {
            publ.send(&pkt::pubrel(id)).await;
        }
        expect_acks(&mut publ, kind::PUBCOMP, resent, "PUBCOMP").await;
        // The marker: any duplicate was queued for the subscriber before it.
        publ.send(&pkt::publish(
            false,
            "dur2/marker",
            b"",
            1,
            100,
            false,
            false,
            &[],
        ))
        .await;
        expect_acks(&mut publ, kind::PUBACK, [100], "PUBACK").await;

        eprintln!("--- the subscriber gets every message once, then the marker");
        let (mut sub, ack) = RawClient::handshake(broker.mqtt_addr(), &sub_connect).await;
        assert_eq!(
            ack.connack(),
            (true, 0),
            "the subscriber's session survived"
        );
        let mut got: Vec<u16> = Vec::new();
        loop {
            let p = sub.expect_packet(WAIT, "PUBLISH or PUBREL").await;
            match p.kind {
                kind::PUBREL => sub.send(&pkt::pubcomp(p.pkid())).await,
                kind::PUBLISH => {
                    let m = p.publish(false);
                    match m.qos {
                        2 => sub.send(&pkt::pubrec(m.pkid)).await,
                        1 => sub.send(&pkt::puback(m.pkid)).await,
                        _ => {}
                    }
                    if m.topic == "dur2/marker" {
                        break;
                    }
                    got.push(text(&m.payload).parse().expect("numeric payload"));
                }
                _ => panic!("subscriber: unexpected {p:?}"),
            }
        }
        let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
        for id in &got {
            *counts.entry(*id).or_default() += 1;
        }
        let twice: Vec<u16> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| *id)
            .collect();
        assert!(
            twice.is_empty(),
            "QoS 2 messages delivered more than once across the kill: {twice:?}"
        );
        let missing: Vec<u16> = (1..=70u16).filter(|id| !counts.contains_key(id)).collect();
        assert!(missing.is_empty(), "QoS 2 messages lost: {missing:?}");
    })
    .await;
}

/// Far longer than noticing a dropped connection and a kill -9 take, so the will is still
/// pending when the first broker dies: it can only come from the second.
const WILL_DELAY_SECS: u32 = 10;

#[tokio::test]
async fn t3_kill9_keeps_retained_and_delayed_wills() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = start_on(dir.path(), &[]).await;
        let persistent = |o: &mut rumqttc::v5::MqttOptions| {
            o.set_clean_start(false);
            set_session_expiry(o, 600);
        };

        eprintln!("--- a watcher with a persistent session subscribes to the will topic");
        let mut watch = V5Client::connect_with(broker.mqtt_addr(), "dur-watch", persistent).await;
        watch.subscribe("dur3/will", Q5::AtLeastOnce).await;
        let mut p = V5Client::connect(broker.mqtt_addr(), "dur-ret").await;
        p.publish("dur3/state", Q5::AtLeastOnce, true, "kept").await;
        p.disconnect().await;

        eprintln!(
            "--- a client with a will delayed {WILL_DELAY_SECS} s dies, then the broker is killed"
        );
        let w = V5Client::connect_with(broker.mqtt_addr(), "dur-will", |o| {
            let mut props = will_props();
            props.delay_interval = Some(WILL_DELAY_SECS);
            o.set_last_will(p5::LastWill::new(
                "dur3/will",
                "gone",
                Q5::AtLeastOnce,
                false,
                Some(props),
            ));
            set_session_expiry(o, 600);
        })
        .await;
        let dropped = Instant::now();
        w.drop_connection();
        // The connection gauge drops after the broker decided about the will (scheduled it).
        wait_connections(&broker, 1).await;
        broker.kill9().await;
        let killed_after = dropped.elapsed();
        let early = watch.publishes_until_closed(WAIT).await;
        assert!(
            early.is_empty(),
            "the will came before the kill ({killed_after:?} after the drop), before its \
             {WILL_DELAY_SECS} s delay: {early:?}"
        );
        // Not a bound on the broker: the precondition of what follows (the will was pending
        // when the broker died), which 10 s leaves ample room for.
        assert!(
            killed_after < Duration::from_secs(WILL_DELAY_SECS.into()),
            "the kill came {killed_after:?} after the drop, when the will was already due: \
             this run cannot show that a pending will survives"
        );

        eprintln!("--- restart: the retained message is there, the will comes when due");
        let broker = start_on(dir.path(), &[]).await;
        let mut watch = V5Client::connect_with(broker.mqtt_addr(), "dur-watch", persistent).await;
        assert!(
            watch.connack.session_present,
            "the watcher's session survived"
        );
        watch.subscribe("dur3/state", Q5::AtLeastOnce).await;
        let kept = watch.recv_publish().await;
        assert_eq!(
            (
                topic5(&kept).as_str(),
                text(&kept.payload).as_str(),
                kept.retain
            ),
            ("dur3/state", "kept", true),
            "the retained message survived"
        );
        let will = watch
            .recv_publish_within(Duration::from_secs(WILL_DELAY_SECS.into()) + WAIT)
            .await;
        assert_eq!(
            (topic5(&will).as_str(), text(&will.payload).as_str()),
            ("dur3/will", "gone"),
            "the delayed will fired after the restart"
        );
        assert!(
            dropped.elapsed() >= Duration::from_secs(WILL_DELAY_SECS.into()),
            "the will came {:?} after the drop, before its {WILL_DELAY_SECS} s delay",
            dropped.elapsed()
        );
        watch.assert_no_publish_before_marker().await;
    })
    .await;
}

/// MQTT 5, 4.8.2, across a restart: copies a share group gave to a member that is offline
/// (its queue, stored) go to another member when that member's session ends, also when the
/// broker was killed in between (the share mark is stored with the copy).
#[tokio::test]
async fn t3_kill9_keeps_queued_share_copies_for_the_groups_other_members() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = start_on(dir.path(), &[]).await;
        // Long enough for the restart and the other member's SUBSCRIBE to come first, short
        // enough for the copies to come within the receive wait (10 s) after that.
        eprintln!("--- the group's only member goes offline with a session of 6 s");
        let mut member = V5Client::connect_with(broker.mqtt_addr(), "shk-member", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 6);
        })
        .await;
        member.subscribe("$share/gk/shk/t", Q5::AtLeastOnce).await;
        member.disconnect().await;
        wait_connections(&broker, 0).await;
        let mut publ = V5Client::connect(broker.mqtt_addr(), "shk-pub").await;
        for i in 0..5 {
            publ.publish("shk/t", Q5::AtLeastOnce, false, format!("{i}"))
                .await;
        }
        drop(publ);
        eprintln!("--- kill -9 and restart; another member joins; the first one's session ends");
        broker.kill9().await;
        let broker = start_on(dir.path(), &[]).await;
        let mut other = V5Client::connect(broker.mqtt_addr(), "shk-other").await;
        other.subscribe("$share/gk/shk/t", Q5::AtLeastOnce).await;
        let mut got: Vec<String> = other
            .recv_publishes(5)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        got.sort();
        assert_eq!(
            got,
            ["0", "1", "2", "3", "4"],
            "given on when the session ended"
        );
        other.assert_no_publish_before_marker().await;
    })
    .await;
}
