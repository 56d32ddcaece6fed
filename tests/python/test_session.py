"""Sessions: clean vs persistent, queued messages, redelivery, session and message expiry,
takeover, queue limits and in-flight windows."""

import pytest

import rawmqtt as raw
from harness import let_time_pass
from mqttclient import props, unique_id
from paho.mqtt.packettypes import PacketTypes

MARK = "zz-marker"


def persistent(clients, broker, version, cid, expiry=300):
    """Connect `cid` with a persistent session (3.1.1 clean session 0, v5 clean start 0 plus a
    session expiry interval); return (client, connack)."""
    c = clients.new(broker, version, client_id=cid, clean=False)
    ack = c.connect(session_expiry=expiry if version == 5 else None)
    return c, ack


def offline_subscriber(clients, broker, version, cid, topic, qos=2, expiry=300):
    c, ack = persistent(clients, broker, version, cid, expiry)
    assert not ack.session_present
    c.subscribe(topic, qos=qos)
    c.subscribe(MARK, qos=2)
    c.disconnect()


def test_queued_messages_delivered_after_reconnect(broker, clients, version):
    cid = unique_id("persist")
    offline_subscriber(clients, broker, version, cid, "s/q")

    pub = clients.connected(broker, version)
    pub.publish("s/q", b"q1", qos=1)
    pub.publish("s/q", b"q2", qos=2)
    pub.publish("s/q", b"q0", qos=0)  # QoS 0 is not queued for offline sessions by default
    pub.publish("s/q", b"q1-again", qos=1)

    c, ack = persistent(clients, broker, version, cid)
    assert ack.session_present
    # paho hands a QoS 2 message over at PUBREL, so QoS 1 messages sent after it on the wire
    # may reach the test first; a QoS 2 marker comes after every earlier QoS 2 message.
    pub.publish(MARK, b"", qos=2)
    got = c.collect_until(MARK)
    assert sorted((m.payload, m.qos) for m in got) == [(b"q1", 1), (b"q1-again", 1), (b"q2", 2)]
    assert [m.payload for m in got if m.qos == 1] == [b"q1", b"q1-again"]


def test_subscriptions_survive_reconnect(broker, clients, version):
    cid = unique_id("persist")
    offline_subscriber(clients, broker, version, cid, "s/live", qos=1)
    c, ack = persistent(clients, broker, version, cid)
    assert ack.session_present
    pub = clients.connected(broker, version)
    pub.publish("s/live", b"after", qos=1)
    assert c.expect().payload == b"after"


def test_clean_reconnect_discards_session(broker, clients, version):
    cid = unique_id("persist")
    offline_subscriber(clients, broker, version, cid, "s/gone")
    pub = clients.connected(broker, version)
    pub.publish("s/gone", b"queued", qos=1)

    c = clients.new(broker, version, client_id=cid, clean=True)
    assert not c.connect().session_present
    c.subscribe(MARK, qos=1)
    pub.publish(MARK, b"", qos=1)
    assert c.collect_until(MARK) == []  # neither the queued message nor the old subscription


def test_clean_session_is_not_kept(broker, clients, version):
    cid = unique_id("clean")
    c = clients.new(broker, version, client_id=cid, clean=True)
    c.connect()
    c.subscribe("s/x", qos=1)
    c.disconnect()
    again, ack = persistent(clients, broker, version, cid)
    assert not ack.session_present


def test_takeover_closes_first_connection(broker, clients, version):
    cid = unique_id("twin")
    first, _ = persistent(clients, broker, version, cid)
    first.subscribe("s/take", qos=1)
    second, ack = persistent(clients, broker, version, cid)
    assert ack.session_present
    d = first.wait_disconnect()
    if version == 5:
        assert d.reason_code == 0x8E, f"old connection got DISCONNECT {d.reason_code:#x}"
    # the session (and its subscription) now belongs to the second connection
    pub = clients.connected(broker, version)
    pub.publish("s/take", b"to the new one", qos=1)
    assert second.expect().payload == b"to the new one"


def test_v5_session_expires(broker, clients):
    cid = unique_id("expiring")
    offline_subscriber(clients, broker, 5, cid, "s/exp", expiry=1)
    let_time_pass(2.5, "the 1 s session expiry interval must run out")
    c, ack = persistent(clients, broker, 5, cid)
    assert not ack.session_present


def test_v5_session_expiry_zero_ends_at_disconnect(broker, clients):
    cid = unique_id("expiry0")
    offline_subscriber(clients, broker, 5, cid, "s/zero", expiry=0)
    c, ack = persistent(clients, broker, 5, cid)
    assert not ack.session_present


