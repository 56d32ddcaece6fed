//! Codec tests: proptest round trips for every packet at every protocol level, arbitrary-bytes
//! robustness, table-driven strict-validation cases, known-answer wire bytes and `PublishOut`.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::strategy::Union;

use super::decode::{decode_packet, read_remaining_length};
use super::encode::{self, encode_packet, PublishOut, Sink};
use super::error::{DecodeError, EncodeError};
use super::fuzz_logic;
use super::packet::*;
use super::property::MAX_VARINT;
use super::types::{MqttStr, PacketId, Protocol, QoS, ReasonCode};

use DecodeError::{
    InvalidFlags, InvalidTopicName, InvalidUtf8, Malformed, MalformedRemainingLength,
    PacketTooLarge, ReservedPacketType, UnsupportedProtocol,
};
use Protocol::{V3_1, V3_1_1, V5};

const ALL: [Protocol; 3] = [V3_1, V3_1_1, V5];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn s(v: &str) -> MqttStr {
    MqttStr::new(v).expect("valid MQTT string")
}

fn pid(v: u16) -> PacketId {
    PacketId::new(v).expect("non-zero packet id")
}

/// A variable byte integer, written independently of the encoder under test.
fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// A whole packet: first byte, remaining length, body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string or binary field.
fn field(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A 3.1.1 CONNECT with the given flags; `payload` follows keep alive 60.
fn connect_311(flags: u8, payload: &[u8]) -> Vec<u8> {
    frame(0x10, &cat(&[&field(b"MQTT"), &[4, flags, 0, 60], payload]))
}

/// A v5 CONNECT with the given flags and property block contents.
fn connect_v5(flags: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[
            &field(b"MQTT"),
            &[5, flags, 0, 60],
            &varint(props.len()),
            props,
            payload,
        ]),
    )
}

/// A v5 QoS 0 PUBLISH to `t` with the given property block contents and payload `x`.
fn publish_v5(props: &[u8]) -> Vec<u8> {
    frame(
        0x30,
        &cat(&[&field(b"t"), &varint(props.len()), props, b"x"]),
    )
}

/// A v5 SUBSCRIBE (id 1) with the given property block contents and filter entries.
fn subscribe_v5(props: &[u8], filters: &[u8]) -> Vec<u8> {
    frame(0x82, &cat(&[&[0, 1], &varint(props.len()), props, filters]))
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: s(topic),
        packet_id: packet_id.map(pid),
        properties: PublishProperties::default(),
        payload: Bytes::from_static(payload),
    }
}

fn connect(protocol: Protocol, client_id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: s(client_id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

#[track_caller]
fn check_max(
    bytes: &[u8],
    protocol: Protocol,
    max: u32,
    expected: Result<Option<Packet>, DecodeError>,
) {
    let mut buf = BytesMut::from(bytes);
    let got = decode_packet(&mut buf, protocol, max);
    assert_eq!(
        got, expected,
        "decoding {bytes:02x?} as {protocol} (max {max})"
    );
    match got {
        Ok(Some(_)) => assert!(
            buf.is_empty(),
            "{} bytes left after decoding {bytes:02x?}",
            buf.len()
        ),
        Ok(None) => assert_eq!(&buf[..], bytes, "an incomplete packet stays in the buffer"),
        Err(_) => {}
    }
}

/// Decodes `bytes` as `protocol` with a 1 MiB limit and compares with `expected`.
#[track_caller]
fn check(bytes: &[u8], protocol: Protocol, expected: Result<Option<Packet>, DecodeError>) {
    check_max(bytes, protocol, 1 << 20, expected);
}

/// `packet` encodes to exactly `wire` for `protocol`, and `wire` decodes back to `packet`.
#[track_caller]
fn known_answer(packet: Packet, protocol: Protocol, wire: &[u8]) {
    let mut buf = BytesMut::new();
    encode_packet(&packet, protocol, &mut buf).expect("encodes");
    assert_eq!(&buf[..], wire, "encoding {packet:?} for {protocol}");
    assert_eq!(encode::encoded_len(&packet, protocol), wire.len());
    check(wire, protocol, Ok(Some(packet)));
}

// ---------------------------------------------------------------------------------------------
// Strategies: packets valid for a protocol level, as the decoder enforces validity
// ---------------------------------------------------------------------------------------------

fn mqtt_str() -> impl Strategy<Value = MqttStr> + Clone {
    prop_oneof!["[a-z/]{0,8}", "[^\\x00]{0,8}"].prop_map(|v| MqttStr::new(&v).expect("no U+0000"))
}

/// A topic name: no wildcards, possibly empty (callers decide whether empty is allowed).
fn topic_name() -> impl Strategy<Value = MqttStr> + Clone {
    prop_oneof!["[a-z/$]{0,10}", "[^\\x00+#]{0,10}"]
        .prop_map(|v| MqttStr::new(&v).expect("no U+0000"))
}

fn non_empty_topic_name() -> impl Strategy<Value = MqttStr> + Clone {
    prop_oneof!["[a-z/$]{1,10}", "[^\\x00+#]{1,10}"]
        .prop_map(|v| MqttStr::new(&v).expect("no U+0000"))
}

/// Filters are not validated by the codec (the session answers SUBACK 0x8F instead).
fn topic_filter() -> impl Strategy<Value = MqttStr> + Clone {
    prop_oneof!["[a-z/+#]{0,10}", "[^\\x00]{0,6}"]
        .prop_map(|v| MqttStr::new(&v).expect("no U+0000"))
}

fn bin() -> impl Strategy<Value = Bytes> + Clone {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn payload() -> impl Strategy<Value = Bytes> + Clone {
    // Up to 200 bytes so that remaining lengths cross the one-byte boundary.
    vec(any::<u8>(), 0..200).prop_map(Bytes::from)
}

fn packet_id() -> impl Strategy<Value = PacketId> + Clone {
    (1..=u16::MAX).prop_map(pid)
}

fn qos() -> impl Strategy<Value = QoS> + Clone {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn reason_code() -> impl Strategy<Value = ReasonCode> + Clone {
    any::<u8>().prop_map(ReasonCode)
}

fn user_props() -> impl Strategy<Value = Vec<UserProperty>> + Clone {
    vec((mqtt_str(), mqtt_str()), 0..3)
}

fn subscription_id() -> impl Strategy<Value = u32> + Clone {
    prop_oneof![1..=MAX_VARINT, Just(MAX_VARINT), 1..200u32]
}

fn protocol() -> impl Strategy<Value = Protocol> + Clone {
    prop_oneof![Just(V3_1), Just(V3_1_1), Just(V5)]
}

/// A v5-only value: the default for 3.1/3.1.1.
fn v5_only<T, S>(v5: bool, strategy: S) -> BoxedStrategy<T>
where
    T: std::fmt::Debug + Default + Clone + 'static,
    S: Strategy<Value = T> + 'static,
{
    if v5 {
        strategy.boxed()
    } else {
        Just(T::default()).boxed()
    }
}

fn connect_properties() -> impl Strategy<Value = ConnectProperties> {
    (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(1..=u32::MAX),
        option::of(any::<u16>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        user_props(),
        // Authentication data only comes with a method.
        option::of((mqtt_str(), option::of(bin()))),
    )
        .prop_map(|(sei, rm, mps, tam, rri, rpi, user_properties, auth)| {
            let (authentication_method, authentication_data) = match auth {
                Some((m, d)) => (Some(m), d),
                None => (None, None),
            };
            ConnectProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                user_properties,
                authentication_method,
                authentication_data,
            }
        })
}

fn will_properties() -> impl Strategy<Value = WillProperties> {
    (
        option::of(any::<u32>()),
        option::of(0..=1u8),
        option::of(any::<u32>()),
        option::of(mqtt_str()),
        option::of(topic_name()),
        option::of(bin()),
        user_props(),
    )
        .prop_map(
            |(wdi, pfi, mei, ct, rt, cd, user_properties)| WillProperties {
                will_delay_interval: wdi,
                payload_format_indicator: pfi,
                message_expiry_interval: mei,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd,
                user_properties,
            },
        )
}

fn last_will(v5: bool) -> impl Strategy<Value = LastWill> {
    (
        non_empty_topic_name(),
        bin(),
        qos(),
        any::<bool>(),
        v5_only(v5, will_properties()),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        })
}

fn connect_packet(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let v5 = protocol.is_v5();
    (
        any::<bool>(),
        any::<u16>(),
        mqtt_str(),
        option::of(last_will(v5)),
        option::of(mqtt_str()),
        option::of(bin()),
        v5_only(v5, connect_properties()),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                // Before v5 a password may only follow a user name.
                let password = if v5 || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

fn connack_properties() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            option::of(any::<u32>()),
            option::of(any::<u16>()),
            // Maximum QoS is 0 or 1 on the wire; 2 is expressed by leaving it out.
            option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            option::of(any::<bool>()),
            option::of(any::<u32>()),
            option::of(mqtt_str()),
            option::of(any::<u16>()),
            option::of(mqtt_str()),
        ),
        (
            user_props(),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<u16>()),
            option::of(mqtt_str()),
            option::of(mqtt_str()),
            option::of(mqtt_str()),
            option::of(bin()),
        ),
    )
        .prop_map(
            |((sei, rm, mq, ra, mps, aci, tam, rs), (up, wsa, sia, ssa, ska, ri, sr, am, ad))| {
                ConnAckProperties {
                    session_expiry_interval: sei,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: up,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            },
        )
}

fn connack_packet(v5: bool) -> BoxedStrategy<Packet> {
    if v5 {
        (any::<bool>(), reason_code(), connack_properties())
            .prop_map(|(session_present, reason_code, properties)| {
                Packet::ConnAck(ConnAck {
                    session_present,
                    reason_code,
                    properties,
                })
            })
            .boxed()
    } else {
        // 3.x return codes are 0..=5.
        (any::<bool>(), 0..=5u8)
            .prop_map(|(session_present, rc)| {
                Packet::ConnAck(ConnAck {
                    session_present,
                    reason_code: ReasonCode(rc),
                    properties: ConnAckProperties::default(),
                })
            })
            .boxed()
    }
}

fn publish_properties() -> impl Strategy<Value = PublishProperties> {
    (
        option::of(0..=1u8),
        option::of(any::<u32>()),
        option::of(any::<u16>()),
        option::of(topic_name()),
        option::of(bin()),
        user_props(),
        vec(subscription_id(), 0..3),
        option::of(mqtt_str()),
    )
        .prop_map(
            |(pfi, mei, ta, rt, cd, user_properties, subscription_identifiers, ct)| {
                PublishProperties {
                    payload_format_indicator: pfi,
                    message_expiry_interval: mei,
                    topic_alias: ta,
                    response_topic: rt,
                    correlation_data: cd,
                    user_properties,
                    subscription_identifiers,
                    content_type: ct,
                }
            },
        )
}

fn publish_packet(v5: bool) -> impl Strategy<Value = Publish> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        v5_only(v5, publish_properties()),
        payload(),
    )
        .prop_map(|(qos, dup, retain, topic, id, properties, payload)| {
            // The topic may only be empty when a (v5) topic alias stands for it.
            let topic = if topic.is_empty() && properties.topic_alias.is_none() {
                s("t")
            } else {
                topic
            };
            let qos0 = qos == QoS::AtMostOnce;
            Publish {
                dup: dup && !qos0,
                qos,
                retain,
                topic,
                packet_id: (!qos0).then_some(id),
                properties,
                payload,
            }
        })
}

