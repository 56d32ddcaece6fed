//! Issue 2, point 8: v5 passthrough and limits.

use crate::*;
use pkt::{Connect, PropValue};

#[tokio::test]
async fn publish_properties_forwarded_intact() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V5Client::connect(b.mqtt_addr(), "pass-sub").await;
        sub.subscribe("pass/t", Q5::AtLeastOnce).await;
        let mut sub3 = V3Client::connect(b.mqtt_addr(), "pass-sub3").await;
        sub3.subscribe("pass/t", Q3::AtLeastOnce).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "pass-pub").await;
        let user = vec![
            ("k1".to_string(), "v1".to_string()),
            ("k2".to_string(), "ü ∑".to_string()),
            ("k1".to_string(), "v3".to_string()),
        ];
        let props = p5::PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(100),
            content_type: Some("application/json".into()),
            response_topic: Some("pass/reply".into()),
            correlation_data: Some(vec![0u8, 1, 2, 255].into()),
            user_properties: user.clone(),
            ..Default::default()
        };
        publ.publish_with("pass/t", Q5::AtLeastOnce, false, "{\"a\":1}", props)
            .await;
        let p = sub.recv_publish().await;
        assert_eq!(text(&p.payload), "{\"a\":1}");
        let got = p.properties.expect("properties forwarded");
        assert_eq!(got.payload_format_indicator, Some(1));
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        assert_eq!(got.response_topic.as_deref(), Some("pass/reply"));
        assert_eq!(got.correlation_data.as_deref(), Some(&[0u8, 1, 2, 255][..]));
        assert_eq!(
            got.user_properties, user,
            "user properties in order, duplicates kept"
        );
        let left = got.message_expiry_interval.expect("expiry forwarded");
        assert!((95..=100).contains(&left), "remaining expiry {left}");
        assert_eq!(got.topic_alias, None);

        let p3 = sub3.recv_publish().await;
        assert_eq!(
            text(&p3.payload),
            "{\"a\":1}",
            "3.1.1 subscriber gets the payload"
        );
    })
    .await
}

#[tokio::test]
async fn request_response_pattern() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut responder = V5Client::connect(b.mqtt_addr(), "rr-responder").await;
        responder.subscribe("rr/req", Q5::AtLeastOnce).await;
        let mut requester = V5Client::connect_with(b.mqtt_addr(), "rr-requester", |o| {
            o.set_request_response_info(Some(1));
        })
        .await;
        if let Some(info) = requester.connack_props().response_information {
            assert!(
                !info.is_empty(),
                "Response Information, when sent, is a topic prefix"
            );
        }
        requester.subscribe("rr/resp/me", Q5::AtLeastOnce).await;
        requester
            .publish_with(
                "rr/req",
                Q5::AtLeastOnce,
                false,
                "question",
                p5::PublishProperties {
                    response_topic: Some("rr/resp/me".into()),
                    correlation_data: Some(b"id-42".to_vec().into()),
                    ..Default::default()
                },
            )
            .await;
        let req = responder.recv_publish().await;
        let props = req.properties.expect("request properties");
        let reply_to = props.response_topic.expect("response topic");
        responder
            .publish_with(
                &reply_to,
                Q5::AtLeastOnce,
                false,
                "answer",
                p5::PublishProperties {
                    correlation_data: props.correlation_data,
                    ..Default::default()
                },
            )
            .await;
        let resp = requester.recv_publish().await;
        assert_eq!(text(&resp.payload), "answer");
        assert_eq!(
            resp.properties.and_then(|p| p.correlation_data).as_deref(),
            Some(&b"id-42"[..])
        );

        eprintln!("--- Request Response Information 0: none in CONNACK");
        let c = V5Client::connect_with(b.mqtt_addr(), "rr-none", |o| {
            o.set_request_response_info(Some(0));
        })
        .await;
        assert_eq!(c.connack_props().response_information, None);
    })
    .await
}

