//! Issue 3, point 1: what a `kill -9` of the broker must not lose. The data directory outlives
//! the process; a second broker on the same directory must deliver every message the first
//! one acknowledged, QoS 2 exactly once, and keep retained messages and delayed wills.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use petrel_tests::rumqttc::{self, AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet};
use tokio::sync::mpsc;

use super::*;

async fn start_on(dir: &Path, env: &[(&str, &str)]) -> Broker {
    let mut b = Broker::builder()
        .without_data_dir_flag()
        .arg("--data-dir")
        .arg(dir.to_str().expect("utf-8 path"));
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start().await
}

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
/// returns every payload in arrival order (duplicates included).
async fn drain(
    eventloop: &mut EventLoop,
    client: &AsyncClient,
    want: &BTreeSet<u32>,
    within: Duration,
) -> Vec<u32> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let seen: BTreeSet<u32> = got.iter().copied().collect();
        if want.is_subset(&seen) {
            // Give stragglers (duplicates) a short quiet period to show up.
            if tokio::time::timeout(QUIET, eventloop.poll()).await.is_err() {
                return got;
            }
            continue;
        }
        let ev = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(ev)) => ev,
            Ok(Err(e)) => panic!("subscriber connection failed: {e}"),
            Err(_) => return got,
        };
        if let Event::Incoming(Packet::Publish(p)) = ev {
            let seq = u32::from_be_bytes(p.payload[..4].try_into().expect("4-byte payload"));
            got.push(seq);
            let _ = client;
        }
    }
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
        let got = drain(&mut sub_loop, &sub, &acks, Duration::from_secs(30)).await;
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

#[tokio::test]
async fn t3_kill9_keeps_qos2_exactly_once() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = [("PETREL_MQTT__MAX_QUEUED_MESSAGES", "100000")];
        let mut broker = start_on(dir.path(), &env).await;
        let (sub, sub_loop) =
            persistent_subscriber(&broker, "dur-sub-2", "dur2/#", rumqttc::QoS::ExactlyOnce).await;
        drop(sub);
        drop(sub_loop);
        let mut done = spawn_publisher(
            &broker,
            "dur-pub-2",
            "dur2/x",
            rumqttc::QoS::ExactlyOnce,
            100_000,
        );
        let mut completed = BTreeSet::new();
        while completed.len() < 1_000 {
            completed.insert(
                done.recv()
                    .await
                    .expect("publisher completed 1000 messages"),
            );
        }
        broker.kill9().await;
        while let Ok(seq) = done.try_recv() {
            completed.insert(seq);
        }
        let broker = start_on(dir.path(), &env).await;
        let (client, mut eventloop) = AsyncClient::new(opts("dur-sub-2", &broker, false), 256);
        let got = drain(&mut eventloop, &client, &completed, Duration::from_secs(30)).await;
        let mut seen = BTreeSet::new();
        let dups: Vec<u32> = got
            .iter()
            .copied()
            .filter(|s| !seen.insert(*s))
            .take(10)
            .collect();
        assert!(
            dups.is_empty(),
            "QoS 2 messages delivered twice across the restart: {dups:?}"
        );
        let missing: Vec<u32> = completed.difference(&seen).copied().take(10).collect();
        assert!(
            missing.is_empty(),
            "completed QoS 2 messages lost: {missing:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn t3_kill9_keeps_retained_and_delayed_wills() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = start_on(dir.path(), &[]).await;
        let mut p = V5Client::connect(broker.mqtt_addr(), "dur-ret").await;
        p.publish_with(
            "dur3/state",
            Q5::AtLeastOnce,
            true,
            "kept",
            p5::PublishProperties::default(),
        )
        .await;
        p.disconnect().await;
        eprintln!("--- a client with a will delayed 2 s dies, then the broker is killed");
        let w = V5Client::connect_with(broker.mqtt_addr(), "dur-will", |o| {
            let mut props = will_props();
            props.delay_interval = Some(2);
            o.set_last_will(p5::LastWill::new(
                "dur3/will",
                "gone",
                Q5::AtLeastOnce,
                false,
                Some(props),
            ));
            let mut cp = p5::ConnectProperties::new();
            cp.session_expiry_interval = Some(600);
            o.set_connect_properties(cp);
        })
        .await;
        w.drop_connection();
        wait_until("will scheduled", WAIT, || {
            let broker = &broker;
            async move {
                let v = broker.metric("petrel_mqtt_connections").await;
                if v == 0.0 {
                    Ok(())
                } else {
                    Err(v)
                }
            }
        })
        .await;
        broker.kill9().await;
        let broker = start_on(dir.path(), &[]).await;
        let mut s = V5Client::connect(broker.mqtt_addr(), "dur-check").await;
        s.subscribe("dur3/#", Q5::AtLeastOnce).await;
        let mut topics = BTreeSet::new();
        while topics.len() < 2 {
            let m = s.recv_publish_within(Duration::from_secs(15)).await;
            topics.insert(String::from_utf8_lossy(&m.topic).into_owned());
        }
        assert!(
            topics.contains("dur3/state"),
            "retained message survived: {topics:?}"
        );
        assert!(
            topics.contains("dur3/will"),
            "delayed will fired after the restart: {topics:?}"
        );
    })
    .await;
}
