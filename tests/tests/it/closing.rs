//! Issue 10, point 9: reason codes that reach the client.
//!
//! A node that closes a socket while the client is still writing must not reset it: the
//! client's next write would fail and its stack could drop the DISCONNECT unread. Each test
//! here lets the node close its side first (waiting on its metrics), then goes on writing
//! like a client that has not noticed, then reads: every write must succeed, the reason code
//! must be there and the connection must end with a FIN, not a reset. [`RawClient`] gives up
//! on a connection whose write failed without reading further, as such client stacks do.

use crate::*;
use pkt::Connect;

/// A v5 QoS `qos` PUBLISH to `topic` with an `n`-byte payload.
fn publish(topic: &str, qos: u8, id: u16, n: usize) -> Vec<u8> {
    pkt::publish(true, topic, &vec![b'x'; n], qos, id, false, false, &[])
}

/// Writes `chunks` one write at a time, then reads up to the close. Asserts that every write
/// succeeded and that the close was clean; returns what was read.
async fn keep_writing_then_read(raw: &mut RawClient, chunks: Vec<Vec<u8>>) -> Vec<RawPacket> {
    let n = chunks.len();
    for chunk in chunks {
        raw.send(&chunk).await;
    }
    assert_eq!(
        raw.close_error(),
        None,
        "all {n} writes after the node closed its side succeed"
    );
    let got = raw.expect_closed(WAIT).await;
    assert_eq!(
        raw.close_error(),
        None,
        "the node closed with a FIN, not a reset; read {got:?}"
    );
    got
}

/// Waits until the node has counted `series` and let go of all connections but `open`.
async fn wait_closed_by_node(b: &Broker, series: &str, open: u32) {
    b.wait_metric(series, WAIT, |v| v >= 1.0).await;
    wait_connections(b, open).await;
}

#[tokio::test]
async fn t90_issue_10_receive_maximum_exceeded_reaches_a_client_still_sending() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__RECEIVE_MAXIMUM", "2")], &[]).await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("rmx-linger")).await;
        for id in 1..=3u16 {
            raw.send(&publish("rmx-linger/t", 2, id, 16)).await;
        }
        tracing_phase("the node disconnects the third QoS 2 PUBLISH");
        wait_closed_by_node(
            &b,
            r#"petrel_mqtt_bad_packets_total{reason="receive_maximum"}"#,
            0,
        )
        .await;
        tracing_phase("the client, not reading, goes on publishing");
        let more = (4..=40u16)
            .map(|id| publish("rmx-linger/t", 2, id, 200))
            .collect();
        let got = keep_writing_then_read(&mut raw, more).await;
        let recs = got.iter().filter(|p| p.kind == kind::PUBREC).count();
        assert_eq!(recs, 2, "the first two are received: {got:?}");
        let last = got.last().expect("DISCONNECT before the close");
        assert_eq!(last.disconnect_reason(), 0x93, "{got:?}");
    })
    .await
}

#[tokio::test]
async fn t90_issue_10_takeover_reaches_an_old_client_still_sending() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut old, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("tko-linger")).await;
        old.send(&publish("tko-linger/t", 1, 1, 16)).await;
        tracing_phase("a new connection takes the client id over");
        let _new = V5Client::connect(b.mqtt_addr(), "tko-linger").await;
        wait_closed_by_node(&b, "petrel_session_takeovers_total", 1).await;
        tracing_phase("the old client goes on publishing, then reads");
        let more = (2..=40u16)
            .map(|id| publish("tko-linger/t", 1, id, 200))
            .collect();
        let got = keep_writing_then_read(&mut old, more).await;
        let last = got.last().expect("DISCONNECT before the close");
        assert_eq!(
            last.disconnect_reason(),
            0x8E,
            "session taken over: {got:?}"
        );
    })
    .await
}

#[tokio::test]
async fn t90_issue_10_packet_too_large_reaches_a_client_still_writing_it() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__MAX_PACKET_SIZE_BYTES", "1024")], &[]).await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("big-linger")).await;
        let big = publish("big-linger/t", 1, 1, 100 * 1024);
        let (head, rest) = big.split_at(64);
        raw.send(head).await;
        tracing_phase("the node refuses the packet from its header");
        wait_closed_by_node(
            &b,
            r#"petrel_mqtt_bad_packets_total{reason="too_large"}"#,
            0,
        )
        .await;
        tracing_phase("the client is still writing the packet");
        let got =
            keep_writing_then_read(&mut raw, rest.chunks(4096).map(<[u8]>::to_vec).collect()).await;
        let last = got.last().expect("DISCONNECT before the close");
        assert_eq!(last.disconnect_reason(), 0x95, "packet too large: {got:?}");
    })
    .await
}

#[tokio::test]
async fn t90_issue_10_connect_refusals_the_decoder_finds_get_a_connack() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "connect-codes").await;
        let will = |topic: &str| pkt::Will::new(topic, b"gone");
        let cases: Vec<(&str, Connect, u8)> = vec![
            (
                "v5 Receive Maximum 0",
                Connect::v5("rm0").property(prop::u16(prop::RECEIVE_MAXIMUM, 0)),
                0x82,
            ),
            (
                "v5 will topic with +",
                Connect::v5("will-plus").will(will("w/+/t")),
                0x90,
            ),
            (
                "v5 will topic with #",
                Connect::v5("will-hash").will(will("w/#")),
                0x90,
            ),
        ];
        for (what, connect, code) in cases {
            tracing_phase(what);
            let mut raw = RawClient::connect(b.mqtt_addr()).await;
            let mut bytes = connect.encode();
            // A client that does not wait for its CONNACK: more packets right behind it.
            for id in 1..=20u16 {
                bytes.extend(publish("refused/t", 1, id, 200));
            }
            raw.send(&bytes).await;
            let got = raw.expect_closed(WAIT).await;
            assert_eq!(got.len(), 1, "{what}: one CONNACK, then the close: {got:?}");
            assert_eq!(got[0].connack(), (false, code), "{what}: {got:?}");
            assert_eq!(
                raw.close_error(),
                None,
                "{what}: closed with a FIN, not a reset"
            );
        }
        tracing_phase("3.1.1 has no code for a wildcard in the will topic: closed");
        for topic in ["w/+/t", "w/#"] {
            let mut raw = RawClient::connect(b.mqtt_addr()).await;
            raw.send(&Connect::v311("will-v3").will(will(topic)).encode())
                .await;
            let got = raw.expect_closed(WAIT).await;
            assert!(got.is_empty(), "3.1.1 will topic {topic:?}: {got:?}");
        }
        bystander.check().await;
    })
    .await
}

fn tracing_phase(what: &str) {
    eprintln!("--- {what}");
}
