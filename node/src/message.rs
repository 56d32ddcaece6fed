//! An application message as the broker holds it: decoded once, shared by every queue and
//! connection it is delivered to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{LastWill, MqttStr, Publish, PublishProperties, QoS};
use crate::session::SessionId;

#[derive(Debug)]
pub struct Message {
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Passthrough properties; topic alias and subscription identifiers are always cleared
    /// because they belong to one connection, not to the message. Boxed, and `None` when
    /// there are none (most messages): every queued and retained message holds this field.
    pub(crate) props: Option<Box<PublishProperties>>,
    /// When the v5 message expiry interval runs out.
    pub expires_at: Option<Instant>,
    /// The session that published it (for No Local), or [`SessionId::BROKER`].
    pub origin: SessionId,
    /// Its bytes are its own: no slice of a connection's read buffer (see
    /// [`Message::detached`]).
    pub owned: bool,
    /// When it was read from its publisher, on the few publishes the delivery latency is
    /// measured on ([`sample_latency`]): a [`Stamp`] (0 on the others). Four bytes, in what
    /// would otherwise be padding.
    pub received: Stamp,
    /// The log index this node's route table was current up to when it routed the message
    /// (the sending node's, for a forwarded one): which node's copy a session that moved
    /// between nodes takes ([`RoutedAt`]).
    pub routed_at: RoutedAt,
}

/// A Raft log index set once, when the message is routed (0: not routed through the route
/// table, or before the cluster had one).
#[derive(Debug, Default)]
pub struct RoutedAt(std::sync::atomic::AtomicU64);

impl RoutedAt {
    pub fn new(index: u64) -> RoutedAt {
        RoutedAt(std::sync::atomic::AtomicU64::new(index))
    }

    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set(&self, index: u64) {
        self.0.store(index, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A point in time in 4 bytes: microseconds since the process started, wrapping every 71
/// minutes; 0: none. Good for measuring short spans only ([`Stamp::elapsed`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp(u32);

/// The longest span a [`Stamp`] measures; longer ones (a session that was offline) are not
/// measured, and a stamp aliases after 71 minutes.
const STAMP_SPAN: Duration = Duration::from_secs(60);

fn process_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    // An hour back, so that a time shortly before the first use (a forwarded message's
    // publish) still comes after it.
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    })
}

impl Stamp {
    pub const NONE: Stamp = Stamp(0);

    pub fn at(t: Instant) -> Stamp {
        let us = t.saturating_duration_since(process_epoch()).as_micros() as u32;
        Stamp(us.max(1))
    }

    /// The time from the stamp to `now`, if there is a stamp and the span is under a minute.
    pub fn elapsed(self, now: Instant) -> Option<Duration> {
        if self.0 == 0 {
            return None;
        }
        let d = Duration::from_micros(u64::from(Stamp::at(now).0.wrapping_sub(self.0)));
        (d < STAMP_SPAN).then_some(d)
    }
}

/// Whether the next publish read on this thread is one the delivery latency is measured on:
/// one in 16, so that the clock read and the shared histogram's atomics stay off most
/// publishes.
pub fn sample_latency() -> bool {
    use std::cell::Cell;
    thread_local! {
        static N: Cell<u8> = const { Cell::new(0) };
    }
    N.with(|n| {
        let v = n.get().wrapping_add(1);
        n.set(v);
        v % 16 == 0
    })
}

/// The properties of a message without any.
static NO_PROPERTIES: PublishProperties = PublishProperties {
    payload_format_indicator: None,
    message_expiry_interval: None,
    topic_alias: None,
    response_topic: None,
    correlation_data: None,
    user_properties: Vec::new(),
    subscription_identifiers: Vec::new(),
    content_type: None,
};

/// Boxes properties that say anything. Field by field, not `!= NO_PROPERTIES`: the derived
/// comparison calls `memcmp` for the empty vectors, which cost about 15% of the fan-in
/// publish path (measured with perf).
fn boxed(props: PublishProperties) -> Option<Box<PublishProperties>> {
    let PublishProperties {
        payload_format_indicator,
        message_expiry_interval,
        topic_alias,
        response_topic,
        correlation_data,
        user_properties,
        subscription_identifiers,
        content_type,
    } = &props;
    let empty = payload_format_indicator.is_none()
        && message_expiry_interval.is_none()
        && topic_alias.is_none()
        && response_topic.is_none()
        && correlation_data.is_none()
        && user_properties.is_empty()
        && subscription_identifiers.is_empty()
        && content_type.is_none();
    (!empty).then(|| Box::new(props))
}

