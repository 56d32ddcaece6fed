//! `$SYS/broker/...` topics, published retained every `mqtt.sys_interval_secs`, with
//! Mosquitto's names where one exists.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::codec::MqttStr;
use crate::message::Message;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub async fn run(broker: Arc<Broker>, cancel: CancellationToken) {
    let period = Duration::from_secs(broker.cfg.mqtt.sys_interval_secs);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scratch = Vec::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => publish_all(&broker, &mut scratch),
        }
    }
}

fn publish_all(b: &Broker, scratch: &mut Vec<crate::router::Match>) {
    let m = &b.metrics;
    // Counters, not walks over the sessions: a walk would hold the registry lock that every
    // CONNECT's claim takes. A client is connected once its session is attached (a socket
    // still in its CONNECT, or closing, is not a client).
    let sessions = b.sessions.len();
    let connected = b.sessions.connected_count();
    let queued = b.sessions.queued_count();
    let values: [(&str, String); 11] = [
        ("$SYS/broker/version", format!("petrel version {VERSION}")),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", b.started.elapsed().as_secs()),
        ),
        ("$SYS/broker/clients/connected", connected.to_string()),
        (
            "$SYS/broker/clients/total",
            sessions.max(connected).to_string(),
        ),
        (
            "$SYS/broker/clients/disconnected",
            sessions.saturating_sub(connected).to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            m.messages_received.get().to_string(),
        ),
        (
            "$SYS/broker/messages/sent",
            m.messages_sent.get().to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            m.subscriptions.get().to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            b.retained_count().to_string(),
        ),
        (
            "$SYS/broker/messages/stored",
            (b.retained_count() + queued).to_string(),
        ),
        ("$SYS/broker/messages/queued", queued.to_string()),
    ];
    for (topic, value) in values {
        let topic = MqttStr::from_static(topic);
        b.publish(
            Arc::new(Message::broker(topic, Bytes::from(value), true)),
            scratch,
            None,
        );
    }
}
