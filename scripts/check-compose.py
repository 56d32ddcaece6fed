#!/usr/bin/env python3
"""The Compose cluster (deploy/compose.yaml with deploy/compose.local.yaml), for real.

    python3 scripts/check-compose.py [--keep]

Builds the node image from $PETREL_BIN (deploy/build-image.sh --prebuilt) and Prometheus from
Debian's package, starts the stack under its own project name and host ports, and checks:
- the three nodes form one cluster and are ready (the time from `up` to ready is printed);
- Prometheus scrapes every node (its targets are up);
- a message published on one node reaches a subscriber on another;
- a persistent session taken over on another node gets what was queued for it;
- `docker kill` of a node under a QoS 1 stream loses no acknowledged message;
- `docker network disconnect` of a node: the other two keep serving; `docker network
  connect` heals it, and it is ready again and gets messages.
Ends with "check-compose: N passed, M failed"; the stack is removed (volumes too) unless
--keep. Clients are paho's.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "python"))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from harness import free_port, petrel_bin, wait_until  # noqa: E402

PROJECT = "petrel-check"
IMAGE = "petrel:check"
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, ok, detail))
    print(f"check-compose: {'ok' if ok else 'FAILED'}: {name}{(' (' + detail + ')') if detail else ''}",
          flush=True)


def sh(*cmd: str, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def compose(env, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return sh("docker-compose", "-p", PROJECT, "-f", "deploy/compose.yaml", "-f",
              "deploy/compose.local.yaml", *args, env=env, timeout=timeout)


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class Client:
    def __init__(self, port: int, cid: str, clean: bool = True) -> None:
        self.got: list[bytes] = []
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self._got(m.payload)
        self.c.on_publish = lambda c, u, mid, rc, p: self._acked(mid, rc)
        self.c.on_connect = lambda c, u, f, rc, p: (not rc.is_failure) and self.connected.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 600
        self.c.connect("127.0.0.1", port, 30, clean_start=clean, properties=props)
        self.c.loop_start()
        if not self.connected.wait(10):
            raise AssertionError(f"{cid}: no CONNACK from port {port}")

    def _got(self, payload: bytes) -> None:
        with self.lock:
            self.got.append(payload)

    def _acked(self, mid: int, rc) -> None:
        if not rc.is_failure:
            with self.lock:
                self.acked.add(mid)

    def sub(self, topic: str, qos: int = 1) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda c, u, mid, rcs, p: done.set()
        self.c.subscribe(topic, qos)
        if not done.wait(10):
            raise AssertionError("no SUBACK")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    args = ap.parse_args()
    env = dict(os.environ)
    ports = {k: free_port() for k in ("MQTT_1", "MQTT_2", "MQTT_3", "ADMIN_1", "ADMIN_2",
                                        "ADMIN_3", "PROMETHEUS", "GRAFANA")}
    env.update({f"PETREL_HOST_{k}": str(v) for k, v in ports.items()})
    env["PETREL_IMAGE"] = IMAGE
    mqtt_port = [ports["MQTT_1"], ports["MQTT_2"], ports["MQTT_3"]]
    admin_port = [ports["ADMIN_1"], ports["ADMIN_2"], ports["ADMIN_3"]]
    r = sh("bash", "deploy/build-image.sh", "--prebuilt", str(petrel_bin()), "--tag", IMAGE, timeout=900)
    if r.returncode != 0:
        check("the node image builds", False, r.stderr[-500:])
        return finish()
    r = compose(env, "build", "prometheus", timeout=900)
    if r.returncode != 0:
        check("the Prometheus image builds", False, r.stderr[-500:])
        return finish()
    compose(env, "down", "-v")
    t0 = time.monotonic()
    r = compose(env, "up", "-d")
    if r.returncode != 0:
        check("compose up", False, r.stderr[-800:])
        return finish(env)
    try:
        wait_until("every node ready", lambda: all(http_status(p, "/readyz") == 200 for p in admin_port), 120)
        check("three nodes ready", True, f"{time.monotonic() - t0:.1f} s from `up`")
    except AssertionError as e:
        check("three nodes ready", False, str(e)[:300])
        return finish(env)
    try:
        def targets_up():
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['PROMETHEUS']}/api/v1/targets", timeout=3) as resp:
                t = json.loads(resp.read())["data"]["activeTargets"]
            up = [x for x in t if x["labels"].get("job") == "petrel" and x["health"] == "up"]
            return len(up) == 3
        wait_until("Prometheus scrapes the three nodes", lambda: _quiet(targets_up), 90)
        check("Prometheus scrapes every node", True)
    except AssertionError as e:
        check("Prometheus scrapes every node", False, str(e)[:300])

    # A message across nodes.
    try:
        s = Client(mqtt_port[2], "cc-sub")
        s.sub("cc/x")
        p = Client(mqtt_port[0], "cc-pub")
        p.c.publish("cc/x", b"across", qos=1)
        wait_until("the message on node 3", lambda: b"across" in s.got, 20)
        check("a message published on node 1 reaches a subscriber on node 3", True)
        s.close()
        p.close()
    except AssertionError as e:
        check("a message published on node 1 reaches a subscriber on node 3", False, str(e)[:300])

    # Takeover of a persistent session across nodes, with what was queued for it.
    try:
        a = Client(mqtt_port[0], "cc-persist", clean=False)
        a.sub("cc/queued")
        a.close()
        p = Client(mqtt_port[1], "cc-pub2")
        for i in range(5):
            p.c.publish("cc/queued", f"q{i}".encode(), qos=1)
        wait_until("5 acknowledged", lambda: len(p.acked) == 5, 20)
        b = Client(mqtt_port[2], "cc-persist", clean=False)
        wait_until("the queued messages on node 3", lambda: len(b.got) >= 5, 20)
        check("a persistent session taken over on node 3 gets its queue", sorted(b.got) == [f"q{i}".encode() for i in range(5)], str(b.got))
        b.close()
        p.close()
    except AssertionError as e:
        check("a persistent session taken over on node 3 gets its queue", False, str(e)[:300])

    # docker kill of a node under a QoS 1 stream: publisher on node 1, subscriber on node 2.
    try:
        s = Client(mqtt_port[1], "cc-stream-sub", clean=False)
        s.sub("cc/stream")
        p = Client(mqtt_port[0], "cc-stream-pub")
        sent = {}
        for i in range(400):
            info = p.c.publish("cc/stream", f"m{i}".encode(), qos=1)
            sent[info.mid] = f"m{i}".encode()
            if i == 150:
                r = sh("docker", "kill", f"{PROJECT}_petrel-3_1")
                if r.returncode != 0:
                    raise AssertionError(f"docker kill: {r.stderr}")
            time.sleep(0.005)
        wait_until("the stream acknowledged", lambda: len(p.acked) == 400, 60)
        acked = {sent[m] for m in p.acked}
        wait_until("every acknowledged message delivered", lambda: acked <= set(s.got), 60)
        check("docker kill of node 3 under a QoS 1 stream loses no acknowledged message", True,
              f"{len(acked)} acknowledged, {len(set(s.got) & acked)} delivered")
        s.close()
        p.close()
    except AssertionError as e:
        check("docker kill of node 3 under a QoS 1 stream loses no acknowledged message", False, str(e)[:300])
    compose(env, "up", "-d", "petrel-3")
    try:
        wait_until("node 3 ready again", lambda: http_status(admin_port[2], "/readyz") == 200, 120)
        check("the killed node comes back and is ready", True)
    except AssertionError as e:
        check("the killed node comes back and is ready", False, str(e)[:300])

    # A partition: node 3 off the network, then back.
    net = f"{PROJECT}_default"
    r = sh("docker", "network", "disconnect", net, f"{PROJECT}_petrel-3_1")
    try:
        if r.returncode != 0:
            raise AssertionError(r.stderr)
        s = Client(mqtt_port[1], "cc-part-sub")
        s.sub("cc/part")
        p = Client(mqtt_port[0], "cc-part-pub")
        p.c.publish("cc/part", b"majority", qos=1)
        wait_until("the majority serves", lambda: b"majority" in s.got, 30)
        check("with node 3 cut off, nodes 1 and 2 keep serving", True)
    except AssertionError as e:
        check("with node 3 cut off, nodes 1 and 2 keep serving", False, str(e)[:300])
    r = sh("docker", "network", "connect", "--alias", "petrel-3", net, f"{PROJECT}_petrel-3_1")
    try:
        if r.returncode != 0:
            raise AssertionError(r.stderr)
        wait_until("node 3 ready after the heal", lambda: http_status(admin_port[2], "/readyz") == 200, 120)
        s3 = Client(mqtt_port[2], "cc-heal-sub")
        s3.sub("cc/heal")
        p = Client(mqtt_port[0], "cc-heal-pub")
        p.c.publish("cc/heal", b"healed", qos=1)
        wait_until("node 3 gets messages again", lambda: b"healed" in s3.got, 30)
        check("after the heal node 3 is ready and gets messages", True)
    except AssertionError as e:
        check("after the heal node 3 is ready and gets messages", False, str(e)[:300])
    return finish(env if not args.keep else None)


def _quiet(f):
    try:
        return f()
    except (OSError, ValueError, KeyError):
        return False


def finish(env=None) -> int:
    if env is not None:
        compose(env, "down", "-v", "--remove-orphans")
    passed = sum(1 for _, ok, _ in results if ok)
    print(f"check-compose: {passed} passed, {len(results) - passed} failed")
    return 0 if results and passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
