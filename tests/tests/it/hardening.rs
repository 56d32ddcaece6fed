//! Issue 10: holes found in review of the single node, each with a test that failed before
//! its fix. Absence is checked with a marker message published after what must not arrive.

use std::collections::BTreeSet;

use tokio::io::AsyncWriteExt;

use super::*;

/// Receives publishes until `marker` arrives on `marker_topic`; returns the topics before it.
async fn topics_before_marker(c: &mut V3Client, marker_topic: &str) -> Vec<String> {
    let mut before = Vec::new();
    loop {
        let p = c.recv_publish().await;
        if p.topic == marker_topic {
            return before;
        }
        before.push(p.topic.clone());
    }
}

const CHAT_ACL: &str =
    "[user alice]\ndeny subscribe chat/admin/#\nallow all chat/#\n\n[user bob]\nallow all chat/#\n";

// --- point 1: ACL decisions survive a restart, and a reload revokes at once -----------------

#[tokio::test]
async fn t10_acl_filtered_subscription_stays_filtered_after_kill9() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let acl = dir.path().join("acl");
        std::fs::write(&acl, CHAT_ACL).expect("write acl");
        let data = dir.path().join("data");
        let env = [("PETREL_AUTH__ACL_FILE", acl.to_str().expect("utf-8"))];
        let mut b = start_on(&data, &env).await;
        let alice_opts = |o: &mut rumqttc::MqttOptions| {
            o.set_credentials("alice", "");
            o.set_clean_session(false);
        };
        eprintln!("--- alice subscribes to chat/#, which the ACL allows in part");
        {
            let mut alice = V3Client::connect_with(b.mqtt_addr(), "alice-1", alice_opts).await;
            assert_eq!(
                alice.subscribe("chat/#", Q3::AtLeastOnce).await,
                rumqttc::SubscribeReasonCode::Success(Q3::AtLeastOnce)
            );
            alice.disconnect().await;
        }
        eprintln!("--- kill -9 and restart on the same data");
        b.kill9().await;
        let b = start_on(&data, &env).await;
        eprintln!("--- bob publishes to the denied part, then a marker");
        let mut bob = V3Client::connect_with(b.mqtt_addr(), "bob-1", |o| {
            o.set_credentials("bob", "");
        })
        .await;
        bob.publish("chat/admin/secret", Q3::AtLeastOnce, false, "no")
            .await;
        bob.publish("chat/general", Q3::AtLeastOnce, false, "marker")
            .await;
        let mut alice = V3Client::connect_with(b.mqtt_addr(), "alice-1", alice_opts).await;
        let leaked = topics_before_marker(&mut alice, "chat/general").await;
        assert!(
            leaked.is_empty(),
            "denied topics delivered after a restart: {leaked:?}"
        );
    })
    .await
}

#[tokio::test]
async fn t10_acl_reload_revokes_existing_subscriptions_at_once() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let acl = dir.path().join("acl");
        std::fs::write(&acl, "[all]\nallow all chat/#\n").expect("write acl");
        let env = [
            ("PETREL_AUTH__ACL_FILE", acl.to_str().expect("utf-8")),
            ("PETREL_AUTH__RELOAD_INTERVAL_SECS", "1"),
        ];
        let b = start_on(&dir.path().join("data"), &env).await;
        let mut alice = V3Client::connect_with(b.mqtt_addr(), "alice-2", |o| {
            o.set_credentials("alice", "");
        })
        .await;
        assert_eq!(
            alice.subscribe("chat/#", Q3::AtLeastOnce).await,
            rumqttc::SubscribeReasonCode::Success(Q3::AtLeastOnce)
        );
        eprintln!("--- the ACL now denies alice chat/admin/#");
        std::fs::write(&acl, CHAT_ACL).expect("rewrite acl");
        wait_until("the ACL reloaded", WAIT, || async {
            b.log().contains("reloaded").then_some(()).ok_or("not yet")
        })
        .await;
        let mut bob = V3Client::connect_with(b.mqtt_addr(), "bob-2", |o| {
            o.set_credentials("bob", "");
        })
        .await;
        bob.publish("chat/admin/secret", Q3::AtLeastOnce, false, "no")
            .await;
        bob.publish("chat/general", Q3::AtLeastOnce, false, "marker")
            .await;
        let leaked = topics_before_marker(&mut alice, "chat/general").await;
        assert!(
            leaked.is_empty(),
            "revoked topics still delivered: {leaked:?}"
        );
    })
    .await
}

// --- point 2: concurrent CONNECTs with one client id ------------------------------------------

