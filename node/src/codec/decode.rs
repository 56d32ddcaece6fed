//! Strict incremental decoder.
//!
//! [`decode_packet`] takes complete packets off the front of a read buffer and leaves a
//! partial one in place. Every length is checked before it is used, so no input can panic.

use bytes::{Buf, Bytes, BytesMut};

use super::error::DecodeError;
use super::packet::*;
use super::property::{self as prop, read_properties, set_once, MAX_VARINT};
use super::types::{MqttStr, PacketId, Protocol, QoS, ReasonCode};

/// Reads the remaining-length field that starts at `buf[0]`.
/// Returns `(value, bytes used)`, `None` if more bytes are needed.
pub fn read_remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                // A non-minimal encoding (e.g. 0x80 0x00) is not well formed.
                return Err(DecodeError::MalformedRemainingLength);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

/// Decodes one packet from the front of `buf`, or returns `Ok(None)` if it is incomplete.
///
/// `max_packet_size` bounds the whole packet (fixed header included); a larger one is
/// rejected as soon as its header is read, before its body is buffered.
pub fn decode_packet(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let first = buf[0];
    let Some((len, n)) = read_remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    let total = 1 + n + len;
    if total > max_packet_size as usize {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        // Grow towards the announced size a bounded step at a time, so that a few header
        // bytes cannot make the broker reserve a whole maximum-size packet.
        buf.reserve((total - buf.len()).min(64 * 1024));
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(1 + n);
    decode_body(first, frame, protocol).map(Some)
}

/// Decodes `frame`, which holds exactly one whole packet, without copying it: the packet's
/// topic, payload and properties are slices of `frame`.
pub fn decode_frame(mut frame: Bytes, protocol: Protocol) -> Result<Packet, DecodeError> {
    let Some(&first) = frame.first() else {
        return Err(DecodeError::Malformed("empty packet"));
    };
    let Some((len, n)) = read_remaining_length(&frame[1..])? else {
        return Err(DecodeError::Malformed("truncated packet"));
    };
    if frame.len() != 1 + n + len {
        return Err(DecodeError::Malformed(
            "packet length does not match its frame",
        ));
    }
    frame.advance(1 + n);
    decode_body(first, frame, protocol)
}

fn decode_body(first: u8, body: Bytes, protocol: Protocol) -> Result<Packet, DecodeError> {
    let kind_ = first >> 4;
    let flags = first & 0x0F;
    let v5 = protocol.is_v5();
    let expect_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(DecodeError::InvalidFlags { kind: kind_, flags })
        }
    };
    let mut r = Reader(body);
    let packet = match kind_ {
        kind::CONNECT => {
            expect_flags(0)?;
            Packet::Connect(Box::new(connect(&mut r)?))
        }
        kind::CONNACK => {
            expect_flags(0)?;
            Packet::ConnAck(connack(&mut r, v5)?)
        }
        kind::PUBLISH => Packet::Publish(publish(&mut r, flags, v5)?),
        kind::PUBACK => {
            expect_flags(0)?;
            Packet::PubAck(pub_resp(&mut r, v5)?)
        }
        kind::PUBREC => {
            expect_flags(0)?;
            Packet::PubRec(pub_resp(&mut r, v5)?)
        }
        kind::PUBREL => {
            expect_flags(0b0010)?;
            Packet::PubRel(pub_resp(&mut r, v5)?)
        }
        kind::PUBCOMP => {
            expect_flags(0)?;
            Packet::PubComp(pub_resp(&mut r, v5)?)
        }
        kind::SUBSCRIBE => {
            expect_flags(0b0010)?;
            Packet::Subscribe(subscribe(&mut r, v5)?)
        }
        kind::SUBACK => {
            expect_flags(0)?;
            Packet::SubAck(suback(&mut r, v5)?)
        }
        kind::UNSUBSCRIBE => {
            expect_flags(0b0010)?;
            Packet::Unsubscribe(unsubscribe(&mut r, v5)?)
        }
        kind::UNSUBACK => {
            expect_flags(0)?;
            Packet::UnsubAck(unsuback(&mut r, v5)?)
        }
        kind::PINGREQ => {
            expect_flags(0)?;
            Packet::PingReq
        }
        kind::PINGRESP => {
            expect_flags(0)?;
            Packet::PingResp
        }
        kind::DISCONNECT => {
            expect_flags(0)?;
            Packet::Disconnect(disconnect(&mut r, v5)?)
        }
        kind::AUTH if v5 => {
            expect_flags(0)?;
            Packet::Auth(auth(&mut r)?)
        }
        other => return Err(DecodeError::ReservedPacketType(other)),
    };
    if !r.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes after packet"));
    }
    Ok(packet)
}

