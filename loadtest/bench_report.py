#!/usr/bin/env python3
"""Helper of loadtest/bench.sh (Python 3 standard library only).

    bench_report.py free-port                  print a free TCP port on 127.0.0.1
    bench_report.py ready-addr READY_FILE [KEY]  print an address ("mqtt", "admin") of a petrel
                                               ready file
    bench_report.py snap PID LABEL             print one /proc sample of PID as a JSON line
    bench_report.py sample PID OUT INTERVAL_S  append a /proc sample of PID to OUT every
                                               INTERVAL_S until PID is gone or SIGTERM
    bench_report.py metrics ADDR               print Petrel's /metrics text (admin address)
    bench_report.py report RESULTS_DIR OUT_MD  medians, ratios and targets as Markdown

A sample is wall time, utime+stime in clock ticks (/proc/PID/stat, which sums every thread of
the process), VmRSS and VmHWM in kB (/proc/PID/status).
"""

import json
import os
import signal
import socket
import statistics
import sys
import time

# --- /proc sampling -------------------------------------------------------------------------


def proc_sample(pid):
    """(t, cpu_ticks, rss_kb, hwm_kb), or None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: the fields after it start past the last ')'.
    rest = stat[stat.rfind(")") + 2 :].split()
    if rest[0] == "Z":
        return None
    ticks = int(rest[11]) + int(rest[12])  # fields 14 (utime) and 15 (stime)
    rss = hwm = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return (time.time(), ticks, rss, hwm)


def cmd_snap(pid, label):
    s = proc_sample(pid)
    if s is None:
        print(json.dumps({"label": label, "gone": True}))
        return 1
    t, ticks, rss, hwm = s
    print(json.dumps({"label": label, "t": t, "cpu_ticks": ticks, "rss_kb": rss, "hwm_kb": hwm}))
    return 0


def cmd_sample(pid, out, interval):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(out, "a", buffering=1) as f:
        while True:
            s = proc_sample(pid)
            if s is None:
                return 0
            f.write("%.3f %d %d %d\n" % s)
            time.sleep(interval)


# --- small helpers for bench.sh -------------------------------------------------------------


def cmd_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    return 0


def cmd_ready_addr(path, key="mqtt"):
    with open(path) as f:
        print(json.load(f)[key])
    return 0


def cmd_metrics(addr):
    import urllib.request

    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        sys.stdout.write(r.read().decode())
    return 0


def metric_sums(path):
    """{name{labels}: value} of a Prometheus text file (empty if there is none)."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line and not line.startswith("#"):
                    parts = line.rsplit(None, 1)
                    if len(parts) == 2:
                        try:
                            out[parts[0]] = float(parts[1])
                        except ValueError:
                            pass
    return out


# --- the report -----------------------------------------------------------------------------

BROKERS = ("petrel", "mosquitto")
NAMES = {"petrel": "Petrel", "mosquitto": "Mosquitto"}

# Scenario keys in table order, with their heading.
SCENARIOS = [
    ("fanin-q0", "fan-in QoS 0 (8 publishers, one `+` subscriber)"),
    ("fanin-q1", "fan-in QoS 1 (8 publishers, one `+` subscriber)"),
    ("fanout-q0", "fan-out QoS 0 (1 publisher, 16 subscribers)"),
    ("p2p-q1", "p2p QoS 1 (32 pairs)"),
    ("latency-q1", "latency at a fixed 10,000 msg/s, QoS 1 (1 pair)"),
    ("conn", "5,000 idle connections"),
    ("offline", "offline drain of 10,000 queued QoS 1 messages"),
]
MESSAGE_SCENARIOS = ("fanin-q0", "fanin-q1", "fanout-q0", "p2p-q1", "latency-q1")

KB = 1024.0  # /proc's kB are KiB; the tables use KB = 1024 B and MB = 1024 KB


def read_tsv(path):
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if "\t" in line:
                    k, v = line.split("\t", 1)
                    out[k] = v
    return out


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_snaps(path):
    snaps = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    s = json.loads(line)
                except ValueError:
                    continue
                snaps[s.get("label")] = s
    return snaps


def read_samples(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4:
                    rows.append((float(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])))
    return rows


