//! Issue 2, point 6: retained messages.

use std::collections::BTreeSet;

use crate::*;

#[tokio::test]
async fn retained_set_replace_clear() {
    test_timeout(async {
        // No $SYS, so the retained gauge counts only this test's messages.
        let b = Broker::start_with(&[("PETREL_MQTT__SYS_INTERVAL_SECS", "0")], &[]).await;
        // Every node holds the replicated retained store and counts it.
        let replicas = b.nodes() as f64;
        let mut publ = V3Client::connect(b.mqtt_addr(), "ret-pub").await;
        publ.publish("ret/t", Q3::AtLeastOnce, true, "one").await;
        b.wait_metric("petrel_retained_messages", WAIT, |v| v == replicas)
            .await;

        eprintln!("--- a new subscriber gets the retained message with RETAIN=1");
        let mut s1 = V3Client::connect(b.mqtt_addr(), "ret-s1").await;
        s1.subscribe("ret/t", Q3::AtLeastOnce).await;
        let p = s1.recv_publish().await;
        assert_eq!((text(&p.payload).as_str(), p.retain), ("one", true));

        eprintln!("--- replace: live subscribers see RETAIN=0, new ones the new value");
        publ.publish("ret/t", Q3::AtLeastOnce, true, "two").await;
        let p = s1.recv_publish().await;
        assert_eq!((text(&p.payload).as_str(), p.retain), ("two", false));
        let mut s2 = V3Client::connect(b.mqtt_addr(), "ret-s2").await;
        s2.subscribe("ret/t", Q3::AtLeastOnce).await;
        let p = s2.recv_publish().await;
        assert_eq!((text(&p.payload).as_str(), p.retain), ("two", true));
        s2.assert_no_publish_before_marker().await;
        assert_eq!(b.metric("petrel_retained_messages").await, replicas);

        eprintln!("--- clear with an empty retained payload");
        publ.publish("ret/t", Q3::AtLeastOnce, true, "").await;
        let p = s1.recv_publish().await;
        assert!(
            p.payload.is_empty(),
            "the empty message is forwarded to subscribers"
        );
        let mut s3 = V3Client::connect(b.mqtt_addr(), "ret-s3").await;
        s3.subscribe("ret/t", Q3::AtLeastOnce).await;
        s3.assert_no_publish_before_marker().await;
        b.wait_metric("petrel_retained_messages", WAIT, |v| v == 0.0)
            .await;
    })
    .await
}

#[tokio::test]
async fn retained_delivered_to_wildcard_subscriptions() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "retw-pub").await;
        for t in ["rw/1", "rw/2", "rw/x/3", "rwother", "rw"] {
            publ.publish(t, Q3::AtLeastOnce, true, t).await;
        }
        let mut plus = V3Client::connect(b.mqtt_addr(), "retw-plus").await;
        plus.subscribe("rw/+", Q3::AtLeastOnce).await;
        let mut got = BTreeSet::new();
        for _ in 0..2 {
            let p = plus.recv_publish().await;
            assert!(p.retain, "retained delivery on subscribe has RETAIN=1");
            got.insert(p.topic);
        }
        plus.assert_no_publish_before_marker().await;
        assert_eq!(
            got,
            BTreeSet::from(["rw/1".to_string(), "rw/2".to_string()])
        );

        let mut hash = V5Client::connect(b.mqtt_addr(), "retw-hash").await;
        hash.subscribe("rw/#", Q5::AtLeastOnce).await;
        let mut got = BTreeSet::new();
        for _ in 0..4 {
            let p = hash.recv_publish().await;
            assert!(p.retain);
            got.insert(topic5(&p));
        }
        hash.assert_no_publish_before_marker().await;
        let want: BTreeSet<String> = ["rw", "rw/1", "rw/2", "rw/x/3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(got, want, "'rw/#' also matches 'rw'");
    })
    .await
}

#[tokio::test]
async fn retained_delivery_downgrades_qos() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "retq-pub").await;
        publ.publish("retq/t", Q3::AtLeastOnce, true, "q1").await;
        let mut s0 = V3Client::connect(b.mqtt_addr(), "retq-0").await;
        s0.subscribe("retq/t", Q3::AtMostOnce).await;
        assert_eq!(s0.recv_publish().await.qos, Q3::AtMostOnce);
        let mut s2 = V3Client::connect(b.mqtt_addr(), "retq-2").await;
        s2.subscribe("retq/t", Q3::ExactlyOnce).await;
        assert_eq!(
            s2.recv_publish().await.qos,
            Q3::AtLeastOnce,
            "stored QoS 1 stays 1"
        );
    })
    .await
}

