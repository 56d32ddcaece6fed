"""QoS 0/1/2 round trips, downgrade, ordering and topic matching, in MQTT 3.1.1 and 5.0."""

import pytest

from mqttclient import unique_id

PAYLOAD = bytes(range(256)) * 4


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_round_trip(broker, clients, version, qos):
    topic = f"qos/{unique_id()}"
    sub = clients.connected(broker, version)
    assert sub.subscribe(topic, qos=2) == [2]
    pub = clients.connected(broker, version)
    pub.publish(topic, PAYLOAD, qos=qos)  # waits for PUBACK / PUBCOMP at QoS 1 / 2

    msg = sub.expect()
    assert msg.topic == topic
    assert msg.payload == PAYLOAD
    assert msg.qos == qos
    assert msg.retain is False
    assert msg.dup is False


@pytest.mark.parametrize("sub_qos", [0, 1])
def test_downgrade_to_subscription_qos(broker, clients, version, sub_qos):
    topic = f"down/{unique_id()}"
    sub = clients.connected(broker, version)
    assert sub.subscribe(topic, qos=sub_qos) == [sub_qos]
    pub = clients.connected(broker, version)
    for qos in (0, 1, 2):
        pub.publish(topic, f"q{qos}", qos=qos)
    got = sub.expect_n(3)
    assert [m.payload for m in got] == [b"q0", b"q1", b"q2"]
    assert [m.qos for m in got] == [min(q, sub_qos) for q in (0, 1, 2)]


@pytest.mark.parametrize("qos", [1, 2])
def test_order_is_kept_per_publisher(broker, clients, version, qos):
    topic = f"order/{unique_id()}"
    sub = clients.connected(broker, version)
    sub.subscribe(topic, qos=qos)
    pub = clients.connected(broker, version)
    infos = [pub.publish(topic, str(i), qos=qos, wait=False) for i in range(200)]
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()
    got = sub.expect_n(200)
    assert [int(m.payload) for m in got] == list(range(200))


def test_publisher_gets_its_own_message(broker, clients, version):
    c = clients.connected(broker, version)
    topic = f"self/{unique_id()}"
    c.subscribe(topic, qos=1)
    c.publish(topic, b"echo", qos=1)
    assert c.expect().payload == b"echo"


@pytest.mark.parametrize("flt, matching, not_matching", [
    ("a/#", ["a", "a/b", "a/b/c"], ["b", "ab", "b/a"]),
    ("a/+", ["a/b", "a/"], ["a", "a/b/c", "b/a"]),
    ("+/+", ["a/b", "/b", "x/"], ["a", "a/b/c"]),
    ("+", ["a", "bc"], ["a/b", "/a"]),
    ("a/+/c", ["a/b/c", "a//c"], ["a/b/d", "a/b/c/d", "a/c"]),
    ("#", ["a", "a/b", "/"], []),
    ("/#", ["/", "/a"], ["a", "a/"]),
    ("a/b", ["a/b"], ["a/b/", "A/b", "a/b/c"]),
])
def test_topic_filters(broker, clients, version, flt, matching, not_matching):
    """Spec 4.7: '#' also matches the parent level, '+' exactly one level (which may be empty),
    matching is case sensitive and exact on separators. Each test has its own broker, so the
    topics need no private prefix."""
    marker = "zz-marker"
    sub = clients.connected(broker, version)
    assert sub.subscribe(flt, qos=1) == [1]
    sub.subscribe(marker, qos=1)
    pub = clients.connected(broker, version)
    for topic in matching + not_matching:
        pub.publish(topic, topic, qos=1)
    pub.publish(marker, b"", qos=1)
    got = sub.collect_until(marker)
    assert sorted(m.topic for m in got) == sorted(matching)
