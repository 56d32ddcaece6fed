//! Issue 2, point 3: QoS 0, 1 and 2 in both directions.

use std::collections::HashSet;

use crate::*;
use pkt::Connect;

#[tokio::test]
async fn qos_matrix_v311_with_downgrade() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V3Client::connect(b.mqtt_addr(), "qm3-sub").await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "qm3-pub").await;
        let mut filters = Vec::new();
        for s in 0..3u8 {
            for p in 0..3u8 {
                filters.push((format!("qm3/p{p}/s{s}"), q3(s)));
            }
        }
        let refs: Vec<(&str, Q3)> = filters.iter().map(|(f, q)| (f.as_str(), *q)).collect();
        let granted = sub.subscribe_many(&refs).await;
        for ((f, q), g) in refs.iter().zip(granted) {
            assert_eq!(
                g,
                rumqttc::SubscribeReasonCode::Success(*q),
                "granted QoS for {f}"
            );
        }
        for s in 0..3u8 {
            for p in 0..3u8 {
                let topic = format!("qm3/p{p}/s{s}");
                let payload = format!("pub {p} sub {s}");
                publ.publish(&topic, q3(p), false, payload.clone()).await;
                let got = sub.recv_publish().await;
                assert_eq!(got.topic, topic);
                assert_eq!(text(&got.payload), payload);
                assert_eq!(
                    n3(got.qos),
                    p.min(s),
                    "delivered QoS = min(publish, subscription)"
                );
                assert!(!got.retain && !got.dup);
                if got.qos != Q3::AtMostOnce {
                    assert_ne!(got.pkid, 0);
                }
            }
        }
        sub.assert_no_publish_before_marker().await;
        // Counted by QoS (label `qos`): the sum over the labels.
        for family in [
            "petrel_mqtt_messages_received_total",
            "petrel_mqtt_messages_sent_total",
        ] {
            wait_until(&format!("{family} reaches 9"), WAIT, || async {
                let v = b.metric_sum(family).await;
                if v >= 9.0 {
                    Ok(v)
                } else {
                    Err(v)
                }
            })
            .await;
        }
    })
    .await
}

#[tokio::test]
async fn qos_matrix_v5_with_downgrade() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V5Client::connect(b.mqtt_addr(), "qm5-sub").await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "qm5-pub").await;
        for s in 0..3u8 {
            let granted = sub.subscribe(&format!("qm5/+/s{s}"), q5(s)).await;
            assert_eq!(granted, p5::SubscribeReasonCode::Success(q5(s)));
        }
        for s in 0..3u8 {
            for p in 0..3u8 {
                let topic = format!("qm5/p{p}/s{s}");
                let payload = format!("pub {p} sub {s}");
                publ.publish(&topic, q5(p), false, payload.clone()).await;
                let got = sub.recv_publish().await;
                assert_eq!(topic5(&got), topic);
                assert_eq!(text(&got.payload), payload);
                assert_eq!(
                    n5(got.qos),
                    p.min(s),
                    "delivered QoS = min(publish, subscription)"
                );
                assert!(!got.retain && !got.dup);
            }
        }
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn qos_across_protocol_versions() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut s3 = V3Client::connect(b.mqtt_addr(), "x-s3").await;
        let mut s5 = V5Client::connect(b.mqtt_addr(), "x-s5").await;
        s3.subscribe("xver/#", Q3::ExactlyOnce).await;
        s5.subscribe("xver/#", Q5::ExactlyOnce).await;

        let mut p3 = V3Client::connect(b.mqtt_addr(), "x-p3").await;
        p3.publish("xver/from3", Q3::ExactlyOnce, false, "three")
            .await;
        let mut p5c = V5Client::connect(b.mqtt_addr(), "x-p5").await;
        p5c.publish("xver/from5", Q5::ExactlyOnce, false, "five")
            .await;

        for expected in [("xver/from3", "three"), ("xver/from5", "five")] {
            let a = s3.recv_publish().await;
            assert_eq!((a.topic.as_str(), text(&a.payload).as_str()), expected);
            assert_eq!(a.qos, Q3::ExactlyOnce);
            let c = s5.recv_publish().await;
            assert_eq!((topic5(&c).as_str(), text(&c.payload).as_str()), expected);
            assert_eq!(c.qos, Q5::ExactlyOnce);
        }
    })
    .await
}

