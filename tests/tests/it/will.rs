//! Issue 2, point 7: will messages.

use std::time::Instant;

use crate::*;
use pkt::{Connect, Will};

async fn watcher(b: &Broker, id: &str, filter: &str) -> V3Client {
    let mut w = V3Client::connect(b.mqtt_addr(), id).await;
    w.subscribe(filter, Q3::AtLeastOnce).await;
    w
}

#[tokio::test]
async fn will_published_on_socket_loss() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = watcher(&b, "will-loss-w", "will/loss").await;
        let c = V3Client::connect_with(b.mqtt_addr(), "will-loss", |o| {
            o.set_last_will(rumqttc::LastWill::new(
                "will/loss",
                "gone",
                Q3::AtLeastOnce,
                false,
            ));
        })
        .await;
        c.drop_connection();
        let p = w.recv_publish().await;
        assert_eq!(
            (p.topic.as_str(), text(&p.payload).as_str()),
            ("will/loss", "gone")
        );
        assert_eq!(p.qos, Q3::AtLeastOnce);
        w.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn no_will_after_normal_disconnect() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = watcher(&b, "will-dc-w", "will/dc/#").await;
        let c3 = V3Client::connect_with(b.mqtt_addr(), "will-dc3", |o| {
            o.set_last_will(rumqttc::LastWill::new(
                "will/dc/3",
                "x",
                Q3::AtLeastOnce,
                false,
            ));
        })
        .await;
        let c5 = V5Client::connect_with(b.mqtt_addr(), "will-dc5", |o| {
            o.set_last_will(p5::LastWill::new(
                "will/dc/5",
                "x",
                Q5::AtLeastOnce,
                false,
                None,
            ));
        })
        .await;
        wait_connections(&b, 3).await;
        c3.disconnect().await;
        c5.disconnect().await;
        wait_connections(&b, 1).await;
        w.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn will_published_on_v5_disconnect_with_will_0x04() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = watcher(&b, "will-04-w", "will/04").await;
        let connect = Connect::v5("will-04").will(Will::new("will/04", b"by request"));
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        raw.send(&pkt::disconnect_v5(0x04, &[])).await;
        raw.expect_closed(WAIT).await;
        assert_eq!(text(&w.recv_publish().await.payload), "by request");
    })
    .await
}

#[tokio::test]
async fn will_published_on_keepalive_timeout() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = watcher(&b, "will-ka-w", "will/ka").await;
        let connect = Connect::v311("will-ka")
            .keep_alive(1)
            .will(Will::new("will/ka", b"timed out"));
        let start = Instant::now();
        let (_raw, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        let p = w.recv_publish().await;
        assert_eq!(text(&p.payload), "timed out");
        assert!(
            start.elapsed() >= Duration::from_millis(1500),
            "not before 1.5 x keepalive"
        );
    })
    .await
}

#[tokio::test]
async fn will_published_on_protocol_error() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = watcher(&b, "will-pe-w", "will/pe").await;
        let connect = Connect::v311("will-pe").will(Will::new("will/pe", b"broken"));
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        raw.send(&Connect::v311("will-pe").encode()).await;
        raw.expect_closed(WAIT).await;
        assert_eq!(text(&w.recv_publish().await.payload), "broken");
    })
    .await
}

#[tokio::test]
async fn will_published_on_takeover_v311() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = watcher(&b, "will-to-w", "will/to").await;
        let mut first = V3Client::connect_with(b.mqtt_addr(), "will-to", |o| {
            o.set_last_will(rumqttc::LastWill::new(
                "will/to",
                "taken",
                Q3::AtLeastOnce,
                false,
            ));
        })
        .await;
        let _second = V3Client::connect(b.mqtt_addr(), "will-to").await;
        first.wait_closed(WAIT).await;
        assert_eq!(text(&w.recv_publish().await.payload), "taken");
    })
    .await
}

