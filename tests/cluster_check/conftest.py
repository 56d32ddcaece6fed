"""A black-box check of a clustered MQTT broker: it takes only the nodes' MQTT addresses.

    python3 -m pytest tests/cluster_check --nodes 10.0.0.1:1883,10.0.0.2:1883,10.0.0.3:1883

or, against a cluster of N local Petrel nodes it starts itself (the binary in $PETREL_BIN or
the shared target dir; CI does this):

    python3 -m pytest tests/cluster_check --local-cluster 3

Every check connects its clients to different nodes (publisher on one, subscribers on the
others, a session resumed on a third) and asserts what a single broker would guarantee. It
uses only MQTT (paho-mqtt), no admin API and no knowledge of the broker, so it runs against
any clustered broker, and against a live deployment: every check works under its own random
topic root and client ids, and cleans up its retained messages and sessions.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# The paho wrapper of the project's Python suite (it needs only a host and a port).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from mqttclient import Clients  # noqa: E402


@dataclass(frozen=True)
class Node:
    """One node's MQTT listener (what `mqttclient.Client` needs of a broker)."""

    host: str
    port: int

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def pytest_addoption(parser):
    parser.addoption("--nodes", default=os.environ.get("PETREL_CHECK_NODES", ""),
                     help="comma-separated HOST:PORT of the cluster's MQTT listeners "
                          "(at least 2; env PETREL_CHECK_NODES)")
    parser.addoption("--local-cluster", type=int, default=0, metavar="N",
                     help="start N local petrel nodes as one cluster and check them")


def parse_nodes(spec: str) -> list[Node]:
    nodes = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise pytest.UsageError(f"--nodes: expected HOST:PORT, got {part!r}")
        nodes.append(Node(host.strip("[]"), int(port)))
    return nodes


@pytest.fixture(scope="session")
def nodes(pytestconfig, tmp_path_factory) -> list[Node]:
    local = pytestconfig.getoption("--local-cluster")
    if local:
        from harness import ClusterBroker

        cluster = ClusterBroker(tmp_path_factory.mktemp("cluster"), local)
        try:
            cluster.start()
            yield [Node(b.host, b.port) for b in cluster.nodes]
        finally:
            cluster.stop()
            if not all(code == 0 for code in (b.exit_code for b in cluster.nodes)):
                print(cluster.log())
        return
    found = parse_nodes(pytestconfig.getoption("--nodes"))
    if len(found) < 2:
        raise pytest.UsageError("--nodes (or --local-cluster N) needs the MQTT addresses of "
                                "at least two nodes")
    yield found


@pytest.fixture
def root() -> str:
    """A topic root of this check's own."""
    return f"clustercheck/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clients():
    made = Clients()
    yield made
    made.close_all()