fn ack_properties() -> impl Strategy<Value = AckProperties> + Clone {
    (option::of(mqtt_str()), user_props()).prop_map(|(reason_string, user_properties)| {
        AckProperties {
            reason_string,
            user_properties,
        }
    })
}

fn pub_resp(v5: bool) -> BoxedStrategy<PubResp> {
    if v5 {
        (packet_id(), reason_code(), ack_properties())
            .prop_map(|(packet_id, reason_code, properties)| PubResp {
                packet_id,
                reason_code,
                properties,
            })
            .boxed()
    } else {
        packet_id()
            .prop_map(|id| PubResp::new(id, ReasonCode::SUCCESS))
            .boxed()
    }
}

fn subscription_options(v5: bool) -> BoxedStrategy<SubscriptionOptions> {
    if v5 {
        let rh = prop_oneof![
            Just(RetainHandling::SendAtSubscribe),
            Just(RetainHandling::SendIfNew),
            Just(RetainHandling::DoNotSend)
        ];
        (qos(), any::<bool>(), any::<bool>(), rh)
            .prop_map(
                |(qos, no_local, retain_as_published, retain_handling)| SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                },
            )
            .boxed()
    } else {
        qos()
            .prop_map(|qos| SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            })
            .boxed()
    }
}

fn subscribe_packet(v5: bool) -> impl Strategy<Value = Subscribe> {
    let props = (option::of(subscription_id()), user_props()).prop_map(
        |(subscription_identifier, user_properties)| SubscribeProperties {
            subscription_identifier,
            user_properties,
        },
    );
    (
        packet_id(),
        v5_only(v5, props),
        vec((topic_filter(), subscription_options(v5)), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| Subscribe {
            packet_id,
            properties,
            filters,
        })
}

fn suback_packet(v5: bool) -> impl Strategy<Value = SubAck> {
    (
        packet_id(),
        v5_only(v5, ack_properties()),
        vec(reason_code(), 0..5),
    )
        .prop_map(|(packet_id, properties, reason_codes)| SubAck {
            packet_id,
            properties,
            reason_codes,
        })
}

fn unsubscribe_packet(v5: bool) -> impl Strategy<Value = Unsubscribe> {
    (
        packet_id(),
        v5_only(v5, user_props()),
        vec(topic_filter(), 1..4),
    )
        .prop_map(|(packet_id, user_properties, filters)| Unsubscribe {
            packet_id,
            user_properties,
            filters,
        })
}

fn unsuback_packet(v5: bool) -> impl Strategy<Value = UnsubAck> {
    // MQTT 3.x UNSUBACK carries no reason codes.
    (
        packet_id(),
        v5_only(v5, ack_properties()),
        v5_only(v5, vec(reason_code(), 0..5)),
    )
        .prop_map(|(packet_id, properties, reason_codes)| UnsubAck {
            packet_id,
            properties,
            reason_codes,
        })
}

fn disconnect_packet(v5: bool) -> impl Strategy<Value = Disconnect> {
    let props = (
        option::of(any::<u32>()),
        option::of(mqtt_str()),
        user_props(),
        option::of(mqtt_str()),
    )
        .prop_map(|(sei, rs, user_properties, sr)| DisconnectProperties {
            session_expiry_interval: sei,
            reason_string: rs,
            user_properties,
            server_reference: sr,
        });
    (v5_only(v5, reason_code()), v5_only(v5, props)).prop_map(|(reason_code, properties)| {
        Disconnect {
            reason_code,
            properties,
        }
    })
}

fn auth_packet() -> impl Strategy<Value = Auth> {
    let props = (
        option::of(mqtt_str()),
        option::of(bin()),
        option::of(mqtt_str()),
        user_props(),
    )
        .prop_map(
            |(authentication_method, authentication_data, reason_string, user_properties)| {
                AuthProperties {
                    authentication_method,
                    authentication_data,
                    reason_string,
                    user_properties,
                }
            },
        );
    (reason_code(), props).prop_map(|(reason_code, properties)| Auth {
        reason_code,
        properties,
    })
}

/// Every packet variant, valid for `protocol`.
fn packet(protocol: Protocol) -> BoxedStrategy<Packet> {
    let v5 = protocol.is_v5();
    let mut variants = vec![
        connect_packet(protocol).boxed(),
        connack_packet(v5),
        publish_packet(v5).prop_map(Packet::Publish).boxed(),
        pub_resp(v5).prop_map(Packet::PubAck).boxed(),
        pub_resp(v5).prop_map(Packet::PubRec).boxed(),
        pub_resp(v5).prop_map(Packet::PubRel).boxed(),
        pub_resp(v5).prop_map(Packet::PubComp).boxed(),
        subscribe_packet(v5).prop_map(Packet::Subscribe).boxed(),
        suback_packet(v5).prop_map(Packet::SubAck).boxed(),
        unsubscribe_packet(v5).prop_map(Packet::Unsubscribe).boxed(),
        unsuback_packet(v5).prop_map(Packet::UnsubAck).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect_packet(v5).prop_map(Packet::Disconnect).boxed(),
    ];
    if v5 {
        variants.push(auth_packet().prop_map(Packet::Auth).boxed());
    }
    Union::new(variants).boxed()
}

fn protocol_and_packet() -> impl Strategy<Value = (Protocol, Packet)> {
    protocol().prop_flat_map(|proto| (Just(proto), packet(proto)))
}

// ---------------------------------------------------------------------------------------------
// (a) Round trips
// ---------------------------------------------------------------------------------------------

fn encode_ok(packet: &Packet, protocol: Protocol) -> Result<BytesMut, TestCaseError> {
    let mut wire = BytesMut::new();
    encode_packet(packet, protocol, &mut wire)
        .map_err(|e| TestCaseError::fail(format!("encode failed: {e}")))?;
    Ok(wire)
}

/// decode(encode(p)) == p, whole and in chunks of the given sizes, and the size accounting.
fn assert_round_trip(
    packet: &Packet,
    protocol: Protocol,
    chunks: &[usize],
) -> Result<(), TestCaseError> {
    let wire = encode_ok(packet, protocol)?;
    prop_assert_eq!(
        encode::encoded_len(packet, protocol),
        wire.len(),
        "encoded_len"
    );
    let len = wire.len();

    // All at once.
    let mut buf = wire.clone();
    prop_assert_eq!(
        decode_packet(&mut buf, protocol, u32::MAX),
        Ok(Some(packet.clone()))
    );
    prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());

    // The size limit counts the whole packet and is enforced from the fixed header alone.
    let mut buf = wire.clone();
    prop_assert_eq!(
        decode_packet(&mut buf, protocol, len as u32),
        Ok(Some(packet.clone()))
    );
    let header_len = 1 + read_remaining_length(&wire[1..])
        .expect("valid")
        .expect("complete")
        .1;
    let too_large = Err(PacketTooLarge {
        size: len,
        max: len as u32 - 1,
    });
    prop_assert_eq!(
        decode_packet(
            &mut BytesMut::from(&wire[..header_len]),
            protocol,
            len as u32 - 1
        ),
        too_large
    );

    // Incrementally: nothing until the last byte arrives.
    let mut buf = BytesMut::new();
    let mut fed = 0;
    for &n in chunks.iter().cycle() {
        let n = n.min(len - fed);
        buf.extend_from_slice(&wire[fed..fed + n]);
        fed += n;
        let got = decode_packet(&mut buf, protocol, u32::MAX);
        if fed < len {
            prop_assert_eq!(got, Ok(None), "after {} of {} bytes", fed, len);
            prop_assert_eq!(buf.len(), fed);
        } else {
            prop_assert_eq!(got, Ok(Some(packet.clone())));
            prop_assert!(buf.is_empty());
            break;
        }
    }

    // Back to back, followed by the start of a third copy.
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&wire);
    buf.extend_from_slice(&wire);
    buf.extend_from_slice(&wire[..len / 2]);
    prop_assert_eq!(
        decode_packet(&mut buf, protocol, u32::MAX),
        Ok(Some(packet.clone()))
    );
    prop_assert_eq!(
        decode_packet(&mut buf, protocol, u32::MAX),
        Ok(Some(packet.clone()))
    );
    prop_assert_eq!(decode_packet(&mut buf, protocol, u32::MAX), Ok(None));
    prop_assert_eq!(&buf[..], &wire[..len / 2]);
    Ok(())
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![1..4usize, 1..64usize], 1..16)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip_v3_1(p in packet(V3_1), chunks in chunk_sizes()) {
        assert_round_trip(&p, V3_1, &chunks)?;
    }

    #[test]
    fn round_trip_v3_1_1(p in packet(V3_1_1), chunks in chunk_sizes()) {
        assert_round_trip(&p, V3_1_1, &chunks)?;
    }

    #[test]
    fn round_trip_v5(p in packet(V5), chunks in chunk_sizes()) {
        assert_round_trip(&p, V5, &chunks)?;
    }

    /// A v5 packet sent to a 3.x peer loses its v5-only parts but still decodes.
    #[test]
    fn v5_packets_encode_for_3x(p in packet(V5), proto in prop_oneof![Just(V3_1), Just(V3_1_1)]) {
        let mut wire = BytesMut::new();
        match encode_packet(&p, proto, &mut wire) {
            Err(EncodeError::NotInProtocol(_)) => prop_assert!(matches!(p, Packet::Auth(_))),
            Err(e) => return Err(TestCaseError::fail(format!("encode failed: {e}"))),
            Ok(()) => {
                prop_assert_eq!(encode::encoded_len(&p, proto), wire.len());
                let empty_publish_topic = matches!(&p, Packet::Publish(x) if x.topic.is_empty());
                match decode_packet(&mut wire, proto, u32::MAX) {
                    Ok(Some(q)) => prop_assert_eq!(p.kind(), q.kind()),
                    // Only an alias-only PUBLISH cannot be expressed before v5.
                    other => prop_assert!(empty_publish_topic, "{:?}", other),
                }
            }
        }
    }

    #[test]
    fn varint_round_trip(v in prop_oneof![0..=MAX_VARINT, 0..20_000u32]) {
        let mut buf = BytesMut::new();
        buf.put_varint(v);
        prop_assert_eq!(buf.len(), encode::varint_len(v as usize));
        prop_assert_eq!(&buf[..], &varint(v as usize)[..]);
        prop_assert_eq!(read_remaining_length(&buf), Ok(Some((v as usize, buf.len()))));
        // Any strict prefix is incomplete.
        prop_assert_eq!(read_remaining_length(&buf[..buf.len() - 1]), Ok(None));
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Arbitrary bytes never panic
// ---------------------------------------------------------------------------------------------

fn decode_all(data: &[u8], protocol: Protocol, max: u32) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = decode_packet(&mut buf, protocol, max) {}
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..256), max in 0u32..96) {
        fuzz_logic(&data);
        for proto in ALL {
            decode_all(&data, proto, max);
        }
    }

    /// A correctly framed body of random bytes reaches the per-packet parsers: a complete
    /// frame always yields a packet or an error, never "need more".
    #[test]
    fn framed_random_bodies(first in any::<u8>(), body in vec(any::<u8>(), 0..160)) {
        let wire = frame(first, &body);
        fuzz_logic(&wire);
        for proto in ALL {
            let mut buf = BytesMut::from(&wire[..]);
            let got = decode_packet(&mut buf, proto, u32::MAX);
            prop_assert!(!matches!(got, Ok(None)), "complete frame reported incomplete");
            if got.is_ok() {
                prop_assert!(buf.is_empty());
            }
        }
    }

    /// Valid packets with one byte changed, a few bytes cut or appended: whatever still
    /// decodes must re-encode to an equal packet (`fuzz_logic` asserts it).
    #[test]
    fn mutated_packets((proto, p) in protocol_and_packet(),
                       at in any::<prop::sample::Index>(),
                       byte in any::<u8>(),
                       cut in 0..4usize,
                       tail in vec(any::<u8>(), 0..4)) {
        let mut wire = encode_ok(&p, proto)?.to_vec();
        let i = at.index(wire.len());
        wire[i] = byte;
        fuzz_logic(&wire);
        wire.truncate(wire.len().saturating_sub(cut));
        wire.extend_from_slice(&tail);
        fuzz_logic(&wire);
        for proto in ALL {
            decode_all(&wire, proto, 64);
        }
    }
}

