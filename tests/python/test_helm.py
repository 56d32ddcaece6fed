"""The Helm chart helm/petrel, rendered by `helm template` and read as Kubernetes would.

No cluster is needed: the tests read the rendered objects (node ids, seeds, Services, probes,
PDB, security, secrets, monitoring objects), run the container's start-up shell with a stand-in
`petrel` to see the node id, advertised address and seed list each pod really gets, and start
the real node on the chart's petrel.toml. scripts/check-helm.sh lints the chart and validates
the same renderings against Kubernetes' schemas; it also fetches helm when it is missing
(`scripts/check-helm.sh --helm`).
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (tests/python/requirements.txt)")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "petrel"
NAMESPACE = "mqtt"
RELEASE = "petrel"


@pytest.fixture(scope="session")
def helm() -> str:
    out = subprocess.run([str(REPO / "scripts" / "check-helm.sh"), "--helm"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"no helm: {out.stderr}"
    return out.stdout.strip().splitlines()[-1]


class Rendered:
    """The objects of one `helm template`, by kind and name."""

    def __init__(self, text: str):
        self.text = text
        self.objects = [d for d in yaml.safe_load_all(text) if d]

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
        return found[0]

    @property
    def sts(self) -> dict:
        return self.one("StatefulSet")

    @property
    def pod(self) -> dict:
        return self.sts["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        (c,) = self.pod["containers"]
        return c

    def env(self) -> dict[str, dict]:
        return {e["name"]: e for e in self.container["env"]}

    def toml(self) -> dict:
        cm = self.one("ConfigMap", self.sts["metadata"]["name"])
        return tomllib.loads(cm["data"]["petrel.toml"])


def run_helm(helm: str, tmp_path: Path, values: dict | None = None, files=(),
             release: str = RELEASE) -> subprocess.CompletedProcess:
    args = [helm, "template", release, str(CHART), "-n", NAMESPACE]
    for f in files:
        args += ["-f", str(CHART / "ci" / f)]
    if values is not None:
        path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        path.write_text(json.dumps(values))  # JSON is YAML
        args += ["-f", str(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.fixture
def render(helm, tmp_path):
    def go(values: dict | None = None, files=(), release: str = RELEASE) -> Rendered:
        out = run_helm(helm, tmp_path, values, files, release)
        assert out.returncode == 0, out.stderr
        return Rendered(out.stdout)
    return go


@pytest.fixture
def render_error(helm, tmp_path):
    def go(values: dict | None = None, files=()) -> str:
        out = run_helm(helm, tmp_path, values, files)
        assert out.returncode != 0, "rendering should have been refused"
        return out.stderr
    return go


def k8s_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of an env value from the variables defined before it."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: env.get(m.group(1), m.group(0)), value)


def start_pod(r: Rendered, ordinal: int | None, tmp_path: Path, pod_name: str | None = None):
    """Runs the container's command and args as the pod with this ordinal would, with a
    stand-in `petrel` first on PATH that prints what the node would get."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "petrel"
    stub.write_text("#!/bin/sh\n"
                    "printf '%s\\n' \"$PETREL_NODE_ID\" \"$PETREL_ADVERTISE_ADDR\" \"$PETREL_JOIN\" "
                    "\"$PETREL_CONFIG\" \"$*\"\n")
    stub.chmod(0o755)
    name = pod_name or f"{r.sts['metadata']['name']}-{ordinal}"
    env = {"PATH": f"{stub_dir}:/usr/bin:/bin"}
    for e in r.container["env"]:
        if "value" in e:
            env[e["name"]] = k8s_expand(e["value"], env)
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = name
    cmd = r.container["command"] + r.container.get("args", [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return out.returncode, out.stderr
    node_id, advertise, join, config, args = out.stdout.split("\n")[:5]
    return 0, {"id": int(node_id), "advertise": advertise, "join": join.split(","),
               "config": config, "args": args}


# --- cluster identity --------------------------------------------------------------------------

@pytest.mark.parametrize("replicas, voters", [(3, 3), (1, 3), (5, 3), (5, 5), (3, 1)])
def test_node_ids_seeds_and_advertised_addresses(render, tmp_path, replicas, voters):
    """Pod N is node N; every pod gets the same seeds, the first min(replicas, voters) pods,
    by their headless DNS names; a seed finds itself in the list (its advertised address is
    spelled exactly as there), and pod 0, the lowest id, is among them, so it starts the
    cluster."""
    r = render({"replicaCount": replicas, "config": {"cluster": {"voters": voters}}})
    assert r.sts["spec"]["replicas"] == replicas
    headless = r.sts["spec"]["serviceName"]
    grpc = r.toml()["cluster"]["grpc_addr"].rsplit(":", 1)[1]
    seeds = [f"{RELEASE}-{i}.{headless}.{NAMESPACE}.svc.cluster.local:{grpc}"
             for i in range(min(replicas, voters))]
    pods = []
    for ordinal in range(replicas):
        code, pod = start_pod(r, ordinal, tmp_path)
        assert code == 0, pod
        pods.append(pod)
        assert pod["id"] == ordinal
        assert pod["advertise"] == f"{RELEASE}-{ordinal}.{headless}.{NAMESPACE}.svc.cluster.local:{grpc}"
        assert pod["join"] == seeds
        assert pod["config"] == "/etc/petrel/config/petrel.toml"
        if ordinal < len(seeds):
            assert pod["advertise"] in pod["join"], "a seed must recognise itself"
    assert len({p["id"] for p in pods}) == replicas
    assert min(p["id"] for p in pods) == 0 and pods[0]["advertise"] == seeds[0]


def test_ids_follow_the_ordinal_whatever_the_release_name(render, tmp_path):
    r = render({"replicaCount": 2}, release="mqtt-prod-2")
    assert r.sts["metadata"]["name"] == "mqtt-prod-2-petrel"
    for ordinal in range(2):
        code, pod = start_pod(r, ordinal, tmp_path)
        assert code == 0, pod
        assert pod["id"] == ordinal
        assert pod["advertise"].startswith(f"mqtt-prod-2-petrel-{ordinal}.mqtt-prod-2-petrel-headless.")


def test_extra_args_reach_the_node(render, tmp_path):
    r = render({"extraArgs": ["--log-format", "json"]})
    code, pod = start_pod(r, 0, tmp_path)
    assert code == 0, pod
    assert pod["args"] == "--log-format json"


def test_a_pod_name_without_ordinal_is_refused(render, tmp_path):
    code, err = start_pod(render(), None, tmp_path, pod_name="petrel-x")
    assert code == 64
    assert "no ordinal" in err


def test_statefulset_starts_pods_in_parallel(render):
    """The lowest-id seed waits for every seed before it starts the cluster: OrderedReady would
    wait for a pod 0 that cannot be ready alone."""
    spec = render().sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"


def test_headless_service_publishes_pods_before_they_are_ready(render):
    r = render()
    sts = r.sts
    svc = r.one("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in r.container["ports"]}
    assert ports["grpc"]["port"] == container_ports["grpc"] == 7883
    assert ports["admin"]["port"] == container_ports["admin"] == 8080


def test_no_service_links_in_the_environment(render):
    """A Service named petrel-... would otherwise put PETREL_* variables into the pod."""
    assert render().pod["enableServiceLinks"] is False


def petrel_env_names() -> set[str]:
    """The environment variables the node reads by name (clap's `env = "..."`)."""
    names = set()
    for src in (REPO / "node" / "src").rglob("*.rs"):
        names |= set(re.findall(r'env\s*=\s*"(PETREL_[A-Z_]+)"', src.read_text()))
    return names


def test_every_petrel_variable_is_one_the_node_reads(render):
    """PETREL_<SECTION>__<FIELD> names are checked by the node itself; a plain PETREL_ name the
    node does not know would be ignored without a word."""
    known = petrel_env_names()
    assert {"PETREL_CONFIG", "PETREL_NODE_ID", "PETREL_ADVERTISE_ADDR", "PETREL_JOIN",
            "PETREL_ADMIN_TOKEN"} <= known
    r = render({"adminToken": {"value": "t" * 16}})
    names = set(r.env()) | {"PETREL_NODE_ID"}
    for name in names:
        if not name.startswith("PETREL_") or "__" in name:
            continue
        assert name in known, f"{name} is not read by the node"


# --- probes, stop, disruption ------------------------------------------------------------------

def test_probes(render):
    r = render()
    c = r.container
    admin_port = int(r.toml()["admin"]["addr"].rsplit(":", 1)[1])
    assert {"name": "admin", "containerPort": admin_port, "protocol": "TCP"} in c["ports"]
    assert r.toml()["admin"]["enabled"] is True
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "admin", "scheme": "HTTP"}, probe
    # The startup probe gives a slow start (RocksDB recovery) at least a minute.
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 60
    # Liveness never fires before a pod could have started, and is not the readiness check:
    # a node that lost its quorum is not ready, and must not be restarted for it.
    assert c["livenessProbe"]["httpGet"]["path"] != "/readyz"


def test_probes_can_be_switched_off(render):
    c = render({"livenessProbe": {"enabled": False}}).container
    assert "livenessProbe" not in c and "readinessProbe" in c


def run_prestop(r: Rendered, ordinal: int, tmp_path: Path, ctl_exit: int = 0):
    """Runs the preStop command as the kubelet would in pod `ordinal`, with stand-ins for
    `petrel` and `sleep` that log their arguments."""
    stub_dir = tmp_path / "prestop-bin"
    stub_dir.mkdir(exist_ok=True)
    log = tmp_path / "prestop.log"
    for name, code in (("petrel", ctl_exit), ("sleep", 0)):
        stub = stub_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit {code}\n')
        stub.chmod(0o755)
    env = {"PATH": f"{stub_dir}:/usr/bin:/bin", "POD_NAME": f"{r.sts['metadata']['name']}-{ordinal}"}
    cmd = r.container["lifecycle"]["preStop"]["exec"]["command"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10)
    return out.returncode, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("ctl_exit", [0, 1])
def test_prestop_drains_the_pods_own_node_then_waits(render, tmp_path, ctl_exit):
    """`petrel ctl cluster drain <this pod's id>` on the local admin port, with the data dir
    where the node keeps its generated token; then the sleep, even when the drain failed."""
    r = render({"preStopSleepSeconds": 7, "terminationGracePeriodSeconds": 45,
                "ports": {"admin": 18080}})
    (mount,) = [m for m in r.container["volumeMounts"] if m["name"] == "data"]
    code, calls = run_prestop(r, 2, tmp_path, ctl_exit)
    assert code == 0
    assert calls == [
        f"petrel ctl --url http://127.0.0.1:18080 --data-dir {mount['mountPath']}/data "
        "cluster drain 2",
        "sleep 7",
    ]
    assert r.toml()["storage"]["data_dir"] == mount["mountPath"] + "/data"


def test_prestop_without_drain_only_waits(render, tmp_path):
    r = render({"drainOnStop": False, "preStopSleepSeconds": 6})
    assert r.container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "6"]


def test_grace_period_covers_the_prestop_and_the_nodes_own_stop(render, render_error):
    r = render({"preStopSleepSeconds": 7, "terminationGracePeriodSeconds": 45})
    assert r.pod["terminationGracePeriodSeconds"] == 45
    # The default covers the sleep plus the node's own drain (10 s), commit (2 s) and stop.
    d = render()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert d.pod["terminationGracePeriodSeconds"] >= values["preStopSleepSeconds"] + 25
    err = render_error({"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 25})
    assert "terminationGracePeriodSeconds (25) must be at least" in err


@pytest.mark.parametrize("replicas", [1, 3, 5])
def test_pdb_allows_one_pod_down(render, replicas):
    r = render({"replicaCount": replicas})
    pdb = r.one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    labels = r.sts["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_pdb_can_be_switched_off(render):
    assert render(files=["single-values.yaml"]).all("PodDisruptionBudget") == []


@pytest.mark.parametrize("preset, kind", [
    ("soft", "preferredDuringSchedulingIgnoredDuringExecution"),
    ("hard", "requiredDuringSchedulingIgnoredDuringExecution"),
    ("none", None),
])
def test_pod_anti_affinity(render, preset, kind):
    r = render({"podAntiAffinity": preset})
    if kind is None:
        assert "affinity" not in r.pod
        return
    (term,) = r.pod["affinity"]["podAntiAffinity"][kind]
    term = term.get("podAffinityTerm", term)
    assert term["topologyKey"] == "kubernetes.io/hostname"
    labels = r.sts["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()


def test_default_is_soft_anti_affinity(render):
    assert "preferredDuringSchedulingIgnoredDuringExecution" in \
        render().pod["affinity"]["podAntiAffinity"]


def test_explicit_affinity_wins(render):
    aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["mqtt"]}]}]}}}
    assert render({"affinity": aff}).pod["affinity"] == aff


