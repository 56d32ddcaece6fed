//! Issue 2, point 10: bad input gets the right reason code or a closed connection, is
//! counted, and never affects other clients.

use std::time::Instant;

use crate::*;
use pkt::Connect;

fn reason(r: &str) -> String {
    format!("petrel_mqtt_bad_packets_total{{reason=\"{r}\"}}")
}

/// Closed, with a v5 DISCONNECT carrying `code` as the last packet.
fn assert_disconnect(got: &[RawPacket], code: u8) {
    let last = got
        .last()
        .unwrap_or_else(|| panic!("no DISCONNECT {code:#04x} before close"));
    assert_eq!(
        last.kind,
        kind::DISCONNECT,
        "last packet {last:?} of {got:?}"
    );
    assert_eq!(
        last.disconnect_reason(),
        code,
        "DISCONNECT reason {:#04x}, expected {code:#04x}",
        last.disconnect_reason()
    );
}

/// No CONNACK accepting the connection, no DISCONNECT below 0x80.
fn assert_no_success(got: &[RawPacket]) {
    for p in got {
        match p.kind {
            kind::CONNACK => assert_ne!(p.connack().1, 0, "accepted: {got:?}"),
            kind::DISCONNECT => assert!(p.disconnect_reason() >= 0x80, "{got:?}"),
            _ => panic!("unexpected packet {p:?}"),
        }
    }
}

async fn v311(b: &Broker, id: &str) -> RawClient {
    RawClient::handshake(b.mqtt_addr(), &Connect::v311(id))
        .await
        .0
}

async fn v5(b: &Broker, id: &str) -> RawClient {
    RawClient::handshake(b.mqtt_addr(), &Connect::v5(id))
        .await
        .0
}

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "garbage").await;
        let before = b.metric_sum("petrel_mqtt_bad_packets_total").await;
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        raw.send(b"GET / HTTP/1.1\r\nHost: petrel\r\n\r\n").await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        raw.send(&[0xFF; 64]).await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        b.wait_metric_sum_at_least(before + 2.0).await;
        bystander.check().await;
    })
    .await
}

trait SumWait {
    async fn wait_metric_sum_at_least(&self, n: f64);
}

impl SumWait for Broker {
    async fn wait_metric_sum_at_least(&self, n: f64) {
        wait_until("bad packet counter rises", WAIT, || async {
            let v = self.metric_sum("petrel_mqtt_bad_packets_total").await;
            if v >= n {
                Ok(())
            } else {
                Err(v)
            }
        })
        .await
    }
}