/// A raw v5 client with a persistent session (expiry 1 h) that subscribes to `storm/t`.
async fn storm_client(addr: std::net::SocketAddr, clean: bool) -> Option<RawClient> {
    let connect = pkt::Connect::v5("storm")
        .clean(clean)
        .property(prop::u32(prop::SESSION_EXPIRY, 3600));
    let mut raw = RawClient::connect(addr).await;
    raw.send(&connect.encode()).await;
    match raw.read(WAIT).await {
        RawRead::Packet(p) if p.kind == kind::CONNACK && p.connack().1 == 0 => {}
        _ => return None,
    }
    raw.send(&pkt::subscribe(true, 1, &[("storm/t", 1)], &[]))
        .await;
    Some(raw)
}

#[tokio::test]
async fn t10_concurrent_connects_leave_one_session_that_loses_nothing() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut b = start_on(&data, &[]).await;
        let addr = b.mqtt_addr();
        for round in 0..3 {
            eprintln!(
                "--- one connection, then 16 clean-start CONNECTs at once ({})",
                round
            );
            let first = storm_client(addr, true).await.expect("first connect");
            let storm: Vec<_> = (0..16)
                .map(|_| tokio::spawn(storm_client(addr, true)))
                .collect();
            let mut clients = vec![first];
            for t in storm {
                clients.extend(t.await.expect("storm task"));
            }
            wait_until("one session left", WAIT, || async {
                let m = b.metrics().await;
                let (s, subs) = (m.get("petrel_sessions"), m.get("petrel_subscriptions"));
                (s == 1.0 && subs == 1.0).then_some(()).ok_or((s, subs))
            })
            .await;
            drop(clients);
            wait_connections(&b, 0).await;
        }
        eprintln!("--- 50 messages queued for the offline session, kill -9, restart");
        let mut publisher = V3Client::connect(addr, "storm-pub").await;
        for i in 0..50u32 {
            publisher
                .publish("storm/t", Q3::AtLeastOnce, false, i.to_string())
                .await;
        }
        drop(publisher);
        b.kill9().await;
        let b = start_on(&data, &[]).await;
        assert_eq!(b.metric("petrel_sessions").await, 1.0, "one stored session");
        let mut c = V5Client::connect_with(b.mqtt_addr(), "storm", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 3600);
        })
        .await;
        let got: BTreeSet<u32> = c
            .recv_publishes(50)
            .await
            .iter()
            .map(|p| text(&p.payload).parse().expect("number"))
            .collect();
        assert_eq!(got, (0..50).collect(), "every queued message, once");
    })
    .await
}

// --- point 4: wills of clients connected at a crash -------------------------------------------

#[tokio::test]
async fn t10_wills_of_connected_clients_survive_kill9() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut b = start_on(&data, &[]).await;
        eprintln!("--- a persistent watcher, and a device with a retained will, connected");
        let watcher_opts = |o: &mut rumqttc::MqttOptions| {
            o.set_clean_session(false);
        };
        let mut watcher = V3Client::connect_with(b.mqtt_addr(), "watcher", watcher_opts).await;
        watcher.subscribe("dev/+/status", Q3::AtLeastOnce).await;
        watcher.disconnect().await;
        let device = V3Client::connect_with(b.mqtt_addr(), "dev-7", |o| {
            o.set_last_will(rumqttc::LastWill::new(
                "dev/7/status",
                "offline",
                Q3::AtLeastOnce,
                true,
            ));
        })
        .await;
        wait_connections(&b, 1).await;
        eprintln!("--- kill -9 with the device connected");
        b.kill9().await;
        drop(device);
        let b = start_on(&data, &[]).await;
        let mut watcher = V3Client::connect_with(b.mqtt_addr(), "watcher", watcher_opts).await;
        let p = watcher.recv_publish().await;
        assert_eq!(
            (p.topic.as_str(), text(&p.payload).as_str()),
            ("dev/7/status", "offline")
        );
        let mut late = V3Client::connect(b.mqtt_addr(), "late").await;
        late.subscribe("dev/7/status", Q3::AtLeastOnce).await;
        let p = late.recv_publish().await;
        assert!(p.retain, "the will was retained");
        assert_eq!(text(&p.payload), "offline");
        eprintln!("--- published once: a second restart does not publish it again");
        watcher.disconnect().await;
        drop(late);
        let mut b = b;
        b.kill9().await;
        let b = start_on(&data, &[]).await;
        let mut watcher = V3Client::connect_with(b.mqtt_addr(), "watcher", watcher_opts).await;
        let mut marker = V3Client::connect(b.mqtt_addr(), "marker").await;
        marker
            .publish("dev/0/status", Q3::AtLeastOnce, false, "marker")
            .await;
        let before = topics_before_marker(&mut watcher, "dev/0/status").await;
        assert!(before.is_empty(), "the will came twice: {before:?}");
    })
    .await
}

