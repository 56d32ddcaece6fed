"""Draining a node: SIGTERM (a rolling upgrade's step) and the admin API's drain.

A drained node turns not ready, refuses new CONNECTs, hands Raft leadership away and tells its
clients to go; the wills of its clients wait `cluster.will_grace_ms` and are published only for
clients that did not connect again (here after a restart, or on another node).
"""

import json
import urllib.error
import urllib.request

import pytest

from harness import Broker, ClusterBroker, let_time_pass, wait_until
from mqttclient import Clients, prop, unique_id

TOKEN = "drain-token-0123456789"
GRACE_MS = 3000


def api(b, method: str, path: str):
    req = urllib.request.Request(f"http://127.0.0.1:{b.admin_port}{path}", method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture
def mqtt():
    made = Clients()
    yield made
    made.close_all()


@pytest.fixture
def cluster(tmp_path):
    c = ClusterBroker(tmp_path / "c", 3, env={
        "PETREL_ADMIN_TOKEN": TOKEN,
        "PETREL_CLUSTER__WILL_GRACE_MS": str(GRACE_MS),
    }).start()
    yield c
    for b in c.nodes:
        b.stop()


def node_ids(c):
    return [api(b, "GET", "/api/v1/cluster")[1]["node_id"] for b in c.nodes]


@pytest.mark.single_node
def test_sigterm_hands_leadership_away_and_keeps_wills_of_clients_that_do_not_return(cluster, mqtt):
    ids = node_ids(cluster)
    leader_id = api(cluster.nodes[0], "GET", "/api/v1/cluster")[1]["leader_id"]
    leader = cluster.nodes[ids.index(leader_id)]
    others = [b for b in cluster.nodes if b is not leader]
    topic = f"dw/{unique_id()}"
    w = mqtt.connected(others[0], version=5)
    w.subscribe(f"{topic}/#", qos=1)
    back = mqtt.new(leader, version=5, client_id=unique_id("back")).will(f"{topic}/back", b"back gone", qos=1)
    back.connect(session_expiry=600)
    gone = mqtt.new(leader, version=4, client_id=unique_id("gone")).will(f"{topic}/gone", b"gone", qos=1)
    gone.connect()

    leader.proc.send_signal(15)
    assert back.wait_disconnect().reason_code == 0x8B
    assert leader.stop(timeout=30) == 0
    assert "leadership handed away for the shutdown" in leader.log()
    new_leader = wait_until("a new leader among the others", lambda: (
        api(others[0], "GET", "/api/v1/cluster")[1]["leader_id"]))
    assert new_leader != leader_id

    # One client comes back within the grace, on another node; the other never does.
    back2 = mqtt.new(others[1], version=5, client_id=back.client_id)
    back2.connect(clean_start=False, session_expiry=600)
    msg = w.expect(timeout=GRACE_MS / 1000 + 20, what="the will of the client that did not return")
    assert (msg.topic, msg.payload) == (f"{topic}/gone", b"gone")
    let_time_pass(GRACE_MS / 1000, "the returned client's will would be due by now")
    w.subscribe("zz-mark", qos=1)
    w.publish("zz-mark", b"m", qos=1)
    assert w.expect(what="the marker").topic == "zz-mark", "no will for the client that came back"


def test_single_node_sigterm_will_waits_the_grace_after_the_restart(tmp_path, mqtt):
    env = {"PETREL_CLUSTER__WILL_GRACE_MS": str(GRACE_MS), "PETREL_ADMIN_TOKEN": TOKEN}
    b = Broker(tmp_path / "n", env=env).start()
    topic = f"dw1/{unique_id()}"
    stays = mqtt.new(b, version=5, client_id=unique_id("stays")).will(f"{topic}/stays", b"x", qos=1)
    stays.connect(session_expiry=600)
    away = mqtt.new(b, version=5, client_id=unique_id("away")).will(f"{topic}/away", b"away", qos=1)
    away.connect(session_expiry=600)
    b.proc.send_signal(15)
    assert stays.wait_disconnect().reason_code == 0x8B
    assert b.stop(timeout=30) == 0
    stays.close()
    away.close()
    b.start()
    w = mqtt.connected(b, version=5)
    w.subscribe(f"{topic}/#", qos=1)
    again = mqtt.new(b, version=5, client_id=stays.client_id)
    again.connect(clean_start=False, session_expiry=600)
    msg = w.expect(timeout=GRACE_MS / 1000 + 15, what="the will of the client that stayed away")
    assert (msg.topic, msg.payload) == (f"{topic}/away", b"away")
    let_time_pass(1, "both wills were due at the same time")
    w.subscribe("zz-mark", qos=1)
    w.publish("zz-mark", b"m", qos=1)
    assert w.expect(what="the marker").topic == "zz-mark", "no will for the client that came back"
    b.stop()


def test_sigterm_sends_v5_clients_to_the_server_reference(tmp_path, mqtt):
    b = Broker(tmp_path / "n", env={"PETREL_MQTT__SERVER_REFERENCE": "mqtt.example.net:1883"}).start()
    c = mqtt.connected(b, version=5)
    b.proc.send_signal(15)
    d = c.wait_disconnect()
    assert d.reason_code == 0x9C, f"DISCONNECT {d.reason_code:#x}, wanted 0x9C Use another server"
    assert prop(d.properties, "ServerReference") == "mqtt.example.net:1883"
    assert b.stop(timeout=30) == 0


@pytest.mark.single_node
def test_admin_drain_through_another_node(cluster, mqtt):
    ids = node_ids(cluster)
    target, asker = cluster.nodes[1], cluster.nodes[2]
    v5 = mqtt.connected(target, version=5)
    status, out = api(asker, "POST", f"/api/v1/cluster/nodes/{ids[1]}/drain")
    assert status == 200 and out == {"node_id": ids[1], "state": "draining"}
    assert v5.wait_disconnect().reason_code == 0x8B
    wait_until("drained node not ready", lambda: target.http_get("/readyz")[0] == 503)
    # The others stay (or are back, if leadership moved away from the drained node) ready.
    wait_until("the other nodes ready",
               lambda: all(b.http_get("/readyz")[0] == 200 for b in cluster.nodes if b is not target))
    refused = mqtt.new(target, version=5)
    assert refused.connect(expect_rc=None).reason_code == 0x9C
    refused3 = mqtt.new(target, version=4)
    # paho reports 3.1.1's return code 3 (Server unavailable) as 0x88, its v5 counterpart.
    assert refused3.connect(expect_rc=None).reason_code == 0x88
    wait_until("draining in the cluster state", lambda: [
        m["draining"] for m in api(asker, "GET", "/api/v1/cluster")[1]["members"]
        if m["node_id"] == ids[1]] == [True])
    assert api(asker, "GET", "/api/v1/cluster")[1]["leader_id"] != ids[1]
    status, out = api(asker, "POST", "/api/v1/cluster/nodes/99/drain")
    assert status == 404 and out["error"]["code"] == "unknown_node"