#[tokio::test]
async fn retained_will() {
    test_timeout(async {
        // No $SYS, so the retained gauge counts only the will.
        let b = Broker::start_with(&[("PETREL_MQTT__SYS_INTERVAL_SECS", "0")], &[]).await;
        // Every node holds the replicated retained store and counts it.
        let replicas = b.nodes() as f64;
        let c = V3Client::connect_with(b.mqtt_addr(), "will-ret", |o| {
            o.set_last_will(rumqttc::LastWill::new(
                "will/ret",
                "last words",
                Q3::AtLeastOnce,
                true,
            ));
        })
        .await;
        c.drop_connection();
        b.wait_metric("petrel_retained_messages", WAIT, |v| v == replicas)
            .await;
        let mut late = V3Client::connect(b.mqtt_addr(), "will-ret-late").await;
        late.subscribe("will/ret", Q3::AtLeastOnce).await;
        let p = late.recv_publish().await;
        assert_eq!((text(&p.payload).as_str(), p.retain), ("last words", true));
    })
    .await
}

fn v5_with_delayed_will(o: &mut rumqttc::v5::MqttOptions, topic: &str, delay: u32, expiry: u32) {
    let mut props = will_props();
    props.delay_interval = Some(delay);
    props.content_type = Some("text/plain".into());
    props.user_properties = vec![("origin".into(), "will".into())];
    o.set_last_will(p5::LastWill::new(
        topic,
        "delayed",
        Q5::AtLeastOnce,
        false,
        Some(props),
    ));
    o.set_clean_start(false);
    set_session_expiry(o, expiry);
}

#[tokio::test]
async fn will_delay_elapses_v5() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = V5Client::connect(b.mqtt_addr(), "wd-w").await;
        w.subscribe("will/delay", Q5::AtLeastOnce).await;
        let c = V5Client::connect_with(b.mqtt_addr(), "wd", |o| {
            v5_with_delayed_will(o, "will/delay", 1, 60)
        })
        .await;
        let lost = Instant::now();
        c.drop_connection();
        let p = w.recv_publish().await;
        assert!(
            lost.elapsed() >= Duration::from_millis(900),
            "will published after {:?}, before the 1 s delay",
            lost.elapsed()
        );
        assert_eq!(text(&p.payload), "delayed");
        let props = p.properties.expect("will properties forwarded");
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            props.user_properties,
            vec![("origin".to_string(), "will".to_string())]
        );
    })
    .await
}

#[tokio::test]
async fn will_delay_cancelled_by_reconnect_v5() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = V5Client::connect(b.mqtt_addr(), "wdc-w").await;
        w.subscribe("will/cancel", Q5::AtLeastOnce).await;
        let c = V5Client::connect_with(b.mqtt_addr(), "wdc", |o| {
            v5_with_delayed_will(o, "will/cancel", 2, 60)
        })
        .await;
        c.drop_connection();
        let back = V5Client::connect_with(b.mqtt_addr(), "wdc", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 60);
        })
        .await;
        assert!(back.connack.session_present);
        eprintln!("--- past the 2 s will delay: nothing");
        let_time_pass(Duration::from_secs(3)).await; // the behaviour is defined by the delay
        w.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn will_published_when_session_ends_before_delay() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut w = V5Client::connect(b.mqtt_addr(), "wse-w").await;
        w.subscribe("will/sessend", Q5::AtLeastOnce).await;
        let c = V5Client::connect_with(b.mqtt_addr(), "wse", |o| {
            v5_with_delayed_will(o, "will/sessend", 30, 1)
        })
        .await;
        let lost = Instant::now();
        c.drop_connection();
        let p = w.recv_publish().await;
        assert_eq!(text(&p.payload), "delayed");
        assert!(
            lost.elapsed() >= Duration::from_millis(900),
            "will at session end (1 s), got it after {:?}",
            lost.elapsed()
        );
    })
    .await
}
