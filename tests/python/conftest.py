"""Fixtures: a fresh petrel process per test on loopback ports the kernel picks.

- `broker`: the zero-config broker (plus test ports, a temp data dir and a ready file).
- `broker_factory(env={...}, args=[...])`: more brokers, e.g. with PETREL_MQTT__... settings.
- `version`: parametrises a test over MQTT 3.1.1 (4) and 5.0 (5).

Every broker is stopped when the test ends; the test fails if a broker died under it, and
the broker's log is printed when the test failed.
"""

from __future__ import annotations

import pytest

from harness import Broker


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def broker_factory(request, tmp_path):
    brokers: list[Broker] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None) -> Broker:
        b = Broker(tmp_path / f"broker{len(brokers)}", env=env, args=args)
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
