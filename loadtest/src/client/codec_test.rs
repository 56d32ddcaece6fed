use bytes::{BufMut, BytesMut};

use super::*;

fn only_frame(buf: &[u8]) -> Frame {
    let f = frame(buf, MAX_REMAINING_LENGTH)
        .expect("valid")
        .expect("complete");
    assert_eq!(f.packet_len(), buf.len(), "one packet exactly");
    f
}

#[test]
fn varint_boundaries_round_trip_through_frame() {
    for n in [
        0usize,
        1,
        127,
        128,
        16_383,
        16_384,
        2_097_151,
        2_097_152,
        MAX_REMAINING_LENGTH,
    ] {
        let mut buf = BytesMut::new();
        buf.put_u8(0x30);
        put_varint(&mut buf, n);
        assert_eq!(buf.len() - 1, varint_len(n), "length of {n}");
        let header_len = buf.len();
        // Only the header: incomplete unless the body is empty.
        let f = frame(&buf, MAX_REMAINING_LENGTH).expect("valid");
        assert_eq!(f.is_some(), n == 0, "{n}");
        if n < 100_000 {
            buf.put_bytes(7, n);
            let f = only_frame(&buf);
            assert_eq!((f.kind, f.header_len, f.body_len), (3, header_len, n));
        }
    }
}

#[test]
fn frame_needs_the_whole_packet_and_rejects_bad_lengths() {
    assert_eq!(frame(&[], 10), Ok(None));
    assert_eq!(frame(&[0x40], 10), Ok(None));
    assert_eq!(frame(&[0x40, 2, 0], 10), Ok(None));
    assert_eq!(
        frame(&[0x40, 0x80], 10),
        Ok(None),
        "continuation byte pending"
    );
    assert_eq!(
        frame(&[0x40, 0x80, 0x80, 0x80, 0x80], 10),
        Err(DecodeError::RemainingLength)
    );
    assert_eq!(frame(&[0x40, 11], 10), Err(DecodeError::TooLarge(11)));
    let two = [0x40, 2, 0, 1, 0x50, 2, 0, 2];
    let f = frame(&two, 10).unwrap().unwrap();
    assert_eq!((f.kind, f.flags, f.packet_len()), (kind::PUBACK, 0, 4));
    assert_eq!(parse_ack(f.body(&two)), Ok((1, 0)));
}

#[test]
fn connect_311_is_byte_exact() {
    let mut buf = BytesMut::new();
    let c = Connect {
        version: Version::V311,
        client_id: "ab",
        clean: true,
        keepalive_secs: 60,
        session_expiry_secs: Some(9),
        receive_maximum: Some(9),
        username: None,
        password: None,
    };
    encode_connect(&mut buf, &c);
    let want = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'a', b'b',
    ];
    assert_eq!(&buf[..], &want[..]);
    let f = only_frame(&buf);
    assert_eq!(parse_connect_version(f.body(&buf)), Ok(Version::V311));
}

#[test]
fn connect_5_carries_properties_and_credentials() {
    let mut buf = BytesMut::new();
    let c = Connect {
        version: Version::V5,
        client_id: "c",
        clean: false,
        keepalive_secs: 5,
        session_expiry_secs: Some(300),
        receive_maximum: Some(64),
        username: Some("u"),
        password: Some("pw"),
    };
    encode_connect(&mut buf, &c);
    let want = [
        0x10, 29, 0, 4, b'M', b'Q', b'T', b'T', 5, 0xC0, 0,
        5, // header, flags: user+pass, no clean
        8, 0x11, 0, 0, 1, 44, 0x21, 0, 64, // properties
        0, 1, b'c', 0, 1, b'u', 0, 2, b'p', b'w',
    ];
    assert_eq!(&buf[..], &want[..]);
    assert_eq!(
        parse_connect_version(only_frame(&buf).body(&buf)),
        Ok(Version::V5)
    );
}

#[test]
fn publish_round_trips_at_every_qos_and_version() {
    for version in [Version::V311, Version::V5] {
        for qos in 0..=2u8 {
            let mut buf = BytesMut::new();
            let stamp = Stamp {
                publisher: 7,
                seq: 1 << 40,
                sent_ns: 123_456_789,
            };
            encode_publish(&mut buf, version, b"a/b", qos, 513, stamp, 64);
            let f = only_frame(&buf);
            assert_eq!(f.kind, kind::PUBLISH);
            let p = parse_publish(version, f.flags, f.body(&buf)).expect("parse");
            assert_eq!(
                (p.qos, p.dup, p.retain, p.topic),
                (qos, false, false, &b"a/b"[..])
            );
            assert_eq!(p.pid, if qos > 0 { 513 } else { 0 });
            assert_eq!(p.payload.len(), 64);
            assert_eq!(parse_stamp(p.payload), Some(stamp));
        }
    }
}