impl Message {
    /// The message's v5 properties.
    pub fn props(&self) -> &PublishProperties {
        self.props.as_deref().unwrap_or(&NO_PROPERTIES)
    }

    /// Takes a client's PUBLISH (its topic already resolved from an alias).
    /// `now` is asked only for a message with an expiry.
    pub fn from_publish(p: Publish, origin: SessionId, now: impl FnOnce() -> Instant) -> Message {
        let mut props = p.properties;
        props.topic_alias = None;
        props.subscription_identifiers = Vec::new();
        let expires_at = props
            .message_expiry_interval
            .map(|s| now() + Duration::from_secs(s as u64));
        Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            props: boxed(props),
            expires_at,
            origin,
            owned: false,
            received: Stamp::NONE,
            routed_at: Default::default(),
        }
    }

    /// Builds the message a will turns into when it is published.
    pub fn from_will(w: &LastWill, origin: SessionId, now: Instant) -> Message {
        let wp = &w.properties;
        let props = PublishProperties {
            payload_format_indicator: wp.payload_format_indicator,
            message_expiry_interval: wp.message_expiry_interval,
            response_topic: wp.response_topic.clone(),
            correlation_data: wp.correlation_data.clone(),
            user_properties: wp.user_properties.clone(),
            content_type: wp.content_type.clone(),
            ..Default::default()
        };
        let expires_at = wp
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(s as u64));
        Message {
            topic: w.topic.clone(),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            props: boxed(props),
            expires_at,
            origin,
            owned: false,
            received: Stamp::NONE,
            routed_at: Default::default(),
        }
    }

    /// A message the broker itself publishes ($SYS).
    pub fn broker(topic: MqttStr, payload: Bytes, retain: bool) -> Message {
        Message {
            topic,
            payload,
            qos: QoS::AtMostOnce,
            retain,
            props: None,
            expires_at: None,
            origin: SessionId::BROKER,
            owned: true,
            received: Stamp::NONE,
            routed_at: Default::default(),
        }
    }

    /// A copy that owns its bytes. A decoded message's topic, payload and properties are
    /// slices of its connection's read buffer, so keeping it past delivery (retained, queued
    /// for an offline session) would keep that whole buffer chunk alive.
    pub fn detached(&self) -> Message {
        let p = self.props();
        Message {
            topic: self.topic.detached(),
            payload: Bytes::copy_from_slice(&self.payload),
            qos: self.qos,
            retain: self.retain,
            props: boxed(PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                topic_alias: None,
                response_topic: p.response_topic.as_ref().map(MqttStr::detached),
                correlation_data: p.correlation_data.as_deref().map(Bytes::copy_from_slice),
                user_properties: p
                    .user_properties
                    .iter()
                    .map(|(k, v)| (k.detached(), v.detached()))
                    .collect(),
                subscription_identifiers: Vec::new(),
                content_type: p.content_type.as_ref().map(MqttStr::detached),
            }),
            expires_at: self.expires_at,
            origin: self.origin,
            owned: true,
            received: Stamp::NONE,
            routed_at: RoutedAt::new(self.routed_at.get()),
        }
    }

    /// The message itself if it owns its bytes, else a [`Message::detached`] copy: what is
    /// kept past delivery.
    pub fn kept(msg: &Arc<Message>) -> Arc<Message> {
        match msg.owned {
            true => msg.clone(),
            false => Arc::new(msg.detached()),
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// The message expiry interval to send with a delivery: what is left, rounded up.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|t| {
            let left = t.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            secs.max(1) as u32
        })
    }

    #[cfg(test)]
    pub fn for_test(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message::broker(
            MqttStr::new(topic).expect("test topic"),
            Bytes::from_static(payload),
            true,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every queued or retained message holds these (see ARCHITECTURE.md, "Payloads kept
    /// past delivery"): a larger struct is a decision, not an accident.
    #[test]
    fn message_and_delivery_sizes() {
        assert!(std::mem::size_of::<Message>() <= 112);
        let t = Instant::now();
        let s = Stamp::at(t);
        assert_eq!(s.elapsed(t), Some(Duration::ZERO));
        assert_eq!(
            s.elapsed(t + Duration::from_millis(5)),
            Some(Duration::from_millis(5))
        );
        assert_eq!(s.elapsed(t + Duration::from_secs(61)), None);
        assert_eq!(Stamp::NONE.elapsed(t), None);
        // `Delivery::acl_gen` and the flags sit in what would otherwise be padding.
        assert!(std::mem::size_of::<crate::session::Delivery>() <= 48);
    }
}
