//! Issue 2, point 2: connection lifecycle.

use std::time::Instant;

use crate::*;
use pkt::Connect;

#[tokio::test]
async fn v311_connect_connack_and_connection_gauge() {
    test_timeout(async {
        let b = Broker::start().await;
        let c = V3Client::connect(b.mqtt_addr(), "conn-basic").await;
        assert_eq!(c.connack.code, rumqttc::ConnectReturnCode::Success);
        assert!(
            !c.connack.session_present,
            "fresh clean session is not present"
        );
        wait_connections(&b, 1).await;
        assert!(b.metric("petrel_mqtt_connections_total").await >= 1.0);

        eprintln!("--- graceful disconnect lowers the gauge");
        c.disconnect().await;
        wait_connections(&b, 0).await;
    })
    .await
}

#[tokio::test]
async fn mqtt31_connect_subscribe_and_receive() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, ack) = RawClient::handshake(b.mqtt_addr(), &Connect::v31("conn31")).await;
        assert_eq!(ack.connack(), (false, 0));

        raw.send(&pkt::subscribe(false, 1, &[("c31/t", 1)], &[]))
            .await;
        let suback = raw.expect_packet(WAIT, "SUBACK").await;
        assert_eq!(suback.pkid(), 1);
        assert_eq!(suback.suback_codes(false), vec![1]);

        let mut publisher = V3Client::connect(b.mqtt_addr(), "conn31-pub").await;
        publisher
            .publish("c31/t", Q3::AtLeastOnce, false, "hello 3.1")
            .await;
        let p = raw.expect_packet(WAIT, "PUBLISH").await.publish(false);
        assert_eq!(p.topic, "c31/t");
        assert_eq!(p.payload, b"hello 3.1");
        assert_eq!(p.qos, 1);
        assert_ne!(p.pkid, 0, "QoS 1 PUBLISH needs a non-zero packet id");
        raw.send(&pkt::puback(p.pkid)).await;
        raw.ping().await;
    })
    .await
}

#[tokio::test]
async fn v311_empty_client_id_needs_clean_session() {
    test_timeout(async {
        let b = Broker::start().await;

        eprintln!("--- empty id with clean session is accepted");
        let c = V3Client::connect(b.mqtt_addr(), "").await;
        assert_eq!(c.connack.code, rumqttc::ConnectReturnCode::Success);

        eprintln!("--- empty id with clean_session=0: CONNACK 0x02 then close");
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        raw.send(&Connect::v311("").clean(false).encode()).await;
        let got = raw.expect_closed(WAIT).await;
        let ack = got
            .first()
            .unwrap_or_else(|| panic!("no CONNACK before close"));
        assert_eq!(ack.connack(), (false, 0x02), "identifier rejected");
    })
    .await
}

#[tokio::test]
async fn v5_empty_client_id_gets_assigned_identifier() {
    test_timeout(async {
        let b = Broker::start().await;
        let a = V5Client::connect(b.mqtt_addr(), "").await;
        let b2 = V5Client::connect(b.mqtt_addr(), "").await;
        let id_a = a
            .connack_props()
            .assigned_client_identifier
            .expect("CONNACK carries Assigned Client Identifier");
        let id_b = b2
            .connack_props()
            .assigned_client_identifier
            .expect("CONNACK carries Assigned Client Identifier");
        assert!(
            id_a.starts_with("petrel-"),
            "assigned id {id_a:?} uses the prefix"
        );
        assert_ne!(id_a, id_b, "assigned ids are unique");
    })
    .await
}

#[tokio::test]
async fn unsupported_protocol_level_is_refused() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        let mut c = Connect::v311("conn-level6");
        c.level = 6;
        raw.send(&c.encode()).await;
        let got = raw.expect_closed(WAIT).await;
        let ack = got
            .first()
            .unwrap_or_else(|| panic!("no CONNACK before close"));
        let (_, code) = ack.connack();
        assert!(
            code == 0x01 || code == 0x84,
            "CONNACK code {code:#04x}, expected 0x01 (3.x) or 0x84 (v5)"
        );
        b.wait_metric(
            r#"petrel_mqtt_bad_packets_total{reason="protocol_version"}"#,
            WAIT,
            |v| v >= 1.0,
        )
        .await;
    })
    .await
}