#[tokio::test]
async fn ordering_of_100_qos1_and_qos2_messages() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V3Client::connect(b.mqtt_addr(), "order-sub").await;
        sub.subscribe("order/1", Q3::AtLeastOnce).await;
        let mut sub5 = V5Client::connect(b.mqtt_addr(), "order-sub5").await;
        sub5.subscribe("order/2", Q5::ExactlyOnce).await;
        let publ = V3Client::connect(b.mqtt_addr(), "order-pub").await;
        let publ5 = V5Client::connect(b.mqtt_addr(), "order-pub5").await;

        eprintln!("--- publish back to back without waiting for acks");
        for i in 0..100 {
            publ.client
                .publish("order/1", Q3::AtLeastOnce, false, format!("{i}"))
                .await
                .expect("queue publish");
            publ5
                .client
                .publish("order/2", Q5::ExactlyOnce, false, format!("{i}"))
                .await
                .expect("queue publish");
        }
        let got: Vec<String> = sub
            .recv_publishes(100)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        let want: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        assert_eq!(got, want, "QoS 1 order");
        let got5: Vec<String> = sub5
            .recv_publishes(100)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(got5, want, "QoS 2 order");
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn unacked_qos1_redelivered_with_dup_after_reconnect_v311() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V3Client::connect_with(b.mqtt_addr(), "dup3", |o| {
            o.set_clean_session(false).set_manual_acks(true);
        })
        .await;
        sub.subscribe("dup3/t", Q3::AtLeastOnce).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "dup3-pub").await;
        publ.publish("dup3/t", Q3::AtLeastOnce, false, "m1").await;
        let first = sub.recv_publish().await;
        assert!(!first.dup, "first delivery has DUP=0");

        eprintln!("--- drop the connection without acking");
        sub.drop_connection();
        wait_connections(&b, 1).await;
        let mut sub = V3Client::connect_with(b.mqtt_addr(), "dup3", |o| {
            o.set_clean_session(false);
        })
        .await;
        assert!(sub.connack.session_present);
        let again = sub.recv_publish().await;
        assert_eq!(text(&again.payload), "m1");
        assert!(
            again.dup,
            "redelivery of an unacknowledged PUBLISH has DUP=1"
        );
        assert_eq!(again.qos, Q3::AtLeastOnce);
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn unacked_qos1_redelivered_with_dup_after_reconnect_v5() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "dup5", |o| {
            o.set_clean_start(false).set_manual_acks(true);
            set_session_expiry(o, 300);
        })
        .await;
        sub.subscribe("dup5/t", Q5::AtLeastOnce).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "dup5-pub").await;
        publ.publish("dup5/t", Q5::AtLeastOnce, false, "m1").await;
        let first = sub.recv_publish().await;
        assert!(!first.dup);

        sub.drop_connection();
        wait_connections(&b, 1).await;
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "dup5", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 300);
        })
        .await;
        assert!(sub.connack.session_present);
        let again = sub.recv_publish().await;
        assert_eq!(text(&again.payload), "m1");
        assert!(again.dup, "redelivery has DUP=1");
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn qos2_pubrel_resent_after_reconnect() {
    test_timeout(async {
        let b = Broker::start().await;
        let connect = Connect::v311("q2rel").clean(false);
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        raw.send(&pkt::subscribe(false, 1, &[("q2rel/t", 2)], &[]))
            .await;
        assert_eq!(
            raw.expect_kind(kind::SUBACK, WAIT)
                .await
                .0
                .suback_codes(false),
            vec![2]
        );

        let mut publ = V3Client::connect(b.mqtt_addr(), "q2rel-pub").await;
        publ.publish("q2rel/t", Q3::ExactlyOnce, false, "once")
            .await;
        let p = raw.expect_kind(kind::PUBLISH, WAIT).await.0.publish(false);
        assert_eq!((p.qos, p.payload.as_slice()), (2, &b"once"[..]));
        raw.send(&pkt::pubrec(p.pkid)).await;
        let rel = raw.expect_kind(kind::PUBREL, WAIT).await.0;
        assert_eq!(rel.pkid(), p.pkid);
        assert_eq!(rel.flags, 0b0010, "PUBREL fixed header flags");

        eprintln!("--- drop before PUBCOMP, reconnect: PUBREL again, not the PUBLISH");
        drop(raw);
        wait_connections(&b, 1).await;
        let (mut raw, ack) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        assert_eq!(ack.connack(), (true, 0));
        let rel = raw.expect_packet(WAIT, "PUBREL").await;
        assert_eq!(
            (rel.kind, rel.pkid()),
            (kind::PUBREL, p.pkid),
            "resent PUBREL: {rel:?}"
        );
        raw.send(&pkt::pubcomp(p.pkid)).await;
        raw.ping().await; // the marker: nothing else (no second PUBREL) before the PINGRESP
    })
    .await
}

