"""The admin REST API (/api/v1), its tokens, `petrel ctl` and the OpenAPI document, from outside.

Every call goes over real HTTP to a real node; MQTT clients are paho's. The 3-node tests list and
kick a session through a node other than the one its client is connected to.
"""

import json
import os
import stat
import subprocess
import urllib.error
import urllib.request

import pytest

from harness import Broker, ClusterBroker, petrel_bin, wait_until
from mqttclient import Clients, unique_id

RW = "rw-token-0123456789abcdef"
RO = "ro-token-0123456789abcdef"


def _decode(text: str):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"text": text}


def call(b, method: str, path: str, token: str | None = RW, body=None, raw: bytes | None = None,
         content_type: str | None = "application/json") -> tuple[int, dict | None, dict]:
    url = f"http://127.0.0.1:{b.admin_port}{path}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None and content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
            return resp.status, _decode(text), dict(resp.headers)
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        return err.code, _decode(text), dict(err.headers)


def error_code(answer) -> str:
    status, body, _ = answer
    assert body and "error" in body, f"{status}: not a JSON error: {body}"
    assert body["error"]["message"], body
    return body["error"]["code"]


@pytest.fixture
def node(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# test tokens\nread-write {RW}\nread-only {RO}\n")
    b = Broker(tmp_path / "n", args=["--admin-token-file", str(tokens)]).start()
    yield b
    b.stop()


@pytest.fixture
def mqtt():
    made = Clients()
    yield made
    made.close_all()


def test_tokens_roles_and_open_routes(node):
    status, _, headers = call(node, "GET", "/api/v1/sessions", token=None)
    assert status == 401 and "Bearer" in headers.get("www-authenticate", headers.get("WWW-Authenticate", ""))
    assert error_code(call(node, "GET", "/api/v1/sessions", token=None)) == "unauthorized"
    assert error_code(call(node, "GET", "/api/v1/sessions", token=RW + "x")) == "unauthorized"
    assert error_code(call(node, "GET", "/api/v1/sessions", token="short")) == "unauthorized"
    assert call(node, "GET", "/api/v1/sessions", token=RO)[0] == 200
    assert error_code(call(node, "POST", "/api/v1/publish", token=RO, body={"topic": "t"})) == "forbidden"
    assert call(node, "POST", "/api/v1/publish", token=RW, body={"topic": "t"})[0] == 200
    # Open by default: probes and scrapes need no token; the API's description neither.
    for path in ("/healthz", "/readyz", "/health/live", "/health/ready", "/metrics",
                 "/api/v1/openapi.json"):
        assert node.http_get(path)[0] == 200, path


def test_metrics_and_health_can_be_put_behind_the_token(tmp_path):
    b = Broker(tmp_path / "n", env={"PETREL_ADMIN__PROTECT_METRICS": "true",
                                     "PETREL_ADMIN__PROTECT_HEALTH": "true",
                                     "PETREL_ADMIN_TOKEN": RW})
    b.start()
    try:
        # The ready file comes with the listeners; readiness a moment later (caught up with
        # the log, routes reconciled): wait for it, with the token.
        wait_until("ready, asked with the token",
                   lambda: call(b, "GET", "/readyz", token=RW)[0] == 200)
        for path in ("/metrics", "/healthz", "/readyz"):
            assert call(b, "GET", path, token=None)[0] == 401, path
            assert call(b, "GET", path.replace("metrics", "healthz"), token=RW)[0] == 200
        req = urllib.request.Request(f"http://127.0.0.1:{b.admin_port}/metrics")
        req.add_header("Authorization", f"Bearer {RW}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert b"petrel_mqtt_connections" in resp.read()
    finally:
        b.stop()


def test_a_zero_config_node_makes_a_private_token_that_ctl_finds(tmp_path, mqtt):
    b = Broker(tmp_path / "n").start()
    try:
        token_file = b.data_dir / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert call(b, "GET", "/api/v1/sessions", token=None)[0] == 401, "never an open door"
        c = mqtt.connected(b, client_id="zero-config-client")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PETREL_")}
        out = subprocess.run(
            [str(petrel_bin()), "ctl", "--url", f"http://127.0.0.1:{b.admin_port}",
             "--data-dir", str(b.data_dir), "sessions", "list"],
            capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "CLIENT ID" in out.stdout and "zero-config-client" in out.stdout
        c.disconnect()
    finally:
        b.stop()


def test_sessions_list_filters_and_cursor_pagination(node, mqtt):
    ids = [f"pg-{i:02d}" for i in range(7)]
    clients = [mqtt.connected(node, client_id=i) for i in ids]
    # One persistent session, offline.
    p = mqtt.new(node, version=4, client_id="pg-offline", clean=False)
    p.connect()
    p.subscribe("x/#", qos=1)
    p.disconnect()
    wait_until("pg-offline offline", lambda: call(node, "GET", "/api/v1/sessions/pg-offline")[1]
               .get("connected") is False)
    seen, cursor, pages = [], None, 0
    while True:
        q = "/api/v1/sessions?limit=3&client_id_prefix=pg-" + (f"&cursor={cursor}" if cursor else "")
        status, page, _ = call(node, "GET", q)
        assert status == 200, page
        assert len(page["items"]) <= 3
        seen += [s["client_id"] for s in page["items"]]
        pages += 1
        if pages == 1:
            # Items come and go between pages: the cursor stays valid.
            clients[-1].disconnect()
            mqtt.connected(node, client_id="pg-00a")
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert set(ids[:-1]) | {"pg-offline"} <= set(seen)
    status, page, _ = call(node, "GET", "/api/v1/sessions?connected=false")
    assert [s["client_id"] for s in page["items"]] == ["pg-offline"]
    assert page["items"][0]["persistent"] is True
    status, page, _ = call(node, "GET", "/api/v1/sessions?client_id_prefix=pg-0&connected=true&limit=1000")
    assert all(s["connected"] and s["client_id"].startswith("pg-0") for s in page["items"])
    for bad, code in [("?cursor=nonsense", "bad_cursor"), ("?cursor=k1.zz", "bad_cursor"),
                      ("?limit=0", "bad_request"), ("?limit=1001", "bad_request"),
                      ("?limit=many", "bad_request"), ("?connected=maybe", "bad_request"),
                      ("?node=-1", "bad_request")]:
        answer = call(node, "GET", "/api/v1/sessions" + bad)
        assert answer[0] == 400 and error_code(answer) == code, bad


def test_session_detail_kick_and_discard(node, mqtt):
    cid = unique_id("kick")
    c = mqtt.new(node, version=5, client_id=cid)
    from mqttclient import props
    c.connect(properties=props(1, SessionExpiryInterval=3600))
    c.subscribe("k/+/t", qos=1)
    status, s, _ = call(node, "GET", f"/api/v1/sessions/{cid}")
    assert status == 200
    assert s["connected"] and s["persistent"] and s["protocol_version"] == 5
    assert s["listener"] == "mqtt" and s["tls"] is False and s["peer"].startswith("127.0.0.1:")
    assert s["expiry_secs"] == 3600 and s["keep_alive_secs"] == 60
    assert [x["filter"] for x in s["subscriptions"]] == ["k/+/t"] and s["subscriptions"][0]["qos"] == 1
    # Kept filter by filter while connected: a new one is listed in order, an ended one goes.
    c.subscribe("a/b", qos=0)
    c.subscribe("z/#", qos=2)
    c.unsubscribe("a/b")
    s = call(node, "GET", f"/api/v1/sessions/{cid}")[1]
    assert [(x["filter"], x["qos"]) for x in s["subscriptions"]] == [("k/+/t", 1), ("z/#", 2)]
    assert s["subscription_count"] == 2
    status, k, _ = call(node, "DELETE", f"/api/v1/sessions/{cid}")
    assert status == 200 and k["disconnected"] and not k["discarded"]
    d = c.wait_disconnect()
    assert d.reason_code == 0x98, f"DISCONNECT {d.reason_code:#x}, wanted 0x98 Administrative action"
    wait_until("offline", lambda: call(node, "GET", f"/api/v1/sessions/{cid}")[1]["connected"] is False)
    s = call(node, "GET", f"/api/v1/sessions/{cid}")[1]
    assert [x["filter"] for x in s["subscriptions"]] == ["k/+/t", "z/#"], "the session stays"
    status, k, _ = call(node, "DELETE", f"/api/v1/sessions/{cid}?discard=true")
    assert status == 200 and k["discarded"] and not k["disconnected"]
    answer = call(node, "GET", f"/api/v1/sessions/{cid}")
    assert answer[0] == 404 and error_code(answer) == "unknown_session"
    answer = call(node, "DELETE", "/api/v1/sessions/nobody-here")
    assert answer[0] == 404 and error_code(answer) == "unknown_session"
    assert error_code(call(node, "DELETE", f"/api/v1/sessions/{cid}?discard=perhaps")) == "bad_request"


def test_subscriptions_retained_and_publish(node, mqtt):
    sub = mqtt.connected(node, client_id="sub-r")
    sub.subscribe("r/#", qos=1)
    status, out, _ = call(node, "POST", "/api/v1/publish",
                          body={"topic": "r/a", "payload": "on", "qos": 1, "retain": True})
    assert status == 200 and out["receivers"] == 1
    assert sub.expect().payload == b"on"
    call(node, "POST", "/api/v1/publish", body={"topic": "r/b", "payload_base64": "/wA=", "retain": True})
    status, page, _ = call(node, "GET", "/api/v1/subscriptions?client_id=sub-r")
    assert [(s["filter"], s["qos"]) for s in page["items"]] == [("r/#", 1)]
    status, page, _ = call(node, "GET", "/api/v1/retained?filter=r/%2B")
    assert [m["topic"] for m in page["items"]] == ["r/a", "r/b"]
    assert page["items"][1]["payload"] is None and page["items"][1]["payload_base64"] == "/wA="
    status, page, _ = call(node, "GET", "/api/v1/retained?limit=1")
    assert len(page["items"]) == 1 and page["next_cursor"]
    status, m, _ = call(node, "GET", "/api/v1/retained/message?topic=r/a")
    assert status == 200 and m["payload"] == "on" and m["qos"] == 1
    assert call(node, "DELETE", "/api/v1/retained/message?topic=r/a")[0] == 204
    answer = call(node, "GET", "/api/v1/retained/message?topic=r/a")
    assert answer[0] == 404 and error_code(answer) == "unknown_retained"
    assert error_code(call(node, "DELETE", "/api/v1/retained/message?topic=r/a")) == "unknown_retained"
    for bad in [{"topic": "r/+"}, {"topic": ""}, {"topic": "r", "qos": 3},
                {"topic": "r", "payload": "a", "payload_base64": "YQ=="},
                {"topic": "r", "payload_base64": "!!"}, {"topic": "$SYS/x"}]:
        answer = call(node, "POST", "/api/v1/publish", body=bad)
        assert answer[0] == 400 and error_code(answer) == "bad_request", bad
    assert error_code(call(node, "POST", "/api/v1/publish", raw=b"{not json")) == "bad_json"
    assert error_code(call(node, "POST", "/api/v1/publish", body={"topic": "t", "extra": 1})) == "bad_json"
    answer = call(node, "POST", "/api/v1/publish", raw=b'{"topic":"t"}', content_type=None)
    assert answer[0] == 415 and error_code(answer) == "unsupported_media_type"
    assert error_code(call(node, "GET", "/api/v1/retained?filter=a/%23/b")) == "bad_request"


def test_routes_cluster_and_unknown_routes(node, mqtt):
    c = mqtt.connected(node)
    c.subscribe("route/me", qos=0)
    status, page, _ = call(node, "GET", "/api/v1/routes")
    assert status == 200 and any(r["filter"] == "route/me" for r in page["items"])
    assert not any(r["unknown_node"] for r in page["items"])
    status, info, _ = call(node, "GET", "/api/v1/cluster")
    assert status == 200 and info["role"] == "leader" and info["leader_id"] == info["node_id"]
    assert [m["role"] for m in info["members"]] == ["leader"] and info["members"][0]["reachable"]
    me = info["node_id"]
    answer = call(node, "DELETE", f"/api/v1/cluster/nodes/{me}")
    assert answer[0] == 409 and error_code(answer) == "conflict"
    answer = call(node, "DELETE", "/api/v1/cluster/nodes/77")
    assert answer[0] == 404 and error_code(answer) == "unknown_node"
    assert error_code(call(node, "DELETE", "/api/v1/cluster/nodes/x")) == "bad_request"
    answer = call(node, "GET", "/api/v1/no/such/thing")
    assert answer[0] == 404 and error_code(answer) == "not_found"
    answer = call(node, "PUT", "/api/v1/sessions", body={})
    assert answer[0] == 405 and error_code(answer) == "method_not_allowed"


def test_ctl_against_a_live_node(node, mqtt):
    c = mqtt.connected(node, client_id="ctl-client")
    c.subscribe("ctl/#")
    base = [str(petrel_bin()), "ctl", "--url", f"http://127.0.0.1:{node.admin_port}", "--token", RW]

    def ctl(*args):
        out = subprocess.run(base + list(args), capture_output=True, text=True, timeout=30)
        return out.returncode, out.stdout, out.stderr

    rc, out, err = ctl("cluster", "status")
    assert rc == 0 and "leader" in out and "NODE" in out, err
    rc, out, err = ctl("--json", "sessions", "list")
    assert rc == 0, err
    assert "ctl-client" in [s["client_id"] for s in json.loads(out)]
    rc, out, err = ctl("publish", "ctl/x", "hello", "--retain")
    assert rc == 0, err
    assert c.expect().payload == b"hello"
    rc, out, err = ctl("retained", "list", "--filter", "ctl/#")
    assert rc == 0 and "ctl/x" in out and "hello" in out
    rc, out, err = ctl("sessions", "show", "nobody")
    assert rc == 1 and "404 unknown_session" in err
    rc, out, err = ctl("sessions", "kick", "ctl-client")
    assert rc == 0 and "disconnected: true" in out
    assert c.wait_disconnect().reason_code == 0x98
    out = subprocess.run([str(petrel_bin()), "ctl", "--url", f"http://127.0.0.1:{node.admin_port}",
                          "--token", RO, "retained", "delete", "ctl/x"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "403 forbidden" in out.stderr


def test_openapi_document_holds_every_route(node):
    status, doc, _ = call(node, "GET", "/api/v1/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for p in ["/api/v1/sessions", "/api/v1/sessions/{client_id}", "/api/v1/subscriptions",
              "/api/v1/retained", "/api/v1/retained/message", "/api/v1/publish", "/api/v1/routes",
              "/api/v1/cluster", "/api/v1/cluster/nodes/{node_id}",
              "/api/v1/cluster/nodes/{node_id}/drain"]:
        assert p in paths, p
    assert "bearer" in doc["components"]["securitySchemes"]


def test_schemathesis_finds_no_server_error_and_no_schema_break(node, mqtt, tmp_path):
    pytest.importorskip("schemathesis")
    mqtt.connected(node, client_id="st-client").subscribe("st/#")
    url = f"http://127.0.0.1:{node.admin_port}/api/v1/openapi.json"
    cmd = ["schemathesis", "run", url, "--header", f"Authorization: Bearer {RW}",
           "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
           "--max-examples", "25", "--exclude-path-regex", "drain",
           "--request-timeout", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


@pytest.mark.single_node
def test_a_session_is_listed_and_kicked_through_any_node(tmp_path, mqtt):
    cluster = ClusterBroker(tmp_path / "c", 3, env={"PETREL_ADMIN_TOKEN": RW}).start()
    try:
        n0, n1, n2 = cluster.nodes
        c = mqtt.new(n2, version=5, client_id="far-client")
        c.connect()
        c.subscribe("far/#")
        wait_until("listed through node 0", lambda: "far-client" in [
            s["client_id"] for s in call(n0, "GET", "/api/v1/sessions")[1]["items"]])
        page = call(n0, "GET", "/api/v1/sessions?client_id_prefix=far")[1]
        node2 = call(n2, "GET", "/api/v1/cluster")[1]["node_id"]
        assert [s["node_id"] for s in page["items"]] == [node2] and not page.get("unreachable_nodes")
        s = call(n1, "GET", "/api/v1/sessions/far-client")[1]
        assert "node_id" in s, s
        assert s["node_id"] == node2 and [x["filter"] for x in s["subscriptions"]] == ["far/#"]
        subs = call(n0, "GET", "/api/v1/subscriptions?filter=far/%23")[1]["items"]
        assert [x["client_id"] for x in subs] == ["far-client"]
        status, k, _ = call(n0, "DELETE", "/api/v1/sessions/far-client")
        assert status == 200 and k["disconnected"] and k["node_id"] == node2
        assert c.wait_disconnect().reason_code == 0x98
        info = call(n1, "GET", "/api/v1/cluster")[1]
        assert sorted(m["role"] for m in info["members"]).count("leader") == 1
        assert len(info["members"]) == 3
    finally:
        for b in cluster.nodes:
            b.stop()


def test_the_admin_listener_speaks_https_only_with_a_certificate(tmp_path):
    import ssl
    certs = tmp_path / "certs"
    certs.mkdir()
    res = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", "admin.key", "-out", "admin.crt", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        cwd=certs, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    b = Broker(tmp_path / "n", env={
        "PETREL_ADMIN__TLS_CERT_FILE": str(certs / "admin.crt"),
        "PETREL_ADMIN__TLS_KEY_FILE": str(certs / "admin.key"),
        "PETREL_ADMIN_TOKEN": RW}).start()
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "admin.crt"))
        req = urllib.request.Request(f"https://127.0.0.1:{b.admin_port}/api/v1/sessions")
        req.add_header("Authorization", f"Bearer {RW}")
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            assert resp.status == 200 and json.loads(resp.read())["items"] == []
        with urllib.request.urlopen(f"https://127.0.0.1:{b.admin_port}/healthz", timeout=10,
                                    context=ctx) as resp:
            assert resp.status == 200
        import http.client
        # Plain HTTP gets no HTTP answer (a TLS alert, or a closed socket).
        with pytest.raises((urllib.error.URLError, OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{b.admin_port}/healthz", timeout=5)
        # The certificate's expiry is exported for the alert rules.
        with urllib.request.urlopen(f"https://127.0.0.1:{b.admin_port}/metrics", timeout=10,
                                    context=ctx) as resp:
            text = resp.read().decode()
        assert 'petrel_tls_certificate_expiry_timestamp_seconds{listener="admin"}' in text
    finally:
        b.stop()
