"""Bad input from a raw socket, byte by byte.

Each case checks three things:
  1. the answer: the reason code the specification (and the project's documented decisions)
     asks for, or a closed connection where 3.1.1 has no way to say more;
  2. that it was counted in petrel_mqtt_bad_packets_total (with the expected reason label
     where the contract names one);
  3. that a client connected before the bad input still works afterwards.
"""

from __future__ import annotations

import socket

import pytest

import rawmqtt as raw
from mqttclient import unique_id

BAD = "petrel_mqtt_bad_packets_total"


class Witness:
    """A healthy paho client connected before the bad input, plus the counter baseline."""

    def __init__(self, broker, clients, version):
        self.broker = broker
        self.client = clients.connected(broker, version)
        self.client.subscribe("healthy/echo", qos=1)
        self.total_before = broker.metric(BAD)
        self.reason_before: dict[str, float] = {}

    def baseline(self, reason: str | None) -> None:
        self.total_before = self.broker.metric(BAD)
        if reason:
            self.reason_before[reason] = self.broker.metric(BAD, reason=reason)

    def check(self, reason: str | None) -> None:
        if reason:
            before = self.reason_before.get(reason, 0.0)
            self.broker.wait_metric(f"{BAD}{{reason={reason!r}}} to increase", BAD,
                                    lambda v: v > before, reason=reason)
        else:
            before = self.total_before
            self.broker.wait_metric(f"{BAD} to increase", BAD, lambda v: v > before)
        self.client.publish("healthy/echo", b"still fine", qos=1)
        assert self.client.expect(what="the healthy round trip").payload == b"still fine"
        assert self.broker.alive()


@pytest.fixture
def witness(broker, clients, version):
    return Witness(broker, clients, version)


def connected_raw(broker, version) -> raw.RawClient:
    c = raw.RawClient(broker.addr)
    ack = c.connect(version, client_id=unique_id("bad"))
    assert ack.code == 0
    return c


def assert_answer(packets: list[raw.Packet], version: int, v5_codes: set[int]) -> None:
    """v5: exactly one DISCONNECT with one of `v5_codes`, then close; 3.x: just a close."""
    if version == 5:
        assert len(packets) == 1 and packets[0].type == raw.DISCONNECT, \
            f"expected one DISCONNECT {[hex(c) for c in sorted(v5_codes)]}, got {packets}"
        code, _ = raw.parse_disconnect(packets[0])
        assert code in v5_codes, f"DISCONNECT {code:#x}, expected one of " \
                                 f"{[hex(c) for c in sorted(v5_codes)]}"
    else:
        assert packets == [], f"3.x has no error packet here; got {packets}"


def v5_props(version: int, props: bytes) -> bytes:
    return props if version == 5 else b""


# (id, bytes for a protocol version, acceptable v5 DISCONNECT codes, metric reason or None)
AFTER_CONNECT = [
    ("remaining-length-5-bytes", lambda v: b"\x30\xff\xff\xff\xff\x7f", {0x81},
     "remaining_length"),
    ("garbage", lambda v: b"\xff" * 16, {0x81, 0x82}, None),
    ("invalid-utf8-topic", lambda v: raw.publish(b"a/\xff\xfe", b"x", version=v), {0x81}, "utf8"),
    ("invalid-utf8-filter", lambda v: raw.subscribe(1, [(b"a/\xc3", 0)], v), {0x81}, "utf8"),
    ("surrogate-in-topic", lambda v: raw.publish(b"a/\xed\xa0\x80", b"x", version=v), {0x81},
     "utf8"),
    ("nul-in-topic", lambda v: raw.publish(b"a\x00b", b"x", version=v), {0x81}, "utf8"),
    ("plus-in-publish-topic", lambda v: raw.publish("a/+/b", b"x", version=v), {0x90},
     "topic_name"),
    ("hash-in-publish-topic", lambda v: raw.publish("a/#", b"x", version=v), {0x90},
     "topic_name"),
    ("empty-publish-topic", lambda v: raw.publish("", b"x", version=v), {0x82, 0x90}, None),
    ("packet-type-0", lambda v: b"\x00\x00", {0x81, 0x82}, "packet_type"),
    ("subscribe-flags-0", lambda v: raw.subscribe(1, [("a", 0)], v, first=0x80), {0x81},
     "flags"),
    ("pubrel-flags-0", lambda v: b"\x60\x02\x00\x01", {0x81}, "flags"),
    ("pingreq-flags", lambda v: b"\xc1\x00", {0x81}, "flags"),
    ("publish-qos-3", lambda v: raw.packet(0x36, raw.string("a") + b"\x00\x01" +
                                           v5_props(v, b"\x00")), {0x81}, None),
    ("publish-qos0-dup", lambda v: raw.publish("a", b"x", dup=True, version=v), {0x81, 0x82},
     None),
    ("subscribe-options-reserved-bits", lambda v: raw.subscribe(1, [("a", 0xC0)], v), {0x81},
     None),
    ("subscribe-qos-3", lambda v: raw.subscribe(1, [("a", 3)], v), {0x81}, None),
    ("second-connect", lambda v: raw.connect(v, client_id="again"), {0x82}, "second_connect"),
    ("subscribe-packet-id-0", lambda v: raw.subscribe(0, [("a", 0)], v), {0x81, 0x82}, None),
    ("unsubscribe-packet-id-0", lambda v: raw.packet(0xA2, b"\x00\x00" + v5_props(v, b"\x00") +
                                                     raw.string("a")), {0x81, 0x82}, None),
    ("publish-packet-id-0", lambda v: raw.publish("a", b"x", qos=1, pid=0, version=v),
     {0x81, 0x82}, None),
    ("subscribe-without-filters", lambda v: raw.subscribe(1, [], v), {0x81, 0x82}, None),
    ("connack-from-client", lambda v: b"\x20\x02\x00\x00" if v != 5 else b"\x20\x03\x00\x00\x00",
     {0x81, 0x82}, None),
    ("filter-cut-short", lambda v: b"\x82\x03\x00\x01\x00", {0x81, 0x82}, None),
]


