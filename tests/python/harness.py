"""Start the real `petrel` binary for a test and look at it from outside (ready file, /metrics).

Nothing here sleeps to synchronise: every wait polls a named condition until a deadline and
reports the last thing it saw when the deadline passes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0


def petrel_bin() -> Path:
    """The binary under test: $PETREL_BIN, else the debug build in the shared target dir."""
    explicit = os.environ.get("PETREL_BIN")
    if explicit:
        return Path(explicit)
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/petrel-target")
    return Path(target) / "debug" / "petrel"


def wait_until(what: str, probe: Callable[[], T], timeout: float = DEFAULT_TIMEOUT,
               interval: float = 0.02) -> T:
    """Poll `probe` until it returns something truthy; return it. Fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = probe()
        except Exception as exc:  # the condition may not be observable yet
            last = exc
        else:
            if last:
                return last  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)  # polling pace, not synchronisation


def let_time_pass(seconds: float, why: str) -> None:
    """Let wall-clock time pass because the behaviour under test is defined by it (an expiry
    interval, a delay). Never used to wait for the broker to catch up."""
    assert why
    time.sleep(seconds)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format -> {(name, frozenset(labels.items())): value}."""
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(_LABEL.findall(m.group(3) or ""))
        try:
            samples[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            continue
    return samples


class Broker:
    """One petrel process with its own data dir, on loopback ports chosen by the kernel."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None, grpc_addr: str = "127.0.0.1:0",
                 bind: str = "127.0.0.1", prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.grpc_addr = grpc_addr
        # The address every listener binds (a network namespace's own), and what runs the
        # binary (e.g. `ip netns exec NAME`).
        self.bind = bind
        self.prefix = list(prefix or [])
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.ready_file = workdir / "ready.json"
        self.log_path = workdir / "petrel.log"
        self.extra_env = dict(env or {})
        self.extra_args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.admin_port: int | None = None
        self.pid = 0
        self.exit_code: int | None = None
        self.ready: dict = {}  # the ready file's JSON (listener addresses by name, pid)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "Broker":
        binary = petrel_bin()
        if not binary.exists():
            raise AssertionError(f"petrel binary not found at {binary}: build it with "
                                 "`cargo build -p petrel-node --bin petrel` or set PETREL_BIN")
        if self.ready_file.exists():
            self.ready_file.unlink()
        env = dict(os.environ)
        env.setdefault("PETREL_LOG", "debug,openraft=info")
        env.update(self.extra_env)
        cmd = [*self.prefix, str(binary),
               "--mqtt-addr", f"{self.bind}:0",
               "--admin-addr", f"{self.bind}:0",
               "--grpc-addr", self.grpc_addr,
               "--data-dir", str(self.data_dir),
               "--ready-file", str(self.ready_file),
               *self.extra_args]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        finally:
            log.close()

        def ready():
            if self.proc.poll() is not None:
                return "exited"  # (wait_until would take an exception for "not yet")
            if not self.ready_file.exists():
                return None
            return json.loads(self.ready_file.read_text())

        try:
            info = wait_until("the ready file", ready, timeout)
        except AssertionError:
            self.kill()
            raise
        if info == "exited":
            self.exit_code = self.proc.returncode
            raise AssertionError(f"petrel exited with {self.proc.returncode} before it was "
                                 f"ready; log:\n{self.log()}")
        self.ready = info
        host, port = info["mqtt"].rsplit(":", 1)
        self.host = host.strip("[]")
        self.port = int(port)
        self.admin_port = int(info["admin"].rsplit(":", 1)[1]) if info.get("admin") else None
        self.pid = int(info.get("pid", self.proc.pid))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the broker and wait for it to exit; SIGKILL after `timeout`. Returns its code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self.exit_code = self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    # --- observation -----------------------------------------------------------------------------

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def listener_port(self, name: str) -> int:
        """The port of the listener the ready file names `name` ("mqtts", "ws", ...)."""
        assert self.ready.get(name), f"no {name!r} listener in the ready file: {self.ready}"
        return int(self.ready[name].rsplit(":", 1)[1])

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        assert self.admin_port is not None, "admin API disabled"
        url = f"http://{self.host}:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode("utf-8", "replace")

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        status, body = self.http_get("/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:200]}"
        return parse_metrics(body)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
        want = set(labels.items())
        return sum(v for (n, lbls), v in self.metrics().items() if n == name and want <= lbls)

    def wait_metric(self, what: str, name: str, predicate: Callable[[float], bool],
                    timeout: float = DEFAULT_TIMEOUT, **labels: str) -> float:
        def probe():
            value = self.metric(name, **labels)
            return (True, value) if predicate(value) else None

        try:
            return wait_until(what, probe, timeout)[1]
        except AssertionError as err:
            samples = {f"{n}{dict(lbls)}": v for (n, lbls), v in self.metrics().items()
                       if n == name}
            raise AssertionError(f"{err}; samples of {name}: {samples or 'none'}") from None


def free_port() -> int:
    """A port free now, for addresses nodes must know before they start. Picked below the
    kernel's ephemeral range, so that no outgoing connection (the nodes' own, to each other)
    takes it before its node binds it; only another test's pick could, rarely."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterBroker:
    """Several petrel nodes formed into one cluster, standing in for one `Broker`.

    Every new MQTT connection goes to the next node in turn (`addr` and `port` rotate), so a
    test's publisher, subscriber and resumed session land on different nodes. Metrics are
    summed over the nodes; the admin API is node 0's. Selected with PETREL_TEST_CLUSTER=N
    (see conftest.py); tests that only make sense on one node are marked `single_node`.
    """

    def __init__(self, workdir: Path, n: int, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        grpc = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        seeds = ",".join(grpc)
        self.nodes = []
        for i in range(n):
            node_env = dict(env or {})
            node_env.update({"PETREL_NODE_ID": str(i), "PETREL_JOIN": seeds})
            self.nodes.append(Broker(workdir / f"node{i}", env=node_env, args=args,
                                     grpc_addr=grpc[i]))
        self._next = 0
        self.host = "127.0.0.1"

    def start(self, timeout: float = 60.0) -> "ClusterBroker":
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda b: b.start(timeout), self.nodes))
        for i, b in enumerate(self.nodes):
            wait_until(f"node {i} ready", lambda b=b: b.http_get("/health/ready")[0] == 200,
                       timeout)
        # The data plane up too: each node has opened its forwarding stream to every other
        # (its first batch goes when the stream opens). Before that, a QoS 1/2 publish may be
        # acknowledged ahead of a peer's copy, which follows in order.
        for i, b in enumerate(self.nodes):
            for j in range(len(self.nodes)):
                if j != i:
                    wait_until(f"node {i} streams to node {j}",
                               lambda b=b, j=j: b.metric("petrel_forward_peer_batches_total",
                                                         peer=str(j)) >= 1, timeout)
        return self

    # --- one broker's interface, over the nodes ----------------------------------------------

    def _take(self) -> "Broker":
        b = self.nodes[self._next % len(self.nodes)]
        self._next += 1
        return b

    @property
    def port(self) -> int:
        return self._take().port

    @property
    def addr(self) -> tuple[str, int]:
        return self._take().addr

    @property
    def admin_port(self) -> int | None:
        return self.nodes[0].admin_port

    @property
    def proc(self):
        return self.nodes[0].proc

    @property
    def exit_code(self) -> int | None:
        codes = [b.exit_code for b in self.nodes if b.exit_code]
        return codes[0] if codes else self.nodes[0].exit_code

    @property
    def pid(self) -> int:
        return self.nodes[0].pid

    def listener_port(self, name: str) -> int:
        return self._take().listener_port(name)

    def alive(self) -> bool:
        return all(b.alive() for b in self.nodes)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        # All at once: a node stopping after the others would wait for a quorum that is gone.
        for b in self.nodes:
            if b.proc is not None and b.proc.poll() is None:
                b.proc.send_signal(sig)
        codes = [b.stop(sig, timeout) for b in self.nodes]
        return next((c for c in codes if c), codes[0])

    def kill(self) -> None:
        for b in self.nodes:
            b.kill()

    def log(self) -> str:
        return "\n".join(f"===== node {i} =====\n{b.log()}" for i, b in enumerate(self.nodes))

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        return self.nodes[0].http_get(path, timeout)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        total: dict[tuple[str, frozenset], float] = {}
        for b in self.nodes:
            for k, v in b.metrics().items():
                total[k] = total.get(k, 0.0) + v
        return total

    def metric(self, name: str, **labels: str) -> float:
        return sum(b.metric(name, **labels) for b in self.nodes)

    # Over the summed metrics and metric above.
    wait_metric = Broker.wait_metric