#[test]
fn fuzz_logic_regressions() {
    // 3.1.1 CONNACK with a reserved return code used to decode, then re-encode as 3.
    fuzz_logic(&[0x20, 0x02, 0x00, 0x80]);
    fuzz_logic(&[0x20, 0x02, 0x01, 0x06]);
}

// ---------------------------------------------------------------------------------------------
// (c) Strict validation, table-driven
// ---------------------------------------------------------------------------------------------

#[test]
fn read_remaining_length_values() {
    let cases: &[(&[u8], usize)] = &[
        (&[0x00], 0),
        (&[0x7F], 127),
        (&[0x80, 0x01], 128),
        (&[0xFF, 0x7F], 16_383),
        (&[0x80, 0x80, 0x01], 16_384),
        (&[0xFF, 0xFF, 0x7F], 2_097_151),
        (&[0x80, 0x80, 0x80, 0x01], 2_097_152),
        (&[0xFF, 0xFF, 0xFF, 0x7F], 268_435_455),
    ];
    for &(bytes, value) in cases {
        assert_eq!(
            read_remaining_length(bytes),
            Ok(Some((value, bytes.len()))),
            "{bytes:02x?}"
        );
        // Whatever follows the length is not part of it.
        let mut more = bytes.to_vec();
        more.push(0xFF);
        assert_eq!(
            read_remaining_length(&more),
            Ok(Some((value, bytes.len()))),
            "{bytes:02x?}"
        );
    }
    assert_eq!(read_remaining_length(&[]), Ok(None));
    assert_eq!(read_remaining_length(&[0x80]), Ok(None));
    assert_eq!(read_remaining_length(&[0xFF, 0xFF, 0xFF]), Ok(None));
    assert_eq!(
        read_remaining_length(&[0xFF, 0xFF, 0xFF, 0xFF]),
        Err(MalformedRemainingLength)
    );
}