#[test]
fn publish_payload_is_at_least_the_stamp() {
    let mut buf = BytesMut::new();
    encode_publish(
        &mut buf,
        Version::V311,
        b"t",
        0,
        0,
        Stamp {
            publisher: 1,
            seq: 2,
            sent_ns: 3,
        },
        1,
    );
    let f = only_frame(&buf);
    let p = parse_publish(Version::V311, f.flags, f.body(&buf)).unwrap();
    assert_eq!(p.payload.len(), STAMP_LEN);
}

#[test]
fn foreign_payloads_have_no_stamp() {
    assert_eq!(parse_stamp(b"hello"), None);
    assert_eq!(parse_stamp(&[0u8; 40]), None, "wrong magic");
    let mut short = BytesMut::new();
    short.put_u32(STAMP_MAGIC);
    short.put_u32(1);
    assert_eq!(parse_stamp(&short), None, "truncated after the magic");
}

#[test]
fn v5_publish_from_a_broker_with_properties_parses() {
    // qos 1, dup, retain; properties: message expiry (4 bytes) + subscription id varint.
    let body = [
        0, 1, b't', 0, 9, 8, 0x02, 0, 0, 0, 10, 0x0B, 0x81, 0x01, b'x',
    ];
    let p = parse_publish(Version::V5, 0x0B, &body).unwrap();
    assert_eq!(
        (p.qos, p.dup, p.retain, p.pid, p.payload),
        (1, true, true, 9, &b"x"[..])
    );
    assert_eq!(
        parse_publish(Version::V5, 0x02, &body[..4]),
        Err(DecodeError::Truncated("publish"))
    );
}

#[test]
fn acks_encode_with_the_right_flags() {
    for (k, first) in [
        (kind::PUBACK, 0x40),
        (kind::PUBREC, 0x50),
        (kind::PUBREL, 0x62),
        (kind::PUBCOMP, 0x70),
    ] {
        let mut buf = BytesMut::new();
        encode_ack(&mut buf, k, 0x0102);
        assert_eq!(&buf[..], &[first, 2, 1, 2]);
    }
    assert_eq!(parse_ack(&[0, 5, 0x10]), Ok((5, 0x10)), "v5 reason code");
    assert_eq!(parse_ack(&[0]), Err(DecodeError::Truncated("ack")));
}

#[test]
fn connack_5_properties_are_read_and_unknown_ones_skipped() {
    let body = [
        1, 0, 20, // session present, success, properties length
        0x21, 0, 20, // receive maximum
        0x24, 1, // maximum qos
        0x26, 0, 1, b'k', 0, 1, b'v', // user property (skipped)
        0x13, 0, 30, // server keep alive
        0x1F, 0, 2, b'o', b'k', // reason string
    ];
    let ack = parse_connack(Version::V5, &body).unwrap();
    assert!(ack.session_present);
    assert_eq!(ack.receive_maximum, Some(20));
    assert_eq!(ack.maximum_qos, Some(1));
    assert_eq!(ack.server_keepalive, Some(30));
    assert_eq!(ack.reason_string.as_deref(), Some("ok"));
    assert_eq!(
        parse_connack(Version::V5, &[0, 0, 2, 0x7F, 0]),
        Err(DecodeError::Property(0x7F))
    );
    assert_eq!(parse_connack(Version::V311, &[0, 5]).unwrap().code, 5);
}

#[test]
fn subscribe_and_suback_round_trip() {
    for version in [Version::V311, Version::V5] {
        let mut buf = BytesMut::new();
        encode_subscribe(&mut buf, version, 3, "$share/g/a/+", 2);
        let f = only_frame(&buf);
        assert_eq!((f.kind, f.flags), (kind::SUBSCRIBE, 2));
        let mut qos = Vec::new();
        assert_eq!(parse_subscribe(version, f.body(&buf), &mut qos), Ok(3));
        assert_eq!(qos, [2]);

        let mut buf = BytesMut::new();
        encode_suback(&mut buf, version, 3, &[2, 0x80]);
        let f = only_frame(&buf);
        assert_eq!(
            parse_suback(version, f.body(&buf)),
            Ok((3, &[2u8, 0x80][..]))
        );
    }
}

#[test]
fn connack_and_disconnect_encodings() {
    let mut buf = BytesMut::new();
    encode_connack(&mut buf, Version::V5, 0);
    let f = only_frame(&buf);
    assert_eq!(
        parse_connack(Version::V5, f.body(&buf)).unwrap(),
        ConnAck::default()
    );

    let mut buf = BytesMut::new();
    encode_disconnect(&mut buf, Version::V5, true);
    let f = only_frame(&buf);
    assert_eq!(parse_disconnect(Version::V5, f.body(&buf)), Ok((0, None)));
    let mut buf = BytesMut::new();
    encode_disconnect(&mut buf, Version::V311, true);
    assert_eq!(&buf[..], &[0xE0, 0]);

    let body = [0x8E, 6, 0x1F, 0, 3, b'b', b'y', b'e'];
    assert_eq!(
        parse_disconnect(Version::V5, &body),
        Ok((0x8E, Some("bye".into())))
    );
}