#[tokio::test]
async fn qos2_inbound_exactly_once() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V3Client::connect(b.mqtt_addr(), "eo-sub").await;
        sub.subscribe("eo/t", Q3::ExactlyOnce).await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v311("eo-pub")).await;

        eprintln!("--- PUBLISH, duplicate PUBLISH, then PUBREL");
        raw.send(&pkt::publish(
            false,
            "eo/t",
            b"once",
            2,
            10,
            false,
            false,
            &[],
        ))
        .await;
        let rec = raw.expect_packet(WAIT, "PUBREC").await;
        assert_eq!((rec.kind, rec.pkid()), (kind::PUBREC, 10));
        raw.send(&pkt::publish(
            false,
            "eo/t",
            b"once",
            2,
            10,
            false,
            true,
            &[],
        ))
        .await;
        let rec = raw.expect_packet(WAIT, "PUBREC").await;
        assert_eq!((rec.kind, rec.pkid()), (kind::PUBREC, 10));
        raw.send(&pkt::pubrel(10)).await;
        let comp = raw.expect_packet(WAIT, "PUBCOMP").await;
        assert_eq!((comp.kind, comp.pkid()), (kind::PUBCOMP, 10));

        let got = sub.recv_publish().await;
        assert_eq!(text(&got.payload), "once");
        sub.assert_no_publish_before_marker().await;

        eprintln!("--- the packet id is free again: a new message");
        raw.send(&pkt::publish(
            false,
            "eo/t",
            b"twice",
            2,
            10,
            false,
            false,
            &[],
        ))
        .await;
        assert_eq!(raw.expect_packet(WAIT, "PUBREC").await.kind, kind::PUBREC);
        raw.send(&pkt::pubrel(10)).await;
        assert_eq!(raw.expect_packet(WAIT, "PUBCOMP").await.kind, kind::PUBCOMP);
        assert_eq!(text(&sub.recv_publish().await.payload), "twice");
        sub.assert_no_publish_before_marker().await;

        eprintln!("--- PUBREL for an unknown packet id still gets PUBCOMP");
        raw.send(&pkt::pubrel(77)).await;
        let comp = raw.expect_packet(WAIT, "PUBCOMP").await;
        assert_eq!((comp.kind, comp.pkid()), (kind::PUBCOMP, 77));
    })
    .await
}

#[tokio::test]
async fn v5_pubrel_unknown_packet_id_reason_0x92() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("pubrel92")).await;
        raw.send(&pkt::pubrel(99)).await;
        let comp = raw.expect_packet(WAIT, "PUBCOMP").await;
        assert_eq!((comp.kind, comp.pkid()), (kind::PUBCOMP, 99));
        assert_eq!(comp.ack_reason(), 0x92, "Packet Identifier not found");
    })
    .await
}

/// The next PUBLISH on a raw connection (nothing else may come first).
async fn next_publish(raw: &mut RawClient, v5: bool) -> petrel_tests::RawPublish {
    raw.expect_packet(WAIT, "PUBLISH").await.publish(v5)
}

#[tokio::test]
async fn receive_maximum_honoured_outbound_v5() {
    test_timeout(async {
        let b = Broker::start().await;
        let connect = Connect::v5("rm-sub").property(prop::u16(prop::RECEIVE_MAXIMUM, 2));
        let (mut sub, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        sub.send(&pkt::subscribe(true, 1, &[("rm/t", 1)], &[]))
            .await;
        sub.expect_kind(kind::SUBACK, WAIT).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "rm-pub").await;
        for i in 0..5 {
            publ.publish("rm/t", Q5::AtLeastOnce, false, format!("{i}"))
                .await;
        }
        let a = next_publish(&mut sub, true).await;
        let c = next_publish(&mut sub, true).await;
        assert_ne!(a.pkid, c.pkid, "in-flight packet ids are distinct");
        // All five were queued before the PINGREQ: a third PUBLISH would come before PINGRESP.
        sub.ping().await;

        eprintln!("--- each ack opens one slot");
        sub.send(&pkt::puback(a.pkid)).await;
        let d = next_publish(&mut sub, true).await;
        sub.ping().await;
        sub.send(&pkt::puback(c.pkid)).await;
        sub.send(&pkt::puback(d.pkid)).await;
        let e = next_publish(&mut sub, true).await;
        let f = next_publish(&mut sub, true).await;
        let order: Vec<String> = [&a, &c, &d, &e, &f]
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(order, ["0", "1", "2", "3", "4"]);
        sub.send(&pkt::puback(e.pkid)).await;
        sub.send(&pkt::puback(f.pkid)).await;
        sub.ping().await;
    })
    .await
}