#[test]
fn remaining_length_rules() {
    // Five length bytes: the fourth still has its continuation bit.
    check(
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        V3_1_1,
        Err(MalformedRemainingLength),
    );
    check(
        &[0xC0, 0x80, 0x80, 0x80, 0x80],
        V5,
        Err(MalformedRemainingLength),
    );
    // Non-minimal encodings.
    check(&[0xC0, 0x80, 0x00], V3_1_1, Err(MalformedRemainingLength));
    check(&[0x30, 0x81, 0x80, 0x00], V5, Err(MalformedRemainingLength));
    check(
        &[0x30, 0xFF, 0xFF, 0x80, 0x00],
        V3_1,
        Err(MalformedRemainingLength),
    );
    // An incomplete length waits for more.
    check(&[0x30], V3_1_1, Ok(None));
    check(&[0x30, 0x80], V3_1_1, Ok(None));
    check(&[0x30, 0xFF, 0xFF, 0xFF], V5, Ok(None));
}

#[test]
fn packet_too_large_from_the_header_alone() {
    // A 16,383-byte body is announced; only the fixed header has arrived.
    check_max(
        &[0x30, 0xFF, 0x7F],
        V3_1_1,
        1000,
        Err(PacketTooLarge {
            size: 16_386,
            max: 1000,
        }),
    );
    check_max(
        &[0x30, 0xFF, 0xFF, 0xFF, 0x7F],
        V5,
        1 << 20,
        Err(PacketTooLarge {
            size: 268_435_460,
            max: 1 << 20,
        }),
    );
    // Even a reserved packet type is rejected for its size first.
    check_max(
        &[0x00, 0x7F],
        V3_1_1,
        100,
        Err(PacketTooLarge {
            size: 129,
            max: 100,
        }),
    );
    // The limit covers the fixed header too, and is inclusive.
    check_max(&[0xC0, 0x00], V3_1_1, 2, Ok(Some(Packet::PingReq)));
    check_max(
        &[0xC0, 0x00],
        V3_1_1,
        1,
        Err(PacketTooLarge { size: 2, max: 1 }),
    );
    let p = Packet::Publish(publish("a", QoS::AtMostOnce, None, b""));
    check_max(&[0x30, 0x03, 0x00, 0x01, b'a'], V3_1_1, 5, Ok(Some(p)));
    check_max(
        &[0x30, 0x03, 0x00, 0x01, b'a'],
        V3_1_1,
        4,
        Err(PacketTooLarge { size: 5, max: 4 }),
    );
    // Incomplete but within the limit: wait.
    check_max(&[0x30, 0x03, 0x00], V3_1_1, 5, Ok(None));
}

#[test]
fn reserved_packet_types() {
    for proto in ALL {
        check(&[0x00, 0x00], proto, Err(ReservedPacketType(0)));
    }
    check(&[0xF0, 0x00], V3_1, Err(ReservedPacketType(15)));
    check(&[0xF0, 0x00], V3_1_1, Err(ReservedPacketType(15)));
    check(&[0xF0, 0x00], V5, Ok(Some(Packet::Auth(Auth::default()))));
}

#[test]
fn fixed_header_flags() {
    // SUBSCRIBE, UNSUBSCRIBE and PUBREL require 0b0010; every other type but PUBLISH 0.
    let cases: &[(u8, u8, u8)] = &[
        (0x80, 8, 0b0000),
        (0x83, 8, 0b0011),
        (0x8A, 8, 0b1010),
        (0xA0, 10, 0b0000),
        (0xA4, 10, 0b0100),
        (0x60, 6, 0b0000),
        (0x63, 6, 0b0011),
        (0x11, 1, 0b0001),
        (0x22, 2, 0b0010),
        (0x42, 4, 0b0010),
        (0x58, 5, 0b1000),
        (0x72, 7, 0b0010),
        (0x92, 9, 0b0010),
        (0xB2, 11, 0b0010),
        (0xC1, 12, 0b0001),
        (0xD4, 13, 0b0100),
        (0xE8, 14, 0b1000),
    ];
    for &(first, kind, flags) in cases {
        for proto in ALL {
            check(&[first, 0x00], proto, Err(InvalidFlags { kind, flags }));
        }
    }
    check(&[0xF1, 0x00], V5, Err(InvalidFlags { kind: 15, flags: 1 }));
    // The required flags are accepted.
    check(
        &[0x62, 0x02, 0x00, 0x01],
        V3_1_1,
        Ok(Some(Packet::PubRel(PubResp::new(
            pid(1),
            ReasonCode::SUCCESS,
        )))),
    );
}

#[test]
fn publish_flags() {
    for proto in [V3_1, V3_1_1] {
        check(
            &[0x36, 0x05, 0, 1, b'a', 0, 1],
            proto,
            Err(Malformed("publish qos 3")),
        );
        check(
            &[0x38, 0x03, 0, 1, b'a'],
            proto,
            Err(Malformed("dup flag set on a qos 0 publish")),
        );
        check(
            &[0x39, 0x03, 0, 1, b'a'],
            proto,
            Err(Malformed("dup flag set on a qos 0 publish")),
        );
    }
    check(
        &[0x3E, 0x05, 0, 1, b'a', 0, 1],
        V5,
        Err(Malformed("publish qos 3")),
    );
    // DUP on QoS 1 and RETAIN on QoS 0 are fine.
    let mut p = publish("a", QoS::AtLeastOnce, Some(7), b"hi");
    p.dup = true;
    p.retain = true;
    check(
        &[0x3B, 0x07, 0, 1, b'a', 0, 7, b'h', b'i'],
        V3_1_1,
        Ok(Some(Packet::Publish(p))),
    );
    let mut p = publish("a", QoS::AtMostOnce, None, b"");
    p.retain = true;
    check(
        &[0x31, 0x03, 0, 1, b'a'],
        V3_1_1,
        Ok(Some(Packet::Publish(p))),
    );
}

#[test]
fn strings_must_be_mqtt_utf8() {
    let bad: &[&[u8]] = &[
        &[0xC3, 0x28],             // invalid continuation
        &[0xC0, 0xAF],             // overlong '/'
        &[0xED, 0xA0, 0x80],       // UTF-16 surrogate
        &[0xF4, 0x90, 0x80, 0x80], // beyond U+10FFFF
        &[0xE2, 0x82],             // truncated sequence
        &[b'a', 0x00, b'b'],       // U+0000
        &[0x00],
    ];
    for &topic in bad {
        for proto in ALL {
            check(
                &frame(0x30, &cat(&[&field(topic), b"x"])),
                proto,
                Err(InvalidUtf8),
            );
        }
        // In a client id, a subscription filter and a v5 user property too.
        check(&connect_311(0x02, &field(topic)), V3_1_1, Err(InvalidUtf8));
        check(
            &frame(0x82, &cat(&[&[0, 1], &field(topic), &[0]])),
            V3_1_1,
            Err(InvalidUtf8),
        );
        check(
            &frame(0xA2, &cat(&[&[0, 1], &field(topic)])),
            V3_1_1,
            Err(InvalidUtf8),
        );
        check(
            &publish_v5(&cat(&[&[0x26], &field(b"k"), &field(topic)])),
            V5,
            Err(InvalidUtf8),
        );
        check(
            &frame(
                0x40,
                &cat(&[
                    &[0, 1, 0x80],
                    &varint(3 + topic.len()),
                    &[0x1F],
                    &field(topic),
                ]),
            ),
            V5,
            Err(InvalidUtf8),
        );
    }
    // Non-ASCII is fine, and U+FEFF is not stripped.
    let topic = "é/日本/\u{FEFF}/🦀";
    let p = Packet::Publish(publish(topic, QoS::AtMostOnce, None, b""));
    check(&frame(0x30, &field(topic.as_bytes())), V3_1_1, Ok(Some(p)));
    // A length that runs past the packet.
    check(
        &frame(0x30, &[0x00, 0x05, b'a']),
        V3_1_1,
        Err(Malformed("packet shorter than its fields")),
    );
    check(
        &frame(0x30, &[0x00]),
        V3_1_1,
        Err(Malformed("packet shorter than its fields")),
    );
}

