"""A real network partition: three nodes, each in a network namespace of its own on a private
bridge, one of them cut off from the other two (iptables in its namespace) while its clients
still reach it, then healed.

Needs root and `ip`/`iptables` (skipped otherwise). Every address is in 10.213.<n>.0/24, made
for the test and removed after it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time

import pytest

from harness import Broker, wait_until
from mqttclient import Clients, unique_id

pytestmark = [
    pytest.mark.single_node,  # it builds a cluster of its own
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"),
                       reason="needs root, ip and iptables (network namespaces)"),
]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Net:
    """A bridge in this namespace and one namespace per node, each with a veth on the bridge."""

    def __init__(self, n: int) -> None:
        self.tag = f"{os.getpid() % 1000}{random.randint(0, 99)}"
        self.subnet = random.randint(1, 250)
        self.bridge = f"ptbr{self.tag}"
        self.names = [f"pt{self.tag}n{i}" for i in range(n)]
        self.gateway = f"10.213.{self.subnet}.1"
        self.addrs = [f"10.213.{self.subnet}.{10 + i}" for i in range(n)]
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        # Docker's FORWARD policy drops bridged traffic when bridges go through iptables.
        self.forward_rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        sh("iptables", "-I", *self.forward_rule)
        for i, ns in enumerate(self.names):
            outer, inner = f"pt{self.tag}v{i}", f"pt{self.tag}i{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", self.bridge)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addrs[i]}/24", "dev", inner)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        """Node i no longer hears the other nodes, nor they it; clients still reach it."""
        for j, addr in enumerate(self.addrs):
            if j != i:
                for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
                    sh("ip", "netns", "exec", self.names[i], "iptables", "-A", chain, flag, addr,
                       "-j", "DROP")

    def heal(self, i: int) -> None:
        for chain in ("INPUT", "OUTPUT"):
            sh("ip", "netns", "exec", self.names[i], "iptables", "-F", chain)

    def close(self) -> None:
        subprocess.run(["iptables", "-D", *self.forward_rule], capture_output=True)
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def cluster(tmp_path):
    net = Net(3)
    nodes: list[Broker] = []
    try:
        seeds = ",".join(f"{a}:7883" for a in net.addrs)
        env = {"PETREL_JOIN": seeds, "PETREL_CLUSTER__HEARTBEAT_INTERVAL_MS": "100",
               "PETREL_CLUSTER__ELECTION_TIMEOUT_MS": "500",
               "PETREL_CLUSTER__PROPOSE_TIMEOUT_MS": "2000",
               "PETREL_CLUSTER__FORWARD_ACK_TIMEOUT_MS": "500"}
        for i, ns in enumerate(net.names):
            nodes.append(Broker(tmp_path / f"node{i}", env=dict(env, PETREL_NODE_ID=str(i)),
                                grpc_addr=f"{net.addrs[i]}:7883", bind=net.addrs[i],
                                prefix=["ip", "netns", "exec", ns]))
        for b in nodes:
            b.start()
        for i, b in enumerate(nodes):
            wait_until(f"node {i} ready", lambda b=b: b.http_get("/health/ready")[0] == 200, 30)
        yield net, nodes
    finally:
        for b in nodes:
            b.stop()
        failed = any(b.exit_code not in (0, None) for b in nodes)
        net.close()
        if failed:
            for i, b in enumerate(nodes):
                print(f"----- node {i} -----\n{b.log()}")


def test_a_partition_between_publisher_and_subscriber_nodes_loses_nothing(cluster):
    net, nodes = cluster
    clients = Clients()
    try:
        sub = clients.new(nodes[2], 5, client_id=unique_id("cut-sub"))
        sub.connect(keepalive=60)
        assert sub.subscribe("part/#", qos=1) == [1]
        pub = clients.connected(nodes[0], 5)
        pub.publish("part/x", "before", qos=1)
        assert sub.expect().payload == b"before"

        net.cut(2)
        started = time.monotonic()
        for i in range(20):
            t = time.monotonic()
            pub.publish("part/x", f"m{i}", qos=1)
            # Never held past the ack timeout (500 ms), whatever the peer does.
            assert time.monotonic() - t < 1.5, f"PUBACK {i} took {time.monotonic() - t:.2f}s"
        took = time.monotonic() - started
        # The majority side keeps working: a new client and subscription on node 1.
        other = clients.connected(nodes[1], 5)
        assert other.subscribe("part/other", qos=1) == [1]
        # The minority side answers, and refuses what needs the cluster, in bounded time.
        t = time.monotonic()
        cut_off = clients.new(nodes[2], 5, client_id=unique_id("cut-new"))
        ack = cut_off.connect(expect_rc=None, timeout=10)
        assert ack.reason_code == 0x88, ack
        assert time.monotonic() - t < 5

        net.heal(2)
        got = [m.payload.decode() for m in sub.expect_n(20, timeout=30)]
        assert got == [f"m{i}" for i in range(20)], "every acknowledged message, in order"
        sub.subscribe("part/mark", qos=1)
        pub.publish("part/mark", "end", qos=1)
        # Order per publisher holds across the partition: the marker comes last.
        assert [m.payload for m in sub.collect_until("part/mark", 30)] == []
        print(f"20 QoS 1 publishes during the partition took {took:.2f}s")
    finally:
        clients.close_all()
