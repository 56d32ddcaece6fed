//! Client packets made from fuzz input: mostly well formed, drawn from small pools of topics,
//! filters, client ids and packet ids so that they meet (takeover, overlapping and shared
//! subscriptions, acknowledgements of ids the broker really uses), with the odd invalid value.

use bytes::Bytes;

use super::input::Input;
use crate::codec::{
    Auth, ConnAck, ConnAckProperties, Connect, ConnectProperties, Disconnect, LastWill, MqttStr,
    Packet, PacketId, Protocol, PubResp, Publish, PublishProperties, QoS, ReasonCode,
    RetainHandling, SubAck, Subscribe, SubscribeProperties, SubscriptionOptions, UnsubAck,
    Unsubscribe, UserProperty, WillProperties,
};

/// Client ids: few, so that connections take each other's sessions over; empty ones get an
/// assigned id (v5, 3.1.1 clean session) or are refused.
const CLIENT_IDS: &[&str] = &["a", "b", "a", "b", "a", "b", "", "fuzz/+#"];

/// Topic names: nested, empty levels, `$SYS`, non-ASCII, and one longer than small limits.
const TOPICS: &[&str] = &[
    "a",
    "a/b",
    "a/b/c",
    "b",
    "/",
    "a//b",
    "$SYS/x",
    "$share/g/a",
    "é/ü",
    "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p",
    "bystander/x",
];
/// Topic names that end the connection: wildcards, and empty (valid only with an alias).
const BAD_TOPICS: &[&str] = &["a/+", "#", ""];

/// Filters: wildcards, shared subscriptions, `$SYS`.
const FILTERS: &[&str] = &[
    "#",
    "+",
    "a/#",
    "a/+",
    "a",
    "a/b",
    "+/+/+",
    "+/b/#",
    "$SYS/#",
    "$share/g/#",
    "$share/g/a/+",
    "$share/h/a",
    "/",
    "a//b",
    "bystander/+",
];
/// Invalid filters (refused one by one in SUBACK).
const BAD_FILTERS: &[&str] = &["$share/g", "$share//a", "a/#/b", "a+", ""];

const REASON_CODES: &[u8] = &[0x00, 0x00, 0x04, 0x10, 0x80, 0x83, 0x8E, 0x92];

fn mqtt_str(s: &str) -> MqttStr {
    MqttStr::new(s).expect("pool strings are valid MQTT strings")
}

fn topic(i: &mut Input<'_>) -> MqttStr {
    mqtt_str(if i.one_in(32) {
        i.pick(BAD_TOPICS)
    } else {
        i.pick(TOPICS)
    })
}

fn filter(i: &mut Input<'_>) -> MqttStr {
    mqtt_str(if i.one_in(12) {
        i.pick(BAD_FILTERS)
    } else {
        i.pick(FILTERS)
    })
}

pub(super) fn protocol(i: &mut Input<'_>) -> Protocol {
    i.pick(&[Protocol::V5, Protocol::V5, Protocol::V3_1_1, Protocol::V3_1])
}

/// Ids 1 to 4 mostly: the broker numbers its own deliveries from 1.
fn packet_id(i: &mut Input<'_>) -> PacketId {
    let id = if i.one_in(8) {
        i.u16()
    } else {
        1 + i.below(4) as u16
    };
    PacketId::new(id).unwrap_or(PacketId::new(1).expect("1 is not 0"))
}