#[tokio::test]
async fn t10_no_will_after_a_clean_disconnect_and_kill9() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut b = start_on(&data, &[]).await;
        let device = V3Client::connect_with(b.mqtt_addr(), "dev-8", |o| {
            o.set_last_will(rumqttc::LastWill::new(
                "dev/8/status",
                "offline",
                Q3::AtLeastOnce,
                true,
            ));
        })
        .await;
        device.disconnect().await;
        wait_connections(&b, 0).await;
        // The DISCONNECT's delete is in the store once a later write is acknowledged.
        let mut p = V3Client::connect(b.mqtt_addr(), "sync").await;
        p.publish("sync/x", Q3::AtLeastOnce, true, "x").await;
        b.kill9().await;
        let b = start_on(&data, &[]).await;
        let mut c = V3Client::connect(b.mqtt_addr(), "check").await;
        c.subscribe("dev/8/status", Q3::AtLeastOnce).await;
        c.subscribe("sync/x", Q3::AtLeastOnce).await;
        // Retained messages come in filter order: the will, had it fired, before sync/x.
        let before = topics_before_marker(&mut c, "sync/x").await;
        assert!(
            before.is_empty(),
            "a will after a clean disconnect: {before:?}"
        );
    })
    .await
}

// --- point 5: bounded by default --------------------------------------------------------------

#[tokio::test]
async fn t10_retained_quota_refuses_new_topics_with_0x97() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_LIMITS__MAX_RETAINED_MESSAGES", "3")], &[]).await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &pkt::Connect::v5("rq")).await;
        let mut reasons = Vec::new();
        for (id, topic, payload) in [
            (1, "rq/1", &b"a"[..]),
            (2, "rq/2", b"b"),
            (3, "rq/3", b"c"),
            (4, "rq/4", b"d"),
            (5, "rq/1", b"replaced"),
            (6, "rq/2", b""),
            (7, "rq/4", b"d"),
        ] {
            raw.send(&pkt::publish(true, topic, payload, 1, id, true, false, &[]))
                .await;
            let (ack, _) = raw.expect_kind(kind::PUBACK, WAIT).await;
            reasons.push(ack.ack_reason());
        }
        // 0x10: accepted, no matching subscribers.
        assert_eq!(reasons, [0x10, 0x10, 0x10, 0x97, 0x10, 0x10, 0x10]);
        let m = b.metrics().await;
        assert_eq!(
            m.get("petrel_limit_hits_total{limit=\"max_retained_messages\"}"),
            1.0
        );
        eprintln!("--- 3.1.1 past the quota: delivered live, not retained");
        let mut live = V3Client::connect(b.mqtt_addr(), "rq-live").await;
        live.subscribe("rq/#", Q3::AtLeastOnce).await;
        let _ = live.recv_publishes(3).await;
        let mut v3 = V3Client::connect(b.mqtt_addr(), "rq-v3").await;
        v3.publish("rq/5", Q3::AtLeastOnce, true, "e").await;
        assert_eq!(live.recv_publish().await.topic, "rq/5");
        let mut late = V3Client::connect(b.mqtt_addr(), "rq-late").await;
        late.subscribe("rq/#", Q3::AtLeastOnce).await;
        let got: BTreeSet<String> = late
            .recv_publishes(3)
            .await
            .into_iter()
            .map(|p| p.topic)
            .collect();
        assert_eq!(got, ["rq/1", "rq/3", "rq/4"].map(String::from).into());
        v3.publish("rq/1", Q3::AtLeastOnce, false, "marker").await;
        assert_eq!(
            late.recv_publish().await.topic,
            "rq/1",
            "nothing more retained"
        );
    })
    .await
}

