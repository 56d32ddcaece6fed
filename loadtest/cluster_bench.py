#!/usr/bin/env python3
"""Cluster figures of issues 11 and 12, measured on one machine (nodes on loopback ports).

    python3 loadtest/cluster_bench.py [--nodes 3] [--clients 5000] [--subscribers 10000]
                                      [--routes 1000000] [--only connect,subscribe,routes]

- connect: clean-session and persistent-session connects/s (petrel-bench conn, clients
  spread over the nodes) on one node and on a cluster of --nodes, the same run each;
- subscribe: a subscribe storm (petrel-bench conn --subscribe: every client subscribes to a
  filter of its own, a new route each) on one node and on the cluster: subscriptions/s, and
  the Raft log entries it took;
- routes: --routes distinct filters subscribed on node 0 of the cluster (raw MQTT, 100
  filters per SUBSCRIBE); the RSS growth of a node that holds only the replica, per route;
  the snapshot's size; and how long a new node takes to join and catch up from it;
- forward: p2p QoS 1 (8 pairs, flat out), fan-out QoS 0 (one publisher at 5,000/s, 30
  subscribers) and p2p QoS 1 paced at 10,000 msg/s in all, on one node and with publishers
  and subscribers on different nodes of the cluster: messages/s, delivery latency and the
  brokers' CPU seconds per million delivered messages, summed over every node;
- stall: one QoS 1 publisher on node 0, one PUBLISH at a time, its subscriber on node 2,
  which is killed (-9) after 2 s: the longest wait for a PUBACK (against
  cluster.forward_ack_timeout_ms).

Binaries: PETREL_BIN and PETREL_BENCH (default: the release builds under CARGO_TARGET_DIR,
~/.cache/petrel-target). Prints a Markdown table and the raw figures as JSON on stdout.
Needs a quiet machine; nothing here is an assertion (measurements, not tests).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/petrel-target"))
PETREL = os.environ.get("PETREL_BIN", os.path.join(TARGET, "release", "petrel"))
BENCH = os.environ.get("PETREL_BENCH", os.path.join(TARGET, "release", "petrel-bench"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, cond, within=60.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Node:
    def __init__(self, root, node_id, seeds, env):
        self.id = node_id
        self.dir = os.path.join(root, f"node{node_id}")
        os.makedirs(self.dir, exist_ok=True)
        self.grpc = f"127.0.0.1:{free_port()}"
        self.seeds = seeds
        self.env = env
        self.proc = None

    def start(self):
        ready = os.path.join(self.dir, "ready.json")
        if os.path.exists(ready):
            os.remove(ready)
        # Snapshot sizes come from the state machine's log line.
        env = dict(os.environ, PETREL_LOG="warn,petrel_node::cluster::sm=info", **self.env)
        args = [PETREL, "--node-id", str(self.id), "--mqtt-addr", "127.0.0.1:0",
                "--admin-addr", "127.0.0.1:0", "--grpc-addr", self.grpc,
                "--data-dir", os.path.join(self.dir, "data"), "--ready-file", ready]
        if self.seeds:
            args += ["--join", ",".join(self.seeds)]
        self.log = open(os.path.join(self.dir, "log"), "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log, env=env)
        info = wait(f"node {self.id} ready file", lambda: read_json(ready))
        self.mqtt = info["mqtt"]
        self.admin = info["admin"]
        return self

    def status(self):
        out = subprocess.run([PETREL, "cluster", "--addr", self.grpc, "status", "--json"],
                             capture_output=True, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def rss_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def ready(self):
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://{self.admin}/health/ready", timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Cluster:
    def __init__(self, n, env=None):
        self.root = tempfile.mkdtemp(prefix="petrel-cbench-")
        self.env = env or {}
        self.nodes = []
        seeds = []
        for i in range(n):
            node = Node(self.root, i, None, self.env)
            seeds.append(node.grpc)
            self.nodes.append(node)
        for node in self.nodes:
            node.seeds = seeds if n > 1 else []
        for node in self.nodes:
            node.start()
        wait("every node ready", lambda: all(nd.ready() for nd in self.nodes), 120)

    def add(self, node_id):
        node = Node(self.root, node_id, [self.nodes[0].grpc], self.env)
        self.nodes.append(node)
        return node

    def close(self):
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def bench(args):
    out = subprocess.run([BENCH] + args + ["--json", "--quiet"], capture_output=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"petrel-bench {' '.join(args)} failed: {out.stderr.decode()[-2000:]}")
    return json.loads(out.stdout)


def brokers(c):
    args = []
    for node in c.nodes:
        args += ["--broker", node.mqtt]
    return args + ["--placement", "spread"]


def connects(c, clients, extra):
    pids = [nd.proc.pid for nd in c.nodes]
    before = cpu_s(pids)
    r = bench(["conn", "--clients", str(clients), "--duration", "1s"] + brokers(c) + extra)
    used = cpu_s(pids) - before
    s = r["connects"]
    return {"per_s": s["per_sec"], "succeeded": s["succeeded"], "failed": s["failed"],
            "p50_ms": s["latency"].get("p50_us", 0) / 1000, "p99_ms": s["latency"].get("p99_us", 0) / 1000,
            "broker_cpu_ms_per_op": used * 1000 / max(s["succeeded"], 1)}


def log_index(c):
    st = c.nodes[0].status()
    return st["last_log_index"] if st else 0


def run_connect(n, clients):
    rows = {}
    for label, nodes in (("1 node", 1), (f"{n} nodes", n)):
        c = Cluster(nodes)
        try:
            rows[f"clean, {label}"] = connects(c, clients, [])
            rows[f"persistent, {label}"] = connects(c, clients, ["--persistent"])
        finally:
            c.close()
    return rows


def run_subscribe(n, subscribers):
    rows = {}
    for label, nodes in (("1 node", 1), (f"{n} nodes", n)):
        c = Cluster(nodes)
        try:
            before = log_index(c)
            row = connects(c, subscribers, ["--subscribe"])
            row["raft_entries"] = log_index(c) - before
            rows[f"subscribe storm, {label}"] = row
        finally:
            c.close()
    return rows


def mqtt_str(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def varint(n):
    out = bytearray()
    while True:
        d, n = n % 128, n // 128
        out.append(d | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def frame_len(buf):
    """Length of the first whole MQTT packet in `buf`, or None if it is not all there."""
    n, shift, i = 0, 0, 1
    while i < len(buf):
        b = buf[i]
        n |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            return i + n if i + n <= len(buf) else None
    return None


def subscribe_many(addr, client_id, filters, per_packet=100):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.sendall(packet(0x10, mqtt_str("MQTT") + bytes([4, 2]) + struct.pack("!H", 600) + mqtt_str(client_id)))
    buf = b""
    while len(buf) < 4:
        buf += s.recv(4096)
    buf = buf[4:]
    pid = 0
    sent = 0
    for i in range(0, len(filters), per_packet):
        pid = pid % 65535 + 1
        body = struct.pack("!H", pid) + b"".join(mqtt_str(f) + b"\x00" for f in filters[i:i + per_packet])
        s.sendall(packet(0x82, body))
        sent += 1
    # One SUBACK per SUBSCRIBE: read them all (they come in order once the routes settle).
    acks = 0
    while acks < sent:
        chunk = s.recv(1 << 16)
        if not chunk:
            raise SystemExit("connection closed while subscribing")
        buf += chunk
        while True:
            size = frame_len(buf)
            if size is None:
                break
            if buf[0] >> 4 == 9:
                acks += 1
            buf = buf[size:]
    return s


def run_routes(n, routes):
    env = {"PETREL_CLUSTER__SNAPSHOT_AFTER_ENTRIES": "1000", "PETREL_LIMITS__MAX_SUBSCRIPTIONS_PER_CLIENT": "0"}
    c = Cluster(n, env)
    try:
        replica = c.nodes[-1]
        rss0 = replica.rss_kb()
        t0 = time.monotonic()
        per_client = 100_000
        socks = []
        for k in range(0, routes, per_client):
            filters = [f"fleet/{k // per_client}/dev{i}/+/status" for i in range(k, min(k + per_client, routes))]
            socks.append(subscribe_many(c.nodes[0].mqtt, f"routes-{k}", filters))
        took = time.monotonic() - t0
        wait("every replica to hold the routes",
             lambda: (replica.status() or {}).get("members") and
             sum(m["routes"] for m in replica.status()["members"]) >= routes, 600)
        time.sleep(1)
        rss1 = replica.rss_kb()
        snaps = []
        for node in c.nodes:
            p = os.path.join(node.dir, "data")
            snaps.append(du(p))
        # A new node joins: a learner, caught up from the snapshot.
        t1 = time.monotonic()
        newcomer = c.add(n).start()
        wait("the new node to be ready", newcomer.ready, 600)
        catch_up = time.monotonic() - t1
        new_routes = sum(m["routes"] for m in newcomer.status()["members"])
        snapshot_bytes = snapshot_size(c)
        for s in socks:
            s.close()
        return {"routes": routes, "subscribe_s": round(took, 1),
                "routes_per_s": round(routes / took),
                "replica_rss_growth_kb": rss1 - rss0,
                "bytes_per_route_replica": round((rss1 - rss0) * 1024 / routes),
                "new_node_catch_up_s": round(catch_up, 1), "new_node_routes": new_routes,
                "snapshot_bytes": snapshot_bytes,
                "data_dirs_bytes": snaps}
    finally:
        c.close()


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def snapshot_size(c):
    """The largest snapshot any node built or installed, from the logs ("bytes=N")."""
    best = 0
    for node in c.nodes:
        for line in open(os.path.join(node.dir, "log"), errors="replace"):
            if "raft snapshot built" in line and "bytes=" in line:
                best = max(best, int(line.split("bytes=")[1].split()[0]))
    return best


def cpu_s(pids):
    """User + system CPU seconds of the processes `pids`, summed."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def traffic(c, args, nodes=None):
    """One petrel-bench run against the nodes `nodes` (default all) of `c`: its report, plus
    the brokers' CPU seconds per million messages delivered, summed over every node."""
    use = [c.nodes[i] for i in (nodes or range(len(c.nodes)))]
    pids = [nd.proc.pid for nd in c.nodes]
    before = cpu_s(pids)
    addr = []
    for nd in use:
        addr += ["--broker", nd.mqtt]
    r = bench(args + addr)
    used = cpu_s(pids) - before
    received = r["totals"]["received"]
    lat = r["latency"]
    return {"sent": r["sent"], "received": received, "per_s": r["receive_rate"],
            "p50_ms": lat.get("p50_us", 0) / 1000, "p99_ms": lat.get("p99_us", 0) / 1000,
            "max_ms": lat.get("max_us", 0) / 1000,
            "broker_cpu_s_per_million": used / max(received, 1) * 1e6,
            "lost": r["totals"]["lost"], "duplicated": r["totals"]["duplicates"],
            "out_of_order": r["totals"]["out_of_order"]}


