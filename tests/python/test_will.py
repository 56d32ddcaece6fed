"""Last Will and Testament: published on every ungraceful close, never after a normal
DISCONNECT; v5 will delay, DISCONNECT 0x04, retained wills."""

import time

import rawmqtt as raw
from harness import let_time_pass
from mqttclient import props, unique_id
from paho.mqtt.packettypes import PacketTypes

MARK = "zz-marker"


def watcher(clients, broker, version, topic):
    w = clients.connected(broker, version)
    w.subscribe(topic, qos=1)
    w.subscribe(MARK, qos=1)
    return w


def connections_at_most(broker, n):
    broker.wait_metric(f"at most {n} connections", "petrel_mqtt_connections", lambda v: v <= n)


def test_will_on_socket_loss(broker, clients, version):
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, version, topic)
    c = clients.new(broker, version).will(topic, b"gone", qos=1)
    c.connect()
    c.drop()
    msg = w.expect(what="the will")
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topic, b"gone", 1, False)


def test_no_will_after_disconnect(broker, clients, version):
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, version, topic)
    c = clients.new(broker, version).will(topic, b"must not appear", qos=1)
    c.connect()
    c.disconnect()
    # Once the broker has dropped the connection it has decided about the will; anything it
    # published would be queued to the watcher before the marker.
    connections_at_most(broker, 1)
    w.publish(MARK, b"", qos=1)
    assert w.collect_until(MARK) == []


def test_retained_will(broker, clients, version):
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, version, topic)
    c = clients.new(broker, version).will(topic, b"offline", qos=1, retain=True)
    c.connect()
    c.drop()
    w.expect(what="the will")
    late = clients.connected(broker, version)
    late.subscribe(topic, qos=1)
    msg = late.expect(what="the retained will")
    assert (msg.payload, msg.retain) == (b"offline", True)


def test_will_on_protocol_error(broker, clients, version):
    """A connection closed by the broker for a protocol violation publishes the will
    (3.1.1 section 3.1.2.5, 5.0 section 3.1.2.5)."""
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, version, topic)
    with raw.RawClient(broker.addr) as c:
        ack = c.connect(version, client_id=unique_id("raw"),
                        will=raw.Will(topic, b"broken", qos=1))
        assert ack.code == 0
        c.send(raw.packet(0x00, b""))  # reserved packet type 0
        c.until_closed()
    assert w.expect(what="the will").payload == b"broken"


def test_will_on_keepalive_timeout(broker, clients, version):
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, version, topic)
    started = time.monotonic()  # before the CONNECT: the broker's clock starts later
    with raw.RawClient(broker.addr) as c:
        ack = c.connect(version, client_id=unique_id("raw"), keepalive=1,
                        will=raw.Will(topic, b"timed out", qos=1))
        assert ack.code == 0
        packets = c.until_closed(timeout=10)
        elapsed = time.monotonic() - started
    # closed after 1.5 x keepalive of silence, not earlier
    assert elapsed >= 1.5, f"closed after {elapsed:.2f}s, keepalive 1s"
    if version == 5:
        assert [raw.parse_disconnect(p)[0] for p in packets] == [0x8D]
    else:
        assert packets == []
    assert w.expect(what="the will").payload == b"timed out"
    broker.wait_metric("a keepalive timeout counted", "petrel_mqtt_keepalive_timeouts_total",
                       lambda v: v >= 1)


def test_v5_disconnect_with_will_message(broker, clients):
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, 5, topic)
    c = clients.new(broker, 5).will(topic, b"asked for", qos=1)
    c.connect()
    c.disconnect(reason_code=0x04)
    assert w.expect(what="the will").payload == b"asked for"


def test_v5_will_properties_are_forwarded(broker, clients):
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, 5, topic)
    will_props = props(PacketTypes.WILLMESSAGE, ContentType="text/plain",
                       UserProperty=[("device", "d1")], ResponseTopic="resp/d1",
                       CorrelationData=b"\x01\x02")
    c = clients.new(broker, 5).will(topic, b"gone", qos=1, properties=will_props)
    c.connect()
    c.drop()
    msg = w.expect(what="the will")
    assert msg.prop("ContentType") == "text/plain"
    assert msg.prop("UserProperty") == [("device", "d1")]
    assert msg.prop("ResponseTopic") == "resp/d1"
    assert msg.prop("CorrelationData") == b"\x01\x02"


def test_v5_will_delay_publishes_after_the_delay(broker, clients):
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, 5, topic)
    c = clients.new(broker, 5).will(topic, b"late", qos=1,
                                    properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=2))
    c.connect(session_expiry=300)
    dropped = time.monotonic()
    c.drop()
    msg = w.expect(timeout=15, what="the delayed will")
    assert msg.payload == b"late"
    assert time.monotonic() - dropped >= 1.5, "will published before its delay"


def test_v5_will_delay_cancelled_by_reconnect(broker, clients):
    topic = f"will/{unique_id()}"
    cid = unique_id("delayed")
    w = watcher(clients, broker, 5, topic)
    c = clients.new(broker, 5, client_id=cid).will(
        topic, b"must not appear", qos=1,
        properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=3))
    c.connect(session_expiry=300)
    c.drop()
    back = clients.new(broker, 5, client_id=cid, clean=False)
    assert back.connect(session_expiry=300).session_present
    # The delay was 3 s; wait it out and a bit, then check nothing came.
    let_time_pass(4, "the will delay interval must elapse to show the will was cancelled")
    w.publish(MARK, b"", qos=1)
    assert w.collect_until(MARK) == []


def test_v5_will_sent_when_session_ends_before_delay(broker, clients):
    """Spec 3.1.3.2.2: the will is published when the delay elapses or the session ends,
    whichever happens first. Session expiry 0 ends the session at once."""
    topic = f"will/{unique_id()}"
    w = watcher(clients, broker, 5, topic)
    c = clients.new(broker, 5).will(topic, b"session over", qos=1,
                                    properties=props(PacketTypes.WILLMESSAGE,
                                                     WillDelayInterval=3600))
    c.connect(session_expiry=0)
    c.drop()
    assert w.expect(what="the will").payload == b"session over"


def test_v5_takeover_publishes_will_and_tells_old_connection(broker, clients):
    topic = f"will/{unique_id()}"
    cid = unique_id("twin")
    w = watcher(clients, broker, 5, topic)
    old = clients.new(broker, 5, client_id=cid).will(topic, b"taken over", qos=1)
    old.connect()
    new = clients.new(broker, 5, client_id=cid)
    new.connect()
    d = old.wait_disconnect()
    assert d.reason_code == 0x8E
    assert w.expect(what="the will of the old connection").payload == b"taken over"