@pytest.mark.parametrize("case", AFTER_CONNECT, ids=[c[0] for c in AFTER_CONNECT])
def test_after_connect(broker, witness, version, case):
    _, make, v5_codes, reason = case
    witness.baseline(reason)
    with connected_raw(broker, version) as c:
        c.send(make(version))
        packets = c.until_closed()
    assert_answer(packets, version, v5_codes)
    witness.check(reason)


V5_ONLY = [
    ("property-not-allowed-in-publish",  # Session Expiry Interval belongs to CONNECT
     raw.publish("a", b"x", version=5, props=raw.properties((raw.P_SESSION_EXPIRY, 5))),
     {0x81, 0x82}),
    ("duplicate-content-type",
     raw.publish("a", b"x", version=5, props=raw.properties((raw.P_CONTENT_TYPE, "a"),
                                                            (raw.P_CONTENT_TYPE, "b"))),
     {0x81, 0x82}),
    ("properties-length-past-end", raw.packet(0x30, raw.string("a") + b"\x09\x01"), {0x81}),
    ("subscription-identifier-0",
     raw.subscribe(1, [("a", 0)], 5, props=raw.properties((raw.P_SUBSCRIPTION_ID, 0))),
     {0x81, 0x82}),
]


@pytest.mark.parametrize("version", [5], ids=["v5"])
@pytest.mark.parametrize("case", V5_ONLY, ids=[c[0] for c in V5_ONLY])
def test_v5_after_connect(broker, witness, version, case):
    """5.0 2.2.2.2: a property not valid for the packet type is malformed, one that may appear
    once appearing twice is a protocol error; a Subscription Identifier of 0 is a protocol
    error (3.8.2.1.2)."""
    _, data, v5_codes = case
    witness.baseline(None)
    with connected_raw(broker, version) as c:
        c.send(data)
        packets = c.until_closed()
    assert_answer(packets, 5, v5_codes)
    witness.check(None)


def test_truncated_packet_then_close(broker, witness, version):
    witness.baseline(None)
    with connected_raw(broker, version) as c:
        c.send(b"\x30\x0a\x00\x03a/b")  # 10 bytes announced, 5 sent
        c.sock.shutdown(socket.SHUT_WR)
        c.until_closed()
    witness.check(None)


def test_truncated_connect_then_close(broker, witness, version):
    witness.baseline(None)
    with raw.RawClient(broker.addr) as c:
        c.send(raw.connect(version, client_id="cut")[:9])
        c.sock.shutdown(socket.SHUT_WR)
        assert c.until_closed() == []
    witness.check(None)


def test_oversize_packet(broker_factory, clients, version):
    broker = broker_factory(env={"PETREL_MQTT__MAX_PACKET_SIZE_BYTES": "1024"})
    w = Witness(broker, clients, version)
    w.baseline("too_large")
    with raw.RawClient(broker.addr) as c:
        ack = c.connect(version, client_id=unique_id("big"))
        if version == 5:
            assert ack.props.get(raw.P_MAXIMUM_PACKET_SIZE) == [1024]
        c.send(raw.publish("big", b"x" * 2000, qos=0, version=version))
        packets = c.until_closed()
    assert_answer(packets, version, {0x95})
    w.check("too_large")
    # a packet of exactly the maximum is fine
    with raw.RawClient(broker.addr) as c:
        c.connect(version, client_id=unique_id("fit"))
        # fixed header 1 + remaining length 2 + topic "f" 3 + packet id 2 (+ properties 1)
        overhead = 1 + 2 + 3 + 2 + (1 if version == 5 else 0)
        packet = raw.publish("f", b"y" * (1024 - overhead), qos=1, pid=1, version=version)
        assert len(packet) == 1024
        c.send(packet)
        assert c.recv_type(raw.PUBACK)


# --- before or in CONNECT --------------------------------------------------------------------------

def run_before_connect(broker, data: bytes) -> list[raw.Packet]:
    with raw.RawClient(broker.addr) as c:
        c.send(data)
        return c.until_closed()