def test_v5_disconnect_can_shorten_session_expiry(broker, clients):
    cid = unique_id("shorten")
    c, _ = persistent(clients, broker, 5, cid, expiry=300)
    c.subscribe("s/short", qos=1)
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    again, ack = persistent(clients, broker, 5, cid)
    assert not ack.session_present


def test_v5_message_expiry(broker, clients):
    cid = unique_id("msgexp")
    offline_subscriber(clients, broker, 5, cid, "s/me", qos=1)
    pub = clients.connected(broker, 5)
    pub.publish("s/me", b"short", qos=1,
                properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish("s/me", b"long", qos=1,
                properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=100))
    pub.publish("s/me", b"forever", qos=1)
    let_time_pass(2.2, "the 1 s message expiry interval must run out while queued")

    c, ack = persistent(clients, broker, 5, cid)
    assert ack.session_present
    pub.publish(MARK, b"", qos=1)
    got = c.collect_until(MARK)
    assert [m.payload for m in got] == [b"long", b"forever"]
    remaining = got[0].prop("MessageExpiryInterval")
    # spec 3.3.2.3.3: the forwarded value is the received one minus the time spent waiting
    assert remaining is not None and 1 <= remaining <= 98, remaining
    assert got[1].prop("MessageExpiryInterval") is None
    broker.wait_metric("the expired message counted", "petrel_session_queue_dropped_total",
                       lambda v: v >= 1, reason="expired")


@pytest.mark.parametrize("policy, kept", [("drop-newest", range(0, 5)),
                                          ("drop-oldest", range(5, 10))])
def test_queue_limit_and_overflow_policy(broker_factory, clients, version, policy, kept):
    broker = broker_factory(env={"PETREL_MQTT__MAX_QUEUED_MESSAGES": "5",
                                 "PETREL_MQTT__QUEUE_OVERFLOW": policy})
    cid = unique_id("small")
    offline_subscriber(clients, broker, version, cid, "s/lim", qos=1)
    pub = clients.connected(broker, version)
    for i in range(10):
        pub.publish("s/lim", str(i), qos=1)
    broker.wait_metric("5 queue drops", "petrel_session_queue_dropped_total", lambda v: v == 5,
                       reason="queue_full")
    c, ack = persistent(clients, broker, version, cid)
    assert ack.session_present
    pub.publish(MARK, b"", qos=1)
    got = c.collect_until(MARK)
    assert [int(m.payload) for m in got] == list(kept)


def test_qos0_queued_offline_when_enabled(broker_factory, clients, version):
    broker = broker_factory(env={"PETREL_MQTT__QUEUE_QOS0_OFFLINE": "true"})
    cid = unique_id("q0")
    offline_subscriber(clients, broker, version, cid, "s/q0", qos=1)
    pub = clients.connected(broker, version)
    pub.publish("s/q0", b"zero", qos=0)
    pub.publish("s/q0", b"one", qos=1)
    c, ack = persistent(clients, broker, version, cid)
    pub.publish(MARK, b"", qos=1)
    assert [m.payload for m in c.collect_until(MARK)] == [b"zero", b"one"]


def _raw_persistent(broker, version, cid):
    c = raw.RawClient(broker.addr)
    p = raw.properties((raw.P_SESSION_EXPIRY, 300)) if version == 5 else b"\x00"
    ack = c.connect(version, client_id=cid, clean=False, props=p)
    assert ack.code == 0
    return c, ack


def test_unacknowledged_qos1_redelivered_with_dup(broker, clients, version):
    cid = unique_id("dup")
    c, _ = _raw_persistent(broker, version, cid)
    c.send(raw.subscribe(1, [("s/dup", 1)], version))
    c.recv_type(raw.SUBACK)
    pub = clients.connected(broker, version)
    pub.publish("s/dup", b"again", qos=1)
    first = raw.parse_publish(c.recv_type(raw.PUBLISH), version)
    assert (first.payload, first.qos, first.dup) == (b"again", 1, False)
    c.close()  # no PUBACK

    c, ack = _raw_persistent(broker, version, cid)
    with c:
        assert ack.session_present
        again = raw.parse_publish(c.recv_type(raw.PUBLISH), version)
        assert (again.payload, again.pid, again.dup) == (b"again", first.pid, True)
        c.send(raw.ack(raw.PUBACK, again.pid))