#[tokio::test]
async fn t10_client_that_never_reads_cannot_grow_the_node() {
    test_timeout(async {
        let b = Broker::start().await;
        // A small receive buffer on the client: what the node sends it piles up on the node's
        // side after a few KiB, so the test does not wait for megabytes of kernel buffers.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut stream = socket.connect(b.mqtt_addr()).await.expect("connect");
        stream
            .write_all(&pkt::Connect::v311("deaf").encode())
            .await
            .expect("CONNECT");
        let mut connack = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut connack)
            .await
            .expect("CONNACK");
        assert_eq!(connack, [0x20, 2, 0, 0]);
        eprintln!("--- QoS 1 publishes, never reading their PUBACKs");
        // Small publishes (7 bytes for a 4-byte PUBACK); a node that kept reading would take
        // every byte.
        let mut batch = Vec::new();
        for i in 0..4096u16 {
            batch.extend(pkt::publish(false, "d", b"", 1, i + 1, false, false, &[]));
        }
        let limit = 64 << 20;
        let writer = tokio::spawn(async move {
            let mut written = 0usize;
            while written < limit {
                stream.write_all(&batch).await.expect("write");
                written += batch.len();
            }
            stream
        });
        // The node reads until it stops for good (nothing more for 5 s) or has it all.
        let mut last = (0.0, tokio::time::Instant::now());
        let read = loop {
            let now = b.metric("petrel_mqtt_received_bytes_total").await;
            if now >= (limit / 2) as f64 {
                break now;
            }
            if now != last.0 {
                last = (now, tokio::time::Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(5) {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        writer.abort();
        assert!(
            read < (limit / 2) as f64,
            "the node read {read} bytes of publishes whose PUBACKs the client never read"
        );
        eprintln!("--- the node stopped reading after {read} bytes; another client is served");
        let mut other = V3Client::connect(b.mqtt_addr(), "hearing").await;
        other.subscribe("hearing/t", Q3::AtLeastOnce).await;
        other
            .publish("hearing/t", Q3::AtLeastOnce, false, "hi")
            .await;
        assert_eq!(text(&other.recv_publish().await.payload), "hi");
    })
    .await
}

// --- point 8: retained messages for a new wildcard subscriber ---------------------------------

#[tokio::test]
async fn t10_retained_beyond_the_queue_limit_all_arrive() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__MAX_QUEUED_MESSAGES", "100")], &[]).await;
        let mut devices = V3Client::connect(b.mqtt_addr(), "devices").await;
        for i in 0..300u32 {
            devices
                .publish(&format!("status/{i}"), Q3::AtLeastOnce, true, "online")
                .await;
        }
        for (qos, v5) in [(1u8, false), (0, false), (1, true), (0, true)] {
            eprintln!("--- a new status/# subscriber gets all 300 (qos {qos}, v5 {v5})");
            let id = format!("dash-{qos}-{v5}");
            let got: BTreeSet<String> = if v5 {
                let mut c = V5Client::connect(b.mqtt_addr(), &id).await;
                c.subscribe("status/#", q5(qos)).await;
                c.recv_publishes(300).await.iter().map(topic5).collect()
            } else {
                let mut c = V3Client::connect(b.mqtt_addr(), &id).await;
                c.subscribe("status/#", q3(qos)).await;
                c.recv_publishes(300)
                    .await
                    .into_iter()
                    .map(|p| p.topic)
                    .collect()
            };
            assert_eq!(got.len(), 300, "qos {qos} v5 {v5}");
        }
        assert_eq!(
            b.metric_sum("petrel_session_queue_dropped_total").await,
            0.0,
            "nothing dropped"
        );
    })
    .await
}

#[tokio::test]
async fn t10_inbound_qos1_counts_against_receive_maximum() {
    test_timeout(async {
        // fsync: each group commit takes a disk flush, so the PUBACKs of three publishes
        // read at once are all still waiting when the third is decoded.
        let env = [
            ("PETREL_MQTT__RECEIVE_MAXIMUM", "2"),
            ("PETREL_STORAGE__FSYNC", "true"),
        ];
        let b = Broker::start_with(&env, &[]).await;
        // A persistent subscriber: each PUBACK waits for its message's store write.
        let mut sub = V3Client::connect_with(b.mqtt_addr(), "rm-sub", |o| {
            o.set_clean_session(false);
        })
        .await;
        sub.subscribe("rm/t", Q3::AtLeastOnce).await;
        sub.disconnect().await;
        wait_connections(&b, 0).await;
        let three: Vec<u8> = (1..=3u16)
            .flat_map(|id| pkt::publish(true, "rm/t", b"x", 1, id, false, false, &[]))
            .collect();
        eprintln!("--- v5: three QoS 1 publishes in one write, receive maximum 2: 0x93");
        let (mut v5, _) = RawClient::handshake(b.mqtt_addr(), &pkt::Connect::v5("rm-v5")).await;
        v5.send(&three).await;
        let got = v5.expect_closed(WAIT).await;
        let last = got.last().expect("DISCONNECT before close");
        assert_eq!(last.kind, kind::DISCONNECT, "{got:?}");
        assert_eq!(last.disconnect_reason(), 0x93, "{got:?}");
        eprintln!("--- 3.1.1: the same, held back until PUBACKs go out; nothing refused");
        let (mut v3, _) = RawClient::handshake(b.mqtt_addr(), &pkt::Connect::v311("rm-v3")).await;
        let three: Vec<u8> = (1..=3u16)
            .flat_map(|id| pkt::publish(false, "rm/t", b"x", 1, id, false, false, &[]))
            .collect();
        v3.send(&three).await;
        let mut acked = Vec::new();
        while acked.len() < 3 {
            let (ack, _) = v3.expect_kind(kind::PUBACK, WAIT).await;
            acked.push(ack.pkid());
        }
        assert_eq!(acked, [1, 2, 3]);
    })
    .await
}
