#!/usr/bin/env bash
# Run every Petrel test on this machine, installing what is missing first (scripts/setup.sh):
#
#   1. build every target (the debug `petrel` binary among them)
#   2. cargo test --workspace       unit, property and Rust end-to-end tests
#      cargo test (part)            message exchange again with every broker a 3-node cluster
#   3. fuzz                         the codec and whole connections, a time budget each
#      check-monitoring             promtool on the Prometheus config and alert rules (with unit
#                                   tests), the Grafana dashboard's JSON
#   4. pytest tests/python          paho-mqtt (3.1.1 and 5.0) against the binary, raw bad input
#      pytest tests/cluster_check   the black-box cross-node suite against a 3-node cluster
#      pytest tests/python (part)   message exchange again with every broker a 3-node cluster
#   5. tests/interop/*.sh           mosquitto_pub / mosquitto_sub against the binary
#   6. check-helm, prove-chart,     the Helm chart (lint, render, validate), the chart started as
#      check-compose                containers on Docker, the Compose cluster (kill, partition)
#
# Every step runs even when an earlier one failed (except those that need the binary when it
# did not build); a summary closes the output and the exit status is non-zero on any failure.
# The summary counts, per step and in total, the tests that passed, failed, were skipped
# (cargo: ignored; pytest: skipped) and were deselected (cargo: filtered out; pytest:
# deselected), and names every skipped test, so a test that stops running cannot go unseen.
# Builds go to CARGO_TARGET_DIR (default ~/.cache/petrel-target), so repeated runs and CI reuse
# them. Extra arguments are passed to pytest (e.g. `scripts/test.sh -k retained`).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo" || exit 1

[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/petrel-target}"
export PETREL_BIN="$CARGO_TARGET_DIR/debug/petrel"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
export PYTHONDONTWRITEBYTECODE=1

logs="$(mktemp -d "${TMPDIR:-/tmp}/petrel-test.XXXXXX")"
steps=()
results=()
total_passed=0
total_failed=0
total_skipped=0
total_deselected=0
any_failed=0
skipped_names=()

banner() { printf '\n==== %s ====\n' "$*"; }

# record NAME STATUS [DETAIL]
record() {
    steps+=("$1")
    results+=("$2${3:+ ($3)}")
    [ "$2" = ok ] || any_failed=1
}

# add_counts PASSED FAILED SKIPPED DESELECTED
add_counts() {
    total_passed=$((total_passed + $1))
    total_failed=$((total_failed + $2))
    total_skipped=$((total_skipped + $3))
    total_deselected=$((total_deselected + $4))
}

counts() { # counts PASSED FAILED SKIPPED DESELECTED -> "p passed, f failed, s skipped, d deselected"
    printf '%s passed, %s failed, %s skipped, %s deselected' "$1" "$2" "$3" "$4"
}

# --- 0. setup -------------------------------------------------------------------------------------
banner "setup"
if bash "$here/setup.sh" test; then
    record setup ok
else
    record setup FAILED
fi

# --- 1. build ---------------------------------------------------------------------------------------
# Every target of the workspace in one go: `cargo test --workspace` then reuses these builds
# (same feature set), so RocksDB is compiled once, not once per package selection.
banner "cargo build --workspace --all-targets"
if cargo build --workspace --all-targets && [ -x "$PETREL_BIN" ]; then
    record build ok
    have_bin=1
else
    record build FAILED
    have_bin=0
fi

# --- 2. cargo test ------------------------------------------------------------------------------------
banner "cargo test --workspace"
timeout --signal=INT --kill-after=60 60m cargo test --workspace --no-fail-fast 2>&1 | tee "$logs/cargo.log"
rc=${PIPESTATUS[0]}
# "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 3 filtered out; finished in .."
read -r p f s d < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored; [0-9]* measured; \([0-9]*\) filtered out;.*/\1 \2 \3 \4/p' \
    "$logs/cargo.log" | awk '{p += $1; f += $2; s += $3; d += $4} END {print p + 0, f + 0, s + 0, d + 0}')
add_counts "$p" "$f" "$s" "$d"
while read -r skip; do
    skipped_names+=("cargo: $skip (ignored)")
done < <(sed -n 's/^test \(.*\) \.\.\. ignored.*$/\1/p' "$logs/cargo.log")
if [ "$rc" -eq 0 ]; then
    record "cargo test" ok "$(counts "$p" "$f" "$s" "$d")"
else
    [ "$rc" -eq 124 ] && echo "cargo test: timed out" >&2
    record "cargo test" FAILED "$(counts "$p" "$f" "$s" "$d"), exit $rc"
fi