#[test]
fn publish_topic_names() {
    for topic in [&b"a/+"[..], b"+", b"#", b"a/#", b"a+b", b"sport/tennis#"] {
        for proto in [V3_1, V3_1_1] {
            check(&frame(0x30, &field(topic)), proto, Err(InvalidTopicName));
        }
        check(
            &frame(0x30, &cat(&[&field(topic), &[0]])),
            V5,
            Err(InvalidTopicName),
        );
    }
    // Empty topics: only with a v5 topic alias.
    check(&frame(0x30, &field(b"")), V3_1, Err(InvalidTopicName));
    check(&frame(0x30, &field(b"")), V3_1_1, Err(InvalidTopicName));
    // MQTT 5.0 3.3.2.3.4: an empty topic without an alias is a protocol error (0x82).
    check(
        &frame(0x30, &[0, 0, 0]),
        V5,
        Err(DecodeError::Protocol(
            "empty topic name without a topic alias",
        )),
    );
    let mut p = publish("", QoS::AtMostOnce, None, b"x");
    p.properties.topic_alias = Some(1);
    check(
        &frame(0x30, &[0, 0, 3, 0x23, 0, 1, b'x']),
        V5,
        Ok(Some(Packet::Publish(p))),
    );
    // A will topic must be a non-empty topic name.
    for topic in [&b"w/+"[..], b"#", b""] {
        let will = cat(&[&field(b"c"), &field(topic), &field(b"bye")]);
        check(&connect_311(0x06, &will), V3_1_1, Err(InvalidTopicName));
        let will = cat(&[&field(b"c"), &[0], &field(topic), &field(b"bye")]);
        check(&connect_v5(0x06, &[], &will), V5, Err(InvalidTopicName));
    }
    // v5 response topics are topic names too.
    let rt = cat(&[&[0x08][..], &field(b"reply/+")]);
    check(
        &publish_v5(&rt),
        V5,
        Err(DecodeError::Protocol("response topic contains a wildcard")),
    );
    let will = cat(&[
        &field(b"c"),
        &varint(rt.len()),
        &rt,
        &field(b"w"),
        &field(b"bye"),
    ]);
    check(
        &connect_v5(0x06, &[], &will),
        V5,
        Err(DecodeError::Protocol("response topic contains a wildcard")),
    );
    // `$` topics and odd but legal names are accepted by the codec.
    for topic in ["$SYS/x", "/", "//", " ", "a b"] {
        let p = Packet::Publish(publish(topic, QoS::AtMostOnce, None, b""));
        check(&frame(0x30, &field(topic.as_bytes())), V3_1_1, Ok(Some(p)));
    }
}

#[test]
fn packet_id_zero() {
    let zero = || Err(Malformed("packet identifier 0"));
    for proto in ALL {
        let props: &[u8] = if proto.is_v5() { &[0] } else { &[] };
        check(
            &frame(0x32, &cat(&[&field(b"a"), &[0, 0], props])),
            proto,
            zero(),
        );
        check(
            &frame(0x34, &cat(&[&field(b"a"), &[0, 0], props])),
            proto,
            zero(),
        );
        check(
            &frame(0x82, &cat(&[&[0, 0], props, &field(b"a"), &[0]])),
            proto,
            zero(),
        );
        check(
            &frame(0xA2, &cat(&[&[0, 0], props, &field(b"a")])),
            proto,
            zero(),
        );
        for first in [0x40, 0x50, 0x62, 0x70, 0x90, 0xB0] {
            check(&[first, 0x02, 0x00, 0x00], proto, zero());
        }
    }
}

#[test]
fn connect_validation() {
    let client = field(b"c");
    // Reserved flag.
    check(
        &connect_311(0x01, &client),
        V3_1_1,
        Err(Malformed("reserved connect flag set")),
    );
    check(
        &connect_311(0x03, &client),
        V3_1_1,
        Err(Malformed("reserved connect flag set")),
    );
    check(
        &connect_v5(0x03, &[], &client),
        V5,
        Err(Malformed("reserved connect flag set")),
    );
    // Will QoS or retain without the will flag; will QoS 3.
    for flags in [0x08, 0x10, 0x18, 0x20, 0x2A] {
        check(
            &connect_311(flags, &client),
            V3_1_1,
            Err(Malformed("will qos or retain set without a will")),
        );
    }
    let will = cat(&[&client, &field(b"w"), &field(b"bye")]);
    check(
        &connect_311(0x1C, &will),
        V3_1_1,
        Err(Malformed("will qos 3")),
    );
    // Password without user name: not in 3.x, allowed in v5.
    let with_password = cat(&[&client, &field(b"secret")]);
    check(
        &connect_311(0x42, &with_password),
        V3_1_1,
        Err(Malformed("password without user name")),
    );
    let mut c = connect(V5, "c");
    c.password = Some(Bytes::from_static(b"secret"));
    check(
        &connect_v5(0x42, &[], &with_password),
        V5,
        Ok(Some(Packet::Connect(Box::new(c)))),
    );
    // Missing fields and extra bytes.
    check(
        &connect_311(0x82, &client),
        V3_1_1,
        Err(Malformed("packet shorter than its fields")),
    );
    check(
        &connect_311(0x02, &[]),
        V3_1_1,
        Err(Malformed("packet shorter than its fields")),
    );
    check(
        &connect_311(0x02, &cat(&[&client, &[0]])),
        V3_1_1,
        Err(Malformed("trailing bytes after packet")),
    );
    // An empty client id is the session layer's business.
    let p = Packet::Connect(Box::new(connect(V3_1_1, "")));
    check(&connect_311(0x02, &field(b"")), V3_1_1, Ok(Some(p)));
}

#[test]
fn connect_protocol_name_and_level() {
    let body = |name: &[u8], level: u8| {
        frame(
            0x10,
            &cat(&[&field(name), &[level, 0x02, 0, 60], &field(b"c")]),
        )
    };
    for proto in ALL {
        // The level comes from the CONNECT, whatever the connection assumed so far.
        let c = |p| Ok(Some(Packet::Connect(Box::new(connect(p, "c")))));
        check(&body(b"MQIsdp", 3), proto, c(V3_1));
        check(&body(b"MQTT", 4), proto, c(V3_1_1));
        check(
            &frame(
                0x10,
                &cat(&[&field(b"MQTT"), &[5, 0x02, 0, 60, 0], &field(b"c")]),
            ),
            proto,
            c(V5),
        );
        for (name, level) in [
            (&b"MQTT"[..], 3),
            (b"MQTT", 6),
            (b"MQTT", 0),
            (b"MQIsdp", 4),
            (b"MQIsdp", 5),
            (b"MQTX", 4),
            (b"mqtt", 4),
            (b"", 4),
        ] {
            check(
                &body(name, level),
                proto,
                Err(UnsupportedProtocol { level }),
            );
        }
    }
    // A truncated protocol name is malformed, not an unsupported protocol.
    check(
        &frame(0x10, &[0, 4, b'M', b'Q']),
        V3_1_1,
        Err(Malformed("packet shorter than its fields")),
    );
}