#[tokio::test]
async fn wrong_protocol_name_and_reserved_flag_are_refused() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "proto-name").await;

        eprintln!("--- protocol name MQTX");
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        let mut c = Connect::v311("conn-mqtx");
        c.protocol_name = "MQTX".into();
        raw.send(&c.encode()).await;
        for p in raw.expect_closed(WAIT).await {
            if p.kind == kind::CONNACK {
                assert_ne!(p.connack().1, 0, "a bad protocol name must not be accepted");
            }
        }

        eprintln!("--- reserved connect flag set");
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        let mut c = Connect::v311("conn-reserved");
        c.reserved_flag = true;
        raw.send(&c.encode()).await;
        for p in raw.expect_closed(WAIT).await {
            if p.kind == kind::CONNACK {
                assert_ne!(p.connack().1, 0, "reserved flag set must not be accepted");
            }
        }
        bystander.check().await;
    })
    .await
}

/// Connects with `connect` and returns the connection with the instant taken before the
/// CONNECT was sent: the broker's keep-alive clock cannot start before it.
async fn connect_timed(b: &Broker, connect: &Connect) -> (RawClient, RawPacket, Instant) {
    let start = Instant::now();
    let (raw, ack) = RawClient::handshake(b.mqtt_addr(), connect).await;
    (raw, ack, start)
}

/// Closed by the broker, and not before 1.5 x keepalive of silence since `start`. The
/// deadline for the close is generous: a loaded machine may be late, never early.
async fn assert_closed_after_keepalive(
    raw: &mut RawClient,
    start: Instant,
    keepalive: Duration,
) -> Vec<RawPacket> {
    let limit = keepalive.mul_f64(1.5);
    let got = raw.expect_closed(limit + WAIT).await;
    let took = start.elapsed();
    assert!(
        took >= limit,
        "closed after {took:?} of silence, before 1.5 x keepalive {keepalive:?}"
    );
    got
}

#[tokio::test]
async fn keepalive_enforced_v311() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _, start) = connect_timed(&b, &Connect::v311("ka3").keep_alive(1)).await;
        let got = assert_closed_after_keepalive(&mut raw, start, Duration::from_secs(1)).await;
        assert!(
            got.is_empty(),
            "3.1.1 has no DISCONNECT from the server: {got:?}"
        );
        b.wait_metric("petrel_mqtt_keepalive_timeouts_total", WAIT, |v| v >= 1.0)
            .await;
    })
    .await
}

#[tokio::test]
async fn keepalive_enforced_v5_with_disconnect_0x8d() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _, start) = connect_timed(&b, &Connect::v5("ka5").keep_alive(1)).await;
        let got = assert_closed_after_keepalive(&mut raw, start, Duration::from_secs(1)).await;
        let reasons: Vec<u8> = got
            .iter()
            .filter(|p| p.kind == kind::DISCONNECT)
            .map(|p| p.disconnect_reason())
            .collect();
        assert_eq!(
            reasons,
            vec![0x8D],
            "DISCONNECT Keep Alive timeout; got {got:?}"
        );
    })
    .await
}

#[tokio::test]
async fn pings_keep_the_connection_alive() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _) =
            RawClient::handshake(b.mqtt_addr(), &Connect::v311("ka-ping").keep_alive(2)).await;
        // The client's side of keepalive: a PINGREQ every quarter interval, for 4 s, past the
        // broker's 3 s (1.5 x keepalive) of allowed silence; a late tick has 2.5 s to spare.
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        for _ in 0..8 {
            tick.tick().await;
            raw.ping().await;
        }
    })
    .await
}

#[tokio::test]
async fn server_keep_alive_v5_caps_and_is_enforced() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__MAX_KEEP_ALIVE_SECS", "1")], &[]).await;
        let start = Instant::now();
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        raw.send(&Connect::v5("ska").keep_alive(60).encode()).await;
        let ack = raw.expect_packet(WAIT, "CONNACK").await;
        assert_eq!(ack.connack().1, 0);
        let ska = ack
            .connack_props()
            .into_iter()
            .find(|(id, _)| *id == prop::SERVER_KEEP_ALIVE)
            .map(|(_, v)| v);
        assert_eq!(
            ska,
            Some(pkt::PropValue::U16(1)),
            "Server Keep Alive in CONNACK"
        );
        let got = assert_closed_after_keepalive(&mut raw, start, Duration::from_secs(1)).await;
        assert!(
            got.iter()
                .any(|p| p.kind == kind::DISCONNECT && p.disconnect_reason() == 0x8D),
            "DISCONNECT 0x8D; got {got:?}"
        );

        eprintln!("--- rumqttc sees the same cap");
        let c = V5Client::connect(b.mqtt_addr(), "ska-rumqttc").await;
        assert_eq!(c.connack_props().server_keep_alive, Some(1));
    })
    .await
}