def run_forward(n, secs):
    """Publishes crossing nodes against the same on one node (see the module docs)."""
    rows = {}
    dur = ["--duration", f"{secs}s"]
    p2p = ["p2p", "-c", "8", "--qos", "1"] + dur
    fan = ["fanout", "--subscribers", "30", "--qos", "0", "--rate", "5000"] + dur
    paced = ["p2p", "-c", "8", "--qos", "1", "--rate", "1250"] + dur
    one = Cluster(1)
    try:
        rows["p2p QoS 1, 1 node"] = traffic(one, p2p + ["--placement", "same"])
        rows["fan-out QoS 0 x30, 1 node"] = traffic(one, fan + ["--placement", "same"])
        rows["p2p QoS 1 at 10,000/s, 1 node"] = traffic(one, paced + ["--placement", "same"])
    finally:
        one.close()
    c = Cluster(n)
    try:
        # Publishers on node 0, subscribers on node 1: every message crosses.
        rows[f"p2p QoS 1, across 2 of {n} nodes"] = traffic(c, p2p + ["--placement", "spread"], [0, 1])
        # One publisher on node 0, subscribers over every node in turn.
        rows[f"fan-out QoS 0 x30, {n} nodes"] = traffic(c, fan + ["--placement", "same"])
        rows[f"p2p QoS 1 at 10,000/s, across 2 of {n} nodes"] = traffic(
            c, paced + ["--placement", "spread"], [0, 1])
    finally:
        c.close()
    return rows