#[test]
fn v5_property_rules() {
    // Duplicates are protocol errors; user properties and subscription ids may repeat.
    let twice = || Err(DecodeError::Protocol("property included more than once"));
    check(
        &publish_v5(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2]),
        V5,
        twice(),
    );
    check(&publish_v5(&[0x23, 0, 1, 0x23, 0, 1]), V5, twice());
    check(&publish_v5(&[0x01, 0, 0x01, 0]), V5, twice());
    check(
        &connect_v5(0x02, &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1], &field(b"c")),
        V5,
        twice(),
    );
    check(
        &subscribe_v5(&[0x0B, 1, 0x0B, 2], &cat(&[&field(b"a"), &[0]])),
        V5,
        twice(),
    );
    check(
        &frame(0x40, &[0, 1, 0x80, 6, 0x1F, 0, 0, 0x1F, 0, 0]),
        V5,
        twice(),
    );
    let mut p = publish("t", QoS::AtMostOnce, None, b"x");
    p.properties.user_properties = vec![(s("k"), s("1")), (s("k"), s("2"))];
    p.properties.subscription_identifiers = vec![5, 3];
    let props = cat(&[
        &[0x26],
        &field(b"k"),
        &field(b"1"),
        &[0x26],
        &field(b"k"),
        &field(b"2"),
        &[0x0B, 5, 0x0B, 3],
    ]);
    check(&publish_v5(&props), V5, Ok(Some(Packet::Publish(p))));

    // A property the packet does not carry.
    let not_allowed = || Err(Malformed("property not allowed in this packet"));
    check(&publish_v5(&[0x11, 0, 0, 0, 1]), V5, not_allowed());
    check(
        &connect_v5(0x02, &[0x23, 0, 1], &field(b"c")),
        V5,
        not_allowed(),
    );
    check(
        &frame(0x40, &[0, 1, 0x00, 3, 0x23, 0, 1]),
        V5,
        not_allowed(),
    );
    check(
        &subscribe_v5(&[0x02, 0, 0, 0, 1], &cat(&[&field(b"a"), &[0]])),
        V5,
        not_allowed(),
    );
    check(
        &frame(0xA2, &cat(&[&[0, 1, 2, 0x0B, 1], &field(b"a")])),
        V5,
        not_allowed(),
    );
    check(&frame(0xE0, &[0x00, 2, 0x0B, 1]), V5, not_allowed());
    check(
        &frame(0x20, &[0, 0, 5, 0x18, 0, 0, 0, 1]),
        V5,
        not_allowed(),
    );
    // Unknown identifiers, including non-minimal and oversized ones.
    let unknown = || Err(Malformed("unknown property identifier"));
    check(&publish_v5(&[0x00]), V5, unknown());
    check(&publish_v5(&[0x7F, 0]), V5, unknown());
    check(&publish_v5(&[0x81, 0x01, 0]), V5, unknown());
    check(&publish_v5(&[0x80, 0x02, 0]), V5, unknown());
    check(
        &publish_v5(&[0x82, 0x00, 0, 0, 0, 1]),
        V5,
        Err(Malformed("variable byte integer longer than 4 bytes")),
    );
    // Lengths that do not fit.
    check(
        &frame(0x30, &[0, 1, b't', 5, 0x01]),
        V5,
        Err(Malformed("packet shorter than its fields")),
    );
    check(
        &publish_v5(&[0x02, 0, 0]),
        V5,
        Err(Malformed("packet shorter than its fields")),
    );
    check(
        &publish_v5(&[0x0B]),
        V5,
        Err(Malformed("truncated variable byte integer")),
    );
    // Value rules.
    check(
        &publish_v5(&[0x0B, 0]),
        V5,
        Err(DecodeError::Protocol("subscription identifier 0")),
    );
    check(
        &subscribe_v5(&[0x0B, 0], &cat(&[&field(b"a"), &[0]])),
        V5,
        Err(DecodeError::Protocol("subscription identifier 0")),
    );
    check(
        &publish_v5(&[0x0B, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
        V5,
        Err(Malformed("variable byte integer longer than 4 bytes")),
    );
    let mut p = publish("t", QoS::AtMostOnce, None, b"x");
    p.properties.subscription_identifiers = vec![MAX_VARINT];
    check(
        &publish_v5(&[0x0B, 0xFF, 0xFF, 0xFF, 0x7F]),
        V5,
        Ok(Some(Packet::Publish(p))),
    );
    check(
        &publish_v5(&[0x01, 2]),
        V5,
        Err(DecodeError::Protocol("payload format indicator not 0 or 1")),
    );
    let c = |props: &[u8]| connect_v5(0x02, props, &field(b"c"));
    check(
        &c(&[0x21, 0, 0]),
        V5,
        Err(DecodeError::Protocol("receive maximum 0")),
    );
    check(
        &c(&[0x27, 0, 0, 0, 0]),
        V5,
        Err(DecodeError::Protocol("maximum packet size 0")),
    );
    check(
        &c(&[0x17, 2]),
        V5,
        Err(DecodeError::Protocol("boolean property is not 0 or 1")),
    );
    check(
        &c(&[0x19, 0xFF]),
        V5,
        Err(DecodeError::Protocol("boolean property is not 0 or 1")),
    );
    check(
        &c(&cat(&[&[0x16], &field(b"data")])),
        V5,
        Err(DecodeError::Protocol(
            "authentication data without a method",
        )),
    );
    check(
        &frame(0x20, &[0, 0, 2, 0x24, 2]),
        V5,
        Err(DecodeError::Protocol("maximum qos not 0 or 1")),
    );
    check(
        &frame(0x20, &[0, 0, 2, 0x25, 3]),
        V5,
        Err(DecodeError::Protocol("boolean property is not 0 or 1")),
    );
}

#[test]
fn subscribe_validation() {
    let no_filters = || Err(DecodeError::Protocol("subscribe without topic filters"));
    check(&[0x82, 0x02, 0, 1], V3_1_1, no_filters());
    check(&[0x82, 0x03, 0, 1, 0], V5, no_filters());
    check(
        &[0xA2, 0x02, 0, 1],
        V3_1_1,
        Err(DecodeError::Protocol("unsubscribe without topic filters")),
    );
    check(
        &[0xA2, 0x03, 0, 1, 0],
        V5,
        Err(DecodeError::Protocol("unsubscribe without topic filters")),
    );

    let entry = |o: u8| cat(&[&field(b"a"), &[o]]);
    check(
        &subscribe_v5(&[], &entry(0x30)),
        V5,
        Err(DecodeError::Protocol("retain handling 3")),
    );
    let reserved = || Err(Malformed("reserved subscription option bits set"));
    check(&subscribe_v5(&[], &entry(0x40)), V5, reserved());
    check(&subscribe_v5(&[], &entry(0x80)), V5, reserved());
    for o in [0x04, 0x08, 0x10, 0x80] {
        // v5 options are reserved bits before v5.
        check(
            &frame(0x82, &cat(&[&[0, 1], &entry(o)])),
            V3_1_1,
            reserved(),
        );
    }
    check(
        &subscribe_v5(&[], &entry(0x03)),
        V5,
        Err(Malformed("subscription qos 3")),
    );
    check(
        &frame(0x82, &cat(&[&[0, 1], &entry(0x03)])),
        V3_1,
        Err(Malformed("subscription qos 3")),
    );
    // A filter without its options byte.
    check(
        &frame(0x82, &cat(&[&[0, 1], &field(b"a")])),
        V3_1_1,
        Err(Malformed("packet shorter than its fields")),
    );

    let sub = Subscribe {
        packet_id: pid(1),
        properties: SubscribeProperties::default(),
        filters: vec![
            (
                s("a/+"),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
            ),
            (
                s("$share/g/#"),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
            ),
        ],
    };
    let entries = cat(&[&field(b"a/+"), &[0x02], &field(b"$share/g/#"), &[0x2D]]);
    check(
        &subscribe_v5(&[], &entries),
        V5,
        Ok(Some(Packet::Subscribe(sub))),
    );
}

#[test]
fn connack_validation() {
    check(
        &[0x20, 0x02, 0x02, 0x00],
        V3_1_1,
        Err(Malformed("reserved connack flags set")),
    );
    check(
        &[0x20, 0x03, 0x80, 0x00, 0x00],
        V5,
        Err(Malformed("reserved connack flags set")),
    );
    for rc in [6, 0x80, 0x87, 0xFF] {
        check(
            &[0x20, 0x02, 0x00, rc],
            V3_1_1,
            Err(Malformed("reserved connack return code")),
        );
        check(
            &[0x20, 0x02, 0x00, rc],
            V3_1,
            Err(Malformed("reserved connack return code")),
        );
    }
    let ack = |rc| ConnAck {
        session_present: true,
        reason_code: ReasonCode(rc),
        properties: Default::default(),
    };
    for rc in 0..=5 {
        check(
            &[0x20, 0x02, 0x01, rc],
            V3_1_1,
            Ok(Some(Packet::ConnAck(ack(rc)))),
        );
    }
    // A v5 CONNACK needs its property length.
    check(
        &[0x20, 0x02, 0x00, 0x00],
        V5,
        Err(Malformed("truncated variable byte integer")),
    );
}

#[test]
fn trailing_bytes() {
    let trailing = || Err(Malformed("trailing bytes after packet"));
    for proto in ALL {
        check(&[0xC0, 0x01, 0x00], proto, trailing());
        check(&[0xD0, 0x01, 0x00], proto, trailing());
    }
    for proto in [V3_1, V3_1_1] {
        check(&[0x40, 0x03, 0, 1, 0], proto, trailing());
        check(&[0x62, 0x03, 0, 1, 0], proto, trailing());
        check(&[0xB0, 0x03, 0, 1, 0], proto, trailing());
        check(&[0xE0, 0x01, 0x00], proto, trailing());
        check(&[0x20, 0x03, 0, 0, 0], proto, trailing());
    }
    check(&[0x40, 0x05, 0, 1, 0x10, 0, 0xFF], V5, trailing());
    check(&[0xE0, 0x03, 0x00, 0x00, 0xFF], V5, trailing());
    check(&[0xF0, 0x03, 0x00, 0x00, 0xFF], V5, trailing());
    check(&[0x20, 0x04, 0, 0, 0, 0xFF], V5, trailing());
}

#[test]
fn truncated_packets_wait_for_more() {
    let full: &[(&[u8], Protocol)] = &[
        (
            &[
                0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07, b'h', b'i',
            ],
            V3_1_1,
        ),
        (
            &[
                0x82, 0x09, 0x00, 0x0A, 0x02, 0x0B, 0x05, 0x00, 0x01, b'a', 0x2E,
            ],
            V5,
        ),
        (&[0x40, 0x03, 0x00, 0x01, 0x10], V5),
        (&[0xC0, 0x00], V3_1),
    ];
    for &(bytes, proto) in full {
        for n in 0..bytes.len() {
            check(&bytes[..n], proto, Ok(None));
        }
        let mut buf = BytesMut::from(bytes);
        assert!(matches!(
            decode_packet(&mut buf, proto, u32::MAX),
            Ok(Some(_))
        ));
    }
}

#[test]
fn v5_short_forms() {
    // PUBACK family: reason code and properties are optional.
    let ok = |rc| Ok(Some(Packet::PubAck(PubResp::new(pid(1), ReasonCode(rc)))));
    check(&[0x40, 0x02, 0, 1], V5, ok(0));
    check(&[0x40, 0x03, 0, 1, 0x10], V5, ok(0x10));
    check(&[0x40, 0x04, 0, 1, 0x10, 0x00], V5, ok(0x10));
    // DISCONNECT and AUTH likewise.
    let d = |rc| Ok(Some(Packet::Disconnect(Disconnect::new(ReasonCode(rc)))));
    check(&[0xE0, 0x00], V5, d(0));
    check(&[0xE0, 0x01, 0x8E], V5, d(0x8E));
    check(&[0xE0, 0x02, 0x8E, 0x00], V5, d(0x8E));
    let a = |rc| {
        Ok(Some(Packet::Auth(Auth {
            reason_code: ReasonCode(rc),
            properties: Default::default(),
        })))
    };
    check(&[0xF0, 0x00], V5, a(0));
    check(&[0xF0, 0x01, 0x18], V5, a(0x18));
    check(&[0xF0, 0x02, 0x18, 0x00], V5, a(0x18));
    // Before v5 the same bytes are trailing garbage (see `trailing_bytes`).
}

// ---------------------------------------------------------------------------------------------
// Known answers: exact wire bytes
// ---------------------------------------------------------------------------------------------

#[test]
fn known_answers() {
    known_answer(Packet::PingReq, V3_1_1, &[0xC0, 0x00]);
    known_answer(Packet::PingResp, V5, &[0xD0, 0x00]);
    known_answer(
        Packet::Disconnect(Disconnect::default()),
        V3_1_1,
        &[0xE0, 0x00],
    );
    known_answer(Packet::Disconnect(Disconnect::default()), V5, &[0xE0, 0x00]);
    known_answer(
        Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER)),
        V5,
        &[0xE0, 0x01, 0x8E],
    );

    // The 3.1.1 specification's CONNECT example: flags 0xCE (user name, password, will QoS 1,
    // will, clean session), keep alive 10.
    let c = Connect {
        protocol: V3_1_1,
        clean_start: true,
        keep_alive: 10,
        client_id: s("petrel"),
        will: Some(LastWill {
            topic: s("w"),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        }),
        username: Some(s("u")),
        password: Some(Bytes::from_static(b"p")),
        properties: Default::default(),
    };
    #[rustfmt::skip]
    let wire = [
        0x10, 0x20,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xCE, 0x00, 0x0A,
        0x00, 0x06, b'p', b'e', b't', b'r', b'e', b'l',
        0x00, 0x01, b'w', 0x00, 0x03, b'b', b'y', b'e',
        0x00, 0x01, b'u', 0x00, 0x01, b'p',
    ];
    known_answer(Packet::Connect(Box::new(c)), V3_1_1, &wire);

    // 3.1: MQIsdp, level 3.
    #[rustfmt::skip]
    let wire = [
        0x10, 0x0F,
        0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C,
        0x00, 0x01, b'c',
    ];
    known_answer(Packet::Connect(Box::new(connect(V3_1, "c"))), V3_1, &wire);

    // v5 CONNECT with session expiry 3600 and receive maximum 20.
    let mut c = connect(V5, "c");
    c.properties.session_expiry_interval = Some(3600);
    c.properties.receive_maximum = Some(20);
    #[rustfmt::skip]
    let wire = [
        0x10, 0x16,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C,
        0x08, 0x11, 0x00, 0x00, 0x0E, 0x10, 0x21, 0x00, 0x14,
        0x00, 0x01, b'c',
    ];
    known_answer(Packet::Connect(Box::new(c)), V5, &wire);

    let ack = |sp, rc| ConnAck {
        session_present: sp,
        reason_code: ReasonCode(rc),
        properties: Default::default(),
    };
    known_answer(
        Packet::ConnAck(ack(true, 0)),
        V3_1_1,
        &[0x20, 0x02, 0x01, 0x00],
    );
    known_answer(
        Packet::ConnAck(ack(false, 0x84)),
        V5,
        &[0x20, 0x03, 0x00, 0x84, 0x00],
    );

    // PUBLISH QoS 1, 3.1.1.
    known_answer(
        Packet::Publish(publish("a/b", QoS::AtLeastOnce, Some(7), b"hi")),
        V3_1_1,
        &[
            0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07, b'h', b'i',
        ],
    );
    // v5 PUBLISH by topic alias only.
    let mut p = publish("", QoS::AtMostOnce, None, b"x");
    p.properties.topic_alias = Some(3);
    known_answer(
        Packet::Publish(p),
        V5,
        &[0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x03, b'x'],
    );

    // v5 PUBACK: success is two bytes; a reason code adds one; a reason string a block.
    let ack = |rc| PubResp::new(pid(1), ReasonCode(rc));
    known_answer(Packet::PubAck(ack(0)), V5, &[0x40, 0x02, 0x00, 0x01]);
    known_answer(
        Packet::PubAck(ack(0x10)),
        V5,
        &[0x40, 0x03, 0x00, 0x01, 0x10],
    );
    let mut r = ack(0x87);
    r.properties.reason_string = Some(s("no"));
    known_answer(
        Packet::PubAck(r),
        V5,
        &[
            0x40, 0x09, 0x00, 0x01, 0x87, 0x05, 0x1F, 0x00, 0x02, b'n', b'o',
        ],
    );
    known_answer(Packet::PubRel(ack(0)), V3_1_1, &[0x62, 0x02, 0x00, 0x01]);
    known_answer(Packet::PubRec(ack(0)), V3_1, &[0x50, 0x02, 0x00, 0x01]);
    known_answer(
        Packet::PubComp(ack(0x92)),
        V5,
        &[0x70, 0x03, 0x00, 0x01, 0x92],
    );

    // SUBSCRIBE: 3.1.1 QoS 1; v5 with subscription id 5 and every option set.
    let sub = |props, o| Subscribe {
        packet_id: pid(10),
        properties: props,
        filters: vec![(s("a"), o)],
    };
    let o = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    known_answer(
        Packet::Subscribe(sub(Default::default(), o)),
        V3_1_1,
        &[0x82, 0x06, 0x00, 0x0A, 0x00, 0x01, b'a', 0x01],
    );
    let props = SubscribeProperties {
        subscription_identifier: Some(5),
        user_properties: vec![],
    };
    let o = SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        no_local: true,
        retain_as_published: true,
        retain_handling: RetainHandling::DoNotSend,
    };
    known_answer(
        Packet::Subscribe(sub(props, o)),
        V5,
        &[
            0x82, 0x09, 0x00, 0x0A, 0x02, 0x0B, 0x05, 0x00, 0x01, b'a', 0x2E,
        ],
    );

    let suback = |rcs: &[u8]| SubAck {
        packet_id: pid(10),
        properties: Default::default(),
        reason_codes: rcs.iter().map(|&b| ReasonCode(b)).collect(),
    };
    known_answer(
        Packet::SubAck(suback(&[0x01, 0x80])),
        V3_1_1,
        &[0x90, 0x04, 0x00, 0x0A, 0x01, 0x80],
    );
    known_answer(
        Packet::SubAck(suback(&[0x02, 0x8F])),
        V5,
        &[0x90, 0x05, 0x00, 0x0A, 0x00, 0x02, 0x8F],
    );

    let unsub = Unsubscribe {
        packet_id: pid(5),
        user_properties: vec![],
        filters: vec![s("a"), s("b")],
    };
    known_answer(
        Packet::Unsubscribe(unsub),
        V3_1_1,
        &[0xA2, 0x08, 0x00, 0x05, 0x00, 0x01, b'a', 0x00, 0x01, b'b'],
    );
    let unsuback = |rcs: Vec<ReasonCode>| UnsubAck {
        packet_id: pid(5),
        properties: Default::default(),
        reason_codes: rcs,
    };
    known_answer(
        Packet::UnsubAck(unsuback(vec![])),
        V3_1_1,
        &[0xB0, 0x02, 0x00, 0x05],
    );
    known_answer(
        Packet::UnsubAck(unsuback(vec![
            ReasonCode::SUCCESS,
            ReasonCode::NO_SUBSCRIPTION_EXISTED,
        ])),
        V5,
        &[0xB0, 0x05, 0x00, 0x05, 0x00, 0x00, 0x11],
    );
    known_answer(Packet::Auth(Auth::default()), V5, &[0xF0, 0x00]);
}

