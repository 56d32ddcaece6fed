"""$SYS topics: published on an interval with Mosquitto's names, never matched by a leading
wildcard."""

import re
import time

import pytest

SYS_TOPICS = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/clients/total",
    "$SYS/broker/clients/disconnected",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/subscriptions/count",
    "$SYS/broker/retained messages/count",
    "$SYS/broker/messages/stored",
    "$SYS/broker/messages/queued",
]


@pytest.fixture
def sys_broker(broker_factory):
    return broker_factory(env={"PETREL_MQTT__SYS_INTERVAL_SECS": "1"})


def collect_sys(client, want, timeout=10.0):
    """{topic: latest payload} once every topic in `want` was seen."""
    latest: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while not set(want) <= set(latest):
        left = deadline - time.monotonic()
        assert left > 0, f"missing $SYS topics: {sorted(set(want) - set(latest))}"
        msg = client.expect(timeout=left, what=f"$SYS topics {sorted(set(want) - set(latest))}")
        latest[msg.topic] = msg.payload.decode()
    return latest


def test_sys_topics_published(sys_broker, clients, version):
    c = clients.connected(sys_broker, version)
    c.subscribe("$SYS/#", qos=0)
    got = collect_sys(c, SYS_TOPICS)
    assert got["$SYS/broker/version"].strip()
    assert re.fullmatch(r"\d+ seconds", got["$SYS/broker/uptime"]), got["$SYS/broker/uptime"]
    for name in SYS_TOPICS[2:]:
        assert re.fullmatch(r"\d+", got[name]), f"{name} = {got[name]!r}"
    # The retained values first received may predate this client; a later round counts it.
    deadline = time.monotonic() + 10
    while not (int(got["$SYS/broker/clients/connected"]) >= 1
               and int(got["$SYS/broker/subscriptions/count"]) >= 1):
        left = deadline - time.monotonic()
        assert left > 0, f"$SYS never counted this client and its subscription: {got}"
        msg = c.expect(timeout=left, what="a $SYS round that counts this client")
        got[msg.topic] = msg.payload.decode()


@pytest.mark.single_node  # each node's $SYS is its own
def test_sys_values_follow_activity(sys_broker, clients, version):
    watcher = clients.connected(sys_broker, version)
    watcher.subscribe("$SYS/broker/clients/connected", qos=0)
    first = int(watcher.expect(what="clients/connected").payload)
    others = [clients.connected(sys_broker, version) for _ in range(3)]
    deadline = time.monotonic() + 10
    while True:
        value = int(watcher.expect(timeout=max(0.1, deadline - time.monotonic()),
                                   what="clients/connected to rise").payload)
        if value >= first + 3:
            break
        assert time.monotonic() < deadline, f"clients/connected stayed at {value}"
    assert len(others) == 3


def test_sys_retained_for_late_subscribers(sys_broker, clients, version):
    early = clients.connected(sys_broker, version)
    early.subscribe("$SYS/broker/version", qos=0)
    early.expect(what="a first $SYS publication")
    late = clients.connected(sys_broker, version)
    late.subscribe("$SYS/broker/version", qos=0)
    msg = late.expect(timeout=5, what="the retained $SYS/broker/version")
    assert msg.retain is True


def test_leading_wildcard_does_not_match_sys(sys_broker, clients, version):
    """Spec 4.7.2: filters starting with '#' or '+' do not match topics starting with '$'."""
    wild = clients.connected(sys_broker, version)
    wild.subscribe("#", qos=0)
    wild.subscribe("+/broker/#", qos=0)
    sys_sub = clients.connected(sys_broker, version)
    sys_sub.subscribe("$SYS/broker/uptime", qos=0)
    # wait for two publication rounds, so the wildcard subscriber had every chance to see one
    sys_sub.expect(what="a $SYS publication")
    sys_sub.expect(what="a second $SYS publication")
    wild.publish("zz-marker", b"", qos=1)
    got = wild.collect_until("zz-marker")
    assert [m.topic for m in got if m.topic.startswith("$")] == []