def test_unacknowledged_pubrel_resent(broker, clients, version):
    cid = unique_id("rel")
    c, _ = _raw_persistent(broker, version, cid)
    c.send(raw.subscribe(1, [("s/rel", 2)], version))
    c.recv_type(raw.SUBACK)
    pub = clients.connected(broker, version)
    pub.publish("s/rel", b"two", qos=2)
    msg = raw.parse_publish(c.recv_type(raw.PUBLISH), version)
    assert msg.qos == 2
    c.send(raw.ack(raw.PUBREC, msg.pid))
    rel = c.recv_type(raw.PUBREL)
    assert rel.flags == 0x2
    c.close()  # no PUBCOMP

    c, ack = _raw_persistent(broker, version, cid)
    with c:
        assert ack.session_present
        rel = c.recv_type(raw.PUBREL)  # the PUBREL again, not the PUBLISH
        assert rel.body[:2] == msg.pid.to_bytes(2, "big")
        c.send(raw.ack(raw.PUBCOMP, msg.pid))


def test_inbound_qos2_is_exactly_once(broker, clients, version):
    sub = clients.connected(broker, version)
    sub.subscribe("s/once", qos=2)
    # The marker is QoS 2 too: paho hands a QoS 2 message over only at PUBREL, so a QoS 1
    # marker could overtake the message under test.
    sub.subscribe(MARK, qos=2)
    with raw.RawClient(broker.addr) as c:
        assert c.connect(version, client_id=unique_id("raw")).code == 0
        c.send(raw.publish("s/once", b"1", qos=2, pid=7, version=version))
        c.recv_type(raw.PUBREC)
        # the client did not see the PUBREC and sends the message again with DUP
        c.send(raw.publish("s/once", b"1", qos=2, pid=7, dup=True, version=version))
        c.recv_type(raw.PUBREC)
        c.send(raw.ack(raw.PUBREL, 7))
        c.recv_type(raw.PUBCOMP)
        c.send(raw.publish(MARK, b"", qos=2, pid=8, version=version))
        c.recv_type(raw.PUBREC)
        c.send(raw.ack(raw.PUBREL, 8))
        c.recv_type(raw.PUBCOMP)
    assert [m.payload for m in sub.collect_until(MARK)] == [b"1"]


def test_v5_outbound_window_honours_client_receive_maximum(broker, clients):
    with raw.RawClient(broker.addr) as c:
        ack = c.connect(5, client_id=unique_id("rm"),
                        props=raw.properties((raw.P_RECEIVE_MAXIMUM, 2)))
        assert ack.code == 0
        c.send(raw.subscribe(1, [("s/win", 1)], 5))
        c.recv_type(raw.SUBACK)
        pub = clients.connected(broker, 5)
        for i in range(5):
            pub.publish("s/win", str(i), qos=1)
        window = [raw.parse_publish(c.recv_type(raw.PUBLISH), 5) for _ in range(2)]
        assert [p.payload for p in window] == [b"0", b"1"]
        # The marker is a PINGRESP: all five were queued before the PINGREQ was sent, so a third
        # PUBLISH the window let through would come before it.
        c.send(raw.packet(0xC0, b""))
        extra = c.recv()
        assert extra.type == raw.PINGRESP, f"broker exceeded receive maximum 2: {extra!r}"
        got = [p.payload for p in window]
        for p in window:
            c.send(raw.ack(raw.PUBACK, p.pid))
        while len(got) < 5:
            p = raw.parse_publish(c.recv_type(raw.PUBLISH), 5)
            got.append(p.payload)
            c.send(raw.ack(raw.PUBACK, p.pid))
        assert got == [b"0", b"1", b"2", b"3", b"4"]


def test_v5_inbound_receive_maximum_enforced(broker_factory):
    broker = broker_factory(env={"PETREL_MQTT__RECEIVE_MAXIMUM": "3"})
    with raw.RawClient(broker.addr) as c:
        ack = c.connect(5, client_id=unique_id("flood"))
        assert ack.props.get(raw.P_RECEIVE_MAXIMUM) == [3]
        for pid in (1, 2, 3):
            c.send(raw.publish("s/flood", b"x", qos=2, pid=pid, version=5))
            c.recv_type(raw.PUBREC)
        c.send(raw.publish("s/flood", b"x", qos=2, pid=4, version=5))  # a 4th, unreleased
        packets = c.until_closed()
        assert [raw.parse_disconnect(p)[0] for p in packets if p.type == raw.DISCONNECT] == [0x93]
