"""Retained messages: set, replace, clear; the retain flag on delivery; wildcards; v5 retain
handling and retain-as-published."""

import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

MARK = "zz-marker"


def retained_seen(clients, broker, version, flt, qos=1):
    """Subscribe a fresh client to `flt` and return the retained messages it gets: everything
    before a marker published after the SUBACK (retained messages are sent right after it)."""
    c = clients.connected(broker, version)
    c.subscribe(MARK, qos=1)
    c.subscribe(flt, qos=qos)
    c.publish(MARK, b"", qos=1)
    return c.collect_until(MARK)


def test_set_replace_clear(broker, clients, version):
    pub = clients.connected(broker, version)

    pub.publish("r/t", b"v1", qos=1, retain=True)
    got = retained_seen(clients, broker, version, "r/t")
    assert [(m.topic, m.payload, m.retain) for m in got] == [("r/t", b"v1", True)]

    pub.publish("r/t", b"v2", qos=1, retain=True)
    got = retained_seen(clients, broker, version, "r/t")
    assert [(m.topic, m.payload, m.retain) for m in got] == [("r/t", b"v2", True)]

    pub.publish("r/t", b"", qos=1, retain=True)  # an empty retained payload clears it
    assert retained_seen(clients, broker, version, "r/t") == []


def test_clearing_message_is_still_delivered_live(broker, clients, version):
    """Spec 3.3.1.3: a zero-byte retained PUBLISH is delivered to current subscribers as usual."""
    sub = clients.connected(broker, version)
    sub.subscribe("r/live", qos=1)
    pub = clients.connected(broker, version)
    pub.publish("r/live", b"x", qos=1, retain=True)
    pub.publish("r/live", b"", qos=1, retain=True)
    got = sub.expect_n(2)
    assert [m.payload for m in got] == [b"x", b""]


def test_retained_qos_is_min_of_stored_and_subscription(broker, clients, version):
    pub = clients.connected(broker, version)
    pub.publish("r/q2", b"two", qos=2, retain=True)
    pub.publish("r/q0", b"zero", qos=0, retain=True)
    pub.publish(MARK, b"", qos=1)  # QoS 0 above is ordered before this QoS 1 publish

    got = {m.topic: m for m in retained_seen(clients, broker, version, "r/+", qos=1)}
    assert set(got) == {"r/q2", "r/q0"}
    assert got["r/q2"].qos == 1
    assert got["r/q0"].qos == 0


def test_wildcard_subscription_gets_every_match(broker, clients, version):
    pub = clients.connected(broker, version)
    for t in ("w/a", "w/b/c", "w", "other/x"):
        pub.publish(t, t, qos=1, retain=True)
    got = retained_seen(clients, broker, version, "w/#")
    assert sorted((m.topic, m.payload) for m in got) == [("w", b"w"), ("w/a", b"w/a"),
                                                          ("w/b/c", b"w/b/c")]
    assert all(m.retain for m in got)
    got = retained_seen(clients, broker, version, "+/x")
    assert [m.topic for m in got] == ["other/x"]


def test_live_delivery_clears_retain_flag(broker, clients, version):
    """3.1.1 [MQTT-3.3.1-9] / 5.0 with Retain As Published = 0 [MQTT-3.3.1-13]: a retained
    message forwarded to an established subscription has RETAIN 0."""
    sub = clients.connected(broker, version)
    sub.subscribe("r/flag", qos=1)
    pub = clients.connected(broker, version)
    pub.publish("r/flag", b"x", qos=1, retain=True)
    msg = sub.expect()
    assert (msg.payload, msg.retain) == (b"x", False)


def test_v5_retain_as_published(broker, clients):
    sub = clients.connected(broker, 5)
    sub.subscribe("r/rap", options=SubscribeOptions(qos=1, retainAsPublished=True))
    pub = clients.connected(broker, 5)
    pub.publish("r/rap", b"kept", qos=1, retain=True)
    pub.publish("r/rap", b"plain", qos=1, retain=False)
    got = sub.expect_n(2)
    assert [(m.payload, m.retain) for m in got] == [(b"kept", True), (b"plain", False)]


@pytest.mark.parametrize("handling, first, again", [
    (0, True, True),    # send retained at every subscribe
    (1, True, False),   # only when the subscription did not exist yet
    (2, False, False),  # never
])
def test_v5_retain_handling(broker, clients, handling, first, again):
    pub = clients.connected(broker, 5)
    pub.publish("rh/t", b"stored", qos=1, retain=True)

    c = clients.connected(broker, 5)
    c.subscribe(MARK, qos=1)
    opts = SubscribeOptions(qos=1, retainHandling=handling)
    for expected in (first, again):  # the second SUBSCRIBE replaces the existing subscription
        assert c.subscribe("rh/t", options=opts) == [1]
        c.publish(MARK, b"", qos=1)
        got = c.collect_until(MARK)
        assert [m.payload for m in got] == ([b"stored"] if expected else [])


def test_retained_survives_publisher_disconnect(broker, clients, version):
    pub = clients.connected(broker, version)
    pub.publish("r/keep", b"still here", qos=1, retain=True)
    pub.disconnect()
    got = retained_seen(clients, broker, version, "r/keep")
    assert [m.payload for m in got] == [b"still here"]


@pytest.mark.single_node  # each node holds (and counts) every retained message
def test_retained_metric(broker_factory, clients, version):
    # $SYS topics are retained messages too: switch them off to count exactly
    broker = broker_factory(env={"PETREL_MQTT__SYS_INTERVAL_SECS": "0"})
    pub = clients.connected(broker, version)
    pub.publish("r/m1", b"1", qos=1, retain=True)
    pub.publish("r/m2", b"2", qos=1, retain=True)
    broker.wait_metric("two retained messages", "petrel_retained_messages", lambda v: v == 2)
    pub.publish("r/m1", b"", qos=1, retain=True)
    broker.wait_metric("one retained message", "petrel_retained_messages", lambda v: v == 1)