class Run:
    """One broker run of one scenario: the numbers the tables need, plus problems seen."""

    def __init__(self, path, clk_tck):
        self.path = path
        self.meta = read_tsv(os.path.join(path, "meta.tsv"))
        self.scenario = self.meta.get("scenario", "?")
        self.broker = self.meta.get("broker", "?")
        self.round = int(self.meta.get("round", "0"))
        self.seq = int(self.meta.get("seq", "0"))
        self.bench = read_json(os.path.join(path, "bench.json"))
        self.snaps = read_snaps(os.path.join(path, "snaps.jsonl"))
        self.samples = read_samples(os.path.join(path, "samples.tsv"))
        self.metrics = metric_sums(os.path.join(path, "metrics.txt"))
        self.clk_tck = clk_tck
        self.values = {}
        self.problems = []
        self._compute()

    def _compute(self):
        rc = self.meta.get("bench_rc", "?")
        if rc != "0":
            self.problems.append(f"petrel-bench exit status {rc}")
        if self.meta.get("broker_died"):
            self.problems.append("the broker exited during the run")
        b = self.bench
        if b is None:
            self.problems.append("no JSON report")
            return
        for e in b.get("errors", [])[:3]:
            self.problems.append(f"error: {e}")
        if len(b.get("errors", [])) > 3:
            self.problems.append(f"... {len(b['errors'])} errors in all")
        before, after = self.snaps.get("before"), self.snaps.get("after")
        if after and "hwm_kb" in after:
            self.values["hwm_mb"] = after["hwm_kb"] / KB
        cpu_s = None
        if before and after and "cpu_ticks" in before and "cpu_ticks" in after:
            cpu_s = (after["cpu_ticks"] - before["cpu_ticks"]) / self.clk_tck
            self.values["cpu_s"] = cpu_s

        if self.scenario == "conn":
            c = b.get("connects") or {}
            ok = c.get("succeeded", 0)
            self.values["connects_per_s"] = c.get("per_sec")
            self.values["connect_p99_us"] = (c.get("latency") or {}).get("p99_us")
            if c.get("failed"):
                self.problems.append(f"{c['failed']} connections failed")
            if c.get("dropped"):
                self.problems.append(f"{c['dropped']} connections dropped while idle")
            held = self.held_rss_kb()
            if before and held is not None and ok:
                self.values["rss_before_mb"] = before["rss_kb"] / KB
                self.values["rss_held_mb"] = held / KB
                self.values["rss_per_conn_kb"] = (held - before["rss_kb"]) / ok
            return

        t = b.get("totals") or {}
        delivered = t.get("distinct", 0)
        lat = b.get("latency") or {}
        if self.scenario == "offline":
            o = b.get("offline") or {}
            self.values["rate"] = o.get("drain_rate")
            self.values["drain_s"] = o.get("drain_s")
            if o.get("sessions_not_present"):
                self.problems.append(f"{o['sessions_not_present']} sessions not resumed")
        else:
            self.values["rate"] = b.get("receive_rate")
            for p in ("p50", "p99", "p999"):
                if lat.get("count"):
                    self.values[p] = lat.get(f"{p}_us")
        if cpu_s is not None and delivered:
            self.values["cpu_per_m"] = cpu_s * 1e6 / delivered
        if t.get("lost"):
            qos = b.get("qos") or []
            kind = "QoS 0" if qos == [0] else "QoS 1/2, acknowledged to the publisher"
            text = f"{t['lost']:,} of {t.get('expected') or 0:,} messages never delivered ({kind})"
            drops = {k: v for k, v in self.metrics.items() if k.startswith("petrel_session_queue_dropped_total") and v}
            if drops:
                text += "; Petrel's metrics: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(drops.items()))
            self.problems.append(text)
        if t.get("duplicates"):
            self.problems.append(f"{t['duplicates']} duplicates")
        if b.get("misrouted"):
            self.problems.append(f"{b['misrouted']} misrouted")
        if b.get("drain_timed_out"):
            self.problems.append("drain timed out")
        if self.scenario == "latency-q1" and (b.get("receive_rate") or 0) < 9500:
            self.problems.append(f"did not keep up with 10,000 msg/s ({b.get('receive_rate', 0):.0f})")

    def held_rss_kb(self):
        """VmRSS while the connections are held idle: the median of the samples taken between
        the ready file and the end of the hold, with the reading taken at the ready file."""
        held = self.snaps.get("held")
        vals = [held["rss_kb"]] if held and "rss_kb" in held else []
        try:
            t0 = float(self.meta["t_ready"])
            hold = float(self.meta.get("hold_s", "0"))
        except (KeyError, ValueError):
            return vals[0] if vals else None
        # Leave the last tenth of the hold out: the generator starts closing right after it.
        vals += [rss for (t, _, rss, _) in self.samples if t0 <= t <= t0 + 0.9 * hold]
        return statistics.median(vals) if vals else None


