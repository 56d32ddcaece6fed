use super::*;
use crate::codec::{MqttStr, QoS};

fn live(topic: &'static str, payload: &'static [u8], qos: QoS, retain: bool) -> Message {
    let mut m = Message::broker(
        MqttStr::from_static(topic),
        Bytes::from_static(payload),
        retain,
    );
    m.qos = qos;
    m
}

/// Messages with every optional part, in both forms.
fn sample() -> Vec<(pb::ForwardedMessage, Option<Message>)> {
    let plain = pb::ForwardedMessage {
        seq: 1,
        plain: true,
        published_at_ms: 1_700_000_000_123,
        routed_at: 42,
        ..Default::default()
    };
    let everything = pb::ForwardedMessage {
        seq: 2,
        plain: false,
        share_redirected: true,
        first_incarnation: 99,
        first_seq: 7,
        client_id: "dev-ü".into(),
        shared: vec![
            pb::SharedTarget {
                group: "g1".into(),
                filter: "a/+".into(),
            },
            pb::SharedTarget {
                group: "g2".into(),
                filter: "#".into(),
            },
        ],
        ..Default::default()
    };
    let stored = pb::ForwardedMessage {
        seq: u64::MAX,
        plain: true,
        message: Bytes::from_static(b"\x01stored encoding"),
        ..Default::default()
    };
    vec![
        (
            plain.clone(),
            Some(live("a/b", b"payload", QoS::AtLeastOnce, false)),
        ),
        (everything, Some(live("c", b"", QoS::ExactlyOnce, true))),
        (stored, None),
        (
            plain,
            Some(live("a/b", &[0xff; 300], QoS::AtMostOnce, false)),
        ),
    ]
}

fn pack(msgs: &[(pb::ForwardedMessage, Option<Message>)]) -> Bytes {
    let mut p = Packer::with_capacity(16);
    for (m, l) in msgs {
        p.push(m, l.as_ref());
    }
    p.finish()
}

#[test]
fn a_packed_batch_reads_back_as_written() {
    let msgs = sample();
    let packed = pack(&msgs);
    let got: Vec<_> = unpack(packed.clone())
        .expect("header")
        .map(|r| r.expect("reads"))
        .collect();
    assert_eq!(got.len(), msgs.len());
    for ((m, l), (g, fields)) in msgs.iter().zip(got) {
        match l {
            Some(l) => {
                let f = fields.expect("as fields");
                assert_eq!(f.topic.as_bytes(), l.topic.as_bytes());
                assert_eq!(f.payload, l.payload);
                assert_eq!((f.qos, f.retain), (l.qos, l.retain));
                // Slices of the batch, not copies.
                let range = packed.as_ptr_range();
                assert!(range.contains(&f.payload.as_ptr()) || f.payload.is_empty());
                assert!(g.message.is_empty());
            }
            None => {
                assert!(fields.is_none());
                assert_eq!(g.message, m.message);
            }
        }
        let mut want = m.clone();
        want.message = g.message.clone();
        assert_eq!(g, want);
    }
    // A batch of the listed form reads through the same iterator.
    let mut b = pb::ForwardBatch {
        messages: vec![msgs[2].0.clone()],
        ..Default::default()
    };
    let listed: Vec<_> = Messages::of(&mut b).expect("listed").collect();
    assert_eq!(listed, vec![Ok((msgs[2].0.clone(), None))]);
}