#[tokio::test]
async fn first_packet_must_be_connect() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "first").await;
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        raw.send(&pkt::pingreq()).await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        raw.send(&pkt::publish(false, "a/b", b"x", 0, 0, false, false, &[]))
            .await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        b.wait_metric(&reason("first_packet_not_connect"), WAIT, |v| v >= 2.0)
            .await;
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn silent_client_dropped_after_connect_timeout() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__CONNECT_TIMEOUT_MS", "500")], &[]).await;
        let mut bystander = Bystander::new(&b, "silent").await;

        // Closed, with nothing sent, and not before the timeout: the broker's clock starts
        // after `start` (at accept), so a loaded machine can only make the close later. The
        // deadline for the close (WAIT) is the generous one of every positive wait.
        let limit = Duration::from_millis(500);
        eprintln!("--- nothing at all");
        let start = Instant::now();
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        assert!(raw.expect_closed(WAIT).await.is_empty());
        let took = start.elapsed();
        assert!(
            took >= limit,
            "closed after {took:?}, before the 500 ms connect timeout"
        );

        eprintln!("--- half a CONNECT");
        let start = Instant::now();
        let mut raw = RawClient::connect(b.mqtt_addr()).await;
        let connect = Connect::v311("slow").encode();
        raw.send(&connect[..5]).await;
        assert!(raw.expect_closed(WAIT).await.is_empty());
        let took = start.elapsed();
        assert!(
            took >= limit,
            "closed after {took:?}, before the 500 ms connect timeout"
        );

        b.wait_metric("petrel_mqtt_connect_timeouts_total", WAIT, |v| v >= 2.0)
            .await;
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn malformed_remaining_length() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "rl").await;
        let five_byte_length = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];

        let mut raw = v311(&b, "rl3").await;
        raw.send(&five_byte_length).await;
        assert_no_success(&raw.expect_closed(WAIT).await);

        let mut raw = v5(&b, "rl5").await;
        raw.send(&five_byte_length).await;
        assert_disconnect(&raw.expect_closed(WAIT).await, 0x81);

        b.wait_metric(&reason("remaining_length"), WAIT, |v| v >= 2.0)
            .await;
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn truncated_packets() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "trunc").await;

        eprintln!("--- topic length beyond the packet (v5): malformed 0x81");
        let mut raw = v5(&b, "trunc5").await;
        raw.send(&pkt::frame(0x30, &[0x00, 0x32, b'a', b'b', 0x00]))
            .await;
        assert_disconnect(&raw.expect_closed(WAIT).await, 0x81);

        eprintln!("--- topic length beyond the packet (3.1.1): closed");
        let mut raw = v311(&b, "trunc3").await;
        raw.send(&pkt::frame(0x30, &[0x00, 0x32, b'a', b'b'])).await;
        assert_no_success(&raw.expect_closed(WAIT).await);

        eprintln!("--- half a frame, then EOF");
        let mut raw = v311(&b, "trunc-eof").await;
        let publish = pkt::publish(false, "trunc/t", &[7u8; 40], 1, 1, false, false, &[]);
        raw.send(&publish[..10]).await;
        raw.shutdown_write().await;
        raw.expect_closed(WAIT).await;

        b.wait_metric(&reason("malformed"), WAIT, |v| v >= 1.0)
            .await;
        bystander.check().await;
        wait_connections(&b, 1).await;
    })
    .await
}

