"""TLS, mutual TLS, WebSocket, password files and ACLs, checked against the real binary.

Certificates are throwaway ones made with the `openssl` CLI for each test; password files are
made with `petrel passwd`.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import rawmqtt as raw
from harness import petrel_bin, wait_until
from mqttclient import Client, unique_id

TIMEOUT = 10.0


# --- helpers -------------------------------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)} failed:\n{res.stderr}"


def make_pki(d: Path) -> SimpleNamespace:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (CN=device-42),
    all signed by the CA."""
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=Petrel Test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "srv.ext").write_text("basicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature,keyEncipherment\n"
                               "extendedKeyUsage=serverAuth\n"
                               "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "cli.ext").write_text("basicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature,keyEncipherment\n"
                               "extendedKeyUsage=clientAuth\n")
    for name, cn in (("srv", "localhost"), ("cli", "device-42")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
                "-extfile", f"{name}.ext", cwd=d)
    # a second, unrelated CA that nobody trusts
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", "other-ca.key", "-out", "other-ca.crt", "-subj", "/CN=Other CA", cwd=d)
    return SimpleNamespace(dir=d, ca=d / "ca.crt", srv_crt=d / "srv.crt", srv_key=d / "srv.key",
                           cli_crt=d / "cli.crt", cli_key=d / "cli.key",
                           other_ca=d / "other-ca.crt")


def endpoint(host: str, port: int) -> SimpleNamespace:
    """What mqttclient.Client needs of a broker: where to connect."""
    return SimpleNamespace(host=host, port=port)


def tls_client(clients, broker, pki, version: int = 5, ca: Path | None = None,
               cert: bool = False, **kwargs) -> Client:
    c = clients.new(endpoint("localhost", broker.listener_port("mqtts")), version, **kwargs)
    c.paho.tls_set(ca_certs=str(ca or pki.ca),
                   certfile=str(pki.cli_crt) if cert else None,
                   keyfile=str(pki.cli_key) if cert else None)
    return c


def assert_cannot_connect(c: Client, timeout: float = TIMEOUT) -> str:
    """The connection attempt fails: the TLS handshake raises, or the broker closes the
    connection without a successful CONNACK. Returns what happened."""
    try:
        c.paho.connect(c.broker.host, c.broker.port, 60)
    except (ssl.SSLError, OSError) as err:
        return f"connect raised {err!r}"
    c.paho.loop_start()
    assert c.disconnected.wait(timeout), f"{c.client_id}: still connected after {timeout}s"
    acks = []
    while not c.connacks.empty():
        acks.append(c.connacks.get())
    assert all(a.reason_code != 0 for a in acks), f"{c.client_id} was accepted: {acks}"
    return f"closed after CONNACKs {acks}"


def raw_connect(broker, version: int, **kwargs) -> raw.ConnackInfo:
    with raw.RawClient(broker.addr) as rc:
        return rc.connect(version, client_id=unique_id("raw"), **kwargs)


# --- 1. TLS -------------------------------------------------------------------------------------