@pytest.mark.parametrize("data, reason", [
    (raw.PINGREQ_BYTES, "first_packet_not_connect"),
    (raw.publish("a", b"x"), "first_packet_not_connect"),
    (raw.subscribe(1, [("a", 0)]), "first_packet_not_connect"),
    (b"\xde\xad\xbe\xef" * 8, None),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"\x10\xff\xff\xff\xff\x7f", "remaining_length"),
], ids=["pingreq", "publish", "subscribe", "garbage", "http", "remaining-length-5-bytes"])
def test_first_packet_must_be_connect(broker, witness, data, reason):
    witness.baseline(reason)
    assert run_before_connect(broker, data) == []
    witness.check(reason)


def assert_refused(packets: list[raw.Packet], version: int, allowed_codes: set[int]) -> None:
    """Closed, after at most a CONNACK carrying one of `allowed_codes` (never a success)."""
    assert all(p.type == raw.CONNACK for p in packets) and len(packets) <= 1, packets
    if packets:
        info = raw.parse_connack(packets[0], version)
        assert info.code in allowed_codes, \
            f"CONNACK {info.code:#x}, allowed {[hex(c) for c in sorted(allowed_codes)]}"


def test_nul_in_client_id(broker, witness, version):
    """U+0000 in a UTF-8 string is malformed (3.1.1 [MQTT-1.5.3-2] close; 5.0 1.5.4)."""
    witness.baseline(None)
    packets = run_before_connect(broker, raw.connect(version, client_id=b"a\x00b"))
    assert_refused(packets, version, {0x02} if version != 5 else {0x81, 0x85})
    witness.check(None)


def test_invalid_utf8_client_id(broker, witness, version):
    witness.baseline("utf8")
    packets = run_before_connect(broker, raw.connect(version, client_id=b"a\xc0\xafb"))
    assert_refused(packets, version, {0x02} if version != 5 else {0x81, 0x85})
    witness.check("utf8")


def test_connect_reserved_flag(broker, witness, version):
    """[MQTT-3.1.2-3]: the reserved CONNECT flag must be 0, else malformed: close."""
    witness.baseline(None)
    packets = run_before_connect(broker, raw.connect(version, client_id="r", flags=0x03))
    assert_refused(packets, version, {0x81})
    witness.check(None)


def test_connect_will_qos_without_will_flag(broker, witness, version):
    """[MQTT-3.1.2-13]: with Will Flag 0, Will QoS must be 0."""
    witness.baseline(None)
    packets = run_before_connect(broker, raw.connect(version, client_id="w", flags=0x02 | 0x08))
    assert_refused(packets, version, {0x81, 0x82})
    witness.check(None)


@pytest.mark.parametrize("level", [0, 2, 6, 255])
def test_unsupported_protocol_level(broker, witness, level):
    """3.1.1 [MQTT-3.1.2-2]: CONNACK return code 0x01 and close. The contract: 0x01 in the
    3.x format, or 0x84 in the v5 format."""
    witness.baseline("protocol_version")
    packets = run_before_connect(broker, raw.connect(4, client_id="lvl", protocol_level=level))
    assert len(packets) == 1 and packets[0].type == raw.CONNACK, packets
    body = packets[0].body
    assert body in (b"\x00\x01", b"\x00\x84\x00"), f"CONNACK body {body.hex()}"
    witness.check("protocol_version")


@pytest.mark.parametrize("name, level", [(b"MQTX", 4), (b"MQIsdp", 4), (b"MQTT", 3),
                                         (b"mqtt", 5), (b"", 4)])
def test_wrong_protocol_name(broker, witness, name, level):
    """3.1.1 / 5.0 3.1.2.1: with a wrong protocol name the server may close the connection;
    it must not go on as MQTT. Either a refusing CONNACK or a plain close is fine."""
    witness.baseline(None)
    data = raw.connect(4, client_id="name", protocol_name=name, protocol_level=level)
    packets = run_before_connect(broker, data)
    assert all(p.type == raw.CONNACK for p in packets) and len(packets) <= 1, packets
    if packets:
        assert packets[0].body[1] in (0x01, 0x84), packets[0]
    witness.check(None)


@pytest.mark.parametrize("proto", [3, 4], ids=["v31", "v311"])
def test_empty_client_id_with_persistent_session(broker, witness, proto):
    """3.1.1 [MQTT-3.1.3-8]: empty client id with CleanSession 0 -> CONNACK 0x02, then close.
    3.1 requires 1 to 23 characters: the same answer."""
    packets = run_before_connect(broker, raw.connect(proto, client_id="", clean=False))
    assert [(p.type, p.body) for p in packets] == [(raw.CONNACK, b"\x00\x02")]
    witness.client.publish("healthy/echo", b"still fine", qos=1)
    assert witness.client.expect().payload == b"still fine"


def test_many_bad_clients_do_not_disturb_a_good_one(broker, witness, version):
    witness.baseline(None)
    for i in range(50):
        data = AFTER_CONNECT[i % len(AFTER_CONNECT)][1](version)
        with connected_raw(broker, version) as c:
            c.send(data)
            c.until_closed()
    witness.check(None)
    assert broker.metric(BAD) >= witness.total_before + 50