#[tokio::test]
async fn retain_handling_options() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "rh-pub").await;
        publ.publish("rh/t", Q5::AtLeastOnce, true, "kept").await;
        let with_rule = |rule: p5::RetainForwardRule| {
            vec![filter("rh/t", Q5::AtLeastOnce, move |f| {
                f.retain_forward_rule = rule
            })]
        };

        eprintln!("--- 0: on every subscribe");
        let mut c0 = V5Client::connect(b.mqtt_addr(), "rh-0").await;
        c0.subscribe_with(with_rule(p5::RetainForwardRule::OnEverySubscribe), None)
            .await;
        assert_eq!(text(&c0.recv_publish().await.payload), "kept");
        c0.subscribe_with(with_rule(p5::RetainForwardRule::OnEverySubscribe), None)
            .await;
        assert_eq!(
            text(&c0.recv_publish().await.payload),
            "kept",
            "again on resubscribe"
        );

        eprintln!("--- 1: only for a new subscription");
        let mut c1 = V5Client::connect(b.mqtt_addr(), "rh-1").await;
        c1.subscribe_with(with_rule(p5::RetainForwardRule::OnNewSubscribe), None)
            .await;
        assert_eq!(text(&c1.recv_publish().await.payload), "kept");
        c1.subscribe_with(with_rule(p5::RetainForwardRule::OnNewSubscribe), None)
            .await;
        c1.assert_no_publish_before_marker().await;

        eprintln!("--- 2: never");
        let mut c2 = V5Client::connect(b.mqtt_addr(), "rh-2").await;
        c2.subscribe_with(with_rule(p5::RetainForwardRule::Never), None)
            .await;
        c2.assert_no_publish_before_marker().await;
        publ.publish("rh/t", Q5::AtLeastOnce, false, "live").await;
        assert_eq!(
            text(&c2.recv_publish().await.payload),
            "live",
            "subscription works"
        );
    })
    .await
}

#[tokio::test]
async fn retained_message_expiry_v5() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "rexp-pub").await;
        let expiry = |s| p5::PublishProperties {
            message_expiry_interval: Some(s),
            ..Default::default()
        };
        publ.publish_with("rexp/short", Q5::AtLeastOnce, true, "short", expiry(1))
            .await;
        publ.publish_with("rexp/long", Q5::AtLeastOnce, true, "long", expiry(100))
            .await;
        let_time_pass(Duration::from_millis(2100)).await;
        let mut sub = V5Client::connect(b.mqtt_addr(), "rexp-sub").await;
        sub.subscribe("rexp/+", Q5::AtLeastOnce).await;
        let p = sub.recv_publish().await;
        assert_eq!(
            text(&p.payload),
            "long",
            "expired retained message not delivered"
        );
        let left = p
            .properties
            .as_ref()
            .and_then(|x| x.message_expiry_interval)
            .expect("remaining expiry sent");
        assert!((90..=98).contains(&left), "remaining expiry {left}");
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn retained_messages_follow_the_suback() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "ret-order-pub").await;
        publ.publish("ret-order/t", Q3::AtLeastOnce, true, "kept")
            .await;
        for v5 in [false, true] {
            let mut raw = RawClient::connect(b.mqtt_addr()).await;
            let id = format!("ret-order-{v5}");
            let connect = match v5 {
                true => pkt::Connect::v5(&id),
                false => pkt::Connect::v311(&id),
            };
            raw.send(&connect.encode()).await;
            raw.expect_packet(WAIT, "CONNACK").await;
            raw.send(&pkt::subscribe(v5, 1, &[("ret-order/#", 1)], &[]))
                .await;
            // The SUBACK may wait for the store or the cluster; the retained message waits
            // for it (a client that sees PUBLISH before SUBACK may drop it).
            let first = raw.expect_packet(WAIT, "SUBACK").await;
            assert_eq!(first.kind, kind::SUBACK, "v5={v5}: {first:?}");
            let second = raw.expect_packet(WAIT, "the retained PUBLISH").await;
            assert_eq!(second.kind, kind::PUBLISH, "v5={v5}: {second:?}");
        }
    })
    .await
}
