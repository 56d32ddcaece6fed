//! Issue 2, point 4: sessions, offline queues, expiry.

use std::time::Instant;

use crate::*;

/// Subscribes `id` with a persistent 3.1.1 session, then disconnects gracefully.
async fn park_v311(b: &Broker, id: &str, filter: &str, qos: Q3) {
    let mut sub = V3Client::connect_with(b.mqtt_addr(), id, |o| {
        o.set_clean_session(false);
    })
    .await;
    sub.subscribe(filter, qos).await;
    sub.disconnect().await;
}

async fn reconnect_v311(b: &Broker, id: &str) -> V3Client {
    V3Client::connect_with(b.mqtt_addr(), id, |o| {
        o.set_clean_session(false);
    })
    .await
}

#[tokio::test]
async fn persistent_session_v311_queues_while_offline() {
    test_timeout(async {
        let b = Broker::start().await;
        park_v311(&b, "ps3", "ps3/t", Q3::ExactlyOnce).await;
        wait_connections(&b, 0).await;

        let mut publ = V3Client::connect(b.mqtt_addr(), "ps3-pub").await;
        publ.publish("ps3/t", Q3::AtLeastOnce, false, "m0").await;
        publ.publish("ps3/t", Q3::AtMostOnce, false, "qos0-not-queued")
            .await;
        publ.publish("ps3/t", Q3::ExactlyOnce, false, "m1").await;
        publ.publish("ps3/t", Q3::AtLeastOnce, false, "m2").await;

        let mut sub = reconnect_v311(&b, "ps3").await;
        assert!(
            sub.connack.session_present,
            "session present after reconnect"
        );
        let got = sub.recv_publishes(3).await;
        let payloads: Vec<String> = got.iter().map(|p| text(&p.payload)).collect();
        assert_eq!(payloads, ["m0", "m1", "m2"], "queued QoS 1/2 in order");
        assert_eq!(got[1].qos, Q3::ExactlyOnce);
        sub.assert_no_publish_before_marker().await;

        eprintln!("--- the subscription survived too");
        publ.publish("ps3/t", Q3::AtLeastOnce, false, "live").await;
        assert_eq!(text(&sub.recv_publish().await.payload), "live");
    })
    .await
}

#[tokio::test]
async fn persistent_session_v5_queues_while_offline() {
    test_timeout(async {
        let b = Broker::start().await;
        let connect = |o: &mut rumqttc::v5::MqttOptions| {
            o.set_clean_start(false);
            set_session_expiry(o, 300);
        };
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "ps5", connect).await;
        assert!(!sub.connack.session_present);
        sub.subscribe("ps5/t", Q5::ExactlyOnce).await;
        sub.disconnect().await;
        wait_connections(&b, 0).await;

        let mut publ = V5Client::connect(b.mqtt_addr(), "ps5-pub").await;
        for (i, q) in [1u8, 2, 1].into_iter().enumerate() {
            publ.publish("ps5/t", q5(q), false, format!("m{i}")).await;
        }
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "ps5", connect).await;
        assert!(sub.connack.session_present);
        let got: Vec<String> = sub
            .recv_publishes(3)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(got, ["m0", "m1", "m2"]);
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn qos0_queued_offline_only_when_enabled() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__QUEUE_QOS0_OFFLINE", "true")], &[]).await;
        park_v311(&b, "q0off", "q0off/t", Q3::AtLeastOnce).await;
        wait_connections(&b, 0).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "q0off-pub").await;
        publ.publish("q0off/t", Q3::AtMostOnce, false, "zero").await;
        publ.publish("q0off/t", Q3::AtLeastOnce, false, "one").await;
        let mut sub = reconnect_v311(&b, "q0off").await;
        let got = sub.recv_publishes(2).await;
        assert_eq!(text(&got[0].payload), "zero");
        assert_eq!(got[0].qos, Q3::AtMostOnce);
        assert_eq!(text(&got[1].payload), "one");
    })
    .await
}