#[tokio::test]
async fn inflight_window_v311() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__MAX_INFLIGHT_MESSAGES", "3")], &[]).await;
        let (mut sub, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v311("win-sub")).await;
        sub.send(&pkt::subscribe(false, 1, &[("win/t", 1)], &[]))
            .await;
        sub.expect_kind(kind::SUBACK, WAIT).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "win-pub").await;
        for i in 0..6 {
            publ.publish("win/t", Q3::AtLeastOnce, false, format!("{i}"))
                .await;
        }
        let mut first = Vec::new();
        for _ in 0..3 {
            first.push(next_publish(&mut sub, false).await);
        }
        let ids: HashSet<u16> = first.iter().map(|p| p.pkid).collect();
        assert_eq!(ids.len(), 3, "distinct packet ids in flight: {first:?}");
        assert!(!ids.contains(&0));
        // All six were queued before the PINGREQ: a fourth PUBLISH would come before PINGRESP.
        sub.ping().await;
        for p in &first {
            sub.send(&pkt::puback(p.pkid)).await;
        }
        let mut rest = Vec::new();
        for _ in 0..3 {
            rest.push(next_publish(&mut sub, false).await);
        }
        let all: Vec<String> = first
            .iter()
            .chain(&rest)
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(all, ["0", "1", "2", "3", "4", "5"]);
    })
    .await
}

#[tokio::test]
async fn receive_maximum_exceeded_inbound_disconnects_0x93() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__RECEIVE_MAXIMUM", "2")], &[]).await;
        let (mut raw, ack) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("rmx")).await;
        let rm = ack
            .connack_props()
            .into_iter()
            .find(|(id, _)| *id == prop::RECEIVE_MAXIMUM)
            .map(|(_, v)| v);
        assert_eq!(
            rm,
            Some(pkt::PropValue::U16(2)),
            "Receive Maximum in CONNACK"
        );
        for id in 1..=3u16 {
            raw.send(&pkt::publish(true, "rmx/t", b"x", 2, id, false, false, &[]))
                .await;
        }
        let got = raw.expect_closed(WAIT).await;
        let recs = got.iter().filter(|p| p.kind == kind::PUBREC).count();
        assert_eq!(recs, 2, "the first two are received: {got:?}");
        let last = got.last().expect("DISCONNECT before close");
        assert_eq!(
            last.disconnect_reason(),
            0x93,
            "Receive Maximum exceeded: {got:?}"
        );
    })
    .await
}

#[tokio::test]
async fn max_qos_1_downgrades_grants_and_rejects_qos2_publish() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__MAX_QOS", "1")], &[]).await;
        let mut c = V5Client::connect(b.mqtt_addr(), "maxqos").await;
        assert_eq!(c.connack_props().max_qos, Some(1), "Maximum QoS in CONNACK");
        let granted = c.subscribe("maxqos/t", Q5::ExactlyOnce).await;
        assert_eq!(granted, p5::SubscribeReasonCode::Success(Q5::AtLeastOnce));
        let mut c3 = V3Client::connect(b.mqtt_addr(), "maxqos3").await;
        let granted = c3.subscribe("maxqos/t", Q3::ExactlyOnce).await;
        assert!(
            matches!(
                granted,
                rumqttc::SubscribeReasonCode::Success(Q3::AtLeastOnce | Q3::AtMostOnce)
            ),
            "3.1.1 grant at most 1: {granted:?}"
        );

        eprintln!("--- QoS 2 PUBLISH above Maximum QoS: DISCONNECT 0x9B");
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("maxqos-raw")).await;
        raw.send(&pkt::publish(
            true,
            "maxqos/t",
            b"x",
            2,
            1,
            false,
            false,
            &[],
        ))
        .await;
        let got = raw.expect_closed(WAIT).await;
        let last = got.last().expect("DISCONNECT before close");
        assert_eq!(last.disconnect_reason(), 0x9B, "QoS not supported: {got:?}");
    })
    .await
}