#[tokio::test]
async fn connack_advertises_limits() {
    test_timeout(async {
        let b = Broker::start().await;
        let c = V5Client::connect(b.mqtt_addr(), "limits").await;
        let p = c.connack_props();
        assert_eq!(p.receive_max, Some(128), "Receive Maximum");
        assert_eq!(p.topic_alias_max, Some(64), "Topic Alias Maximum");
        assert_eq!(p.max_packet_size, Some(1_048_576), "Maximum Packet Size");
        assert!(
            matches!(p.max_qos, None | Some(2)),
            "Maximum QoS {:?}",
            p.max_qos
        );
        assert!(matches!(p.retain_available, None | Some(1)));
        assert!(matches!(p.wildcard_subscription_available, None | Some(1)));
        assert!(matches!(p.shared_subscription_available, None | Some(1)));

        let b2 = Broker::start_with(
            &[
                ("PETREL_MQTT__MAX_PACKET_SIZE_BYTES", "2048"),
                ("PETREL_MQTT__RECEIVE_MAXIMUM", "7"),
                ("PETREL_MQTT__TOPIC_ALIAS_MAXIMUM", "3"),
            ],
            &[],
        )
        .await;
        let c = V5Client::connect(b2.mqtt_addr(), "limits2").await;
        let p = c.connack_props();
        assert_eq!(p.max_packet_size, Some(2048));
        assert_eq!(p.receive_max, Some(7));
        assert_eq!(p.topic_alias_max, Some(3));
    })
    .await
}

#[tokio::test]
async fn broker_never_sends_more_than_client_maximum_packet_size() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut small = V5Client::connect_with(b.mqtt_addr(), "mps-small", |o| {
            o.set_max_packet_size(Some(256));
        })
        .await;
        small.subscribe("mps/#", Q5::AtLeastOnce).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "mps-pub").await;
        publ.publish("mps/big", Q5::AtLeastOnce, false, vec![b'x'; 1000])
            .await;
        publ.publish("mps/small", Q5::AtLeastOnce, false, "fits")
            .await;
        // rumqttc ends the connection if a packet above 256 bytes arrives.
        let p = small.recv_publish().await;
        assert_eq!(
            (topic5(&p).as_str(), text(&p.payload).as_str()),
            ("mps/small", "fits"),
            "the oversize message is dropped for this client"
        );
        small.assert_no_publish_before_marker().await;
        b.wait_metric(
            r#"petrel_session_queue_dropped_total{reason="too_large"}"#,
            WAIT,
            |v| v >= 1.0,
        )
        .await;
    })
    .await
}

#[tokio::test]
async fn reason_strings_only_when_requested() {
    test_timeout(async {
        let b = Broker::start().await;
        let connect = Connect::v5("noproblem").property(prop::byte(prop::REQUEST_PROBLEM_INFO, 0));
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        raw.send(&pkt::subscribe(true, 1, &[("bad/#/filter", 1)], &[]))
            .await;
        let (ack, _) = raw.expect_kind(kind::SUBACK, WAIT).await;
        assert_eq!(ack.suback_codes(true), vec![0x8F]);
        let props = ack.suback_props();
        assert!(
            !props
                .iter()
                .any(|(id, _)| *id == prop::REASON_STRING || *id == prop::USER_PROPERTY),
            "Request Problem Information 0: no Reason String/User Property on SUBACK: {props:?}"
        );
        raw.send(&pkt::publish(
            true,
            "nobody/listens",
            b"x",
            1,
            3,
            false,
            false,
            &[],
        ))
        .await;
        let (puback, _) = raw.expect_kind(kind::PUBACK, WAIT).await;
        assert_eq!(puback.pkid(), 3);
        if puback.body.len() > 3 {
            let (len, n) = pkt::read_varint(&puback.body[3..]).expect("property length");
            let props = pkt::parse_props(&puback.body[3 + n..3 + n + len]).expect("props");
            assert!(
                !props
                    .iter()
                    .any(|(id, v)| *id == prop::REASON_STRING || matches!(v, PropValue::Pair(..))),
                "no Reason String/User Property on PUBACK: {props:?}"
            );
        }
    })
    .await
}

#[tokio::test]
async fn retain_unavailable_is_advertised_and_enforced() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__RETAIN_AVAILABLE", "false")], &[]).await;
        let c = V5Client::connect(b.mqtt_addr(), "noretain").await;
        assert_eq!(c.connack_props().retain_available, Some(0));
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("noretain-raw")).await;
        raw.send(&pkt::publish(
            true,
            "noretain/t",
            b"x",
            0,
            0,
            true,
            false,
            &[],
        ))
        .await;
        let got = raw.expect_closed(WAIT).await;
        assert_eq!(
            got.last().map(RawPacket::disconnect_reason),
            Some(0x9A),
            "Retain not supported: {got:?}"
        );
    })
    .await
}