# --- security, storage -------------------------------------------------------------------------

def dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", (REPO / "deploy" / "Dockerfile").read_text(), re.M)
    return users[-1]


def test_security_context(render):
    r = render()
    pod_sc, sc = r.pod["securityContext"], r.container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}" == dockerfile_user()
    assert pod_sc["fsGroup"] == pod_sc["runAsGroup"], "the data volume must be writable"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert r.pod["automountServiceAccountToken"] is False
    # Everything the node writes is on a volume: its data and /tmp.
    mounts = {m["mountPath"]: m for m in r.container["volumeMounts"]}
    data_dir = r.toml()["storage"]["data_dir"]
    assert any(data_dir.startswith(p + "/") and m["name"] == "data" for p, m in mounts.items())
    assert "/tmp" in mounts


def test_data_dir_is_a_subfolder_of_the_volume(render):
    """A fresh volume's root can hold lost+found, which the node would refuse as a data dir."""
    r = render()
    (mount,) = [m for m in r.container["volumeMounts"] if m["name"] == "data"]
    assert r.toml()["storage"]["data_dir"] == mount["mountPath"] + "/data"


def test_volume_claim_templates(render):
    r = render({"persistence": {"size": "20Gi", "storageClass": "fast"}})
    (vct,) = r.sts["spec"]["volumeClaimTemplates"]
    assert vct["metadata"]["name"] == "data"
    assert vct["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert vct["spec"]["storageClassName"] == "fast"
    assert vct["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not [v for v in r.pod["volumes"] if v["name"] == "data"]
    assert "storageClassName" not in render().sts["spec"]["volumeClaimTemplates"][0]["spec"]
    dash = render({"persistence": {"storageClass": "-"}})
    assert dash.sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == ""


def test_without_persistence_data_is_an_empty_dir(render):
    r = render({"persistence": {"enabled": False}})
    assert "volumeClaimTemplates" not in r.sts["spec"]
    assert {"name": "data", "emptyDir": {}} in r.pod["volumes"]


def test_resources(render):
    res = render().container["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]


# --- configuration -----------------------------------------------------------------------------

def example_keys() -> dict[str, set[str]]:
    example = tomllib.loads((REPO / "petrel.example.toml").read_text())
    return {section: set(fields) for section, fields in example.items()}


@pytest.mark.parametrize("files", [[], ["full-values.yaml"], ["existing-secrets-values.yaml"],
                                   ["single-values.yaml"]])
def test_config_file_has_only_settings_the_node_knows(render, files):
    """The node refuses unknown keys; every key the chart writes is in petrel.example.toml,
    with a value of the same type as the default's."""
    known = tomllib.loads((REPO / "petrel.example.toml").read_text())
    for section, fields in render(files=files).toml().items():
        assert section in known, section
        for key, value in fields.items():
            assert key in known[section], f"{section}.{key}"
            assert type(value) is type(known[section][key]), f"{section}.{key} = {value!r}"


def test_config_values_pass_through(render):
    r = render({"config": {"mqtt": {"max_queued_messages": 10000, "queue_overflow": "drop-oldest",
                                    "session_expiry_max_secs": 4294967295},
                           "auth": {"allow_anonymous": False},
                           "log": {"level": 'info,petrel_node="debug"'}}})
    toml = r.toml()
    assert toml["mqtt"]["max_queued_messages"] == 10000
    assert toml["mqtt"]["session_expiry_max_secs"] == 4294967295
    assert toml["mqtt"]["queue_overflow"] == "drop-oldest"
    assert toml["auth"]["allow_anonymous"] is False
    assert toml["log"]["level"] == 'info,petrel_node="debug"'


def test_listeners_follow_ports_and_switches(render):
    t = render({"ports": {"mqtt": 11883, "mqtts": 18883, "ws": 18083, "wss": 18084,
                          "admin": 18080, "grpc": 17883}}).toml()
    assert t["mqtt"]["addr"] == "0.0.0.0:11883"
    assert t["mqtt"]["mqtts_addr"] == t["mqtt"]["ws_addr"] == t["mqtt"]["wss_addr"] == ""
    assert t["admin"]["addr"] == "0.0.0.0:18080"
    assert t["cluster"]["grpc_addr"] == "0.0.0.0:17883"
    r = render({"websocket": {"enabled": True}, "tls": {"enabled": True, "existingSecret": "s"}})
    t = r.toml()
    assert (t["mqtt"]["mqtts_addr"], t["mqtt"]["ws_addr"], t["mqtt"]["wss_addr"]) == \
        ("0.0.0.0:8883", "0.0.0.0:8083", "0.0.0.0:8084")
    assert {p["name"] for p in r.container["ports"]} == {"mqtt", "mqtts", "ws", "wss", "admin", "grpc"}
    client = r.one("Service", RELEASE)
    assert [p["name"] for p in client["spec"]["ports"]] == ["mqtt", "mqtts", "ws", "wss"]


@pytest.mark.parametrize("section, key", [("mqtt", "addr"), ("storage", "data_dir"),
                                          ("cluster", "node_id"), ("cluster", "join"),
                                          ("admin", "enabled"), ("tls", "cert_file")])
def test_settings_the_chart_owns_are_refused_in_config(render_error, section, key):
    err = render_error({"config": {section: {key: "x"}}})
    assert f"config.{section}.{key} is set by the chart" in err


def test_schema_refuses_bad_values(render_error):
    assert "replicaCount" in render_error({"replicaCount": 0})
    assert "podAntiAffinity" in render_error({"podAntiAffinity": "sometimes"})
    assert "nosuchthing" in render_error({"nosuchthing": 1})
    assert "bogus" in render_error({"config": {"bogus": {"x": 1}}})
    assert "voters" in render_error({"config": {"cluster": {"voters": 2}}})
    # The node refuses admin tokens shorter than 16 characters.
    assert "adminToken" in render_error({"adminToken": {"value": "short"}})


def test_admin_settings_that_would_break_the_chart_are_refused(render_error):
    assert "probes" in render_error({"config": {"admin": {"protect_health": True}}})
    assert "config.admin.token is set by the chart" in \
        render_error({"config": {"admin": {"token": "0123456789abcdef"}}})
    assert "needs adminToken" in render_error({
        "config": {"admin": {"protect_metrics": True}},
        "metrics": {"serviceMonitor": {"enabled": True}}})


def test_admin_https_switches_probes_and_scraping(render):
    r = render({"config": {"admin": {"tls_cert_file": "/etc/petrel/admin/tls.crt",
                                     "tls_key_file": "/etc/petrel/admin/tls.key"}},
                "metrics": {"serviceMonitor": {"enabled": True}}})
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert r.container[probe]["httpGet"]["scheme"] == "HTTPS"
    (ep,) = r.one("ServiceMonitor")["spec"]["endpoints"]
    assert ep["scheme"] == "https"
    assert render().container["readinessProbe"]["httpGet"]["scheme"] == "HTTP"


def test_protected_metrics_are_scraped_with_the_admin_token(render):
    r = render({"config": {"admin": {"protect_metrics": True}},
                "adminToken": {"existingSecret": "ops", "key": "admin"},
                "metrics": {"serviceMonitor": {"enabled": True}}})
    (ep,) = r.one("ServiceMonitor")["spec"]["endpoints"]
    assert ep["authorization"] == {"type": "Bearer",
                                   "credentials": {"name": "ops", "key": "admin"}}


def test_a_config_change_rolls_the_pods(render):
    a = render().sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    b = render({"config": {"mqtt": {"max_qos": 1}}}).sts["spec"]["template"]["metadata"][
        "annotations"]["checksum/config"]
    assert a != b


def test_the_node_accepts_the_charts_config_file(render, broker_factory, tmp_path):
    """The rendered petrel.toml starts a real node (the test's flags move its listeners and
    data dir to loopback ports and a temp folder; flags beat the file)."""
    r = render({"config": {"mqtt": {"max_queued_messages": 5000}, "log": {"format": "json"},
                           "cluster": {"voters": 3}}})
    path = tmp_path / "petrel.toml"
    path.write_text(r.one("ConfigMap", RELEASE)["data"]["petrel.toml"])
    b = broker_factory(args=["--config", str(path)])
    status, _ = b.http_get("/healthz")
    assert status == 200


# --- secrets -----------------------------------------------------------------------------------

def test_tls_from_a_secret(render, render_error):
    r = render({"tls": {"enabled": True, "existingSecret": "my-tls", "clientCA": {"enabled": True}}})
    (vol,) = [v for v in r.pod["volumes"] if v["name"] == "tls"]
    assert vol["secret"]["secretName"] == "my-tls"
    (mount,) = [m for m in r.container["volumeMounts"] if m["name"] == "tls"]
    assert "subPath" not in mount, "renewed certificates must reach the node"
    t = r.toml()["tls"]
    assert t["cert_file"] == mount["mountPath"] + "/tls.crt"
    assert t["key_file"] == mount["mountPath"] + "/tls.key"
    assert t["client_ca_file"] == mount["mountPath"] + "/ca.crt"
    assert "tls.existingSecret" in render_error({"tls": {"enabled": True}})


def test_password_file_from_content_or_existing_secret(render):
    r = render({"auth": {"passwords": {"content": "alice:$argon2id$...\n"}}})
    secret = r.one("Secret", f"{RELEASE}-passwords")
    assert "passwords" in secret["data"]
    (vol,) = [v for v in r.pod["volumes"] if v["name"] == "passwords"]
    assert vol["secret"]["secretName"] == f"{RELEASE}-passwords"
    (mount,) = [m for m in r.container["volumeMounts"] if m["name"] == "passwords"]
    assert r.toml()["auth"]["password_file"] == mount["mountPath"] + "/passwords"
    r = render({"auth": {"passwords": {"existingSecret": "users"}}})
    assert r.all("Secret") == []
    (vol,) = [v for v in r.pod["volumes"] if v["name"] == "passwords"]
    assert vol["secret"]["secretName"] == "users"
    assert "password_file" not in render().toml().get("auth", {})


def test_acl_in_the_configmap(render):
    r = render({"auth": {"acl": "[all]\nallow subscribe $SYS/#\n"}})
    cm = r.one("ConfigMap", RELEASE)
    assert cm["data"]["acl"] == "[all]\nallow subscribe $SYS/#\n"
    (mount,) = [m for m in r.container["volumeMounts"] if m["name"] == "config"]
    assert r.toml()["auth"]["acl_file"] == mount["mountPath"] + "/acl"


@pytest.mark.parametrize("values, secret_name, key, made", [
    ({"adminToken": {"value": "s3cret-token-0123456789"}}, f"{RELEASE}-admin-token", "token", True),
    ({"adminToken": {"existingSecret": "ops", "key": "admin"}}, "ops", "admin", False),
])
def test_admin_token_from_a_secret(render, values, secret_name, key, made):
    r = render(values)
    ref = r.env()["PETREL_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret_name, "key": key}
    secrets = [s["metadata"]["name"] for s in r.all("Secret")]
    assert secrets == ([secret_name] if made else [])
    assert "s3cret" not in r.text, "only base64 in the Secret, never in plain sight"


def test_no_admin_token_by_default(render):
    assert "PETREL_ADMIN_TOKEN" not in render().env()


# --- services ------------------------------------------------------------------------------------

def test_client_service(render):
    r = render()
    svc = r.one("Service", RELEASE)
    assert svc["spec"]["type"] == "ClusterIP"
    assert [p["name"] for p in svc["spec"]["ports"]] == ["mqtt"]
    assert svc["spec"]["ports"][0]["port"] == 1883
    labels = r.sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    lb = render({"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                             "nodePorts": {"mqtt": 31883}, "exposeAdmin": True}})
    spec = lb.one("Service", RELEASE)["spec"]
    assert spec["type"] == "LoadBalancer"
    assert spec["externalTrafficPolicy"] == "Local"
    ports = {p["name"]: p for p in spec["ports"]}
    assert ports["mqtt"]["nodePort"] == 31883 and "admin" in ports


# --- monitoring ----------------------------------------------------------------------------------

def test_monitoring_objects_are_off_by_default(render):
    r = render()
    assert not r.all("ServiceMonitor") and not r.all("PrometheusRule")
    assert [c["metadata"]["name"] for c in r.all("ConfigMap")] == [RELEASE]


def test_service_monitor_scrapes_every_pod_as_job_petrel(render):
    r = render({"metrics": {"serviceMonitor": {"enabled": True}}})
    sm = r.one("ServiceMonitor")
    headless = r.one("Service", r.sts["spec"]["serviceName"])
    assert sm["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()
    client = r.one("Service", RELEASE)
    assert not sm["spec"]["selector"]["matchLabels"].items() <= client["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in headless["spec"]["ports"]}
    assert ep["path"] == "/metrics"
    # The job label comes from this label of the Service; the alerts select job="petrel".
    assert headless["metadata"]["labels"][sm["spec"]["jobLabel"]] == "petrel"
    assert 'job="petrel"' in (CHART / "files" / "alerts.yml").read_text()


def test_prometheus_rule_holds_the_alert_rules(render):
    r = render({"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}})
    rule = r.one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = yaml.safe_load((CHART / "files" / "alerts.yml").read_text())
    assert rule["spec"] == alerts
    assert rule["spec"]["groups"]
    for group in rule["spec"]["groups"]:
        for one in group["rules"]:
            assert ("alert" in one) != ("record" in one) and one["expr"]
    # Prometheus's own templates pass through Helm untouched.
    assert "{{ $labels.instance }}" in r.text


def test_grafana_dashboard_configmap(render):
    r = render({"metrics": {"grafanaDashboard": {"enabled": True}}})
    cm = r.one("ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["petrel.json"])
    assert dashboard == json.loads((CHART / "files" / "petrel.json").read_text())


@pytest.mark.parametrize("copy, source", [
    ("files/alerts.yml", "deploy/prometheus/alerts.yml"),
    ("files/petrel.json", "deploy/grafana/dashboards/petrel.json"),
])
def test_chart_copies_equal_the_deploy_files(copy, source):
    """Helm reads no file outside the chart; `scripts/check-helm.sh --sync` copies these."""
    src = REPO / source
    if not src.exists():
        pytest.skip(f"{source} does not exist yet")
    assert (CHART / copy).read_bytes() == src.read_bytes(), \
        f"helm/petrel/{copy} differs from {source}: run scripts/check-helm.sh --sync"


# --- documentation -----------------------------------------------------------------------------

def leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in {"resources", "podSecurityContext",
                                                   "securityContext", "labels"}:
            keys += leaf_keys(v, path + ".")
        else:
            keys.append(path)
    return keys


def test_every_value_is_documented_in_the_chart_readme():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    missing = [k for k in leaf_keys(values) if f"`{k}`" not in readme]
    assert not missing, f"not in helm/petrel/README.md's table: {missing}"


def test_every_value_is_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in leaf_keys(values):
        node = schema
        for part in key.split("."):
            props = node.get("properties", {})
            if part not in props:
                break  # a free-form object below here
            node = props[part]
        else:
            continue
        assert node.get("type") == "object" or node.get("additionalProperties") is not False, key


def test_image_ports_match_the_chart():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", dockerfile, re.M)
               for p in line.split()}
    ports = yaml.safe_load((CHART / "values.yaml").read_text())["ports"]
    assert set(ports.values()) == exposed


def test_compose_nodes_form_one_cluster_by_config():
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    nodes = {n: s for n, s in compose["services"].items() if n.startswith("petrel-")}
    assert len(nodes) == 3
    joins = {s["environment"]["PETREL_JOIN"] for s in nodes.values()}
    (join,) = joins
    ids = set()
    for name, s in nodes.items():
        env = s["environment"]
        assert env["PETREL_ADVERTISE_ADDR"] in join.split(",")
        assert env["PETREL_ADVERTISE_ADDR"] == f"{name}:7883"
        ids.add(env["PETREL_NODE_ID"])
    assert len(ids) == 3
    prom = (REPO / "deploy" / "prometheus" / "prometheus.yml")
    if prom.exists():
        for name in nodes:
            assert f"{name}:8080" in prom.read_text()
