//! Encoder.
//!
//! Each packet body is written once, generically over a [`Sink`]: a [`Counter`] pass sizes it
//! (remaining length, property lengths, maximum-packet-size checks) and a [`BytesMut`] pass
//! writes it. The two can never disagree, and nothing is allocated besides the output buffer.

use bytes::{BufMut, BytesMut};

use super::decode::MAX_REMAINING_LENGTH;
use super::error::EncodeError;
use super::packet::*;
use super::property as prop;
use super::types::{MqttStr, PacketId, Protocol, QoS, ReasonCode};

/// Where encoded bytes go: a counter or a buffer.
pub trait Sink {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_slice(&mut self, v: &[u8]);

    fn put_varint(&mut self, mut v: u32) {
        loop {
            let mut b = (v & 0x7F) as u8;
            v >>= 7;
            if v > 0 {
                b |= 0x80;
            }
            self.put_u8(b);
            if v == 0 {
                break;
            }
        }
    }

    fn put_bin(&mut self, v: &[u8]) {
        self.put_u16(v.len() as u16);
        self.put_slice(v);
    }

    /// A v5 property block: its length, then what `f` writes.
    fn put_props<F>(&mut self, f: F)
    where
        F: Fn(&mut dyn PropSink),
        Self: Sized;
}

/// The property-writing half of a sink, object safe so property blocks can nest.
pub trait PropSink {
    fn byte(&mut self, id: u8, v: u8);
    fn u16(&mut self, id: u8, v: u16);
    fn u32(&mut self, id: u8, v: u32);
    fn varint(&mut self, id: u8, v: u32);
    fn str(&mut self, id: u8, v: &str);
    fn bin(&mut self, id: u8, v: &[u8]);
    fn pair(&mut self, id: u8, k: &str, v: &str);
}

impl<S: Sink> PropSink for S {
    fn byte(&mut self, id: u8, v: u8) {
        self.put_u8(id);
        self.put_u8(v);
    }
    fn u16(&mut self, id: u8, v: u16) {
        self.put_u8(id);
        self.put_u16(v);
    }
    fn u32(&mut self, id: u8, v: u32) {
        self.put_u8(id);
        self.put_u32(v);
    }
    fn varint(&mut self, id: u8, v: u32) {
        self.put_u8(id);
        self.put_varint(v);
    }
    fn str(&mut self, id: u8, v: &str) {
        self.put_u8(id);
        self.put_bin(v.as_bytes());
    }
    fn bin(&mut self, id: u8, v: &[u8]) {
        self.put_u8(id);
        self.put_bin(v);
    }
    fn pair(&mut self, id: u8, k: &str, v: &str) {
        self.put_u8(id);
        self.put_bin(k.as_bytes());
        self.put_bin(v.as_bytes());
    }
}

/// Counts bytes instead of writing them.
#[derive(Default)]
pub struct Counter(pub usize);

impl Sink for Counter {
    fn put_u8(&mut self, _: u8) {
        self.0 += 1;
    }
    fn put_u16(&mut self, _: u16) {
        self.0 += 2;
    }
    fn put_u32(&mut self, _: u32) {
        self.0 += 4;
    }
    fn put_slice(&mut self, v: &[u8]) {
        self.0 += v.len();
    }
    fn put_varint(&mut self, v: u32) {
        self.0 += varint_len(v as usize);
    }
    fn put_props<F>(&mut self, f: F)
    where
        F: Fn(&mut dyn PropSink),
    {
        let mut inner = Counter(0);
        f(&mut inner);
        self.0 += varint_len(inner.0) + inner.0;
    }
}

impl Sink for BytesMut {
    fn put_u8(&mut self, v: u8) {
        BufMut::put_u8(self, v);
    }
    fn put_u16(&mut self, v: u16) {
        BufMut::put_u16(self, v);
    }
    fn put_u32(&mut self, v: u32) {
        BufMut::put_u32(self, v);
    }
    fn put_slice(&mut self, v: &[u8]) {
        self.extend_from_slice(v);
    }
    fn put_props<F>(&mut self, f: F)
    where
        F: Fn(&mut dyn PropSink),
    {
        let mut inner = Counter(0);
        f(&mut inner);
        self.put_varint(inner.0 as u32);
        f(self);
    }
}

/// Bytes a variable byte integer takes.
pub fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn user_props(s: &mut dyn PropSink, props: &[UserProperty]) {
    for (k, v) in props {
        s.pair(prop::USER_PROPERTY, k, v);
    }
}

fn opt_str(s: &mut dyn PropSink, id: u8, v: &Option<MqttStr>) {
    if let Some(v) = v {
        s.str(id, v);
    }
}