#[tokio::test]
async fn oversize_packet_disconnect_0x95() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__MAX_PACKET_SIZE_BYTES", "1024")], &[]).await;
        let mut bystander = Bystander::new(&b, "oversize").await;
        let big = vec![b'x'; 2000];

        let (mut raw, ack) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("big5")).await;
        let mps = ack
            .connack_props()
            .into_iter()
            .find(|(id, _)| *id == prop::MAXIMUM_PACKET_SIZE)
            .map(|(_, v)| v);
        assert_eq!(
            mps,
            Some(pkt::PropValue::U32(1024)),
            "Maximum Packet Size in CONNACK"
        );
        raw.send(&pkt::publish(true, "big/t", &big, 0, 0, false, false, &[]))
            .await;
        assert_disconnect(&raw.expect_closed(WAIT).await, 0x95);

        let mut raw = v311(&b, "big3").await;
        raw.send(&pkt::publish(false, "big/t", &big, 0, 0, false, false, &[]))
            .await;
        assert_no_success(&raw.expect_closed(WAIT).await);

        eprintln!("--- a packet just under the limit is fine");
        let mut raw = v311(&b, "fits3").await;
        raw.send(&pkt::publish(
            false,
            "big/t",
            &[b'y'; 900],
            1,
            1,
            false,
            false,
            &[],
        ))
        .await;
        let ack = raw.expect_packet(WAIT, "PUBACK").await;
        assert_eq!((ack.kind, ack.pkid()), (kind::PUBACK, 1));

        b.wait_metric(&reason("too_large"), WAIT, |v| v >= 2.0)
            .await;
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn wildcard_in_publish_topic() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "wildpub").await;
        for (i, topic) in ["a/+/c", "a/#"].into_iter().enumerate() {
            let mut raw = v5(&b, &format!("wild5-{i}")).await;
            raw.send(&pkt::publish(true, topic, b"x", 0, 0, false, false, &[]))
                .await;
            assert_disconnect(&raw.expect_closed(WAIT).await, 0x90);

            let mut raw = v311(&b, &format!("wild3-{i}")).await;
            raw.send(&pkt::publish(false, topic, b"x", 1, 1, false, false, &[]))
                .await;
            assert_no_success(&raw.expect_closed(WAIT).await);
        }
        b.wait_metric(&reason("topic_name"), WAIT, |v| v >= 4.0)
            .await;
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn second_connect_is_a_protocol_error() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "second").await;
        let mut raw = v5(&b, "twice5").await;
        raw.send(&Connect::v5("twice5").encode()).await;
        assert_disconnect(&raw.expect_closed(WAIT).await, 0x82);

        let mut raw = v311(&b, "twice3").await;
        raw.send(&Connect::v311("twice3").encode()).await;
        assert_no_success(&raw.expect_closed(WAIT).await);

        b.wait_metric(&reason("second_connect"), WAIT, |v| v >= 2.0)
            .await;
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn invalid_utf8_and_nul_in_topic() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "utf8").await;
        let bad_topics: [&[u8]; 3] = [b"a/\xC3\x28", b"a/\xED\xA0\x80", b"a/\x00/b"];
        for (i, topic) in bad_topics.into_iter().enumerate() {
            let mut raw = v5(&b, &format!("utf5-{i}")).await;
            raw.send(&pkt::publish_raw_topic(
                true,
                topic,
                b"x",
                0,
                0,
                false,
                false,
                &[],
            ))
            .await;
            assert_disconnect(&raw.expect_closed(WAIT).await, 0x81);

            let mut raw = v311(&b, &format!("utf3-{i}")).await;
            raw.send(&pkt::publish_raw_topic(
                false,
                topic,
                b"x",
                0,
                0,
                false,
                false,
                &[],
            ))
            .await;
            assert_no_success(&raw.expect_closed(WAIT).await);
        }
        eprintln!("--- invalid UTF-8 in a SUBSCRIBE filter");
        let mut raw = v311(&b, "utf3-sub").await;
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend(pkt::bin(b"\xFF\xFE"));
        body.push(0);
        raw.send(&pkt::frame(0x82, &body)).await;
        assert_no_success(&raw.expect_closed(WAIT).await);

        b.wait_metric(&reason("utf8"), WAIT, |v| v >= 4.0).await;
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn unknown_packet_type_and_bad_flags() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "types").await;

        eprintln!("--- reserved packet type 0");
        let mut raw = v311(&b, "type0").await;
        raw.send(&[0x00, 0x00]).await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        let mut raw = v5(&b, "type0-5").await;
        raw.send(&[0x00, 0x00]).await;
        assert_no_success(&raw.expect_closed(WAIT).await);

        eprintln!("--- AUTH does not exist in 3.1.1");
        let mut raw = v311(&b, "auth3").await;
        raw.send(&[0xF0, 0x00]).await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        b.wait_metric(&reason("packet_type"), WAIT, |v| v >= 2.0)
            .await;

        eprintln!("--- SUBSCRIBE with flags 0000, PUBREL with flags 0000, PINGREQ with flags");
        let mut raw = v311(&b, "flags-sub").await;
        let mut sub = pkt::subscribe(false, 1, &[("f/t", 0)], &[]);
        sub[0] = 0x80;
        raw.send(&sub).await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        let mut raw = v311(&b, "flags-rel").await;
        raw.send(&[0x60, 0x02, 0x00, 0x01]).await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        let mut raw = v5(&b, "flags-ping").await;
        raw.send(&[0xC1, 0x00]).await;
        assert_no_success(&raw.expect_closed(WAIT).await);
        b.wait_metric(&reason("flags"), WAIT, |v| v >= 3.0).await;

        eprintln!("--- PUBLISH with QoS 3");
        let mut raw = v311(&b, "qos3").await;
        let mut p = pkt::publish(false, "q/t", b"x", 1, 1, false, false, &[]);
        p[0] = 0x36;
        raw.send(&p).await;
        assert_no_success(&raw.expect_closed(WAIT).await);

        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn packet_id_zero_is_rejected() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "pkid0").await;
        let mut raw = v311(&b, "pkid0-3").await;
        raw.send(&pkt::publish(false, "z/t", b"x", 1, 0, false, false, &[]))
            .await;
        assert_no_success(&raw.expect_closed(WAIT).await);

        let mut raw = v5(&b, "pkid0-5").await;
        raw.send(&pkt::subscribe(true, 0, &[("z/t", 1)], &[])).await;
        let got = raw.expect_closed(WAIT).await;
        assert_no_success(&got);
        if let Some(last) = got.last() {
            assert!(
                matches!(last.disconnect_reason(), 0x81 | 0x82),
                "malformed or protocol error: {got:?}"
            );
        }
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn bad_input_is_not_logged_as_error_and_others_keep_working() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut b3 = Bystander::new(&b, "mix3").await;
        let mut b5 = V5Client::connect(b.mqtt_addr(), "bystander-mix5").await;
        b5.subscribe("bystander/mix5", Q5::ExactlyOnce).await;
        let before = b.metric_sum("petrel_mqtt_bad_packets_total").await;

        let inputs: Vec<(bool, Vec<u8>)> = vec![
            (false, vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            (true, pkt::frame(0x30, &[0x00, 0x32])),
            (
                true,
                pkt::publish(true, "x/#", b"", 0, 0, false, false, &[]),
            ),
            (false, Connect::v311("again").encode()),
            (false, vec![0x00, 0x00]),
            (
                true,
                pkt::publish_raw_topic(true, b"\xC3\x28", b"", 0, 0, false, false, &[]),
            ),
        ];
        let n = inputs.len();
        for (i, (is_v5, bytes)) in inputs.into_iter().enumerate() {
            let mut raw = if is_v5 {
                v5(&b, &format!("mix-{i}")).await
            } else {
                v311(&b, &format!("mix-{i}")).await
            };
            raw.send(&bytes).await;
            raw.expect_closed(WAIT).await;
            b3.check().await;
        }
        b.wait_metric_sum_at_least(before + n as f64).await;

        let mut publ = V5Client::connect(b.mqtt_addr(), "mix-pub").await;
        publ.publish("bystander/mix5", Q5::ExactlyOnce, false, "fine")
            .await;
        assert_eq!(text(&b5.recv_publish().await.payload), "fine");
        wait_connections(&b, 3).await;

        let log = b.log();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(
            errors.is_empty(),
            "a client's bad input is not an ERROR: {errors:#?}"
        );
    })
    .await
}