#[tokio::test]
async fn clean_session_discards_state_v311() {
    test_timeout(async {
        let b = Broker::start().await;
        park_v311(&b, "cs3", "cs3/t", Q3::AtLeastOnce).await;
        wait_connections(&b, 0).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "cs3-pub").await;
        publ.publish("cs3/t", Q3::AtLeastOnce, false, "queued")
            .await;

        eprintln!("--- clean_session=1 discards the stored session and its queue");
        let mut clean = V3Client::connect(b.mqtt_addr(), "cs3").await;
        assert!(!clean.connack.session_present);
        clean.assert_no_publish_before_marker().await;
        publ.publish("cs3/t", Q3::AtLeastOnce, false, "after").await;
        clean.assert_no_publish_before_marker().await;
        clean.disconnect().await;
        wait_connections(&b, 1).await;

        eprintln!("--- the clean session ended with the connection");
        let again = reconnect_v311(&b, "cs3").await;
        assert!(!again.connack.session_present);
    })
    .await
}

#[tokio::test]
async fn clean_start_discards_state_v5() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "cs5", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 300);
        })
        .await;
        sub.subscribe("cs5/t", Q5::AtLeastOnce).await;
        sub.disconnect().await;
        wait_connections(&b, 0).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "cs5-pub").await;
        publ.publish("cs5/t", Q5::AtLeastOnce, false, "queued")
            .await;

        let mut fresh = V5Client::connect_with(b.mqtt_addr(), "cs5", |o| {
            o.set_clean_start(true);
            set_session_expiry(o, 300);
        })
        .await;
        assert!(
            !fresh.connack.session_present,
            "clean start discards the session"
        );
        fresh.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn v5_session_expiry_zero_ends_session_at_disconnect() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "se0", |o| {
            o.set_clean_start(false);
        })
        .await;
        sub.subscribe("se0/t", Q5::AtLeastOnce).await;
        sub.disconnect().await;
        let again = V5Client::connect_with(b.mqtt_addr(), "se0", |o| {
            o.set_clean_start(false);
        })
        .await;
        assert!(
            !again.connack.session_present,
            "no Session Expiry Interval means 0"
        );
    })
    .await
}