def test_tls_listener_serves_mosquitto_and_paho_and_refuses_untrusted(broker_factory, clients,
                                                                       tmp_path):
    pki = make_pki(tmp_path / "pki")
    b = broker_factory(args=["--mqtts-addr", "127.0.0.1:0",
                             "--tls-cert", str(pki.srv_crt), "--tls-key", str(pki.srv_key)])
    port = b.listener_port("mqtts")

    sub = tls_client(clients, b, pki)
    sub.connect()
    assert sub.subscribe("t", qos=1) == [1]

    res = subprocess.run(["mosquitto_pub", "--cafile", str(pki.ca), "-h", "localhost",
                          "-p", str(port), "-t", "t", "-m", "x", "-q", "1"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"mosquitto_pub failed: {res.stdout}{res.stderr}"
    msg = sub.expect(what="the message mosquitto_pub sent over TLS")
    assert (msg.topic, msg.payload) == ("t", b"x")

    # the plain listener still works next to it
    plain = clients.connected(b)
    plain.publish("t", b"plain", qos=1)
    assert sub.expect().payload == b"plain"

    # a client that trusts another CA refuses the server
    untrusting = tls_client(clients, b, pki, ca=pki.other_ca)
    with pytest.raises(ssl.SSLError):
        untrusting.paho.connect("localhost", port, 60)


# --- 2. mutual TLS, CN as username ---------------------------------------------------------------

def test_mtls_cn_as_username_with_acl(broker_factory, clients, tmp_path):
    pki = make_pki(tmp_path / "pki")
    acl = tmp_path / "acl"
    acl.write_text("[user device-42]\nallow all dev/%u/#\n")
    b = broker_factory(
        env={"PETREL_TLS__CLIENT_CA_FILE": str(pki.ca),
             "PETREL_TLS__REQUIRE_CLIENT_CERT": "true",
             "PETREL_TLS__CN_AS_USERNAME": "true",
             "PETREL_AUTH__ACL_FILE": str(acl)},
        args=["--mqtts-addr", "127.0.0.1:0",
              "--tls-cert", str(pki.srv_crt), "--tls-key", str(pki.srv_key)])

    sub = tls_client(clients, b, pki, cert=True)
    sub.connect()
    assert sub.subscribe("dev/device-42/#", qos=1) == [1]

    pub = tls_client(clients, b, pki, cert=True)
    pub.connect()
    info = pub.publish("dev/device-42/x", b"hello", qos=1)
    assert pub.puback_reason(info) == 0
    msg = sub.expect(what="the message on dev/device-42/x")
    assert (msg.topic, msg.payload) == ("dev/device-42/x", b"hello")

    denied = pub.publish("other/x", b"no", qos=1)
    assert pub.puback_reason(denied) == 0x87

    # a user's rule names that user's topics only: a subscription elsewhere is refused too
    assert sub.subscribe("other/#", qos=1) == [0x87]

    # without a client certificate there is no connection
    anon = tls_client(clients, b, pki, cert=False)
    assert_cannot_connect(anon)


# --- 3. WebSocket --------------------------------------------------------------------------------

@pytest.mark.parametrize("ws_version", [4, 5], ids=["v311", "v5"])
def test_websocket_round_trip_with_tcp_client(broker_factory, clients, ws_version):
    b = broker_factory(args=["--ws-addr", "127.0.0.1:0"])
    ws_ep = endpoint("127.0.0.1", b.listener_port("ws"))

    def ws_client() -> Client:
        c = clients.new(ws_ep, ws_version, transport="websockets")
        c.paho.ws_set_options(path="/mqtt")
        c.connect()
        return c

    ws = ws_client()
    tcp = clients.connected(b, ws_version)
    assert ws.subscribe("ws/in", qos=1) == [1]
    assert tcp.subscribe("ws/out", qos=1) == [1]

    tcp.publish("ws/in", b"tcp->ws", qos=1)
    msg = ws.expect(what="the TCP client's message over WebSocket")
    assert (msg.topic, msg.payload, msg.qos) == ("ws/in", b"tcp->ws", 1)

    ws.publish("ws/out", b"ws->tcp", qos=1)
    msg = tcp.expect(what="the WebSocket client's message")
    assert (msg.topic, msg.payload, msg.qos) == ("ws/out", b"ws->tcp", 1)

    # a second WebSocket client talks to the first one
    other = ws_client()
    other.publish("ws/in", b"ws->ws", qos=1)
    assert ws.expect().payload == b"ws->ws"
    ws.disconnect()


# --- 4. password file ----------------------------------------------------------------------------

def passwd(*args: str) -> None:
    res = subprocess.run([str(petrel_bin()), "passwd", *args], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"petrel passwd {args} failed: {res.stdout}{res.stderr}"


def test_password_file_and_reload(broker_factory, tmp_path):
    pwfile = tmp_path / "passwd"
    passwd("-c", "-b", str(pwfile), "alice", "s3cret")
    assert "alice:" in pwfile.read_text() and "s3cret" not in pwfile.read_text()
    b = broker_factory(env={"PETREL_AUTH__PASSWORD_FILE": str(pwfile),
                            "PETREL_AUTH__ALLOW_ANONYMOUS": "false",
                            "PETREL_AUTH__RELOAD_INTERVAL_SECS": "1"})
    before = b.metric("petrel_auth_failures_total")

    # MQTT 3.1.1 return codes
    assert raw_connect(b, 4, username="alice", password=b"wrong").code == 4
    assert raw_connect(b, 4).code == 5
    assert raw_connect(b, 4, username="alice", password=b"s3cret").code == 0
    # MQTT 5 reason codes
    assert raw_connect(b, 5, username="alice", password=b"wrong").code == 0x86
    assert raw_connect(b, 5).code == 0x87
    assert raw_connect(b, 5, username="alice", password=b"s3cret").code == 0
    # an unknown user is a bad user name or password, not a different answer
    assert raw_connect(b, 5, username="mallory", password=b"s3cret").code == 0x86
    assert raw_connect(b, 5, username="bob", password=b"pw2").code == 0x86

    b.wait_metric("four failed logins counted", "petrel_auth_failures_total",
                  lambda v: v >= before + 4)

    passwd("-b", str(pwfile), "bob", "pw2")
    wait_until("bob to be accepted after the password file changed",
               lambda: raw_connect(b, 5, username="bob", password=b"pw2").code == 0,
               timeout=15.0, interval=0.2)
    # alice is still there, and bob's password is still checked
    assert raw_connect(b, 4, username="alice", password=b"s3cret").code == 0
    assert raw_connect(b, 4, username="bob", password=b"nope").code == 4


# --- 5. ACL --------------------------------------------------------------------------------------

ACL = """[anonymous]
allow publish pub/#
deny subscribe pub/secret/#
allow subscribe pub/#
"""


def test_acl_subscribe_and_publish_rules(broker_factory, clients, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    b = broker_factory(env={"PETREL_AUTH__ACL_FILE": str(acl)})
    denied_before = b.metric("petrel_acl_denied_total")

    v5 = clients.connected(b, 5)
    assert v5.subscribe("nope/#", qos=1) == [0x87]
    assert v5.subscribe("pub/#", qos=1) == [1]

    # MQTT 3.1.1 has only 0x80 for a refused subscription (checked on the wire)
    with raw.RawClient(b.addr) as rc:
        assert rc.connect(4, client_id=unique_id("raw")).code == 0
        rc.send(raw.subscribe(7, [("nope/#", 1), ("pub/open", 1)]))
        pid, codes, _ = raw.parse_suback(rc.recv_type(raw.SUBACK), 4)
        assert (pid, codes) == (7, [0x80, 1])

    pub = clients.connected(b, 5)
    for topic in ("pub/secret/x", "pub/open"):
        assert pub.puback_reason(pub.publish(topic, topic.encode(), qos=1)) == 0
    # the subscription to pub/# does not deliver what the deny rule covers
    got = v5.expect_n(1)
    assert [m.topic for m in got] == ["pub/open"]
    marker = pub.publish("pub/marker", b"m", qos=1)
    assert pub.puback_reason(marker) == 0
    assert [m.topic for m in v5.collect_until("pub/marker")] == []

    info = pub.publish("other/x", b"no", qos=1)
    assert pub.puback_reason(info) == 0x87

    b.wait_metric("the ACL denials counted", "petrel_acl_denied_total",
                  lambda v: v >= denied_before + 3)
