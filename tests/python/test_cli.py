"""The `petrel` binary as an operator meets it: default config, precedence, bad config,
log formats, signals."""

import json
import signal
import subprocess
import tomllib

import pytest

import rawmqtt as raw
from harness import petrel_bin, wait_until
from mqttclient import unique_id

# The command line and the process (flags, signals, logs, exit codes) of one node.
pytestmark = pytest.mark.single_node


def run(args, env=None, timeout=30):
    import os

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(petrel_bin()), *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_print_default_config():
    out = run(["--print-default-config"])
    assert out.returncode == 0, out.stderr
    cfg = tomllib.loads(out.stdout)
    assert cfg["mqtt"]["addr"] == "0.0.0.0:1883"
    assert cfg["admin"]["addr"] == "0.0.0.0:8080"
    assert cfg["admin"]["enabled"] is True
    assert cfg["storage"]["data_dir"] == "./data"
    assert cfg["mqtt"]["max_queued_messages"] == 1000
    assert cfg["mqtt"]["queue_overflow"] == "drop-newest"
    assert cfg["mqtt"]["max_packet_size_bytes"] == 1048576
    assert cfg["log"]["format"] == "text"


def test_default_config_is_a_valid_config_file(broker_factory, tmp_path):
    """The printed defaults, saved as a file, start a node through --config (the test ports
    and data dir come from flags, which beat the file). The same file with one value changed
    shows that the node really read it: a file the node ignored would pass the first half."""
    out = run(["--print-default-config"])
    assert out.returncode == 0, out.stderr
    assert "topic_alias_maximum = 64" in out.stdout, "the value edited below"
    printed = tmp_path / "printed.toml"
    printed.write_text(out.stdout)
    assert connack_alias_max(broker_factory(args=["--config", str(printed)])) == [64]

    edited = tmp_path / "edited.toml"
    edited.write_text(out.stdout.replace("topic_alias_maximum = 64", "topic_alias_maximum = 9"))
    assert connack_alias_max(broker_factory(args=["--config", str(edited)])) == [9]


@pytest.mark.parametrize("env, mentioned", [
    ({"PETREL_MQTT__NO_SUCH_SETTING": "1"}, ["no_such_setting"]),
    ({"PETREL_NOSECTION__X": "1"}, ["nosection"]),
    ({"PETREL_MQTT__MAX_QOS": "7"}, ["max_qos"]),
    ({"PETREL_MQTT__QUEUE_OVERFLOW": "drop-everything"}, ["queue_overflow", "drop-everything"]),
])
def test_bad_config_exits_64(tmp_path, env, mentioned):
    """Bad configuration: exit code 64 before any bind, naming the problem."""
    out = run(["--mqtt-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
               "--data-dir", str(tmp_path / "d"), "--ready-file", str(tmp_path / "ready.json")],
              env=env)
    assert out.returncode == 64, (out.returncode, out.stderr)
    assert not (tmp_path / "ready.json").exists()
    said = (out.stderr + out.stdout).lower()
    assert any(word in said for word in mentioned), out.stderr


def test_unknown_toml_section_rejected(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[mqtt]\nsys_interval_secs = 1\n[nonsense]\nx = 1\n")
    out = run(["--config", str(path), "--mqtt-addr", "127.0.0.1:0"])
    assert out.returncode == 64, out.stderr
    assert "nonsense" in out.stderr + out.stdout


def connack_alias_max(broker):
    with raw.RawClient(broker.addr) as c:
        return c.connect(5, client_id=unique_id("prec")).props.get(raw.P_TOPIC_ALIAS_MAXIMUM)


def test_precedence_defaults_toml_env(broker_factory, tmp_path):
    toml_file = tmp_path / "p.toml"
    toml_file.write_text("[mqtt]\ntopic_alias_maximum = 10\n")
    assert connack_alias_max(broker_factory()) == [64]
    assert connack_alias_max(broker_factory(args=["--config", str(toml_file)])) == [10]
    env_wins = broker_factory(env={"PETREL_MQTT__TOPIC_ALIAS_MAXIMUM": "20"},
                              args=["--config", str(toml_file)])
    assert connack_alias_max(env_wins) == [20]
    env_config = broker_factory(env={"PETREL_CONFIG": str(toml_file)})
    assert connack_alias_max(env_config) == [10]


def test_admin_disabled(broker_factory):
    b = broker_factory(env={"PETREL_ADMIN__ENABLED": "false"})
    assert b.admin_port is None
    with raw.RawClient(b.addr) as c:
        assert c.connect(4, client_id="x").code == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_graceful_shutdown(broker, sig):
    with raw.RawClient(broker.addr) as v5, raw.RawClient(broker.addr) as v4:
        assert v5.connect(5, client_id="v5").code == 0
        assert v4.connect(4, client_id="v4").code == 0
        broker.proc.send_signal(sig)
        assert [raw.parse_disconnect(p)[0] for p in v5.until_closed(timeout=15)] == [0x8B]
        assert v4.until_closed(timeout=15) == []
    assert broker.stop(timeout=15) == 0


def test_json_logs(broker_factory):
    b = broker_factory(env={"PETREL_LOG_FORMAT": "json", "PETREL_LOG": "info"})
    lines = [line for line in b.log().splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]
    assert any("listening" in json.dumps(r) and str(b.port) in json.dumps(r) for r in records)


def test_text_log_names_bound_addresses(broker):
    line = wait_until("the listening line", lambda: next(
        (ln for ln in broker.log().splitlines() if "listening" in ln), None))
    assert f"127.0.0.1:{broker.port}" in line
    assert f"127.0.0.1:{broker.admin_port}" in line