#[tokio::test]
async fn default_keep_alive_is_the_clients() {
    test_timeout(async {
        let b = Broker::start().await;
        let c = V5Client::connect(b.mqtt_addr(), "ka-default").await;
        let ska = c.connack_props().server_keep_alive;
        assert!(
            ska.is_none() || ska == Some(30),
            "max_keep_alive_secs = 0 accepts the client's 30 s; got Server Keep Alive {ska:?}"
        );
    })
    .await
}

#[tokio::test]
async fn takeover_v311_closes_the_first_connection() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut first = V3Client::connect(b.mqtt_addr(), "same-id-3").await;
        let mut second = V3Client::connect(b.mqtt_addr(), "same-id-3").await;
        let why = first.wait_closed(WAIT).await;
        eprintln!("first connection ended: {why}");

        eprintln!("--- the new connection works");
        second.subscribe("takeover3/t", Q3::AtLeastOnce).await;
        second
            .publish("takeover3/t", Q3::AtLeastOnce, false, "x")
            .await;
        assert_eq!(second.recv_publish().await.payload, "x".as_bytes());
        wait_connections(&b, 1).await;
    })
    .await
}

#[tokio::test]
async fn takeover_v5_sends_disconnect_0x8e() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut first = V5Client::connect(b.mqtt_addr(), "same-id-5").await;
        let mut second = V5Client::connect(b.mqtt_addr(), "same-id-5").await;
        let (code, _) = first.wait_disconnect(WAIT).await;
        assert_eq!(code, p5::DisconnectReasonCode::SessionTakenOver);

        second.subscribe("takeover5/t", Q5::AtLeastOnce).await;
        second
            .publish("takeover5/t", Q5::AtLeastOnce, false, "x")
            .await;
        assert_eq!(second.recv_publish().await.payload, "x".as_bytes());
        wait_connections(&b, 1).await;
    })
    .await
}

#[tokio::test]
async fn takeover_across_protocol_versions() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut first = V3Client::connect(b.mqtt_addr(), "same-id-mixed").await;
        let _second = V5Client::connect(b.mqtt_addr(), "same-id-mixed").await;
        first.wait_closed(WAIT).await;
        wait_connections(&b, 1).await;
    })
    .await
}

#[tokio::test]
async fn v5_disconnect_normal_closes_cleanly() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("dc5")).await;
        raw.send(&pkt::disconnect_v5(0x00, &[])).await;
        let got = raw.expect_closed(WAIT).await;
        assert!(
            got.is_empty(),
            "nothing is sent after a client's DISCONNECT: {got:?}"
        );
        wait_connections(&b, 0).await;
        assert_eq!(
            b.metric_sum("petrel_mqtt_bad_packets_total").await,
            0.0,
            "a normal DISCONNECT is not a bad packet"
        );
    })
    .await
}

#[tokio::test]
async fn keepalive_zero_disables_the_timeout() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _) =
            RawClient::handshake(b.mqtt_addr(), &Connect::v311("ka0").keep_alive(0)).await;
        raw.expect_silence(Duration::from_millis(2500)).await;
        raw.ping().await;
    })
    .await
}

#[tokio::test]
async fn takeover_with_persistent_session_keeps_the_session() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut first = V3Client::connect_with(b.mqtt_addr(), "to-keep", |o| {
            o.set_clean_session(false);
        })
        .await;
        first.subscribe("to-keep/t", Q3::AtLeastOnce).await;
        let mut second = V3Client::connect_with(b.mqtt_addr(), "to-keep", |o| {
            o.set_clean_session(false);
        })
        .await;
        assert!(
            second.connack.session_present,
            "the session moves to the new connection"
        );
        first.wait_closed(WAIT).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "to-keep-pub").await;
        publ.publish("to-keep/t", Q3::AtLeastOnce, false, "still subscribed")
            .await;
        assert_eq!(
            text(&second.recv_publish().await.payload),
            "still subscribed"
        );
    })
    .await
}

#[tokio::test]
async fn max_connections_limit() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_LIMITS__MAX_CONNECTIONS", "2")], &[]).await;
        let mut a = V3Client::connect(b.mqtt_addr(), "maxconn-a").await;
        let _c = V5Client::connect(b.mqtt_addr(), "maxconn-b").await;
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        raw.send(&Connect::v5("maxconn-c").encode()).await;
        for p in raw.expect_closed(WAIT).await {
            if p.kind == kind::CONNACK {
                assert!(p.connack().1 >= 0x80, "third connection refused: {p:?}");
            }
        }
        a.subscribe("maxconn/t", Q3::AtLeastOnce).await;
        a.publish("maxconn/t", Q3::AtLeastOnce, false, "ok").await;
        a.recv_publish().await;
    })
    .await
}
