//! End-to-end tests: the real `petrel` binary driven by rumqttc (3.1.1 and 5.0) and by
//! hand-made packets. Each test starts its own broker on kernel-chosen loopback ports, so
//! tests run in parallel; topics are still unique per test.
//!
//! Modules follow the numbered points of issue 2: connection lifecycle (2), QoS (3), sessions
//! (4), router (5), retained (6), will (7), v5 passthrough and limits (8), $SYS (9), bad input
//! (10) and the binary (11). `hardening` covers issue 10; `storm` and `closing` its points 7
//! and 9, `storage_fault` its point 6 (a failed storage write).

mod bad_input;
mod binary;
mod closing;
mod cluster;
mod connect;
mod durability;
mod hardening;
mod qos;
mod retained;
mod router;
mod session;
mod storage_fault;
mod storm;
mod sys;
mod v5;
mod will;

pub use std::time::Duration;

pub use petrel_tests::pkt::{self, kind, prop};
pub use petrel_tests::rumqttc;
pub use petrel_tests::rumqttc::v5::mqttbytes::v5 as p5;
pub use petrel_tests::rumqttc::v5::mqttbytes::QoS as Q5;
pub use petrel_tests::rumqttc::QoS as Q3;
pub use petrel_tests::{
    let_time_pass, test_timeout, wait_until, Broker, RawClient, RawPacket, RawRead, V3Client,
    V5Client, WAIT,
};

/// Starts the binary on an existing data directory (restarts keep what it stored).
pub async fn start_on(dir: &std::path::Path, env: &[(&str, &str)]) -> Broker {
    let mut b = Broker::builder()
        .without_data_dir_flag()
        .arg("--data-dir")
        .arg(dir.to_str().expect("utf-8 path"));
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start().await
}

/// v3 QoS from a number.
pub fn q3(n: u8) -> Q3 {
    match n {
        0 => Q3::AtMostOnce,
        1 => Q3::AtLeastOnce,
        _ => Q3::ExactlyOnce,
    }
}

/// v5 QoS from a number.
pub fn q5(n: u8) -> Q5 {
    match n {
        0 => Q5::AtMostOnce,
        1 => Q5::AtLeastOnce,
        _ => Q5::ExactlyOnce,
    }
}

pub fn n3(q: Q3) -> u8 {
    q as u8
}

pub fn n5(q: Q5) -> u8 {
    q as u8
}

/// Topic of a v5 PUBLISH as a string.
pub fn topic5(p: &p5::Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

/// Payload as a string.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Sets the v5 session expiry interval in the CONNECT properties.
pub fn set_session_expiry(o: &mut rumqttc::v5::MqttOptions, secs: u32) {
    let mut props = o.connect_properties().unwrap_or_default();
    props.session_expiry_interval = Some(secs);
    o.set_connect_properties(props);
}

/// Empty v5 will properties.
pub fn will_props() -> p5::LastWillProperties {
    p5::LastWillProperties {
        delay_interval: None,
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    }
}

/// Subscription properties with only an identifier.
pub fn sub_id(id: usize) -> p5::SubscribeProperties {
    p5::SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    }
}

/// A v5 filter with options.
pub fn filter(path: &str, qos: Q5, f: impl FnOnce(&mut p5::Filter)) -> p5::Filter {
    let mut x = p5::Filter::new(path, qos);
    f(&mut x);
    x
}

/// Waits until the broker reports exactly `n` open MQTT connections.
pub async fn wait_connections(b: &Broker, n: u32) {
    b.wait_metric("petrel_mqtt_connections", WAIT, |v| v == f64::from(n))
        .await;
}

/// A client that checks it still gets its own messages (bad input must not affect others).
pub struct Bystander {
    client: V3Client,
    topic: String,
    n: u32,
}

impl Bystander {
    pub async fn new(b: &Broker, name: &str) -> Bystander {
        let mut client = V3Client::connect(b.mqtt_addr(), &format!("bystander-{name}")).await;
        let topic = format!("bystander/{name}");
        client.subscribe(&topic, Q3::AtLeastOnce).await;
        Bystander {
            client,
            topic,
            n: 0,
        }
    }

    /// Publishes to itself and receives the message.
    pub async fn check(&mut self) {
        self.n += 1;
        let payload = format!("still here {}", self.n);
        self.client
            .publish(&self.topic, Q3::AtLeastOnce, false, payload.clone())
            .await;
        let p = self.client.recv_publish().await;
        assert_eq!(p.topic, self.topic);
        assert_eq!(
            text(&p.payload),
            payload,
            "bystander got a different message"
        );
    }
}
