"""The monitoring in deploy/ against a live node, through a real Prometheus.

One petrel node (with a TLS listener, so that the certificate metric exists) is scraped every
second by Debian's `prometheus` binary, which also loads deploy/prometheus/alerts.yml. After a
little MQTT load:

- every PromQL expression of the Grafana dashboard (deploy/grafana/dashboards/petrel.json, its
  variables replaced by match-everything values) and every alert rule is evaluated through
  Prometheus's HTTP API and must not fail, and every rule must evaluate healthily;
- every dashboard panel returns at least one series, except the panels listed in CLUSTER_ONLY
  (their series only exist once a node has peers);
- every metric name the dashboard and the rules use is exported by the node;
- counters move by exactly N: N messages published move the raw values Prometheus scraped by N
  (in total and per QoS label).

A last test does the same on a 3-node cluster with a publisher and a subscriber on different
nodes, where no panel at all may be empty. About 20 s for the whole module.

Skipped only when the prometheus binary is absent (Debian package `prometheus`; scripts/setup.sh
installs it). The static checks (promtool, JSON) are scripts/check-monitoring.sh.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness import Broker, ClusterBroker, free_port, parse_metrics, wait_until
from mqttclient import Clients

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "petrel.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.single_node,  # it scrapes one node of its own
    pytest.mark.timeout(60),
    pytest.mark.skipif(PROMETHEUS is None,
                       reason="Debian's prometheus package is not installed (apt-get install "
                              "--no-install-recommends prometheus; scripts/setup.sh does it)"),
]

# Panels whose series need a peer: per-peer forwarding series and the forwarded-message counter
# get their first child when a node forwards to (or receives from) another node. On one node
# they are legitimately empty; every other panel must return data.
CLUSTER_ONLY = {
    "Forwarded messages /s by node":
        "petrel_forward_messages_total{direction} has no child before the first forwarded copy",
    "Forwarded messages /s per peer": "per-peer series (petrel_forward_peer_messages_total)",
    "Forwarded bytes /s per peer": "per-peer series (petrel_forward_peer_bytes_total)",
    "Batches and stream errors /s per peer":
        "per-peer series (petrel_forward_peer_batches_total, petrel_forward_peer_errors_total)",
    "Send window in use per peer": "per-peer series (petrel_forward_peer_window_bytes)",
}

# Metric names the expressions may use although one idle node does not export them: `up` is
# Prometheus's own; the others are label vectors that get their first series with the first
# event of their kind (on one node, some never).
NOT_EXPORTED_BY_NODE = {
    "up": "made by Prometheus for each target",
    "petrel_forward_messages_total": "first forwarded copy",
    "petrel_forward_dropped_total": "first dropped copy",
    "petrel_mqtt_bad_packets_total": "first bad packet",
    "petrel_auth_failures_total": "first failed authentication",
    "petrel_acl_denied_total": "first ACL denial",
    "petrel_limit_hits_total": "first limit hit",
    "petrel_forward_peer_messages_total": "cluster only",
    "petrel_forward_peer_bytes_total": "cluster only",
    "petrel_forward_peer_batches_total": "cluster only",
    "petrel_forward_peer_errors_total": "cluster only",
    "petrel_forward_peer_outbox_messages": "cluster only",
    "petrel_forward_peer_window_bytes": "cluster only",
}

SCRAPE_INTERVAL = "1s"
RATE_INTERVAL = "15s"  # stands for Grafana's $__rate_interval
LOAD_PER_QOS = 20      # messages of each QoS published as background load
TOPIC = "mon/load"


# --- Prometheus ------------------------------------------------------------------------------------

class Prometheus:
    """Debian's prometheus binary on a loopback port, with its own storage directory."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        rules = "".join(f"  - {json.dumps(str(p))}\n" for p in rule_files)
        self.config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL}\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL}\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL}\n"
            "rule_files:\n" + rules +
            "scrape_configs:\n"
            "  - job_name: petrel\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n")
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 20.0) -> "Prometheus":
        # The port is free when picked; should another process take it first, Prometheus exits
        # at once and a new port is tried.
        for _attempt in range(3):
            self.port = free_port()
            log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(
                    [PROMETHEUS, f"--config.file={self.config}",
                     f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.workdir)
            finally:
                log.close()

            def ready():
                if self.proc.poll() is not None:
                    return "exited"
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                        return resp.status == 200
                except (urllib.error.URLError, OSError):
                    return None

            try:
                if wait_until("Prometheus ready", ready, timeout) != "exited":
                    return self
            except AssertionError as err:
                self.stop()
                raise AssertionError(f"{err}; prometheus log:\n{self.log()}") from None
            if "address already in use" not in self.log():
                break
        raise AssertionError(f"prometheus exited with {self.proc.returncode}; log:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/<path>; the `data` of a success, else AssertionError with the error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return self._call(urllib.request.Request(url))

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query (POST, so that long expressions fit); its result vector."""
        form = {"query": expr}
        if at is not None:
            form["time"] = f"{at:.3f}"
        req = urllib.request.Request(f"{self.url}/api/v1/query",
                                     data=urllib.parse.urlencode(form).encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        data = self._call(req)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def _call(self, req: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def value(self, expr: str) -> float:
        """The single value of `expr` now; AssertionError when it has no series."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def scraped_after(self, t: float, what: str, timeout: float = 15.0) -> None:
        """Wait until Prometheus holds a scrape of every node that started after wall time `t`."""
        def probe():
            result = self.query("min(timestamp(petrel_mqtt_connections_total))")
            return bool(result) and float(result[0]["value"][1]) > t

        wait_until(f"a scrape after {what}", probe, timeout, interval=0.1)


# --- the dashboard ------------------------------------------------------------------------------

def dashboard_panels(d: dict) -> list[dict]:
    """Every panel that queries, rows' nested panels included."""
    out = []
    for p in d["panels"]:
        out.extend(p.get("panels", []) if p.get("type") == "row" else [p])
    return [p for p in out if p.get("targets")]


def concrete(expr: str, variables: list[str]) -> str:
    """A dashboard expression as Prometheus gets it with every node selected."""
    expr = expr.replace("${__rate_interval}", RATE_INTERVAL).replace("$__rate_interval",
                                                                      RATE_INTERVAL)
    expr = expr.replace("$__interval", "5s").replace("$__range", "1m")
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", ".*").replace("$" + name, ".*")
    assert "$" not in expr, f"a variable is left in {expr!r}"
    return expr


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on",
             "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (a histogram's as _bucket, _sum, _count)."""
    # Drop what is not a name: strings and label matchers, ranges, grouping label lists.
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set()
    for m in re.finditer(r"(?<![0-9.])\b[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
        word = m.group(0)
        if bare[m.end():].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or a keyword
        names.add(word)
    return names


# --- the setup shared by the tests ------------------------------------------------------------

def tail(text: str, lines: int = 150) -> str:
    """The end of a (debug-level, long) log."""
    kept = text.splitlines()[-lines:]
    return "\n".join(kept)


def tls_args(d: Path) -> list[str]:
    crt, key = self_signed(d)
    return ["--mqtts-addr", "127.0.0.1:0", "--tls-cert", str(crt), "--tls-key", str(key)]


def self_signed(d: Path) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
         "-keyout", "srv.key", "-out", "srv.crt", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        cwd=d, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"openssl failed:\n{res.stderr}"
    return d / "srv.crt", d / "srv.key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A node, Prometheus scraping it (alert rules loaded), a subscriber, and some load done."""
    work = tmp_path_factory.mktemp("monitoring")
    node = Broker(work / "node", args=tls_args(work / "pki"))
    prom = None
    clients = Clients()
    try:
        node.start()
        assert node.ready.get("mqtts"), f"no TLS listener in the ready file: {node.ready}"
        target = f"127.0.0.1:{node.admin_port}"
        prom = Prometheus(work / "prometheus", [target], [ALERTS]).start()

        def target_up():
            active = prom.api("targets")["activeTargets"]
            return active and all(t["health"] == "up" for t in active)

        try:
            wait_until("the node's target up in Prometheus", target_up, 15)
        except AssertionError as err:
            raise AssertionError(f"{err}; targets: {prom.api('targets')['activeTargets']}") \
                from None

        # An online subscriber, a persistent session that is away (its messages queue), a
        # retained message, and LOAD_PER_QOS messages of each QoS.
        away = clients.connected(node, clean=False, session_expiry=300)
        assert away.subscribe("mon/#", qos=1) == [1]
        away.disconnect()
        sub = clients.connected(node)
        assert sub.subscribe("mon/#", qos=2) == [2]
        pub = clients.connected(node)
        pub.publish("mon/retained", b"kept", qos=1, retain=True)
        for qos in (0, 1, 2):
            for i in range(LOAD_PER_QOS):
                pub.publish(TOPIC, f"q{qos}-{i}".encode(), qos=qos)
        sub.expect_n(1 + 3 * LOAD_PER_QOS)
        loaded = time.time()
        prom.scraped_after(loaded, "the load")
        yield {"node": node, "prom": prom, "pub": pub, "sub": sub, "target": target}
    except BaseException:
        print(f"\n----- petrel log (end) -----\n{tail(node.log())}")
        if prom is not None:
            print(f"\n----- prometheus log -----\n{tail(prom.log())}")
        raise
    finally:
        clients.close_all()
        if prom is not None:
            prom.stop()
        node.stop()


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def variable_names(d: dict) -> list[str]:
    return [v["name"] for v in d.get("templating", {}).get("list", [])]


def dashboard_exprs(d: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, concrete expression) of every dashboard query."""
    names = variable_names(d)
    return [(p.get("title", "?"), t.get("refId", "?"), concrete(t["expr"], names))
            for p in dashboard_panels(d) for t in p["targets"] if t.get("expr")]


def alert_rules(prom: Prometheus) -> list[dict]:
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert rules, "Prometheus loaded no rule from alerts.yml"
    return rules


def node_families(node: Broker) -> set[str]:
    """Metric families the node exports (from its # TYPE lines and its samples)."""
    status, body = node.http_get("/metrics")
    assert status == 200, f"/metrics answered {status}"
    names = set(re.findall(r"^# TYPE (\S+) ", body, re.M))
    for name, _labels in parse_metrics(body):
        names.add(name)
        names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


# --- the tests ------------------------------------------------------------------------------------

def test_every_expression_is_accepted_by_prometheus(stack, dashboard):
    prom: Prometheus = stack["prom"]
    errors = []
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) > 20, f"only {len(exprs)} queries found in {DASHBOARD}"
    for title, ref, expr in exprs:
        try:
            prom.query(expr)
        except AssertionError as err:
            errors.append(f"dashboard {title!r} {ref}: {err}\n    {expr}")
    rules = alert_rules(stack["prom"])
    for rule in rules:
        try:
            prom.query(rule["query"])
        except AssertionError as err:
            errors.append(f"alert {rule['name']}: {err}\n    {rule['query']}")
    assert not errors, "expressions Prometheus refused:\n" + "\n".join(errors)

    # Prometheus evaluates the loaded rules every second: each must have run without error.
    def evaluated():
        current = alert_rules(prom)
        return current if all(r.get("lastEvaluation", "").startswith("20") for r in current) \
            else None

    current = wait_until("every alert rule evaluated", evaluated, 10, interval=0.2)
    unhealthy = [f"{r['name']}: {r.get('health')} {r.get('lastError', '')}" for r in current
                 if r.get("health") != "ok"]
    assert not unhealthy, "alert rules that fail to evaluate:\n" + "\n".join(unhealthy)


def panels_without_data(prom: Prometheus, dashboard: dict, exported: set[str],
                        skip: dict[str, str]) -> list[str]:
    """A report line for each panel (not in `skip`) none of whose queries returns a series."""
    names = variable_names(dashboard)
    empty = []
    for p in dashboard_panels(dashboard):
        title = p.get("title", "?")
        if title in skip:
            continue
        exprs = [concrete(t["expr"], names) for t in p["targets"] if t.get("expr")]
        if any(prom.query(e) for e in exprs):
            continue
        missing = sorted({n for e in exprs for n in metric_names(e)} - exported - {"up"})
        lines = [f"panel {title!r} returned no series"
                 + (f" (the node does not export {', '.join(missing)})" if missing else "")]
        lines += [f"    {e}" for e in exprs]
        empty.append("\n".join(lines))
    return empty


def test_every_panel_returns_data(stack, dashboard):
    titles = [p.get("title", "?") for p in dashboard_panels(dashboard)]
    stale = sorted(set(CLUSTER_ONLY) - set(titles))
    assert not stale, f"CLUSTER_ONLY names panels the dashboard does not have: {stale}"
    empty = panels_without_data(stack["prom"], dashboard, node_families(stack["node"]),
                                CLUSTER_ONLY)
    assert not empty, f"{len(empty)} dashboard panels without data:\n" + "\n".join(empty)


def test_node_variable_lists_the_node(stack, dashboard):
    """The dashboard's variables are label_values() queries: each must list the node's value."""
    prom: Prometheus = stack["prom"]
    names = variable_names(dashboard)
    problems = []
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q)
        assert m, f"variable {var['name']}: not a label_values() query: {q}"
        selector, label = concrete(m.group(1), names), m.group(2)
        values = prom.api(f"label/{label}/values", **{"match[]": selector})
        want = stack["target"] if label == "instance" else "petrel" if label == "job" else None
        if not values or (want is not None and want not in values):
            problems.append(f"${var['name']} = {q}: values {values}, expected {want or 'some'}")
    assert not problems, "dashboard variables without the node:\n" + "\n".join(problems)


def test_every_metric_name_is_exported(stack, dashboard):
    """A misspelt metric name in a panel or rule would silently show nothing or never fire."""
    exported = node_families(stack["node"])
    used: dict[str, set[str]] = {}
    for title, ref, expr in dashboard_exprs(dashboard):
        for n in metric_names(expr):
            used.setdefault(n, set()).add(f"panel {title!r}")
    for rule in alert_rules(stack["prom"]):
        for n in metric_names(rule["query"]):
            used.setdefault(n, set()).add(f"alert {rule['name']}")
    unknown = {n: sorted(w) for n, w in used.items()
               if n not in exported and n not in NOT_EXPORTED_BY_NODE}
    assert not unknown, "metric names the node does not export:\n" + "\n".join(
        f"  {n}: used by {', '.join(w)}" for n, w in sorted(unknown.items()))


def _publish_and_measure(stack, exprs: list[str], publishes: list[tuple[int, int]],
                         topic: str) -> dict[str, float]:
    """Raw values of `exprs` in Prometheus before and after the publishes [(qos, count)],
    each read from a scrape that started after everything before it had happened."""
    prom: Prometheus = stack["prom"]
    pub, sub = stack["pub"], stack["sub"]
    t0 = time.time()
    prom.scraped_after(t0, "the moment before publishing")
    before = {e: prom.value(e) for e in exprs}
    total = 0
    for qos, count in publishes:
        for i in range(count):
            pub.publish(topic, f"{qos}-{i}".encode(), qos=qos)  # waits for PUBACK/PUBCOMP
        total += count
    got = sub.expect_n(total)
    assert all(m.topic == topic for m in got), [m.topic for m in got]
    t1 = time.time()
    prom.scraped_after(t1, "the publishes")
    after = {e: prom.value(e) for e in exprs}
    return {e: after[e] - before[e] for e in exprs}


def test_counters_move_by_exactly_the_messages_published(stack):
    n = 25
    received = "sum(petrel_mqtt_messages_received_total)"
    sent = "sum(petrel_mqtt_messages_sent_total)"
    delta = _publish_and_measure(stack, [received, sent], [(1, n)], "mon/count")
    assert delta[received] == n, f"{received} moved by {delta[received]}, {n} were published"
    # one subscriber online (the persistent session that is away only queues them)
    assert delta[sent] == n, f"{sent} moved by {delta[sent]}, {n} were delivered"
    # what Prometheus holds is what the node serves
    node_value = stack["node"].metric("petrel_mqtt_messages_received_total")
    assert stack["prom"].value(received) == node_value


def test_counters_by_qos_move_by_exactly_the_messages_published(stack):
    counts = {0: 3, 1: 5, 2: 7}
    exprs = {q: f'sum(petrel_mqtt_messages_received_total{{qos="{q}"}})' for q in counts}
    try:
        delta = _publish_and_measure(stack, list(exprs.values()), list(counts.items()),
                                     "mon/qos")
    except AssertionError as err:
        if "expected one series, got []" in str(err):
            pytest.fail(f"petrel_mqtt_messages_received_total has no qos label yet: {err}")
        raise
    moved = {q: delta[e] for q, e in exprs.items()}
    assert moved == {q: float(c) for q, c in counts.items()}, \
        f"received by QoS moved by {moved}, published {counts}"


# --- on a cluster: the panels that need peers ---------------------------------------------------

def test_every_panel_returns_data_on_a_cluster(tmp_path, dashboard):
    """Three nodes, a publisher on one and a subscriber on another: now the forwarding and
    per-peer panels have series too, and no panel may be empty."""
    cluster = ClusterBroker(tmp_path / "cluster", 3, args=tls_args(tmp_path / "pki"))
    prom = None
    clients = Clients()
    try:
        cluster.start()
        prom = Prometheus(tmp_path / "prometheus",
                          [f"127.0.0.1:{b.admin_port}" for b in cluster.nodes], [ALERTS]).start()
        wait_until("every node's target up in Prometheus",
                   lambda: all(t["health"] == "up" for t in prom.api("targets")["activeTargets"])
                   and len(prom.api("targets")["activeTargets"]) == 3, 15)
        sub = clients.connected(cluster.nodes[1])
        assert sub.subscribe("mon/#", qos=1) == [1]
        pub = clients.connected(cluster.nodes[0])

        def forwarded():  # until the route to node 1 has reached node 0
            pub.publish("mon/probe", b"probe", qos=1)
            try:
                return sub.expect(timeout=0.5, what="a forwarded probe")
            except AssertionError:
                return None

        wait_until("a publish on node 0 reaching a subscriber on node 1", forwarded, 20)
        for qos in (0, 1):
            for i in range(10):
                pub.publish("mon/load", f"{qos}-{i}".encode(), qos=qos)
        seen = []

        def all_load():  # (late probes may arrive among them)
            while not sub.messages.empty():
                seen.append(sub.messages.get_nowait().topic)
            return seen.count("mon/load") >= 20

        wait_until("the 20 forwarded messages on node 1", all_load, 10)
        prom.scraped_after(time.time(), "the forwarded load")
        exported: set[str] = set()
        for b in cluster.nodes:
            exported |= node_families(b)
        empty = panels_without_data(prom, dashboard, exported, {})
    except BaseException:  # the setup failed: the logs tell why
        for i, b in enumerate(cluster.nodes):
            print(f"\n----- petrel log, node {i} (end) -----\n{tail(b.log(), 60)}")
        if prom is not None:
            print(f"\n----- prometheus log -----\n{tail(prom.log())}")
        raise
    finally:
        clients.close_all()
        if prom is not None:
            prom.stop()
        cluster.stop()
    assert not empty, f"{len(empty)} dashboard panels without data on a 3-node cluster:\n" \
        + "\n".join(empty)