def run_stall(n, ack_timeout_ms):
    """A QoS 1 publisher on node 0 with a subscriber on node 2, one PUBLISH at a time; node 2
    is killed (-9) mid-stream. The longest wait for a PUBACK, and the waits around the kill."""
    c = Cluster(n, {"PETREL_CLUSTER__FORWARD_ACK_TIMEOUT_MS": str(ack_timeout_ms)})
    try:
        sub = raw_connect(c.nodes[2].mqtt, "stall-sub")
        sub.sendall(packet(0x82, struct.pack(">H", 1) + mqtt_str("stall/t") + b"\x01"))
        read_packet(sub)  # SUBACK
        pub = raw_connect(c.nodes[0].mqtt, "stall-pub")
        waits = []
        killed_at = None
        started = time.monotonic()
        pid = 1
        while time.monotonic() - started < 6:
            if killed_at is None and time.monotonic() - started > 2:
                c.nodes[2].proc.kill()
                c.nodes[2].proc.wait()
                killed_at = len(waits)
            t = time.monotonic()
            pub.sendall(packet(0x32, mqtt_str("stall/t") + struct.pack(">H", pid) + b"x" * 32))
            while True:
                first, body = read_packet(pub)
                if first >> 4 == 4:
                    break
            waits.append(time.monotonic() - t)
            pid = pid % 65535 + 1
        after = waits[killed_at:]
        return {"publishes": len(waits), "ack_timeout_ms": ack_timeout_ms,
                "max_puback_ms": max(waits) * 1000,
                "max_puback_after_kill_ms": max(after) * 1000 if after else 0,
                "p50_puback_ms": sorted(waits)[len(waits) // 2] * 1000,
                "publishes_after_kill": len(after)}
    finally:
        c.close()


def raw_connect(addr, client_id):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = mqtt_str("MQTT") + b"\x04\x02" + struct.pack(">H", 60) + mqtt_str(client_id)
    s.sendall(packet(0x10, body))
    first, _ = read_packet(s)
    assert first >> 4 == 2, "CONNACK"
    return s


def read_packet(s):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise SystemExit("connection closed")
            buf += chunk
        return buf
    first = exact(1)[0]
    mult, length = 1, 0
    while True:
        b = exact(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return first, exact(length)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--subscribers", type=int, default=10000)
    ap.add_argument("--routes", type=int, default=1_000_000)
    ap.add_argument("--secs", type=int, default=10, help="seconds of traffic per forwarding run")
    ap.add_argument("--ack-timeout-ms", type=int, default=1000)
    ap.add_argument("--only", default="connect,subscribe,routes,forward,stall")
    ap.add_argument("--out", help="also write the tables into this Markdown file "
                    "(loadtest/RESULTS.md), replacing what follows the cluster marker")
    a = ap.parse_args()
    only = set(a.only.split(","))
    results = {}
    if "connect" in only:
        results["connect"] = run_connect(a.nodes, a.clients)
    if "subscribe" in only:
        results["subscribe"] = run_subscribe(a.nodes, a.subscribers)
    if "routes" in only:
        results["routes"] = run_routes(a.nodes, a.routes)
    if "forward" in only:
        results["forward"] = run_forward(a.nodes, a.secs)
    if "stall" in only:
        results["stall"] = run_stall(a.nodes, a.ack_timeout_ms)
    print(json.dumps(results, indent=2))
    md = markdown(results, a)
    print(md)
    if a.out:
        write_section(a.out, md)


MARKER = "<!-- cluster_bench.py: everything below is written by it -->"


def markdown(results, a):
    L = [MARKER, "", "## Cluster (loadtest/cluster_bench.py)", "",
         f"Nodes on loopback ports of this machine (the same 2 cores as the load generator), "
         f"release build, `{' '.join(sys.argv)}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
         f"Clients are spread over the nodes in turn (`--placement spread`).", ""]
    for section in ("connect", "subscribe"):
        if section in results:
            L.append(f"| {section} | per s | p50 ms | p99 ms | failed | Raft entries | broker CPU ms per op (all nodes) |")
            L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            for k, v in results[section].items():
                L.append(f"| {k} | {v['per_s']:,.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                         f"{v['failed']} | {v.get('raft_entries', '')} | {v.get('broker_cpu_ms_per_op', 0):.3f} |")
            L.append("")
    if "forward" in results:
        L += ["| forwarding | msgs/s | p50 ms | p99 ms | broker CPU s per 1M msgs (all nodes) | lost | duplicated |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k, v in results["forward"].items():
            L.append(f"| {k} | {v['per_s']:,.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                     f"{v['broker_cpu_s_per_million']:.1f} | {v['lost']} | {v['duplicated']} |")
        L.append("")
    if "stall" in results:
        r = results["stall"]
        L += ["| a peer killed under a QoS 1 stream | figure |", "| --- | ---: |",
              f"| cluster.forward_ack_timeout_ms | {r['ack_timeout_ms']} |",
              f"| publishes (one at a time, 6 s; the subscriber's node killed at 2 s) | {r['publishes']:,} |",
              f"| median wait for PUBACK | {r['p50_puback_ms']:.2f} ms |",
              f"| longest wait for PUBACK | {r['max_puback_ms']:.0f} ms |",
              f"| publishes after the kill | {r['publishes_after_kill']:,} |", ""]
    if "routes" in results:
        r = results["routes"]
        L += ["| route table | figure |", "| --- | ---: |",
              f"| distinct filters (routes) | {r['routes']:,} |",
              f"| subscribed in | {r['subscribe_s']} s ({r['routes_per_s']:,}/s) |",
              f"| RSS growth of a node holding only the replica | {r['replica_rss_growth_kb']:,} KB |",
              f"| bytes per route per node | {r['bytes_per_route_replica']} |",
              f"| largest snapshot | {r['snapshot_bytes']:,} bytes |",
              f"| a new node joins and is ready in | {r['new_node_catch_up_s']} s |",
              f"| routes in the new node's replica | {r['new_node_routes']:,} |", ""]
    return "\n".join(L)


def write_section(path, md):
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        old = ""
    if MARKER in old:
        old = old[:old.index(MARKER)]
    with open(path, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + md + "\n")


if __name__ == "__main__":
    main()