/// Bounds-checked reads over a packet body.
pub struct Reader(pub Bytes);

impl Reader {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn remaining(&self) -> usize {
        self.0.len()
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.0.len() < n {
            Err(DecodeError::Malformed("packet shorter than its fields"))
        } else {
            Ok(())
        }
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }

    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        match read_remaining_length(&self.0) {
            Ok(Some((v, n))) => {
                self.0.advance(n);
                Ok(v as u32)
            }
            Ok(None) => Err(DecodeError::Malformed("truncated variable byte integer")),
            Err(_) => Err(DecodeError::Malformed(
                "variable byte integer longer than 4 bytes",
            )),
        }
    }

    pub fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.0.split_to(n))
    }

    pub fn sub(&mut self, n: usize) -> Result<Reader, DecodeError> {
        Ok(Reader(self.take(n)?))
    }

    pub fn bin(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    pub fn str(&mut self) -> Result<MqttStr, DecodeError> {
        let b = self.bin()?;
        MqttStr::from_bytes(b)
    }

    pub fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16()?).ok_or(DecodeError::Malformed("packet identifier 0"))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }
}

/// A topic name as a PUBLISH or a will may carry it: no wildcard characters.
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.contains(['+', '#'])
}

fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.bin()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => Protocol::V3_1_1,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQIsdp", 3) => Protocol::V3_1,
        _ => return Err(DecodeError::UnsupportedProtocol { level }),
    };
    let v5 = protocol.is_v5();
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved connect flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will qos or retain set without a will",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will qos 3"))?;
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = r.u16()?;
    let mut properties = ConnectProperties::default();
    if v5 {
        let p = &mut properties;
        read_properties(r, |id, v| match id {
            prop::SESSION_EXPIRY_INTERVAL => set_once(&mut p.session_expiry_interval, v.u32()),
            prop::RECEIVE_MAXIMUM => match v.u16() {
                0 => Err(DecodeError::Protocol("receive maximum 0")),
                n => set_once(&mut p.receive_maximum, n),
            },
            prop::MAXIMUM_PACKET_SIZE => match v.u32() {
                0 => Err(DecodeError::Protocol("maximum packet size 0")),
                n => set_once(&mut p.maximum_packet_size, n),
            },
            prop::TOPIC_ALIAS_MAXIMUM => set_once(&mut p.topic_alias_maximum, v.u16()),
            prop::REQUEST_RESPONSE_INFORMATION => {
                set_once(&mut p.request_response_information, v.bool()?)
            }
            prop::REQUEST_PROBLEM_INFORMATION => {
                set_once(&mut p.request_problem_information, v.bool()?)
            }
            prop::USER_PROPERTY => {
                p.user_properties.push(v.pair());
                Ok(true)
            }
            prop::AUTHENTICATION_METHOD => set_once(&mut p.authentication_method, v.str()),
            prop::AUTHENTICATION_DATA => set_once(&mut p.authentication_data, v.bin()),
            _ => Ok(false),
        })?;
        if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
            return Err(DecodeError::Protocol(
                "authentication data without a method",
            ));
        }
    }
    let client_id = r.str()?;
    let will = if will_flag {
        let mut wp = WillProperties::default();
        if v5 {
            let p = &mut wp;
            read_properties(r, |id, v| match id {
                prop::WILL_DELAY_INTERVAL => set_once(&mut p.will_delay_interval, v.u32()),
                prop::PAYLOAD_FORMAT_INDICATOR => match v.byte() {
                    b @ (0 | 1) => set_once(&mut p.payload_format_indicator, b),
                    _ => Err(DecodeError::Protocol("payload format indicator not 0 or 1")),
                },
                prop::MESSAGE_EXPIRY_INTERVAL => set_once(&mut p.message_expiry_interval, v.u32()),
                prop::CONTENT_TYPE => set_once(&mut p.content_type, v.str()),
                prop::RESPONSE_TOPIC => {
                    let t = v.str();
                    if !is_valid_topic_name(&t) {
                        return Err(DecodeError::Protocol("response topic contains a wildcard"));
                    }
                    set_once(&mut p.response_topic, t)
                }
                prop::CORRELATION_DATA => set_once(&mut p.correlation_data, v.bin()),
                prop::USER_PROPERTY => {
                    p.user_properties.push(v.pair());
                    Ok(true)
                }
                _ => Ok(false),
            })?;
        }
        let topic = r.str()?;
        if topic.is_empty() || !is_valid_topic_name(&topic) {
            return Err(DecodeError::InvalidTopicName);
        }
        let payload = r.bin()?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties: wp,
        })
    } else {
        None
    };
    let username = if username_flag { Some(r.str()?) } else { None };
    let password = if password_flag { Some(r.bin()?) } else { None };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn connack(r: &mut Reader, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("reserved connack flags set"));
    }
    let reason_code = ReasonCode(r.u8()?);
    if !v5 && reason_code.0 > 5 {
        // 6..=255 are reserved; accepting them would not survive a re-encode (see `connack_v3`).
        return Err(DecodeError::Malformed("reserved connack return code"));
    }
    let mut properties = ConnAckProperties::default();
    if v5 {
        let p = &mut properties;
        read_properties(r, |id, v| match id {
            prop::SESSION_EXPIRY_INTERVAL => set_once(&mut p.session_expiry_interval, v.u32()),
            prop::RECEIVE_MAXIMUM => set_once(&mut p.receive_maximum, v.u16()),
            prop::MAXIMUM_QOS => match v.byte() {
                0 => set_once(&mut p.maximum_qos, QoS::AtMostOnce),
                1 => set_once(&mut p.maximum_qos, QoS::AtLeastOnce),
                _ => Err(DecodeError::Protocol("maximum qos not 0 or 1")),
            },
            prop::RETAIN_AVAILABLE => set_once(&mut p.retain_available, v.bool()?),
            prop::MAXIMUM_PACKET_SIZE => set_once(&mut p.maximum_packet_size, v.u32()),
            prop::ASSIGNED_CLIENT_IDENTIFIER => {
                set_once(&mut p.assigned_client_identifier, v.str())
            }
            prop::TOPIC_ALIAS_MAXIMUM => set_once(&mut p.topic_alias_maximum, v.u16()),
            prop::REASON_STRING => set_once(&mut p.reason_string, v.str()),
            prop::USER_PROPERTY => {
                p.user_properties.push(v.pair());
                Ok(true)
            }
            prop::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                set_once(&mut p.wildcard_subscription_available, v.bool()?)
            }
            prop::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                set_once(&mut p.subscription_identifiers_available, v.bool()?)
            }
            prop::SHARED_SUBSCRIPTION_AVAILABLE => {
                set_once(&mut p.shared_subscription_available, v.bool()?)
            }
            prop::SERVER_KEEP_ALIVE => set_once(&mut p.server_keep_alive, v.u16()),
            prop::RESPONSE_INFORMATION => set_once(&mut p.response_information, v.str()),
            prop::SERVER_REFERENCE => set_once(&mut p.server_reference, v.str()),
            prop::AUTHENTICATION_METHOD => set_once(&mut p.authentication_method, v.str()),
            prop::AUTHENTICATION_DATA => set_once(&mut p.authentication_data, v.bin()),
            _ => Ok(false),
        })?;
    }
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        reason_code,
        properties,
    })
}

