"""Fixtures: a fresh petrel process per test on loopback ports the kernel picks.

- `broker`: the zero-config broker (plus test ports, a temp data dir and a ready file).
- `broker_factory(env={...}, args=[...])`: more brokers, e.g. with PETREL_MQTT__... settings.
- `version`: parametrises a test over MQTT 3.1.1 (4) and 5.0 (5).

Every broker is stopped when the test ends; the test fails if a broker died under it, and
the broker's log is printed when the test failed.

With PETREL_TEST_CLUSTER=N (N >= 2) every broker is a cluster of N nodes
(`harness.ClusterBroker`) and each new connection goes to the next node, so publisher,
subscriber and a resumed session sit on different nodes. Tests marked `single_node` (they
restart the broker, read one node's own figures, or test the command line) are skipped
then.
"""

from __future__ import annotations

import os

import pytest

from harness import Broker, ClusterBroker

CLUSTER = int(os.environ.get("PETREL_TEST_CLUSTER", "0") or 0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "single_node: meaningful on one node only; skipped with PETREL_TEST_CLUSTER")


def pytest_collection_modifyitems(config, items):
    if CLUSTER < 2:
        return
    skip = pytest.mark.skip(reason="single_node test (PETREL_TEST_CLUSTER is set)")
    for item in items:
        if item.get_closest_marker("single_node"):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def broker_factory(request, tmp_path):
    brokers: list[Broker] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None) -> Broker:
        workdir = tmp_path / f"broker{len(brokers)}"
        if CLUSTER >= 2:
            b = ClusterBroker(workdir, CLUSTER, env=env, args=args)
        else:
            b = Broker(workdir, env=env, args=args)
        brokers.append(b)
        return b.start()

    yield start

    crashed = [b for b in brokers if b.proc is not None and b.exit_code is None and not b.alive()]
    for b in brokers:
        b.stop()
    failed = any(getattr(request.node, f"rep_{w}", None) is not None
                 and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
    if failed or crashed:
        for i, b in enumerate(brokers):
            print(f"\n----- petrel log (broker {i}, exit {b.exit_code}) -----\n{b.log()}")
    if crashed:
        codes = [b.proc.returncode for b in crashed]
        pytest.fail(f"petrel died during the test (exit codes {codes})")


@pytest.fixture
def broker(broker_factory) -> Broker:
    return broker_factory()


@pytest.fixture(params=[4, 5], ids=["v311", "v5"])
def version(request) -> int:
    return request.param


@pytest.fixture
def clients():
    """Factory for paho clients; all are closed when the test ends."""
    from mqttclient import Clients

    made = Clients()
    yield made
    made.close_all()