#[test]
fn encoding_only_answers() {
    let enc = |p: &Packet, proto| {
        let mut buf = BytesMut::new();
        encode_packet(p, proto, &mut buf).map(|()| buf.to_vec())
    };
    // A v5 CONNACK reason code sent to a 3.x client becomes the nearest return code.
    for (rc, v3) in [
        (0x87, 5),
        (0x86, 4),
        (0x85, 2),
        (0x84, 1),
        (0x88, 3),
        (0x80, 3),
        (0x00, 0),
    ] {
        let ack = ConnAck {
            session_present: false,
            reason_code: ReasonCode(rc),
            properties: Default::default(),
        };
        assert_eq!(
            enc(&Packet::ConnAck(ack), V3_1_1),
            Ok(vec![0x20, 0x02, 0x00, v3]),
            "{rc:#x}"
        );
    }
    // 3.x acks drop v5 reason codes and properties; so does DISCONNECT.
    let mut r = PubResp::new(pid(1), ReasonCode::NO_MATCHING_SUBSCRIBERS);
    r.properties.reason_string = Some(s("x"));
    assert_eq!(
        enc(&Packet::PubAck(r), V3_1_1),
        Ok(vec![0x40, 0x02, 0x00, 0x01])
    );
    assert_eq!(
        enc(&Packet::Disconnect(Disconnect::new(ReasonCode(0x8B))), V3_1),
        Ok(vec![0xE0, 0x00])
    );
    // AUTH does not exist before v5.
    assert_eq!(
        enc(&Packet::Auth(Auth::default()), V3_1_1),
        Err(EncodeError::NotInProtocol("auth"))
    );
    // Remaining-length boundaries.
    for (payload_len, header) in [
        (124, &[0x30, 0x7F][..]),
        (125, &[0x30, 0x80, 0x01]),
        (16_380, &[0x30, 0xFF, 0x7F]),
        (16_381, &[0x30, 0x80, 0x80, 0x01]),
    ] {
        let mut p = publish("a", QoS::AtMostOnce, None, b"");
        p.payload = Bytes::from(vec![0xAB; payload_len]);
        let wire = enc(&Packet::Publish(p.clone()), V3_1_1).expect("encodes");
        assert_eq!(&wire[..header.len()], header, "payload of {payload_len}");
        assert_eq!(wire.len(), header.len() + 3 + payload_len);
        check(&wire, V3_1_1, Ok(Some(Packet::Publish(p))));
    }
}

