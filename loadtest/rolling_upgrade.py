#!/usr/bin/env python3
"""A rolling upgrade under load, on processes: every node of a 3-node cluster replaced in turn
while persistent sessions publish and receive QoS 1 and QoS 2 messages, all with wills.

    python3 loadtest/rolling_upgrade.py [--short] [--sessions 60] [--rate 200]
                                        [--old-bin PATH] [--new-bin PATH] [--json]

Each node in turn: SIGTERM, wait for its exit, start it again (the same binary, or --new-bin
for the nodes' version N+1; the cluster starts on --old-bin, version N, if given) on the same
data, wait for /readyz, next. The clients are paho's
(not ours): each subscriber and publisher has a persistent session and a will, and when its
connection ends it connects again, to the next node in turn, with clean start off.

Checked (the exit status is 1 if any fails) and printed:
- no acknowledged message lost: every message whose PUBACK/PUBCOMP came reaches its
  subscriber;
- no QoS 2 message delivered twice;
- no will published (every client connects again well within cluster.will_grace_ms), and
  none left kept aside for the leader to publish later (`petrel_cluster_wills_replaced`);
- each node exits 0 within its grace, is ready again, and a leader it was is replaced;
- no node is ready (/readyz 200) before it has applied what the others committed while it
  was down;
- with --old-bin and --new-bin: the wire level the new nodes report
  (`petrel_cluster_wire_level`) stays N's while a node of version N is a member, and is
  N+1's once the last node runs it (its newer features turn on then, not before);
- figures: messages sent, acknowledged, delivered, duplicates (QoS 1 and 2), wills, the
  total time, and the longest time any client could not connect.

Binaries: PETREL_BIN (default: the debug build under CARGO_TARGET_DIR). --short is the form
CI runs (fewer sessions and messages, same checks).
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "python"))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from harness import ClusterBroker, wait_until  # noqa: E402

TOKEN = "rolling-upgrade-token-0123"


class Peer:
    """One paho client that keeps connecting again, to the next node in turn."""

    def __init__(self, run, name: str, start_at: int) -> None:
        self.run, self.name = run, name
        self.next_node = start_at
        self.connected = threading.Event()
        self.down_since: float | None = time.monotonic()
        self.longest_down = 0.0
        self.lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                        protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        c.will_set(f"ru-will/{name}", b"gone", qos=1)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self.subscribed = threading.Event()
        c.max_inflight_messages_set(20)
        c.max_queued_messages_set(0)
        self.c = c
        self.on_ready = None
        self.connects = 0

    def _on_connect(self, client, userdata, flags, rc, props):
        if rc.is_failure:
            return
        self.connects += 1
        if self.connects > 1 and not flags.session_present:
            self.run.note(f"{self.name}: connected again without its session")
        with self.lock:
            if self.down_since is not None:
                self.longest_down = max(self.longest_down, time.monotonic() - self.down_since)
                self.down_since = None
        self.connected.set()
        if self.on_ready:
            self.on_ready(self)

    def _on_disconnect(self, client, userdata, flags, rc, props):
        with self.lock:
            if self.down_since is None:
                self.down_since = time.monotonic()
        self.connected.clear()

    def _on_subscribe(self, client, userdata, mid, rcs, props):
        if all(not rc.is_failure for rc in rcs):
            self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        self.run.received(self, msg)

    def _on_publish(self, client, userdata, mid, rc, props):
        self.run.acked(self, mid, rc)

    def keep_connected(self) -> None:
        """Runs in a thread: connects whenever the connection is down, next node first."""
        while not self.run.stop.is_set():
            if self.connected.is_set():
                time.sleep(0.05)
                continue
            nodes = self.run.addrs()
            host, port = nodes[self.next_node % len(nodes)]
            self.next_node += 1
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
            try:
                self.c.loop_stop()
                self.c.connect(host, port, keepalive=30, clean_start=False, properties=props)
                self.c.loop_start()
                self.connected.wait(3)
            except OSError:
                time.sleep(0.1)


class Run:
    def __init__(self, args, cluster: ClusterBroker) -> None:
        self.args, self.cluster = args, cluster
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = {}          # (publisher, mid) -> payload
        self.acked_mids = set() # (publisher, mid) acknowledged with success
        self.sent_count = 0
        self.delivered = {}   # payload -> times
        self.dup_qos = {1: 0, 2: 0}
        self.wills = []
        self.notes = []
        self.t0 = time.monotonic()

    def note(self, what: str) -> None:
        with self.lock:
            self.notes.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def addrs(self):
        return [("127.0.0.1", b.port) for b in self.cluster.nodes if b.alive()]

    def received(self, peer: Peer, msg) -> None:
        if msg.topic.startswith("ru-will/"):
            with self.lock:
                self.wills.append(msg.topic)
            return
        key = msg.payload.decode()
        with self.lock:
            n = self.delivered.get(key, 0) + 1
            self.delivered[key] = n
            if n > 1:
                self.dup_qos[msg.qos] = self.dup_qos.get(msg.qos, 0) + 1
                self.notes.append(f"{time.monotonic() - self.t0:7.2f}s duplicate qos {msg.qos} {key} to {peer.name} (dup flag {msg.dup})")

    def acked(self, peer: Peer, mid: int, rc) -> None:
        # Packet ids are not reused within a run (a few hundred messages per publisher), so
        # (publisher, mid) names one message; the mapping to payloads is made at the end.
        if not rc.is_failure:
            with self.lock:
                self.acked_mids.add((peer.name, mid))

    def acked_payloads(self) -> set:
        with self.lock:
            return {self.sent[k] for k in self.acked_mids if k in self.sent}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="the CI form: fewer sessions, lower rate")
    ap.add_argument("--sessions", type=int, default=60, help="subscriber sessions (as many publishers)")
    ap.add_argument("--rate", type=float, default=200.0, help="messages per second in all")
    ap.add_argument("--old-bin", help="binary the cluster starts on (version N)")
    ap.add_argument("--new-bin", help="binary the replaced nodes run (version N+1)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()
    if args.short:
        args.sessions, args.rate = 12, 60.0
    old_level = new_level = 0
    if args.old_bin and args.new_bin:
        old_level, new_level = binary_level(args.old_bin), binary_level(args.new_bin)
        print(f"rolling-upgrade: wire levels: N {old_level}, N+1 {new_level}", flush=True)
    if args.old_bin:
        os.environ["PETREL_BIN"] = args.old_bin
    work = Path(tempfile.mkdtemp(prefix="petrel-rolling-"))
    print(f"rolling-upgrade: nodes' logs under {work}", flush=True)
    cluster = ClusterBroker(work, 3, env={"PETREL_ADMIN_TOKEN": TOKEN, "PETREL_LOG": "info"}).start()
    run = Run(args, cluster)
    subs = [Peer(run, f"ru-sub-{i}", i) for i in range(args.sessions)]
    pubs = [Peer(run, f"ru-pub-{i}", i + 1) for i in range(args.sessions)]
    watcher = Peer(run, "ru-wills", 0)

    def subscribe(topic):
        return lambda p: p.c.subscribe(topic, qos=2)

    for i, s in enumerate(subs):
        s.on_ready = subscribe(f"ru/{i}")
    watcher.on_ready = subscribe("ru-will/#")
    threads = [threading.Thread(target=p.keep_connected, daemon=True) for p in subs + pubs + [watcher]]
    for t in threads:
        t.start()
    wait_until("every client connected", lambda: all(p.connected.is_set() for p in subs + pubs + [watcher]), 60)
    # Subscriptions stand before the load starts.
    wait_until("every subscription acknowledged",
               lambda: all(p.subscribed.is_set() for p in subs + [watcher]), 60)

    def publish_loop():
        period = 1.0 / args.rate
        seq, nxt = 0, time.monotonic()
        while not run.stop.is_set():
            i = seq % len(pubs)
            p = pubs[i]
            if p.connected.is_set():
                qos = 1 if seq % 2 == 0 else 2
                payload = f"{p.name}:{seq}"
                # Not under the run's lock: paho's network thread takes it in callbacks.
                info = p.c.publish(f"ru/{i}", payload.encode(), qos=qos)
                if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    with run.lock:
                        run.sent[(p.name, info.mid)] = payload
                        run.sent_count += 1
            seq += 1
            nxt += period
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    loader = threading.Thread(target=publish_loop, daemon=True)
    started = time.monotonic()
    loader.start()
    from harness import let_time_pass
    let_time_pass(2.0, "the load runs a while before the first node goes")
    steps, ok = [], True
    for i, node in enumerate(cluster.nodes):
        leader = leader_of(cluster)
        t0 = time.monotonic()
        run.note(f"SIGTERM node {i}")
        node.proc.send_signal(15)
        code = node.stop(timeout=60)
        stopped = time.monotonic() - t0
        handed = "leadership handed away for the shutdown" in node.log()
        if args.new_bin:
            os.environ["PETREL_BIN"] = args.new_bin
        run.note(f"node {i} exited {code}")
        # What the cluster had committed while the node was down: it is not ready before it
        # has applied that much.
        committed = max(int(b.metric("petrel_raft_commit_index")) for b in cluster.nodes if b is not node)
        node.start()
        wait_until(f"node {i} ready again", lambda node=node: node.http_get("/readyz")[0] == 200, 60)
        applied = int(node.metric("petrel_raft_applied_index"))
        ready = time.monotonic() - t0
        step = {"node": i, "exit": code, "stop_s": round(stopped, 2), "back_ready_s": round(ready, 2),
                "was_leader": leader == i, "leadership_handed_away": handed,
                "committed_while_down": committed, "applied_when_ready": applied}
        if code != 0 or (leader == i and not handed) or applied < committed:
            ok = False
        if args.old_bin and args.new_bin:
            # Every node replaced so far runs N+1; the level it reports is the cluster's: N's
            # while a node of N is a member, N+1's once none is.
            last = i == len(cluster.nodes) - 1
            want = new_level if last else old_level
            levels = [wire_level(cluster.nodes[j], want) for j in range(i + 1)]
            step["wire_levels"] = levels
            if any(lv != want for lv in levels):
                ok = False
        steps.append(step)
        print(f"rolling-upgrade: node {i}: {step}", flush=True)
        let_time_pass(2.0, "the load runs a while between two nodes")
    run.stop.set()
    loader.join()
    total = time.monotonic() - started
    # Everything acknowledged reaches its subscriber (a deadline, not a sleep).
    def all_delivered():
        acked = run.acked_payloads()
        with run.lock:
            return all(k in run.delivered for k in acked)

    try:
        wait_until("every acknowledged message delivered", all_delivered, 60)
    except AssertionError:
        pass
    for p in subs + pubs + [watcher]:
        p.c.disconnect()
        p.c.loop_stop()
    acked = run.acked_payloads()
    lost = sorted(k for k in acked if k not in run.delivered)
    figures = {
        "sessions": args.sessions * 2 + 1,
        "sent": run.sent_count,
        "acknowledged": len(acked),
        "delivered": len(run.delivered),
        "lost_acknowledged": len(lost),
        "duplicates_qos1": run.dup_qos.get(1, 0),
        "duplicates_qos2": run.dup_qos.get(2, 0),
        "wills": len(run.wills),
        "total_s": round(total, 1),
        "longest_client_down_s": round(max(p.longest_down for p in subs + pubs + [watcher]), 2),
        "steps": steps,
    }
    # A drained connection's will is dropped when its client connects elsewhere: none may be
    # left kept aside for the leader to publish later (0 from a version without the metric).
    figures["wills_kept"] = max(b.metric("petrel_cluster_wills_replaced") for b in cluster.nodes)
    for b in cluster.nodes:
        b.stop()
    ok = ok and not lost and figures["duplicates_qos2"] == 0 and figures["wills"] == 0
    print("rolling-upgrade: " + ", ".join(f"{k} {v}" for k, v in figures.items() if k != "steps"))
    if args.json:
        print(json.dumps(figures))
    if lost:
        print(f"rolling-upgrade: lost (first 10): {lost[:10]}")
    if os.environ.get("ROLLING_NOTES"):
        for n in run.notes[:200]:
            print("rolling-upgrade: note:", n)
    checks = [("no acknowledged message lost", not lost),
              ("no duplicate QoS 2 delivery", figures["duplicates_qos2"] == 0),
              ("no will published", figures["wills"] == 0),
              ("no will left kept aside for later", figures["wills_kept"] == 0),
              ("every node exited 0 and was ready again; a leader handed over first", all(
                  s["exit"] == 0 and (not s["was_leader"] or s["leadership_handed_away"]) for s in steps)),
              ("no node ready before it applied what the cluster committed while it was down",
               all(s["applied_when_ready"] >= s["committed_while_down"] for s in steps))]
    if args.old_bin and args.new_bin:
        levels = [s["wire_levels"] for s in steps]
        checks.append((f"wire level {old_level} (N's) while a node of N was a member, {new_level} once none was",
                       all(lv == old_level for step in levels[:-1] for lv in step)
                       and all(lv == new_level for lv in levels[-1])))
    for name, good in checks:
        print(f"rolling-upgrade: {'ok' if good else 'FAILED'}: {name}")
    passed = sum(1 for _, g in checks if g)
    print(f"rolling-upgrade: {passed} passed, {len(checks) - passed} failed")
    return 0 if ok and passed == len(checks) else 1


def binary_level(path: str) -> int:
    """The wire level a binary announces by default (`cluster.wire_level` in its default
    configuration; a version before wire levels has none: 1)."""
    import re
    import subprocess
    out = subprocess.run([path, "--print-default-config"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"^wire_level = (\d+)", out, re.M)
    return int(m.group(1)) if m else 1


def wire_level(node, want: int) -> int:
    """The wire level `node` (a node of version N+1) reports, waiting up to 30 s for `want`
    (each member announces itself when it starts, so a change takes a moment)."""
    def read():
        return int(node.metric("petrel_cluster_wire_level"))
    try:
        return wait_until(f"the cluster's wire level is {want}", lambda: read() if read() == want else None, 30)
    except AssertionError:
        return read()


def leader_of(cluster: ClusterBroker):
    import urllib.request
    for b in cluster.nodes:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{b.admin_port}/api/v1/cluster")
            req.add_header("Authorization", f"Bearer {TOKEN}")
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())["leader_id"]
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