#[tokio::test]
async fn qos2_publish_redelivered_with_dup_when_not_received() {
    test_timeout(async {
        let b = Broker::start().await;
        let connect = Connect::v5("q2dup")
            .clean(false)
            .property(prop::u32(prop::SESSION_EXPIRY, 300));
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        raw.send(&pkt::subscribe(true, 1, &[("q2dup/t", 2)], &[]))
            .await;
        raw.expect_kind(kind::SUBACK, WAIT).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "q2dup-pub").await;
        publ.publish("q2dup/t", Q5::ExactlyOnce, false, "two").await;
        let first = raw.expect_kind(kind::PUBLISH, WAIT).await.0.publish(true);
        assert!(!first.dup);
        drop(raw);
        wait_connections(&b, 1).await;
        let (mut raw, ack) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        assert_eq!(ack.connack(), (true, 0));
        let again = raw.expect_packet(WAIT, "PUBLISH").await.publish(true);
        assert_eq!(
            (again.dup, again.qos, again.pkid, again.payload.as_slice()),
            (true, 2, first.pkid, &b"two"[..]),
            "same packet id, DUP=1"
        );
        raw.send(&pkt::pubrec(again.pkid)).await;
        let rel = raw.expect_packet(WAIT, "PUBREL").await;
        assert_eq!((rel.kind, rel.pkid()), (kind::PUBREL, again.pkid));
        raw.send(&pkt::pubcomp(again.pkid)).await;
        raw.ping().await; // the marker: nothing else (no third copy) before the PINGRESP
    })
    .await
}

#[tokio::test]
async fn large_payloads_pass_intact() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut s5 = V5Client::connect_with(b.mqtt_addr(), "big-s5", |o| {
            o.set_max_packet_size(Some(2 << 20));
        })
        .await;
        s5.subscribe("big/#", Q5::ExactlyOnce).await;
        let mut s3 = V3Client::connect(b.mqtt_addr(), "big-s3").await;
        s3.subscribe("big/#", Q3::ExactlyOnce).await;
        let payload: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut p3 = V3Client::connect(b.mqtt_addr(), "big-p3").await;
        p3.publish("big/three", Q3::AtLeastOnce, false, payload.clone())
            .await;
        let mut p5c = V5Client::connect_with(b.mqtt_addr(), "big-p5", |o| {
            o.set_max_packet_size(Some(2 << 20));
        })
        .await;
        p5c.publish("big/five", Q5::ExactlyOnce, false, payload.clone())
            .await;
        for _ in 0..2 {
            let a = s5.recv_publish().await;
            assert!(
                a.payload.as_ref() == payload.as_slice(),
                "v5 payload intact"
            );
            let c = s3.recv_publish().await;
            assert!(
                c.payload.as_ref() == payload.as_slice(),
                "3.1.1 payload intact"
            );
        }
    })
    .await
}

#[tokio::test]
async fn many_concurrent_publishers() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V5Client::connect(b.mqtt_addr(), "fan-in-sub").await;
        sub.subscribe("fanin/#", Q5::AtLeastOnce).await;
        let mut tasks = Vec::new();
        for c in 0..20 {
            let addr = b.mqtt_addr();
            tasks.push(tokio::spawn(async move {
                let mut p = V3Client::connect(addr, &format!("fan-in-{c}")).await;
                // Order is guaranteed per topic and QoS: one QoS per publisher.
                let qos = q3(1 + (c % 2) as u8);
                for i in 0..25 {
                    p.publish(&format!("fanin/{c}"), qos, false, format!("{i}"))
                        .await;
                }
                p.disconnect().await;
            }));
        }
        let mut per_client: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
        for _ in 0..500 {
            let p = sub.recv_publish().await;
            per_client
                .entry(topic5(&p))
                .or_default()
                .push(text(&p.payload).parse().expect("number"));
        }
        sub.assert_no_publish_before_marker().await;
        for t in tasks {
            t.await.expect("publisher task");
        }
        assert_eq!(per_client.len(), 20);
        let want: Vec<u32> = (0..25).collect();
        for (topic, got) in per_client {
            assert_eq!(got, want, "order per publisher on {topic}");
        }
    })
    .await
}