#[tokio::test]
async fn v5_session_expiry_removes_session() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "se1", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 1);
        })
        .await;
        sub.subscribe("se1/t", Q5::AtLeastOnce).await;
        sub.disconnect().await;
        wait_connections(&b, 0).await;
        let gone_from = Instant::now();
        assert_eq!(
            b.metric("petrel_sessions").await,
            1.0,
            "session kept after disconnect"
        );

        eprintln!("--- wait for the 1 s expiry");
        b.wait_metric("petrel_sessions", WAIT, |v| v == 0.0).await;
        assert!(
            gone_from.elapsed() >= Duration::from_millis(900),
            "session removed after {:?}, before its 1 s expiry",
            gone_from.elapsed()
        );
        let mut publ = V5Client::connect(b.mqtt_addr(), "se1-pub").await;
        publ.publish("se1/t", Q5::AtLeastOnce, false, "lost").await;

        let mut again = V5Client::connect_with(b.mqtt_addr(), "se1", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 60);
        })
        .await;
        assert!(!again.connack.session_present, "expired session is gone");
        again.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn queue_limit_drop_newest() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__MAX_QUEUED_MESSAGES", "5")], &[]).await;
        park_v311(&b, "qn", "qn/t", Q3::AtLeastOnce).await;
        wait_connections(&b, 0).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "qn-pub").await;
        for i in 0..10 {
            publ.publish("qn/t", Q3::AtLeastOnce, false, format!("m{i}"))
                .await;
        }
        b.wait_metric(
            r#"petrel_session_queue_dropped_total{reason="queue_full"}"#,
            WAIT,
            |v| v >= 5.0,
        )
        .await;
        let mut sub = reconnect_v311(&b, "qn").await;
        let got: Vec<String> = sub
            .recv_publishes(5)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(
            got,
            ["m0", "m1", "m2", "m3", "m4"],
            "drop-newest keeps the oldest"
        );
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn queue_limit_drop_oldest() {
    test_timeout(async {
        let b = Broker::start_with(
            &[
                ("PETREL_MQTT__MAX_QUEUED_MESSAGES", "5"),
                ("PETREL_MQTT__QUEUE_OVERFLOW", "drop-oldest"),
            ],
            &[],
        )
        .await;
        park_v311(&b, "qo", "qo/t", Q3::AtLeastOnce).await;
        wait_connections(&b, 0).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "qo-pub").await;
        for i in 0..10 {
            publ.publish("qo/t", Q3::AtLeastOnce, false, format!("m{i}"))
                .await;
        }
        b.wait_metric(
            r#"petrel_session_queue_dropped_total{reason="queue_full"}"#,
            WAIT,
            |v| v >= 5.0,
        )
        .await;
        let mut sub = reconnect_v311(&b, "qo").await;
        let got: Vec<String> = sub
            .recv_publishes(5)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(
            got,
            ["m5", "m6", "m7", "m8", "m9"],
            "drop-oldest keeps the newest"
        );
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn v5_message_expiry_while_queued() {
    test_timeout(async {
        let b = Broker::start().await;
        let connect = |o: &mut rumqttc::v5::MqttOptions| {
            o.set_clean_start(false);
            set_session_expiry(o, 300);
        };
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "mexp", connect).await;
        sub.subscribe("mexp/t", Q5::AtLeastOnce).await;
        sub.disconnect().await;
        wait_connections(&b, 0).await;

        let mut publ = V5Client::connect(b.mqtt_addr(), "mexp-pub").await;
        let with_expiry = |secs| p5::PublishProperties {
            message_expiry_interval: Some(secs),
            ..Default::default()
        };
        publ.publish_with("mexp/t", Q5::AtLeastOnce, false, "short", with_expiry(1))
            .await;
        publ.publish_with("mexp/t", Q5::AtLeastOnce, false, "long", with_expiry(100))
            .await;
        publ.publish("mexp/t", Q5::AtLeastOnce, false, "forever")
            .await;

        eprintln!("--- let the short expiry pass while the subscriber is offline");
        let_time_pass(Duration::from_millis(2100)).await;
        let mut sub = V5Client::connect_with(b.mqtt_addr(), "mexp", connect).await;
        assert!(sub.connack.session_present);
        let long = sub.recv_publish().await;
        assert_eq!(
            text(&long.payload),
            "long",
            "the expired message is never delivered"
        );
        let remaining = long
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .expect("delivered message carries the remaining expiry");
        assert!(
            (90..=98).contains(&remaining),
            "remaining expiry {remaining} = 100 minus ~2 s waiting"
        );
        let forever = sub.recv_publish().await;
        assert_eq!(text(&forever.payload), "forever");
        assert_eq!(
            forever
                .properties
                .as_ref()
                .and_then(|p| p.message_expiry_interval),
            None,
            "no expiry stays no expiry"
        );
        sub.assert_no_publish_before_marker().await;
        b.wait_metric(
            r#"petrel_session_queue_dropped_total{reason="expired"}"#,
            WAIT,
            |v| v >= 1.0,
        )
        .await;
    })
    .await
}

#[tokio::test]
async fn sessions_and_subscriptions_gauges() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut c = V3Client::connect_with(b.mqtt_addr(), "gauges", |o| {
            o.set_clean_session(false);
        })
        .await;
        c.subscribe_many(&[("g/a", Q3::AtMostOnce), ("g/b/#", Q3::AtLeastOnce)])
            .await;
        b.wait_metric("petrel_subscriptions", WAIT, |v| v == 2.0)
            .await;
        b.wait_metric("petrel_sessions", WAIT, |v| v == 1.0).await;
        c.unsubscribe("g/a").await;
        b.wait_metric("petrel_subscriptions", WAIT, |v| v == 1.0)
            .await;
        c.disconnect().await;
        wait_connections(&b, 0).await;
        assert_eq!(
            b.metric("petrel_sessions").await,
            1.0,
            "persistent session stays"
        );

        eprintln!("--- clean session removes it");
        let c = V3Client::connect(b.mqtt_addr(), "gauges").await;
        c.disconnect().await;
        b.wait_metric("petrel_sessions", WAIT, |v| v == 0.0).await;
        b.wait_metric("petrel_subscriptions", WAIT, |v| v == 0.0)
            .await;
    })
    .await
}