fn qos(i: &mut Input<'_>) -> QoS {
    i.pick(&[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn payload(i: &mut Input<'_>) -> Bytes {
    match i.below(8) {
        0 => Bytes::new(),
        1 => Bytes::from_static(&[0xff, 0xfe]),
        2 => Bytes::from(vec![b'x'; 300]),
        _ => Bytes::copy_from_slice(i.bytes(12)),
    }
}

fn user_properties(i: &mut Input<'_>) -> Vec<UserProperty> {
    if i.one_in(8) {
        vec![(mqtt_str("k"), mqtt_str("v"))]
    } else {
        Vec::new()
    }
}

fn opt_u32(i: &mut Input<'_>, values: &[u32]) -> Option<u32> {
    let n = i.below(values.len() + 1);
    values.get(n).copied()
}

fn opt_u16(i: &mut Input<'_>, values: &[u16]) -> Option<u16> {
    let n = i.below(values.len() + 1);
    values.get(n).copied()
}

pub(super) fn connect(i: &mut Input<'_>) -> Connect {
    let protocol = protocol(i);
    let will = i.one_in(4).then(|| LastWill {
        topic: topic(i),
        payload: payload(i),
        qos: qos(i),
        retain: i.bool(),
        properties: WillProperties {
            will_delay_interval: opt_u32(i, &[0, 5]),
            payload_format_indicator: i.one_in(8).then_some(1),
            message_expiry_interval: opt_u32(i, &[0, 100]),
            ..WillProperties::default()
        },
    });
    let flags = i.u8();
    let properties = ConnectProperties {
        session_expiry_interval: opt_u32(i, &[0, 10, u32::MAX]),
        receive_maximum: opt_u16(i, &[1, 2, 100]),
        maximum_packet_size: if i.one_in(4) {
            opt_u32(i, &[24, 48, 128, 1024])
        } else {
            None
        },
        topic_alias_maximum: opt_u16(i, &[0, 1, 2, 100]),
        request_response_information: (flags & 0x10 != 0).then_some(true),
        request_problem_information: (flags & 0x20 != 0).then_some(false),
        user_properties: user_properties(i),
        authentication_method: (flags & 0xc0 == 0xc0 && i.one_in(8)).then(|| mqtt_str("x")),
        authentication_data: None,
    };
    Connect {
        protocol,
        clean_start: flags & 1 != 0,
        keep_alive: i.pick(&[0, 0, 60, 1]),
        client_id: mqtt_str(i.pick(CLIENT_IDS)),
        will,
        username: (flags & 2 != 0).then(|| mqtt_str("u")),
        // 3.1.1 forbids a password without a user name: sometimes sent anyway.
        password: (flags & 6 == 6 || flags & 0xce == 0xc8).then(|| Bytes::from_static(b"p")),
        properties,
    }
}

/// A PUBLISH for a connection of protocol level 5 (`v5`) or 3.x.
pub(super) fn publish(i: &mut Input<'_>, v5: bool) -> Publish {
    let qos = qos(i);
    let mut p = Publish {
        // DUP on QoS 0 is malformed.
        dup: (qos != QoS::AtMostOnce || i.one_in(32)) && i.one_in(8),
        qos,
        retain: i.one_in(3),
        topic: topic(i),
        packet_id: (qos != QoS::AtMostOnce).then(|| packet_id(i)),
        properties: PublishProperties::default(),
        payload: payload(i),
    };
    if i.one_in(3) {
        let props = &mut p.properties;
        props.payload_format_indicator = i.one_in(3).then(|| i.below(2) as u8);
        props.message_expiry_interval = opt_u32(i, &[0, 1, 100]);
        // 0 is never a valid alias, 200 is above every configured maximum.
        props.topic_alias = if i.one_in(32) {
            Some(i.pick(&[0, 200]))
        } else {
            opt_u16(i, &[1, 2, 3])
        };
        if v5 && props.topic_alias.is_some() && i.one_in(3) {
            // Alias only: the topic is the one the alias was last set to.
            p.topic = MqttStr::default();
        }
        props.response_topic = i.one_in(4).then(|| mqtt_str("r/t"));
        props.correlation_data = i.one_in(4).then(|| Bytes::from_static(b"c"));
        props.user_properties = user_properties(i);
        // Not allowed from a client: a protocol error.
        if i.one_in(64) {
            props.subscription_identifiers = vec![1];
        }
        props.content_type = i.one_in(8).then(|| mqtt_str("text/plain"));
    }
    p
}

pub(super) fn subscribe(i: &mut Input<'_>) -> Subscribe {
    let n = if i.one_in(64) { 0 } else { 1 + i.below(3) };
    let filters = (0..n)
        .map(|_| {
            let options = SubscriptionOptions {
                qos: qos(i),
                no_local: i.one_in(8),
                retain_as_published: i.one_in(3),
                retain_handling: i.pick(&[
                    RetainHandling::SendAtSubscribe,
                    RetainHandling::SendIfNew,
                    RetainHandling::DoNotSend,
                ]),
            };
            (filter(i), options)
        })
        .collect();
    Subscribe {
        packet_id: packet_id(i),
        properties: SubscribeProperties {
            subscription_identifier: opt_u32(i, &[1, 2, 268_435_455]),
            user_properties: user_properties(i),
        },
        filters,
    }
}

pub(super) fn unsubscribe(i: &mut Input<'_>) -> Unsubscribe {
    let n = if i.one_in(64) { 0 } else { 1 + i.below(2) };
    Unsubscribe {
        packet_id: packet_id(i),
        user_properties: user_properties(i),
        filters: (0..n).map(|_| filter(i)).collect(),
    }
}

fn resp(i: &mut Input<'_>) -> PubResp {
    let id = packet_id(i);
    PubResp::new(id, ReasonCode(i.pick(REASON_CODES)))
}

fn disconnect(i: &mut Input<'_>) -> Disconnect {
    let mut d = Disconnect::new(ReasonCode(i.pick(&[0x00, 0x00, 0x04, 0x80, 0x8E])));
    d.properties.session_expiry_interval = opt_u32(i, &[0, 0, 10, u32::MAX]);
    d
}

/// Any packet a client could send, weighted towards the ones that change state; the ones
/// that end the connection (a second CONNECT, AUTH, packets only a server sends) are rare.
pub(super) fn packet(i: &mut Input<'_>, v5: bool) -> Packet {
    match i.below(64) {
        0..=23 => Packet::Publish(publish(i, v5)),
        24..=35 => Packet::Subscribe(subscribe(i)),
        36..=39 => Packet::Unsubscribe(unsubscribe(i)),
        40..=44 => Packet::PubAck(resp(i)),
        45..=49 => Packet::PubRec(resp(i)),
        50..=54 => Packet::PubRel(resp(i)),
        55..=58 => Packet::PubComp(resp(i)),
        59..=61 => Packet::PingReq,
        62 => Packet::Disconnect(disconnect(i)),
        _ => match i.below(6) {
            0 => Packet::Connect(Box::new(connect(i))),
            1 => Packet::Auth(Auth::default()),
            2 => Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: ReasonCode::SUCCESS,
                properties: ConnAckProperties::default(),
            }),
            3 => Packet::SubAck(SubAck {
                packet_id: packet_id(i),
                properties: Default::default(),
                reason_codes: vec![ReasonCode::SUCCESS],
            }),
            4 => Packet::UnsubAck(UnsubAck {
                packet_id: packet_id(i),
                properties: Default::default(),
                reason_codes: vec![ReasonCode::SUCCESS],
            }),
            _ => Packet::PingResp,
        },
    }
}