def fmt_num(v, kind):
    if v is None:
        return "—"
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "us":
        return f"{v:,.0f}"
    if kind == "cpu":
        return f"{v:.2f}"
    if kind == "kb":
        return f"{v:.2f} KB"
    if kind == "mb":
        return f"{v:.1f} MB"
    if kind == "s":
        return f"{v:.3f} s"
    return str(v)


# Rows of the tables: (scenario, value key, label, kind, better)
ROWS = []
for key, _ in SCENARIOS:
    if key in MESSAGE_SCENARIOS:
        ROWS += [
            (key, "rate", "messages/s delivered", "rate", "higher"),
            (key, "p50", "latency p50 (µs)", "us", "lower"),
            (key, "p99", "latency p99 (µs)", "us", "lower"),
            (key, "p999", "latency p99.9 (µs)", "us", "lower"),
            (key, "cpu_per_m", "broker CPU s per million messages", "cpu", "lower"),
        ]
    elif key == "conn":
        ROWS += [
            (key, "connects_per_s", "connects/s", "rate", "higher"),
            (key, "connect_p99_us", "connect latency p99 (µs)", "us", "lower"),
            (key, "rss_per_conn_kb", "RSS per idle connection", "kb", "lower"),
            (key, "rss_held_mb", "RSS with the connections held", "mb", "lower"),
        ]
    elif key == "offline":
        ROWS += [
            (key, "rate", "drain messages/s", "rate", "higher"),
            (key, "drain_s", "drain time", "s", "lower"),
            (key, "cpu_per_m", "broker CPU s per million messages", "cpu", "lower"),
        ]
ROWS.append(("*", "peak_mb", "peak RSS (VmHWM, highest of the round)", "mb", "lower"))

# Targets: (scenario, key) -> (text, test(petrel median, mosquitto median, ratio) -> bool)
TARGETS = {
    ("fanin-q0", "rate"): ("≥ 3x", lambda p, m, r: r is not None and r >= 3.0),
    ("fanin-q1", "rate"): ("≥ 4.5x", lambda p, m, r: r is not None and r >= 4.5),
    ("fanout-q0", "rate"): ("≥ 12x", lambda p, m, r: r is not None and r >= 12.0),
    ("p2p-q1", "rate"): ("≥ 6x", lambda p, m, r: r is not None and r >= 6.0),
    ("latency-q1", "p99"): ("≤ 1.10x", lambda p, m, r: r is not None and r <= 1.10),
    ("conn", "connects_per_s"): ("≥ 1x", lambda p, m, r: r is not None and r >= 1.0),
    ("conn", "rss_per_conn_kb"): ("Petrel ≤ 2 KB", lambda p, m, r: p is not None and p <= 2.0),
    ("*", "peak_mb"): ("Petrel < 100 MB", lambda p, m, r: p is not None and p < 100.0),
}