#[tokio::test]
async fn v5_disconnect_can_shorten_session_expiry() {
    test_timeout(async {
        use pkt::Connect;
        let b = Broker::start().await;
        let connect = Connect::v5("dse")
            .clean(false)
            .property(prop::u32(prop::SESSION_EXPIRY, 300));
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        raw.send(&pkt::subscribe(true, 1, &[("dse/t", 1)], &[]))
            .await;
        raw.expect_kind(kind::SUBACK, WAIT).await;
        raw.send(&pkt::disconnect_v5(
            0x00,
            &[prop::u32(prop::SESSION_EXPIRY, 0)],
        ))
        .await;
        raw.expect_closed(WAIT).await;
        let (_, ack) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        assert_eq!(
            ack.connack(),
            (false, 0),
            "expiry 0 at DISCONNECT ended the session"
        );
    })
    .await
}

#[tokio::test]
async fn v5_disconnect_cannot_set_expiry_after_zero() {
    test_timeout(async {
        use pkt::Connect;
        let b = Broker::start().await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("dse0")).await;
        raw.send(&pkt::disconnect_v5(
            0x00,
            &[prop::u32(prop::SESSION_EXPIRY, 300)],
        ))
        .await;
        let got = raw.expect_closed(WAIT).await;
        assert_eq!(
            got.last().map(RawPacket::disconnect_reason),
            Some(0x82),
            "non-zero expiry in DISCONNECT after 0 in CONNECT is a protocol error: {got:?}"
        );
        let (_, ack) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("dse0").clean(false)).await;
        assert_eq!(
            ack.connack(),
            (false, 0),
            "the session did not become persistent"
        );
    })
    .await
}

#[tokio::test]
async fn session_expiry_max_caps_the_clients_request() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__SESSION_EXPIRY_MAX_SECS", "1")], &[]).await;
        let c = V5Client::connect_with(b.mqtt_addr(), "cap", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 300);
        })
        .await;
        assert_eq!(
            c.connack_props().session_expiry_interval,
            Some(1),
            "CONNACK tells the client the capped Session Expiry Interval"
        );
        c.disconnect().await;
        b.wait_metric("petrel_sessions", WAIT, |v| v == 0.0).await;
    })
    .await
}

#[tokio::test]
async fn persistent_session_expiry_applies_to_v311() {
    test_timeout(async {
        let b =
            Broker::start_with(&[("PETREL_MQTT__PERSISTENT_SESSION_EXPIRY_SECS", "1")], &[]).await;
        park_v311(&b, "pse", "pse/t", Q3::AtLeastOnce).await;
        wait_connections(&b, 0).await;
        let gone = Instant::now();
        b.wait_metric("petrel_sessions", WAIT, |v| v == 0.0).await;
        assert!(
            gone.elapsed() >= Duration::from_millis(900),
            "expired too early"
        );
        let again = reconnect_v311(&b, "pse").await;
        assert!(!again.connack.session_present);
    })
    .await
}