#[test]
fn a_packed_batch_that_does_not_read_is_refused_whole_and_never_panics() {
    let packed = pack(&sample());
    // Cut anywhere: an error (or, cut after the header, fewer messages than counted, which
    // is an error too), never a panic or a message made up.
    for n in 0..packed.len() {
        let cut = packed.slice(..n);
        match unpack(cut) {
            Err(_) => {}
            Ok(it) => {
                let r: Vec<_> = it.collect();
                assert!(r.last().is_some_and(|x| x.is_err()), "cut at {n}: {r:?}");
                assert_eq!(r.iter().filter(|x| x.is_err()).count(), 1);
            }
        }
    }
    let mut v = packed.to_vec();
    v.push(0);
    let r: Vec<_> = unpack(Bytes::from(v)).expect("header").collect();
    assert_eq!(
        r.last(),
        Some(&Err(Malformed("bytes after the last message")))
    );
    let mut v = packed.to_vec();
    v[0] = 2;
    assert!(unpack(Bytes::from(v)).is_err(), "unknown version");
    // The first message's flags (after the header and its seq) with an unknown bit.
    let mut v = packed.to_vec();
    v[5 + 8] |= 0x80;
    let r: Vec<_> = unpack(Bytes::from(v)).expect("header").collect();
    assert_eq!(r, vec![Err(Malformed("unknown flags"))]);
    // A share-target count far past the bytes: refused before anything is reserved.
    let mut v = vec![VERSION, 0, 0, 0, 1];
    v.extend_from_slice(&1u64.to_be_bytes());
    v.extend_from_slice(&(SHARED | STORED).to_be_bytes());
    v.extend_from_slice(&[0; 16]);
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    let r: Vec<_> = unpack(Bytes::from(v)).expect("header").collect();
    assert_eq!(r, vec![Err(Malformed("share targets past the end"))]);
    // A client id that is not UTF-8.
    let mut v = vec![VERSION, 0, 0, 0, 1];
    v.extend_from_slice(&1u64.to_be_bytes());
    v.extend_from_slice(&(CLIENT | STORED).to_be_bytes());
    v.extend_from_slice(&[0; 16]);
    v.extend_from_slice(&[0, 1, 0xff, 0, 0, 0, 0]);
    let r: Vec<_> = unpack(Bytes::from(v)).expect("header").collect();
    assert_eq!(r, vec![Err(Malformed("a string that is not UTF-8"))]);
}

/// One message of seq 1 with `flags`, no optional parts, and `rest` after the fixed fields.
fn one(flags: u16, rest: &[u8]) -> Bytes {
    let mut v = vec![VERSION, 0, 0, 0, 1];
    v.extend_from_slice(&1u64.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&[0; 16]);
    v.extend_from_slice(rest);
    Bytes::from(v)
}

/// A topic and a one-byte payload as the fields form writes them.
fn topic_and_payload(topic: &[u8]) -> Vec<u8> {
    let mut v = (topic.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(topic);
    v.extend_from_slice(&[0, 0, 0, 1, b'p']);
    v
}

fn first_error(b: Bytes) -> Option<Malformed> {
    unpack(b).expect("header").find_map(|r| r.err())
}

#[test]
fn fields_are_checked_as_a_publish_is() {
    let qos1 = 1 << QOS_SHIFT;
    assert_eq!(first_error(one(qos1, &topic_and_payload(b"a/b"))), None);
    let refused = |topic: &[u8], flags| first_error(one(flags, &topic_and_payload(topic)));
    assert_eq!(refused(b"a/#", qos1), Some(Malformed("not a topic name")));
    assert_eq!(refused(b"a/+/b", 0), Some(Malformed("not a topic name")));
    assert_eq!(refused(b"", 0), Some(Malformed("not a topic name")));
    let not_mqtt = Some(Malformed("a topic that is not an MQTT string"));
    assert_eq!(refused(b"a\xff", 0), not_mqtt);
    assert_eq!(refused(b"a\0b", 0), not_mqtt);
    assert_eq!(refused(b"a", 3 << QOS_SHIFT), Some(Malformed("QoS 3")));
    // The stored encoding carries its own QoS and retain flag: none beside it.
    let stored = [0, 0, 0, 1, 1];
    assert_eq!(first_error(one(STORED, &stored)), None);
    assert_eq!(
        first_error(one(STORED | RETAIN, &stored)),
        Some(Malformed("QoS or retain flags beside a stored encoding"))
    );
    // A batch with messages both packed and listed is refused whole.
    let mut b = pb::ForwardBatch {
        messages: vec![pb::ForwardedMessage::default()],
        packed: one(qos1, &topic_and_payload(b"a")),
        ..Default::default()
    };
    assert!(Messages::of(&mut b).is_err());
    assert_eq!(count(&one(0, &[])), 1);
    assert_eq!(count(b""), 0);
}