def report(results_dir, out_md):
    machine = read_tsv(os.path.join(results_dir, "machine.tsv"))
    clk_tck = float(machine.get("clk_tck", "100"))
    runs = []
    for name in sorted(os.listdir(results_dir)):
        p = os.path.join(results_dir, name)
        if name.startswith("run-") and os.path.isdir(p):
            runs.append(Run(p, clk_tck))
    runs.sort(key=lambda r: r.seq)
    rounds = sorted({r.round for r in runs})
    scen_run = {r.scenario for r in runs}

    # value[(scenario, key)][broker][round]
    value = {}
    for r in runs:
        for k, v in r.values.items():
            if v is not None:
                value.setdefault((r.scenario, k), {}).setdefault(r.broker, {})[r.round] = v
    for b in BROKERS:
        for rd in rounds:
            hwms = [r.values["hwm_mb"] for r in runs if r.broker == b and r.round == rd and "hwm_mb" in r.values]
            if hwms:
                value.setdefault(("*", "peak_mb"), {}).setdefault(b, {})[rd] = max(hwms)

    def med(scen, key, broker):
        vals = list(value.get((scen, key), {}).get(broker, {}).values())
        return statistics.median(vals) if vals else None

    rows = [row for row in ROWS if row[0] == "*" or row[0] in scen_run]
    L = []
    w = L.append
    quick = machine.get("quick") == "1"
    w("# Petrel vs Mosquitto")
    w("")
    if quick:
        w("> **Quick smoke run** (`--quick`: one round, short durations). These numbers only show")
        w("> that the script works; they are not a benchmark result.")
        w("")
    w(f"Written by `loadtest/bench.sh` on {machine.get('date', '?')}. Each value in the first table is the")
    w(f"median over {len(rounds)} round(s); the ratio is Petrel's median divided by Mosquitto's, so")
    w("whether a ratio above 1 is good depends on the row's \"better\" column. KB = 1024 bytes and")
    w("MB = 1024 KB, as in /proc.")
    w("")
    try:
        busy = float(machine.get("loadavg_start", "0").split()[0]) >= 0.5
    except ValueError:
        busy = False
    if busy:
        w(f"> **The machine was not quiet**: load average {machine['loadavg_start']} when the run started.")
        w("> Other work competes with the pinned broker and generator; treat the numbers with care.")
        w("")
    w("## Results")
    w("")
    w("| scenario | metric | better | Petrel | Mosquitto | Petrel/Mosquitto | target | |")
    w("| --- | --- | --- | ---: | ---: | ---: | --- | --- |")
    titles = dict(SCENARIOS)
    titles["*"] = "all scenarios"
    last = None
    for scen, key, label, kind, better in rows:
        p, m = med(scen, key, "petrel"), med(scen, key, "mosquitto")
        ratio = p / m if p is not None and m not in (None, 0) else None
        tgt = TARGETS.get((scen, key))
        mark = ""
        if tgt:
            mark = "**met**" if tgt[1](p, m, ratio) else "**missed**"
        name = titles[scen] if scen != last else ""
        last = scen
        rtxt = f"{ratio:.2f}x" if ratio is not None else "—"
        w(f"| {name} | {label} | {better} | {fmt_num(p, kind)} | {fmt_num(m, kind)} | {rtxt} | {tgt[0] if tgt else ''} | {mark} |")
    missing = [f"{titles[s]}" for (s, _), _ in TARGETS.items() if s != "*" and s not in scen_run]
    if missing:
        w("")
        w("Not run, so their targets are not judged: " + "; ".join(sorted(set(missing))) + ".")
    w("")
    w("Messages/s counts distinct deliveries per second at the subscribers (a fan-out delivers each")
    w("message 16 times), from the start to the last new delivery; for the offline drain, from the")
    w("reconnect. Broker CPU is utime+stime from /proc/PID/stat while petrel-bench ran (connect,")
    w("send, drain and disconnect), divided by the deliveries. RSS per idle connection is (RSS while")
    w("the connections are held - RSS before they opened) / connections. Peak RSS is VmHWM, read")
    w("before each broker is stopped; the row shows the highest over a round's scenarios.")
    w("")

    # Per-round table
    w("## Every round")
    w("")
    head = ["scenario", "metric"]
    for b in BROKERS:
        head += [f"{NAMES[b]} r{rd}" for rd in rounds]
    w("| " + " | ".join(head) + " |")
    w("| --- | --- |" + " ---: |" * (len(head) - 2))
    last = None
    for scen, key, label, kind, _ in rows:
        cells = [titles[scen] if scen != last else "", label]
        last = scen
        for b in BROKERS:
            for rd in rounds:
                cells.append(fmt_num(value.get((scen, key), {}).get(b, {}).get(rd), kind))
        w("| " + " | ".join(cells) + " |")
    w("")
    order = " → ".join(f"r{r.round} {r.scenario} {NAMES.get(r.broker, r.broker)}" for r in runs)
    w("<details><summary>Run order</summary>")
    w("")
    w(order)
    w("")
    w("</details>")
    w("")

    problems = [(r, p) for r in runs for p in r.problems]
    w("## Checks")
    w("")
    if problems:
        w("| round | scenario | broker | problem |")
        w("| --- | --- | --- | --- |")
        for r, p in problems:
            w(f"| {r.round} | {r.scenario} | {NAMES.get(r.broker, r.broker)} | {p} |")
    else:
        w("Every run completed: no errors, no lost, duplicated or misrouted messages, no drain")
        w("timeouts, no failed or dropped connections.")
    w("")

    # Machine
    w("## Machine")
    w("")
    for k, label in [
        ("cpu", "CPU"),
        ("cores", "cores"),
        ("ram", "RAM"),
        ("kernel", "kernel"),
        ("debian", "Debian"),
        ("mosquitto_version", "Mosquitto"),
        ("petrel_version", "Petrel"),
        ("petrel_commit", "Petrel commit"),
        ("bench_version", "petrel-bench"),
        ("pinning", "pinning"),
        ("loadavg_start", "load average at start"),
        ("loadavg_end", "load average at end"),
    ]:
        if k in machine:
            w(f"- {label}: {machine[k]}")
    w("")

    # Commands
    w("## Commands")
    w("")
    w("The whole run:")
    w("")
    w("```sh")
    w(machine.get("invocation", "bash loadtest/bench.sh"))
    w("```")
    w("")
    w("Rounds alternate which broker goes first: in odd rounds every scenario runs against Petrel,")
    w("then Mosquitto; in even rounds Mosquitto first. Each run starts its broker afresh on an")
    w("empty data directory and a free port, and stops it afterwards.")
    w("")
    w("Petrel (default configuration, RocksDB persistence under `--data-dir`):")
    w("")
    w("```sh")
    w(machine.get("petrel_cmd", "?"))
    w("```")
    w("")
    w("Mosquitto (`mosquitto.conf` generated per run):")
    w("")
    w("```sh")
    w(machine.get("mosquitto_cmd", "?"))
    w("```")
    w("")
    w("```")
    conf = os.path.join(results_dir, "mosquitto.conf.example")
    if os.path.exists(conf):
        with open(conf) as f:
            w(f.read().rstrip("\n"))
    w("```")
    w("")
    w("Settings made equal for both brokers (everything else is each broker's default):")
    w("")
    for line in machine.get("equal_settings", "").split(" | "):
        if line:
            w(f"- {line}")
    w("")
    w("petrel-bench (identical for both brokers, `HOST:PORT` being the broker's address):")
    w("")
    w("```sh")
    seen = set()
    for r in runs:
        cmd = r.meta.get("bench_cmd_generic")
        if cmd and r.scenario not in seen:
            seen.add(r.scenario)
            w(cmd)
    w("```")
    w("")
    w(f"Raw data (petrel-bench JSON, /proc samples, broker logs): `{machine.get('results_dir', results_dir)}`.")
    w("")
    # The cluster figures (loadtest/cluster_bench.py --out) live after a marker: kept.
    kept = ""
    try:
        with open(out_md) as f:
            old = f.read()
        if CLUSTER_MARKER in old:
            kept = old[old.index(CLUSTER_MARKER):]
    except OSError:
        pass
    with open(out_md, "w") as f:
        f.write("\n".join(L))
        if kept:
            f.write("\n" + kept)
    # A short summary for the terminal.
    failed = sum(1 for r in runs if r.bench is None or r.meta.get("bench_rc") != "0")
    print(f"{len(runs)} runs, {failed} failed; wrote {out_md}")
    return 1 if failed else 0


CLUSTER_MARKER = "<!-- cluster_bench.py: everything below is written by it -->"


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "free-port":
        return cmd_free_port()
    if cmd == "ready-addr" and len(args) in (1, 2):
        return cmd_ready_addr(*args)
    if cmd == "metrics" and len(args) == 1:
        return cmd_metrics(args[0])
    if cmd == "snap" and len(args) == 2:
        return cmd_snap(int(args[0]), args[1])
    if cmd == "sample" and len(args) == 3:
        return cmd_sample(int(args[0]), args[1], float(args[2]))
    if cmd == "report" and len(args) == 2:
        return report(args[0], args[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