#[tokio::test]
async fn redelivery_before_queued_messages_in_order() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V3Client::connect_with(b.mqtt_addr(), "redo", |o| {
            o.set_clean_session(false).set_manual_acks(true);
        })
        .await;
        sub.subscribe("redo/t", Q3::AtLeastOnce).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "redo-pub").await;
        publ.publish("redo/t", Q3::AtLeastOnce, false, "m0").await;
        publ.publish("redo/t", Q3::AtLeastOnce, false, "m1").await;
        sub.recv_publishes(2).await;
        sub.drop_connection();
        wait_connections(&b, 1).await;
        publ.publish("redo/t", Q3::AtLeastOnce, false, "m2").await;
        publ.publish("redo/t", Q3::AtLeastOnce, false, "m3").await;
        let mut sub = reconnect_v311(&b, "redo").await;
        let got: Vec<(String, bool)> = sub
            .recv_publishes(4)
            .await
            .iter()
            .map(|p| (text(&p.payload), p.dup))
            .collect();
        let want: Vec<(String, bool)> = [("m0", true), ("m1", true), ("m2", false), ("m3", false)]
            .iter()
            .map(|(m, d)| (m.to_string(), *d))
            .collect();
        assert_eq!(got, want, "unacknowledged first, in order, then the queue");
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn queue_limit_applies_to_online_slow_consumer() {
    test_timeout(async {
        let b = Broker::start_with(
            &[
                ("PETREL_MQTT__MAX_INFLIGHT_MESSAGES", "1"),
                ("PETREL_MQTT__MAX_QUEUED_MESSAGES", "2"),
            ],
            &[],
        )
        .await;
        let mut sub = V3Client::connect_with(b.mqtt_addr(), "slow", |o| {
            o.set_manual_acks(true);
        })
        .await;
        sub.subscribe("slow/t", Q3::AtLeastOnce).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "slow-pub").await;
        for i in 0..6 {
            publ.publish("slow/t", Q3::AtLeastOnce, false, format!("m{i}"))
                .await;
        }
        let first = sub.recv_publish().await;
        assert_eq!(text(&first.payload), "m0");
        b.wait_metric(
            r#"petrel_session_queue_dropped_total{reason="queue_full"}"#,
            WAIT,
            |v| v >= 3.0,
        )
        .await;
        let mut got = vec![text(&first.payload)];
        sub.ack(&first).await;
        for _ in 0..2 {
            let p = sub.recv_publish().await;
            got.push(text(&p.payload));
            sub.ack(&p).await;
        }
        sub.assert_no_publish_before_marker().await;
        assert_eq!(
            got,
            ["m0", "m1", "m2"],
            "one in flight + two queued, newest dropped"
        );
    })
    .await
}

#[tokio::test]
async fn takeover_moves_unacknowledged_messages_v5() {
    test_timeout(async {
        let b = Broker::start().await;
        let opts = |o: &mut rumqttc::v5::MqttOptions| {
            o.set_clean_start(false).set_manual_acks(true);
            set_session_expiry(o, 300);
        };
        let mut first = V5Client::connect_with(b.mqtt_addr(), "tomove", opts).await;
        first.subscribe("tomove/t", Q5::AtLeastOnce).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "tomove-pub").await;
        publ.publish("tomove/t", Q5::AtLeastOnce, false, "inflight")
            .await;
        let p = first.recv_publish().await;
        assert!(!p.dup);
        let mut second = V5Client::connect_with(b.mqtt_addr(), "tomove", opts).await;
        assert!(second.connack.session_present);
        let (code, _) = first.wait_disconnect(WAIT).await;
        assert_eq!(code, p5::DisconnectReasonCode::SessionTakenOver);
        let again = second.recv_publish().await;
        assert_eq!(
            (text(&again.payload).as_str(), again.dup),
            ("inflight", true)
        );
        second.ack(&again).await;
        publ.publish("tomove/t", Q5::AtLeastOnce, false, "next")
            .await;
        let next = second.recv_publish().await;
        assert_eq!(text(&next.payload), "next");
    })
    .await
}
