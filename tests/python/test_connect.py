"""Connection lifecycle seen from real clients: protocol versions, client ids, connect timeout,
credentials, the connection metrics and the admin health endpoints."""

import time

import rawmqtt as raw
from harness import wait_until
from mqttclient import unique_id


def test_mqtt_31_client(broker, clients):
    """MQTT 3.1 (protocol name MQIsdp, level 3) through paho's MQTTv31 mode."""
    sub = clients.connected(broker, 3)
    sub.subscribe("v31/t", qos=2)
    pub = clients.connected(broker, 3)
    pub.publish("v31/t", b"old but gold", qos=2)
    msg = sub.expect()
    assert (msg.payload, msg.qos) == (b"old but gold", 2)


def test_versions_interoperate(broker, clients):
    subs = {v: clients.connected(broker, v) for v in (3, 4, 5)}
    for s in subs.values():
        s.subscribe("mix/t", qos=1)
    for v in (3, 4, 5):
        clients.connected(broker, v).publish("mix/t", f"from {v}", qos=1)
    for s in subs.values():
        assert sorted(m.payload for m in s.expect_n(3)) == [b"from 3", b"from 4", b"from 5"]


def test_v311_empty_client_id_with_clean_session(broker):
    with raw.RawClient(broker.addr) as c:
        ack = c.connect(4, client_id="", clean=True)
        assert (ack.session_present, ack.code) == (False, 0)
        c.send(raw.PINGREQ_BYTES)
        c.recv_type(raw.PINGRESP)


def test_username_and_password_accepted_without_auth(broker):
    with raw.RawClient(broker.addr) as c:
        ack = c.connect(5, client_id=unique_id("cred"), username="user", password=b"secret")
        assert ack.code == 0


def test_connect_timeout(broker_factory):
    broker = broker_factory(env={"PETREL_MQTT__CONNECT_TIMEOUT_MS": "500"})
    before = broker.metric("petrel_mqtt_connect_timeouts_total")
    # Timed from before the TCP connects: the broker's clock starts later (at accept), so load
    # can only make the closes later; 10 s is the generous deadline, 0.5 s the exact bound.
    started = time.monotonic()
    with raw.RawClient(broker.addr) as silent, raw.RawClient(broker.addr) as partial:
        partial.send(raw.connect(4, client_id="slow")[:5])  # half a CONNECT, then nothing
        assert silent.until_closed(timeout=10) == []
        assert partial.until_closed(timeout=10) == []
        assert time.monotonic() - started >= 0.5, "closed before the 500 ms connect timeout"
    broker.wait_metric("two connect timeouts", "petrel_mqtt_connect_timeouts_total",
                       lambda v: v >= before + 2)


def test_connection_metrics(broker, clients, version):
    base = broker.metric("petrel_mqtt_connections")
    total = broker.metric("petrel_mqtt_connections_total")
    a = clients.connected(broker, version)
    b = clients.connected(broker, version)
    broker.wait_metric("two more connections", "petrel_mqtt_connections",
                       lambda v: v == base + 2)
    assert broker.metric("petrel_mqtt_connections_total") >= total + 2
    a.disconnect()
    b.drop()
    broker.wait_metric("connections back down", "petrel_mqtt_connections", lambda v: v == base)


def test_message_metrics(broker, clients, version):
    sub = clients.connected(broker, version)
    sub.subscribe("met/t", qos=1)
    pub = clients.connected(broker, version)
    received = broker.metric("petrel_mqtt_messages_received_total")
    sent = broker.metric("petrel_mqtt_messages_sent_total")
    for i in range(3):
        pub.publish("met/t", str(i), qos=1)
    sub.expect_n(3)
    broker.wait_metric("3 messages received", "petrel_mqtt_messages_received_total",
                       lambda v: v >= received + 3)
    broker.wait_metric("3 messages sent", "petrel_mqtt_messages_sent_total",
                       lambda v: v >= sent + 3)
    broker.wait_metric("sessions counted", "petrel_sessions", lambda v: v >= 2)
    broker.wait_metric("subscription counted", "petrel_subscriptions", lambda v: v >= 1)


def test_health_endpoints(broker):
    assert broker.http_get("/health/live")[0] == 200
    assert broker.http_get("/healthz") == (200, "ok\n")
    # Ready once the node leads its cluster of one: a few ms after the ready file.
    wait_until("/health/ready to say 200", lambda: broker.http_get("/health/ready")[0] == 200)
    assert broker.http_get("/readyz") == (200, "ready\n")
    status, body = broker.http_get("/metrics")
    assert status == 200
    for name in ("petrel_mqtt_connections", "petrel_mqtt_connections_total",
                 "petrel_mqtt_messages_received_total", "petrel_mqtt_messages_sent_total",
                 "petrel_sessions", "petrel_subscriptions", "petrel_retained_messages"):
        assert name in body, f"{name} missing from /metrics"