fn publish(r: &mut Reader, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    let dup = flags & 0b1000 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::Malformed("publish qos 3"))?;
    let retain = flags & 1 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::Malformed("dup flag set on a qos 0 publish"));
    }
    let topic = r.str()?;
    if !is_valid_topic_name(&topic) {
        return Err(DecodeError::InvalidTopicName);
    }
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.packet_id()?)
    };
    let mut properties = PublishProperties::default();
    if v5 {
        let p = &mut properties;
        read_properties(r, |id, v| match id {
            prop::PAYLOAD_FORMAT_INDICATOR => match v.byte() {
                b @ (0 | 1) => set_once(&mut p.payload_format_indicator, b),
                _ => Err(DecodeError::Protocol("payload format indicator not 0 or 1")),
            },
            prop::MESSAGE_EXPIRY_INTERVAL => set_once(&mut p.message_expiry_interval, v.u32()),
            prop::TOPIC_ALIAS => set_once(&mut p.topic_alias, v.u16()),
            prop::RESPONSE_TOPIC => {
                let t = v.str();
                if !is_valid_topic_name(&t) {
                    return Err(DecodeError::Protocol("response topic contains a wildcard"));
                }
                set_once(&mut p.response_topic, t)
            }
            prop::CORRELATION_DATA => set_once(&mut p.correlation_data, v.bin()),
            prop::USER_PROPERTY => {
                p.user_properties.push(v.pair());
                Ok(true)
            }
            prop::SUBSCRIPTION_IDENTIFIER => match v.u32() {
                0 => Err(DecodeError::Protocol("subscription identifier 0")),
                n => {
                    p.subscription_identifiers.push(n);
                    Ok(true)
                }
            },
            prop::CONTENT_TYPE => set_once(&mut p.content_type, v.str()),
            _ => Ok(false),
        })?;
    }
    if topic.is_empty() && properties.topic_alias.is_none() {
        // MQTT 5 calls this a protocol error; 3.x has no aliases, so it is a bad topic name.
        return Err(if v5 {
            DecodeError::Protocol("empty topic name without a topic alias")
        } else {
            DecodeError::InvalidTopicName
        });
    }
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload,
    })
}