# --- 2b. cargo test on a 3-node cluster --------------------------------------------------------------
# The message-exchange modules of the Rust end-to-end suite again, every broker a 3-node cluster
# and each connection on the next node (tests/src/broker.rs, PETREL_TEST_CLUSTER). Skipped there,
# with the reason: tests of what is one node's by design.
cluster_skips=(
    # a share group is served local first across nodes, not in turn over every member
    "router::shared_subscription_delivers_each_message_to_one_member"
    # members on other nodes take turns by node, whether connected or not
    "router::shared_subscription_skips_disconnected_member"
)
if [ "$have_bin" -eq 1 ]; then
    banner "cargo test, 3-node cluster"
    skip_args=()
    for t in "${cluster_skips[@]}"; do
        skip_args+=(--skip "$t")
    done
    PETREL_TEST_CLUSTER=3 timeout --signal=INT --kill-after=60 20m cargo test -p petrel-tests \
        --test it -- qos:: session:: will:: v5:: retained:: router:: "${skip_args[@]}" 2>&1 |
        tee "$logs/cargo-cluster.log"
    rc=${PIPESTATUS[0]}
    read -r p f s d < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored; [0-9]* measured; \([0-9]*\) filtered out;.*/\1 \2 \3 \4/p' \
        "$logs/cargo-cluster.log" | awk '{p += $1; f += $2; s += $3; d += $4} END {print p + 0, f + 0, s + 0, d + 0}')
    # The other modules' tests are filtered out on purpose: only the skips are counted.
    s=$((s + ${#cluster_skips[@]}))
    add_counts "$p" "$f" "$s" 0
    for t in "${cluster_skips[@]}"; do
        skipped_names+=("cargo, 3-node cluster: $t (one node's by design)")
    done
    if [ "$rc" -eq 0 ]; then
        record "cargo test, 3-node cluster" ok "$(counts "$p" "$f" "$s" 0)"
    else
        record "cargo test, 3-node cluster" FAILED "$(counts "$p" "$f" "$s" 0), exit $rc"
    fi
fi

# --- 3. fuzz -------------------------------------------------------------------------------------------
# The codec and whole connections (node/src/fuzz), PETREL_FUZZ_SECS each (default 10 here, 2
# inside plain `cargo test`). Engine: cargo-fuzz (coverage-guided) only when it is installed
# and its build of the targets is already there; otherwise the in-tree driver, which runs in
# the test binary step 1 built (random inputs, proptest shrinking) and costs nothing to set
# up. A cold cargo-fuzz setup does not fit CI: `cargo install cargo-fuzz` compiles for minutes,
# and its instrumented build compiles every dependency again, RocksDB's C++ included (tens of
# minutes on 2 cores). PETREL_FUZZ_ENGINE=cargo-fuzz or in-tree forces one. Failing inputs are
# saved under node/fuzz/regressions/ (in-tree) or node/fuzz/artifacts/ (cargo-fuzz).
fuzz_secs="${PETREL_FUZZ_SECS:-10}"
fuzz_engine="${PETREL_FUZZ_ENGINE:-auto}"
if [ "$fuzz_engine" = auto ]; then
    fuzz_engine=in-tree
    for built in node/fuzz/target/*/release/connection "$CARGO_TARGET_DIR"/*/release/connection; do
        if [ -x "$built" ] && cargo fuzz --version >/dev/null 2>&1; then
            fuzz_engine=cargo-fuzz
        fi
    done
fi
banner "fuzz ($fuzz_engine, ${fuzz_secs} s per target)"
if [ "$fuzz_engine" = cargo-fuzz ]; then
    rc=0
    for target in decode connection; do
        (cd node/fuzz && RUSTC_BOOTSTRAP=1 timeout --kill-after=30 20m cargo fuzz run "$target" -- \
            -max_total_time="${fuzz_secs%.*}" -timeout=30) || rc=1
    done
    if [ "$rc" -eq 0 ]; then
        record fuzz ok "cargo-fuzz, decode and connection, ${fuzz_secs} s each"
    else
        record fuzz FAILED "cargo-fuzz: crash input in node/fuzz/artifacts/"
    fi
else
    PETREL_FUZZ_SECS="$fuzz_secs" timeout --signal=INT --kill-after=30 10m \
        cargo test -p petrel-node --lib fuzz:: -- --nocapture 2>&1 | tee "$logs/fuzz.log"
    rc=${PIPESTATUS[0]}
    read -r p f < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed;.*/\1 \2/p' "$logs/fuzz.log" |
        awk '{p += $1; f += $2} END {print p + 0, f + 0}')
    # Only the fuzz tests run here (the others are filtered out, and were counted above).
    add_counts "$p" "$f" 0 0
    cases=$(sed -n 's/^fuzz \([a-z]*\): \([0-9]*\) cases in.*/\1 \2/p' "$logs/fuzz.log" | paste -sd, - | sed 's/,/, /g')
    if [ "$rc" -eq 0 ]; then
        record fuzz ok "in-tree, ${fuzz_secs} s per target: ${cases:-no count}"
    else
        record fuzz FAILED "in-tree: $p passed, $f failed, exit $rc; input saved in node/fuzz/regressions/"
    fi
fi

# --- 3b. monitoring files -------------------------------------------------------------------------
# deploy/prometheus (promtool check config/rules, rule unit tests) and the Grafana dashboard;
# tests/python/test_monitoring.py then evaluates them against live nodes.
banner "check-monitoring"
bash "$here/check-monitoring.sh" 2>&1 | tee "$logs/monitoring.log"
rc=${PIPESTATUS[0]}
read -r p f < <(sed -En 's/^check-monitoring: ([0-9]+) passed, ([0-9]+) failed$/\1 \2/p' \
    "$logs/monitoring.log" | awk '{p = $1; f = $2} END {print p + 0, f + 0}')
add_counts "$p" "$f" 0 0
if [ "$rc" -eq 0 ]; then
    record "check-monitoring" ok "$(counts "$p" "$f" 0 0)"
else
    record "check-monitoring" FAILED "$(counts "$p" "$f" 0 0), exit $rc"
fi

# --- 4. pytest ----------------------------------------------------------------------------------------
# run_pytest NAME MINUTES PYTEST-ARGS...: one pytest run as a step, counted from its JUnit report.
run_pytest() {
    local name="$1" minutes="$2" rc p f s d
    shift 2
    banner "$name"
    timeout --signal=INT --kill-after=30 "${minutes}m" python3 -m pytest -p no:cacheprovider -rfEs \
        --junitxml="$logs/pytest.xml" "$@" 2>&1 | tee "$logs/pytest.log"
    rc=${PIPESTATUS[0]}
    # Passed, failed (failures + errors) and skipped from the JUnit report; deselected tests are
    # not in it, only in pytest's closing line ("== 3 passed, 1 skipped, 2 deselected in 1s ==").
    read -r p f s d < <(python3 - "$logs/pytest.xml" "$logs/pytest.log" <<'EOF' 2>/dev/null || echo "0 0 0 0"
import re
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
deselected = 0
for line in open(sys.argv[2], errors="replace"):
    m = re.match(r"^=+ (.*) in [0-9.]+s", line.strip())
    if m:
        d = re.search(r"(\d+) deselected", m.group(1))
        deselected = int(d.group(1)) if d else 0
print(tests - bad - skipped, bad, skipped, deselected)
EOF
    )
    add_counts "$p" "$f" "$s" "$d"
    while read -r skip; do
        skipped_names+=("$name: $skip")
    done < <(python3 - "$logs/pytest.xml" <<'EOF' 2>/dev/null
import sys
import xml.etree.ElementTree as ET

for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    skip = case.find("skipped")
    if skip is not None:
        print(f"{case.get('classname')}::{case.get('name')} ({skip.get('message', '')})")
EOF
    )
    if [ "$rc" -eq 0 ]; then
        record "$name" ok "$(counts "$p" "$f" "$s" "$d")"
    else
        # exit 5 = no test collected: that is a failure here too
        record "$name" FAILED "$(counts "$p" "$f" "$s" "$d"), exit $rc"
    fi
}

if [ "$have_bin" -eq 1 ]; then
    run_pytest pytest 25 tests/python "$@"
    # The black-box cross-node suite, against a 3-node cluster of this binary.
    run_pytest "cluster check" 10 tests/cluster_check --local-cluster 3
    # The message-exchange part of the Python suite again, every broker a 3-node cluster and
    # each connection on the next node (the whole suite takes about 15 minutes that way:
    # PETREL_TEST_CLUSTER=3 python3 -m pytest tests/python).
    export PETREL_TEST_CLUSTER=3
    run_pytest "pytest, 3-node cluster" 20 tests/python/test_qos.py tests/python/test_session.py \
        tests/python/test_will.py tests/python/test_v5.py tests/python/test_retained.py
    unset PETREL_TEST_CLUSTER
else
    record pytest FAILED "not run: no binary"
fi

# --- 5. mosquitto interop -------------------------------------------------------------------------
shopt -s nullglob
interop=(tests/interop/*.sh)
if [ "$have_bin" -eq 1 ] && [ "${#interop[@]}" -gt 0 ]; then
    for script in "${interop[@]}"; do
        name="interop $(basename "$script" .sh)"
        banner "$name"
        timeout --kill-after=30 10m bash "$script" 2>&1 | tee "$logs/interop.log"
        rc=${PIPESTATUS[0]}
        # each interop script ends with a line "NAME: N passed, M failed[, K skipped]" and names
        # a test it skipped on a line "SKIPPED what (why)"
        read -r p f s < <(sed -En 's/^[A-Za-z0-9_-]+: ([0-9]+) passed, ([0-9]+) failed(, ([0-9]+) skipped)?$/\1 \2 \4/p' \
            "$logs/interop.log" | tail -n 1 | awk '{print $1 + 0, $2 + 0, $3 + 0}')
        add_counts "$p" "$f" "$s" 0
        while read -r skip; do
            skipped_names+=("$name")
        done < <(sed -n "s/^SKIPPED \(.*\)$/$name: \1/p" "$logs/interop.log")
        if [ "$rc" -eq 0 ] && [ "$p" -gt 0 ]; then
            record "$name" ok "$(counts "$p" "$f" "$s" 0)"
        else
            record "$name" FAILED "$(counts "$p" "$f" "$s" 0), exit $rc"
        fi
    done
elif [ "${#interop[@]}" -gt 0 ]; then
    record interop FAILED "not run: no binary"
fi


# --- 6. deployment -------------------------------------------------------------------------------
# The Helm chart (lint, render, validate against two Kubernetes versions: scripts/check-helm.sh;
# tests on the rendered YAML run with pytest above), then the chart's startup logic for real:
# three containers started as the rendered StatefulSet says, on a Docker network whose aliases
# are the pods' DNS names (scripts/prove-chart.sh builds the image from $PETREL_BIN, offline).
run_counted() { # run_counted NAME MINUTES COMMAND...
    local name="$1" minutes="$2" rc p f
    shift 2
    banner "$name"
    timeout --kill-after=30 "${minutes}m" "$@" 2>&1 | tee "$logs/step.log"
    rc=${PIPESTATUS[0]}
    read -r p f < <(sed -En 's/^[a-z-]+: ([0-9]+) passed, ([0-9]+) failed$/\1 \2/p' "$logs/step.log" | tail -n 1)
    p=${p:-0} f=${f:-0}
    add_counts "$p" "$f" 0 0
    if [ "$rc" -eq 0 ] && [ "$p" -gt 0 ]; then
        record "$name" ok "$(counts "$p" "$f" 0 0)"
    else
        record "$name" FAILED "$(counts "$p" "$f" 0 0), exit $rc"
    fi
}
run_counted "helm chart" 5 bash "$here/check-helm.sh"
if [ -x "$PETREL_BIN" ] && docker info >/dev/null 2>&1; then
    run_counted "chart on docker" 10 bash "$here/prove-chart.sh"
    # deploy/compose.yaml (with the local Prometheus override): ready, scraped, takeover across
    # nodes, docker kill under a QoS 1 stream, a partition and its healing.
    run_counted "compose cluster" 15 python3 "$here/check-compose.py"
else
    record "chart on docker" FAILED "not run: no binary or no docker engine"
    record "compose cluster" FAILED "not run: no binary or no docker engine"
fi

# --- 7. rolling upgrade ---------------------------------------------------------------------------
# Every node of a 3-node cluster replaced in turn (SIGTERM, exit, start on the same data,
# /readyz) under a QoS 1/2 load of persistent sessions with wills: nothing acknowledged lost,
# no QoS 2 duplicate, no will, leadership handed away. The short form (12 + 12 sessions, 60
# msg/s); the measured form and N -> N+1 are in README.md, "Benchmarks".
if [ "$have_bin" -eq 1 ]; then
    run_counted "rolling upgrade" 8 python3 loadtest/rolling_upgrade.py --short
else
    record "rolling upgrade" FAILED "not run: no binary"
fi

# --- summary ---------------------------------------------------------------------------------------
banner "summary"
for i in "${!steps[@]}"; do
    printf '  %-26s %s\n' "${steps[$i]}" "${results[$i]}"
done
if [ "${#skipped_names[@]}" -gt 0 ]; then
    echo "  skipped tests (they did not run):"
    printf '    %s\n' "${skipped_names[@]}"
fi
rm -rf "$logs"
if [ "$any_failed" -ne 0 ]; then
    echo "test.sh: FAILED"
else
    echo "test.sh: all steps passed"
fi
echo "total: $(counts "$total_passed" "$total_failed" "$total_skipped" "$total_deselected")"
exit "$any_failed"