fn opt_bin(s: &mut dyn PropSink, id: u8, v: &Option<bytes::Bytes>) {
    if let Some(v) = v {
        s.bin(id, v);
    }
}

fn opt_bool(s: &mut dyn PropSink, id: u8, v: Option<bool>) {
    if let Some(v) = v {
        s.byte(id, v as u8);
    }
}

/// A PUBLISH as it leaves the broker: the shared message's parts plus the fields that differ
/// per subscriber. Borrowing everything keeps delivery free of allocations.
#[derive(Clone, Copy, Debug)]
pub struct PublishOut<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when `topic_alias` names a topic the client already knows.
    pub topic: &'a str,
    pub packet_id: Option<PacketId>,
    /// Payload format, content type, response topic, correlation data and user properties
    /// come from here; its alias, expiry and subscription identifiers are ignored.
    pub props: &'a PublishProperties,
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub subscription_identifiers: &'a [u32],
    pub payload: &'a [u8],
}

impl<'a> PublishOut<'a> {
    /// The view of a decoded publish, sent as it is.
    pub fn of(p: &'a Publish) -> PublishOut<'a> {
        PublishOut {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: &p.topic,
            packet_id: p.packet_id,
            props: &p.properties,
            message_expiry_interval: p.properties.message_expiry_interval,
            topic_alias: p.properties.topic_alias,
            subscription_identifiers: &p.properties.subscription_identifiers,
            payload: &p.payload,
        }
    }

    fn first_byte(&self) -> u8 {
        (kind::PUBLISH << 4) | ((self.dup as u8) << 3) | ((self.qos as u8) << 1) | self.retain as u8
    }

    fn body<S: Sink>(&self, protocol: Protocol, s: &mut S) {
        s.put_bin(self.topic.as_bytes());
        if let (Some(id), true) = (self.packet_id, self.qos != QoS::AtMostOnce) {
            s.put_u16(id.get());
        }
        if protocol.is_v5() {
            s.put_props(|s| {
                let p = self.props;
                if let Some(v) = p.payload_format_indicator {
                    s.byte(prop::PAYLOAD_FORMAT_INDICATOR, v);
                }
                if let Some(v) = self.message_expiry_interval {
                    s.u32(prop::MESSAGE_EXPIRY_INTERVAL, v);
                }
                if let Some(v) = self.topic_alias {
                    s.u16(prop::TOPIC_ALIAS, v);
                }
                opt_str(s, prop::RESPONSE_TOPIC, &p.response_topic);
                opt_bin(s, prop::CORRELATION_DATA, &p.correlation_data);
                user_props(s, &p.user_properties);
                for &id in self.subscription_identifiers {
                    s.varint(prop::SUBSCRIPTION_IDENTIFIER, id);
                }
                opt_str(s, prop::CONTENT_TYPE, &p.content_type);
            });
        }
        s.put_slice(self.payload);
    }

    /// Size of the whole packet on the wire, fixed header included.
    pub fn encoded_len(&self, protocol: Protocol) -> usize {
        let body = self.body_len(protocol);
        1 + varint_len(body) + body
    }

    /// Size of what follows the fixed header (the remaining length).
    pub fn body_len(&self, protocol: Protocol) -> usize {
        let mut c = Counter(0);
        self.body(protocol, &mut c);
        c.0
    }

    pub fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let body = self.body_len(protocol);
        self.encode_sized(protocol, body, buf)
    }

    /// [`PublishOut::encode`] with the body's length already counted
    /// ([`PublishOut::body_len`]); reserves exactly what it writes.
    pub fn encode_sized(
        &self,
        protocol: Protocol,
        body: usize,
        buf: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        if self.qos != QoS::AtMostOnce && self.packet_id.is_none() {
            return Err(EncodeError::MissingPacketId);
        }
        debug_assert_eq!(body, self.body_len(protocol));
        if body > MAX_REMAINING_LENGTH {
            return Err(EncodeError::TooLarge(body));
        }
        buf.reserve(1 + varint_len(body) + body);
        Sink::put_u8(buf, self.first_byte());
        buf.put_varint(body as u32);
        self.body(protocol, buf);
        Ok(())
    }
}

/// Size of a packet on the wire, fixed header included.
pub fn encoded_len(packet: &Packet, protocol: Protocol) -> usize {
    if let Packet::Publish(p) = packet {
        return PublishOut::of(p).encoded_len(protocol);
    }
    let mut c = Counter(0);
    body(packet, protocol, &mut c);
    1 + varint_len(c.0) + c.0
}