fn ack_properties(r: &mut Reader) -> Result<AckProperties, DecodeError> {
    let mut props = AckProperties::default();
    let p = &mut props;
    read_properties(r, |id, v| match id {
        prop::REASON_STRING => set_once(&mut p.reason_string, v.str()),
        prop::USER_PROPERTY => {
            p.user_properties.push(v.pair());
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(props)
}

fn pub_resp(r: &mut Reader, v5: bool) -> Result<PubResp, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut resp = PubResp::new(packet_id, ReasonCode::SUCCESS);
    if v5 {
        if !r.is_empty() {
            resp.reason_code = ReasonCode(r.u8()?);
        }
        if !r.is_empty() {
            resp.properties = ack_properties(r)?;
        }
    }
    Ok(resp)
}

fn subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut properties = SubscribeProperties::default();
    if v5 {
        let p = &mut properties;
        read_properties(r, |id, v| match id {
            prop::SUBSCRIPTION_IDENTIFIER => match v.u32() {
                0 => Err(DecodeError::Protocol("subscription identifier 0")),
                n => set_once(&mut p.subscription_identifier, n),
            },
            prop::USER_PROPERTY => {
                p.user_properties.push(v.pair());
                Ok(true)
            }
            _ => Ok(false),
        })?;
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.str()?;
        let o = r.u8()?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if o & reserved != 0 {
            return Err(DecodeError::Malformed(
                "reserved subscription option bits set",
            ));
        }
        let qos = QoS::from_u8(o & 0b11).ok_or(DecodeError::Malformed("subscription qos 3"))?;
        let retain_handling = match (o >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::Protocol("retain handling 3")),
        };
        let options = SubscriptionOptions {
            qos,
            no_local: o & 0b0100 != 0,
            retain_as_published: o & 0b1000 != 0,
            retain_handling,
        };
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("subscribe without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

fn suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        ack_properties(r)?
    } else {
        AckProperties::default()
    };
    let reason_codes = r.rest().iter().map(|&b| ReasonCode(b)).collect();
    Ok(SubAck {
        packet_id,
        properties,
        reason_codes,
    })
}

fn unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut user_properties = Vec::new();
    if v5 {
        read_properties(r, |id, v| match id {
            prop::USER_PROPERTY => {
                user_properties.push(v.pair());
                Ok(true)
            }
            _ => Ok(false),
        })?;
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.str()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("unsubscribe without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        user_properties,
        filters,
    })
}

fn unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    if !v5 {
        return Ok(UnsubAck {
            packet_id,
            properties: AckProperties::default(),
            reason_codes: Vec::new(),
        });
    }
    let properties = ack_properties(r)?;
    let reason_codes = r.rest().iter().map(|&b| ReasonCode(b)).collect();
    Ok(UnsubAck {
        packet_id,
        properties,
        reason_codes,
    })
}

fn disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::default();
    if !v5 || r.is_empty() {
        return Ok(d);
    }
    d.reason_code = ReasonCode(r.u8()?);
    if !r.is_empty() {
        let p = &mut d.properties;
        read_properties(r, |id, v| match id {
            prop::SESSION_EXPIRY_INTERVAL => set_once(&mut p.session_expiry_interval, v.u32()),
            prop::REASON_STRING => set_once(&mut p.reason_string, v.str()),
            prop::USER_PROPERTY => {
                p.user_properties.push(v.pair());
                Ok(true)
            }
            prop::SERVER_REFERENCE => set_once(&mut p.server_reference, v.str()),
            _ => Ok(false),
        })?;
    }
    Ok(d)
}

fn auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut a = Auth::default();
    if r.is_empty() {
        return Ok(a);
    }
    a.reason_code = ReasonCode(r.u8()?);
    if !r.is_empty() {
        let p = &mut a.properties;
        read_properties(r, |id, v| match id {
            prop::AUTHENTICATION_METHOD => set_once(&mut p.authentication_method, v.str()),
            prop::AUTHENTICATION_DATA => set_once(&mut p.authentication_data, v.bin()),
            prop::REASON_STRING => set_once(&mut p.reason_string, v.str()),
            prop::USER_PROPERTY => {
                p.user_properties.push(v.pair());
                Ok(true)
            }
            _ => Ok(false),
        })?;
    }
    Ok(a)
}

/// Largest remaining length the format allows.
pub const MAX_REMAINING_LENGTH: usize = MAX_VARINT as usize;