#[tokio::test]
async fn malformed_connect_packets() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "badconnect").await;
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();

        let mut c = Connect::v311("will-qos3").will(pkt::Will::new("w/t", b"x"));
        c.will.as_mut().expect("will").qos = 3;
        cases.push(("will QoS 3", c.encode()));

        let mut bytes = Connect::v311("will-qos-no-flag").encode();
        bytes[9] |= 0x08; // Will QoS 1 without the Will Flag
        cases.push(("will QoS without will flag", bytes));

        let mut bytes = Connect::v311("will-retain-no-flag").encode();
        bytes[9] |= 0x20; // Will Retain without the Will Flag
        cases.push(("will retain without will flag", bytes));

        let mut bytes = Connect::v311("pw-no-user").encode();
        bytes[9] |= 0x40; // Password flag without User Name flag (3.1.1)
        bytes.extend(pkt::string("secret"));
        bytes[1] += 8;
        cases.push(("password without user name", bytes));

        cases.push((
            "v5 Receive Maximum 0",
            Connect::v5("rm0")
                .property(prop::u16(prop::RECEIVE_MAXIMUM, 0))
                .encode(),
        ));
        cases.push((
            "v5 Maximum Packet Size 0",
            Connect::v5("mps0")
                .property(prop::u32(prop::MAXIMUM_PACKET_SIZE, 0))
                .encode(),
        ));
        cases.push((
            "v5 property twice",
            Connect::v5("twice")
                .property(prop::u32(prop::SESSION_EXPIRY, 1))
                .property(prop::u32(prop::SESSION_EXPIRY, 2))
                .encode(),
        ));

        for (what, bytes) in cases {
            eprintln!("--- {what}");
            let mut raw = RawClient::connect(b.mqtt_addr()).await;
            raw.send(&bytes).await;
            let got = raw.expect_closed(WAIT).await;
            for p in &got {
                assert_eq!(p.kind, kind::CONNACK, "{what}: {got:?}");
                assert_ne!(p.connack().1, 0, "{what} accepted: {got:?}");
            }
        }
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn protocol_violations_in_publish_and_subscribe() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "violations").await;
        // (what, the packet for a v5 or a 3.1.1 connection, the v5 reason code (0x81 Malformed
        // Packet, 0x82 Protocol Error; None: not a violation in v5), whether it is one in
        // 3.1.1 too). A v5 client must get DISCONNECT with that code before the close (README:
        // Decisions); a 3.1.1 connection is closed with nothing sent.
        type Build = fn(bool) -> Vec<u8>;
        let cases: Vec<(&str, Build, Option<u8>, bool)> = vec![
            (
                "QoS 0 with DUP",
                |v5| pkt::publish(v5, "v/t", b"x", 0, 0, false, true, &[]),
                Some(0x81),
                true,
            ),
            (
                "subscription id from a client in PUBLISH",
                |_| {
                    let sid = [prop::var(prop::SUBSCRIPTION_ID, 3)];
                    pkt::publish(true, "v/t", b"x", 0, 0, false, false, &sid)
                },
                Some(0x82),
                false,
            ),
            (
                "requested QoS 3",
                |v5| pkt::subscribe(v5, 1, &[("v/t", 3)], &[]),
                Some(0x81),
                true,
            ),
            (
                "reserved option bits 6-7",
                |v5| pkt::subscribe(v5, 1, &[("v/t", 0xC1)], &[]),
                Some(0x81),
                true,
            ),
            (
                "retain handling 3",
                |_| pkt::subscribe(true, 1, &[("v/t", 0x31)], &[]),
                Some(0x82),
                false,
            ),
            (
                "SUBSCRIBE without filters",
                |v5| pkt::subscribe(v5, 1, &[], &[]),
                Some(0x82),
                true,
            ),
            (
                // No Local in v5, reserved in 3.1.1
                "reserved option bit 2 (3.1.1)",
                |_| pkt::subscribe(false, 1, &[("v/t", 0x05)], &[]),
                None,
                true,
            ),
        ];
        for (what, build, v5_code, on_v311) in cases {
            if let Some(code) = v5_code {
                eprintln!("--- {what} (v5): DISCONNECT {code:#04x}, then close");
                let mut raw = v5(&b, "viol5").await;
                raw.send(&build(true)).await;
                let got = raw.expect_closed(WAIT).await;
                let ok = matches!(got.as_slice(), [p] if p.kind == kind::DISCONNECT
                    && p.disconnect_reason() == code);
                assert!(
                    ok,
                    "{what}: exactly one DISCONNECT {code:#04x} before the close; got {got:?}"
                );
            }
            if !on_v311 {
                continue;
            }
            eprintln!("--- {what} (3.1.1): closed, nothing sent");
            let mut raw = v311(&b, "viol3").await;
            raw.send(&build(false)).await;
            let got = raw.expect_closed(WAIT).await;
            assert!(got.is_empty(), "{what}: 3.1.1 gets no packet: {got:?}");
        }
        bystander.check().await;
    })
    .await
}