/// Appends one packet to `buf`.
pub fn encode_packet(
    packet: &Packet,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if let Packet::Publish(p) = packet {
        return PublishOut::of(p).encode(protocol, buf);
    }
    if matches!(packet, Packet::Auth(_)) && !protocol.is_v5() {
        return Err(EncodeError::NotInProtocol("auth"));
    }
    let mut c = Counter(0);
    body(packet, protocol, &mut c);
    if c.0 > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge(c.0));
    }
    let flags = match packet {
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    buf.reserve(1 + 4 + c.0);
    Sink::put_u8(buf, (packet.kind() << 4) | flags);
    buf.put_varint(c.0 as u32);
    body(packet, protocol, buf);
    Ok(())
}

fn body<S: Sink>(packet: &Packet, protocol: Protocol, s: &mut S) {
    let v5 = protocol.is_v5();
    match packet {
        Packet::Connect(c) => connect(c, s),
        Packet::ConnAck(c) => connack(c, v5, s),
        Packet::Publish(p) => PublishOut::of(p).body(protocol, s),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            pub_resp(r, v5, s)
        }
        Packet::Subscribe(sub) => subscribe(sub, v5, s),
        Packet::SubAck(a) => {
            s.put_u16(a.packet_id.get());
            if v5 {
                ack_props(&a.properties, s);
            }
            for rc in &a.reason_codes {
                s.put_u8(rc.0);
            }
        }
        Packet::Unsubscribe(u) => {
            s.put_u16(u.packet_id.get());
            if v5 {
                s.put_props(|s| user_props(s, &u.user_properties));
            }
            for f in &u.filters {
                s.put_bin(f.as_bytes());
            }
        }
        Packet::UnsubAck(a) => {
            s.put_u16(a.packet_id.get());
            if v5 {
                ack_props(&a.properties, s);
                for rc in &a.reason_codes {
                    s.put_u8(rc.0);
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => disconnect(d, v5, s),
        Packet::Auth(a) => {
            let p = &a.properties;
            let empty = p.authentication_method.is_none()
                && p.authentication_data.is_none()
                && p.reason_string.is_none()
                && p.user_properties.is_empty();
            if a.reason_code == ReasonCode::SUCCESS && empty {
                return;
            }
            s.put_u8(a.reason_code.0);
            s.put_props(|s| {
                opt_str(s, prop::AUTHENTICATION_METHOD, &p.authentication_method);
                opt_bin(s, prop::AUTHENTICATION_DATA, &p.authentication_data);
                opt_str(s, prop::REASON_STRING, &p.reason_string);
                user_props(s, &p.user_properties);
            });
        }
    }
}

fn connect<S: Sink>(c: &Connect, s: &mut S) {
    let v5 = c.protocol.is_v5();
    s.put_bin(c.protocol.name().as_bytes());
    s.put_u8(c.protocol.level());
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    s.put_u8(flags);
    s.put_u16(c.keep_alive);
    if v5 {
        let p = &c.properties;
        s.put_props(|s| {
            if let Some(v) = p.session_expiry_interval {
                s.u32(prop::SESSION_EXPIRY_INTERVAL, v);
            }
            if let Some(v) = p.receive_maximum {
                s.u16(prop::RECEIVE_MAXIMUM, v);
            }
            if let Some(v) = p.maximum_packet_size {
                s.u32(prop::MAXIMUM_PACKET_SIZE, v);
            }
            if let Some(v) = p.topic_alias_maximum {
                s.u16(prop::TOPIC_ALIAS_MAXIMUM, v);
            }
            opt_bool(
                s,
                prop::REQUEST_RESPONSE_INFORMATION,
                p.request_response_information,
            );
            opt_bool(
                s,
                prop::REQUEST_PROBLEM_INFORMATION,
                p.request_problem_information,
            );
            user_props(s, &p.user_properties);
            opt_str(s, prop::AUTHENTICATION_METHOD, &p.authentication_method);
            opt_bin(s, prop::AUTHENTICATION_DATA, &p.authentication_data);
        });
    }
    s.put_bin(c.client_id.as_bytes());
    if let Some(w) = &c.will {
        if v5 {
            let p = &w.properties;
            s.put_props(|s| {
                if let Some(v) = p.will_delay_interval {
                    s.u32(prop::WILL_DELAY_INTERVAL, v);
                }
                if let Some(v) = p.payload_format_indicator {
                    s.byte(prop::PAYLOAD_FORMAT_INDICATOR, v);
                }
                if let Some(v) = p.message_expiry_interval {
                    s.u32(prop::MESSAGE_EXPIRY_INTERVAL, v);
                }
                opt_str(s, prop::CONTENT_TYPE, &p.content_type);
                opt_str(s, prop::RESPONSE_TOPIC, &p.response_topic);
                opt_bin(s, prop::CORRELATION_DATA, &p.correlation_data);
                user_props(s, &p.user_properties);
            });
        }
        s.put_bin(w.topic.as_bytes());
        s.put_bin(&w.payload);
    }
    if let Some(u) = &c.username {
        s.put_bin(u.as_bytes());
    }
    if let Some(p) = &c.password {
        s.put_bin(p);
    }
}

fn connack<S: Sink>(c: &ConnAck, v5: bool, s: &mut S) {
    s.put_u8(c.session_present as u8);
    if !v5 {
        let rc = if c.reason_code.0 <= 5 {
            c.reason_code.0
        } else {
            c.reason_code.connack_v3()
        };
        s.put_u8(rc);
        return;
    }
    s.put_u8(c.reason_code.0);
    let p = &c.properties;
    s.put_props(|s| {
        if let Some(v) = p.session_expiry_interval {
            s.u32(prop::SESSION_EXPIRY_INTERVAL, v);
        }
        if let Some(v) = p.receive_maximum {
            s.u16(prop::RECEIVE_MAXIMUM, v);
        }
        if let Some(v) = p.maximum_qos {
            s.byte(prop::MAXIMUM_QOS, v as u8);
        }
        opt_bool(s, prop::RETAIN_AVAILABLE, p.retain_available);
        if let Some(v) = p.maximum_packet_size {
            s.u32(prop::MAXIMUM_PACKET_SIZE, v);
        }
        opt_str(
            s,
            prop::ASSIGNED_CLIENT_IDENTIFIER,
            &p.assigned_client_identifier,
        );
        if let Some(v) = p.topic_alias_maximum {
            s.u16(prop::TOPIC_ALIAS_MAXIMUM, v);
        }
        opt_str(s, prop::REASON_STRING, &p.reason_string);
        user_props(s, &p.user_properties);
        opt_bool(
            s,
            prop::WILDCARD_SUBSCRIPTION_AVAILABLE,
            p.wildcard_subscription_available,
        );
        opt_bool(
            s,
            prop::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            p.subscription_identifiers_available,
        );
        opt_bool(
            s,
            prop::SHARED_SUBSCRIPTION_AVAILABLE,
            p.shared_subscription_available,
        );
        if let Some(v) = p.server_keep_alive {
            s.u16(prop::SERVER_KEEP_ALIVE, v);
        }
        opt_str(s, prop::RESPONSE_INFORMATION, &p.response_information);
        opt_str(s, prop::SERVER_REFERENCE, &p.server_reference);
        opt_str(s, prop::AUTHENTICATION_METHOD, &p.authentication_method);
        opt_bin(s, prop::AUTHENTICATION_DATA, &p.authentication_data);
    });
}

fn ack_props<S: Sink>(p: &AckProperties, s: &mut S) {
    s.put_props(|s| {
        opt_str(s, prop::REASON_STRING, &p.reason_string);
        user_props(s, &p.user_properties);
    });
}

fn pub_resp<S: Sink>(r: &PubResp, v5: bool, s: &mut S) {
    s.put_u16(r.packet_id.get());
    if !v5 {
        return;
    }
    let no_props = r.properties.is_empty();
    if r.reason_code == ReasonCode::SUCCESS && no_props {
        return;
    }
    s.put_u8(r.reason_code.0);
    if !no_props {
        ack_props(&r.properties, s);
    }
}

fn subscribe<S: Sink>(sub: &Subscribe, v5: bool, s: &mut S) {
    s.put_u16(sub.packet_id.get());
    if v5 {
        let p = &sub.properties;
        s.put_props(|s| {
            if let Some(v) = p.subscription_identifier {
                s.varint(prop::SUBSCRIPTION_IDENTIFIER, v);
            }
            user_props(s, &p.user_properties);
        });
    }
    for (f, o) in &sub.filters {
        s.put_bin(f.as_bytes());
        let mut b = o.qos as u8;
        if v5 {
            b |= (o.no_local as u8) << 2
                | (o.retain_as_published as u8) << 3
                | (o.retain_handling as u8) << 4;
        }
        s.put_u8(b);
    }
}

fn disconnect<S: Sink>(d: &Disconnect, v5: bool, s: &mut S) {
    if !v5 {
        return;
    }
    let p = &d.properties;
    let no_props = p.session_expiry_interval.is_none()
        && p.reason_string.is_none()
        && p.user_properties.is_empty()
        && p.server_reference.is_none();
    if d.reason_code == ReasonCode::SUCCESS && no_props {
        return;
    }
    s.put_u8(d.reason_code.0);
    if no_props {
        return;
    }
    s.put_props(|s| {
        if let Some(v) = p.session_expiry_interval {
            s.u32(prop::SESSION_EXPIRY_INTERVAL, v);
        }
        opt_str(s, prop::REASON_STRING, &p.reason_string);
        user_props(s, &p.user_properties);
        opt_str(s, prop::SERVER_REFERENCE, &p.server_reference);
    });
}