#[test]
fn error_reason_codes_and_metric_labels() {
    let cases = [
        (
            MalformedRemainingLength,
            ReasonCode::MALFORMED_PACKET,
            "remaining_length",
        ),
        (
            PacketTooLarge { size: 2, max: 1 },
            ReasonCode::PACKET_TOO_LARGE,
            "too_large",
        ),
        (
            ReservedPacketType(0),
            ReasonCode::MALFORMED_PACKET,
            "packet_type",
        ),
        (
            InvalidFlags { kind: 8, flags: 0 },
            ReasonCode::MALFORMED_PACKET,
            "flags",
        ),
        (Malformed("x"), ReasonCode::MALFORMED_PACKET, "malformed"),
        (
            DecodeError::Protocol("x"),
            ReasonCode::PROTOCOL_ERROR,
            "protocol",
        ),
        (InvalidUtf8, ReasonCode::MALFORMED_PACKET, "utf8"),
        (
            InvalidTopicName,
            ReasonCode::TOPIC_NAME_INVALID,
            "topic_name",
        ),
        (
            UnsupportedProtocol { level: 6 },
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            "protocol_version",
        ),
    ];
    for (err, rc, label) in cases {
        assert_eq!(err.reason_code(), rc, "{err}");
        assert_eq!(err.metric_label(), label, "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// (d) PublishOut
// ---------------------------------------------------------------------------------------------

#[test]
fn publish_out_overrides() {
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(100),
        topic_alias: Some(1),
        response_topic: Some(s("reply")),
        correlation_data: Some(Bytes::from_static(b"corr")),
        user_properties: vec![(s("k"), s("v"))],
        subscription_identifiers: vec![1],
        content_type: Some(s("text/plain")),
    };
    let out = PublishOut {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "",
        packet_id: Some(pid(9)),
        props: &props,
        message_expiry_interval: Some(5),
        topic_alias: Some(7),
        subscription_identifiers: &[3, MAX_VARINT],
        payload: b"hello",
    };
    let mut wire = BytesMut::new();
    out.encode(V5, &mut wire).expect("encodes");
    assert_eq!(out.encoded_len(V5), wire.len());
    let want = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: s(""),
        packet_id: Some(pid(9)),
        properties: PublishProperties {
            message_expiry_interval: Some(5),
            topic_alias: Some(7),
            subscription_identifiers: vec![3, MAX_VARINT],
            ..props.clone()
        },
        payload: Bytes::from_static(b"hello"),
    };
    check(&wire, V5, Ok(Some(Packet::Publish(want))));

    // No overrides: expiry, alias and subscription ids are left out even if `props` has them.
    let out = PublishOut {
        topic: "a/b",
        message_expiry_interval: None,
        topic_alias: None,
        subscription_identifiers: &[],
        ..out
    };
    let mut wire = BytesMut::new();
    out.encode(V5, &mut wire).expect("encodes");
    let mut want = publish("a/b", QoS::AtLeastOnce, Some(9), b"hello");
    want.retain = true;
    want.properties = PublishProperties {
        message_expiry_interval: None,
        topic_alias: None,
        subscription_identifiers: vec![],
        ..props.clone()
    };
    check(&wire, V5, Ok(Some(Packet::Publish(want))));

    // 3.1.1 carries none of the properties.
    let mut wire = BytesMut::new();
    out.encode(V3_1_1, &mut wire).expect("encodes");
    assert_eq!(out.encoded_len(V3_1_1), wire.len());
    let mut want = publish("a/b", QoS::AtLeastOnce, Some(9), b"hello");
    want.retain = true;
    check(&wire, V3_1_1, Ok(Some(Packet::Publish(want))));

    // QoS > 0 needs a packet id.
    let out = PublishOut {
        packet_id: None,
        ..out
    };
    assert_eq!(
        out.encode(V5, &mut BytesMut::new()),
        Err(EncodeError::MissingPacketId)
    );
}

proptest! {
    /// PublishOut with arbitrary per-subscriber overrides decodes to the publish it describes.
    #[test]
    fn publish_out_matches_publish(base in publish_packet(true),
                                   topic in non_empty_topic_name(),
                                   expiry in option::of(any::<u32>()),
                                   alias in option::of(any::<u16>()),
                                   sub_ids in vec(subscription_id(), 0..4),
                                   packet_id in packet_id(),
                                   q in qos()) {
        let packet_id = (q != QoS::AtMostOnce).then_some(packet_id);
        let out = PublishOut {
            dup: false,
            qos: q,
            retain: base.retain,
            topic: &topic,
            packet_id,
            props: &base.properties,
            message_expiry_interval: expiry,
            topic_alias: alias,
            subscription_identifiers: &sub_ids,
            payload: &base.payload,
        };
        let mut wire = BytesMut::new();
        out.encode(V5, &mut wire).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(out.encoded_len(V5), wire.len());
        let want = Publish {
            dup: false,
            qos: q,
            retain: base.retain,
            topic: topic.clone(),
            packet_id,
            properties: PublishProperties {
                message_expiry_interval: expiry,
                topic_alias: alias,
                subscription_identifiers: sub_ids.clone(),
                ..base.properties.clone()
            },
            payload: base.payload.clone(),
        };
        prop_assert_eq!(decode_packet(&mut wire, V5, u32::MAX), Ok(Some(Packet::Publish(want))));
        prop_assert!(wire.is_empty());
    }
}
