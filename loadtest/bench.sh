#!/usr/bin/env bash
# Petrel against Debian's Mosquitto, side by side, with petrel-bench as the load generator.
#
#   bash loadtest/bench.sh [--quick] [--rounds N] [--only SCENARIO[,SCENARIO...]] [--no-build]
#                          [--duration D] [--results-dir DIR] [--out FILE]
#
# Scenarios (64-byte payloads, MQTT 3.1.1): fanin-q0, fanin-q1, fanout-q0, p2p-q1, latency-q1,
# conn, offline; see usage() below. Every round runs each scenario against both brokers, one
# after the other, with the broker pinned to one core and petrel-bench to the other. The broker
# starts afresh for every run (empty data directory, free port) so that no scenario inherits
# another's queues, sessions or heap, and the idle-connection RSS starts from a clean baseline.
#
# Writes loadtest/RESULTS.md (medians, Petrel/Mosquitto ratios, targets, every round, machine
# and exact commands) and keeps the raw data under loadtest/results/<date>/ (gitignored).
#
# Environment: CARGO_TARGET_DIR (default ~/.cache/petrel-target), PETREL_BIN, PETREL_BENCH,
# MOSQUITTO_BIN, BROKER_CPU (0), BENCH_CPU (1), BENCH_MAX_QUEUED (100000),
# MOSQUITTO_EXTRA_CONF (extra mosquitto.conf lines, e.g. "set_tcp_nodelay true"; off by default).
# The full run needs a quiet machine: nothing else should use either core.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
invocation="bash loadtest/bench.sh${*:+ $*}"

say() { printf 'bench: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 1
}

usage() {
    cat <<'EOF'
usage: bash loadtest/bench.sh [options]

  --quick            one round, 2 s per message scenario, 3 s hold: a smoke test, not a result
  --rounds N         rounds (default 3; 1 with --quick)
  --only LIST        scenarios to run, comma-separated or repeated (default: all):
                       fanin-q0    fan-in QoS 0: 8 publishers, one `+` subscriber, flat out
                       fanin-q1    fan-in QoS 1: the same at QoS 1
                       fanout-q0   fan-out QoS 0: 1 publisher, 16 subscribers, flat out
                       p2p-q1      p2p QoS 1: 32 publisher/subscriber pairs, flat out
                       latency-q1  one QoS 1 pair at a fixed 10,000 msg/s (latency)
                       conn        5,000 idle connections (connects/s, RSS per connection)
                       offline     10,000 QoS 1 messages queued for an offline session, drained
  --no-build         use the binaries already built (no cargo)
  --duration D       send time of the message scenarios (default 10s; 2s with --quick)
  --results-dir DIR  raw data (default loadtest/results/<UTC date>)
  --out FILE         the Markdown report (default loadtest/RESULTS.md)
EOF
}

all_scenarios=(fanin-q0 fanin-q1 fanout-q0 p2p-q1 latency-q1 conn offline)
rounds=""
quick=0
build=1
only=()
duration=""
results=""
out="$here/RESULTS.md"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --rounds)
            rounds="${2:?--rounds needs a number}"
            shift
            ;;
        --only)
            IFS=, read -r -a more <<<"${2:?--only needs a scenario}"
            only+=("${more[@]}")
            shift
            ;;
        --no-build) build=0 ;;
        --duration)
            duration="${2:?--duration needs a value such as 10s}"
            shift
            ;;
        --results-dir)
            results="${2:?--results-dir needs a directory}"
            shift
            ;;
        --out)
            out="${2:?--out needs a file}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
    shift
done

if [ "$quick" -eq 1 ]; then
    rounds="${rounds:-1}"
    duration="${duration:-2s}"
    hold_s=3
else
    rounds="${rounds:-3}"
    duration="${duration:-10s}"
    hold_s=10
fi
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive number, not '$rounds'"
if [ "${#only[@]}" -eq 0 ]; then
    scenarios=("${all_scenarios[@]}")
else
    scenarios=()
    for s in "${all_scenarios[@]}"; do # keep the table order
        for o in "${only[@]}"; do
            [ "$o" = "$s" ] && scenarios+=("$s")
        done
    done
    for o in "${only[@]}"; do
        [[ " ${all_scenarios[*]} " == *" $o "* ]] || die "unknown scenario '$o' (one of: ${all_scenarios[*]})"
    done
fi

# Equal for both brokers. Each is documented in RESULTS.md.
max_queued="${BENCH_MAX_QUEUED:-100000}" # >= the 10,000 of the offline drain, room for fan-in flat out
inflight_out=128                         # Petrel's default outbound window, given to Mosquitto
conns=5000
offline_count=10000
broker_cpu="${BROKER_CPU:-0}"
bench_cpu="${BENCH_CPU:-1}"
ready_deadline=60 # seconds for a broker to start listening

# The scenarios: the petrel-bench arguments, identical for both brokers.
scenario_args() {
    case "$1" in
        fanin-q0) echo "fanin --publishers 8 --qos 0 --size 64 --duration $duration" ;;
        fanin-q1) echo "fanin --publishers 8 --qos 1 --size 64 --duration $duration" ;;
        fanout-q0) echo "fanout --subscribers 16 --qos 0 --size 64 --duration $duration" ;;
        p2p-q1) echo "p2p --clients 32 --qos 1 --size 64 --duration $duration" ;;
        latency-q1) echo "p2p --clients 1 --qos 1 --size 64 --rate 10000 --duration $duration" ;;
        conn) echo "conn --clients $conns --duration ${hold_s}s" ;;
        offline) echo "offline --publishers 1 --subscribers 1 --qos 1 --size 64 --count $offline_count" ;;
    esac
}

# shellcheck source=scripts/as-root.sh
. "$here/../scripts/as-root.sh"

command -v python3 >/dev/null || die "python3 is missing"
command -v taskset >/dev/null || die "taskset is missing (Debian package util-linux)"
py() { python3 "$here/bench_report.py" "$@"; }

# --- Mosquitto -----------------------------------------------------------------------------------
MOSQUITTO_BIN="${MOSQUITTO_BIN:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}"
if [ ! -x "$MOSQUITTO_BIN" ]; then
    command -v apt-get >/dev/null || die "mosquitto is missing and there is no apt-get to install it"
    say "installing Debian's mosquitto"
    as_root apt-get update -qq || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto ||
        die "apt-get install mosquitto failed"
    MOSQUITTO_BIN="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
    [ -x "$MOSQUITTO_BIN" ] || die "mosquitto still missing after apt-get install"
fi
# The package's system service listens on 1883 (and uses CPU). This script never uses that
# port, but keeps the machine quiet: stop the service if it runs.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    say "stopping the mosquitto system service"
    as_root systemctl stop mosquitto
elif [ -x /etc/init.d/mosquitto ] && /etc/init.d/mosquitto status >/dev/null 2>&1; then
    say "stopping the mosquitto init.d service"
    as_root /etc/init.d/mosquitto stop >/dev/null
fi

# --- Binaries ------------------------------------------------------------------------------------
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/petrel-target}"
if [ "$build" -eq 1 ]; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || die "cargo not found (see scripts/setup.sh), or pass --no-build"
    say "building (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$repo" && cargo build --release -p petrel-node -p petrel-loadtest)
fi
PETREL_BIN="${PETREL_BIN:-$CARGO_TARGET_DIR/release/petrel}"
PETREL_BENCH="${PETREL_BENCH:-$CARGO_TARGET_DIR/release/petrel-bench}"
[ -x "$PETREL_BIN" ] || die "no petrel binary at $PETREL_BIN"
[ -x "$PETREL_BENCH" ] || die "no petrel-bench binary at $PETREL_BENCH"

# --- Cores and limits ----------------------------------------------------------------------------
ncores="$(nproc)" # before this script pins itself (nproc counts the CPUs it may use)
[ "$ncores" -ge 2 ] || die "needs two cores (one for the broker, one for petrel-bench); nproc says $ncores"
[ "$broker_cpu" != "$bench_cpu" ] || die "BROKER_CPU and BENCH_CPU must differ"
taskset -c "$broker_cpu" true 2>/dev/null || die "cannot pin to CPU $broker_cpu (BROKER_CPU)"
taskset -c "$bench_cpu" true 2>/dev/null || die "cannot pin to CPU $bench_cpu (BENCH_CPU)"
# This script and its helpers (the /proc sampler among them) stay off the broker's core.
taskset -cp "$bench_cpu" $$ >/dev/null

# One descriptor per idle connection, in the broker and in petrel-bench.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile="$(ulimit -n)"
if [ "$nofile" != unlimited ] && [ "$nofile" -lt $((conns + 1024)) ]; then
    die "open-files limit is $nofile, below the $conns idle connections (+1024); raise it (ulimit -n)"
fi
clk_tck="$(getconf CLK_TCK)"

# --- Directories ---------------------------------------------------------------------------------
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
results="${results:-$here/results/$stamp}"
mkdir -p "$results"
results="$(cd "$results" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/petrel-bench.XXXXXX")"
# Mosquitto started as root drops to the `mosquitto` user: it must reach its data directory.
chmod 755 "$work"

broker_pid=""
broker_admin=""
sampler_pid=""
bench_pid=""

stop_pid() { # stop_pid PID GRACE_SECS: SIGTERM, wait up to GRACE_SECS, then SIGKILL
    local pid="$1" deadline=$((SECONDS + $2))
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "pid $pid did not stop in $2 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.05 # polling pace
    done
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "$bench_pid" "$sampler_pid"; do
        [ -n "$pid" ] && stop_pid "$pid" 5
    done
    [ -n "$broker_pid" ] && stop_pid "$broker_pid" 30
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# alive PID: running and not a zombie (a child that exited stays a zombie until waited for).
alive() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != Z ]
}

# poll SECS WHAT PID COMMAND...: run COMMAND until it succeeds; fail at the deadline or when
# PID (the process that should make it true) has gone.
poll() {
    local deadline=$((SECONDS + $1)) what="$2" pid="$3"
    shift 3
    until "$@"; do
        if ! alive "$pid"; then
            say "process $pid exited while waiting for $what"
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "timed out waiting for $what"
            return 1
        fi
        sleep 0.05 # polling pace, not synchronisation
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Environment for petrel: the caller's PETREL_* variables removed (default configuration), then
# only the settings that must be equal for both brokers.
petrel_env=(env)
while IFS= read -r v; do
    petrel_env+=(-u "$v")
done < <(compgen -e | grep '^PETREL_' || true)
petrel_env+=("PETREL_MQTT__MAX_QUEUED_MESSAGES=$max_queued")

# start_petrel TMP RUN: sets broker_pid and broker_addr.
start_petrel() {
    local tmp="$1" run="$2"
    # Binaries from before the cluster have no gRPC listener (and no flag for it).
    local grpc=()
    if "$PETREL_BIN" --help 2>/dev/null | grep -q -- --grpc-addr; then
        grpc=(--grpc-addr 127.0.0.1:0)
    fi
    "${petrel_env[@]}" taskset -c "$broker_cpu" "$PETREL_BIN" \
        --mqtt-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 "${grpc[@]}" \
        --data-dir "$tmp/data" --ready-file "$tmp/ready.json" >"$run/broker.log" 2>&1 &
    broker_pid=$!
    poll "$ready_deadline" "petrel's ready file" "$broker_pid" test -s "$tmp/ready.json" || return 1
    broker_addr="$(py ready-addr "$tmp/ready.json")"
    broker_admin="$(py ready-addr "$tmp/ready.json" admin)"
}

mosquitto_conf() { # mosquitto_conf PORT DATA_DIR
    printf '%s\n' \
        "listener $1 127.0.0.1" \
        "allow_anonymous true" \
        "persistence true" \
        "persistence_location $2/" \
        "max_queued_messages $max_queued" \
        "max_inflight_messages $inflight_out"
    if [ -n "${MOSQUITTO_EXTRA_CONF:-}" ]; then
        printf '%s\n' "$MOSQUITTO_EXTRA_CONF"
    fi
}

# start_mosquitto TMP RUN: sets broker_pid and broker_addr.
start_mosquitto() {
    local tmp="$1" run="$2" port
    port="$(py free-port)"
    mkdir -p "$tmp/mosquitto"
    if [ "$(id -u)" -eq 0 ] && id mosquitto >/dev/null 2>&1; then
        chown mosquitto: "$tmp/mosquitto"
    fi
    mosquitto_conf "$port" "$tmp/mosquitto" >"$tmp/mosquitto.conf"
    cp "$tmp/mosquitto.conf" "$run/mosquitto.conf"
    taskset -c "$broker_cpu" "$MOSQUITTO_BIN" -c "$tmp/mosquitto.conf" >"$run/broker.log" 2>&1 &
    broker_pid=$!
    poll "$ready_deadline" "mosquitto on port $port" "$broker_pid" port_open "$port" || return 1
    broker_addr="127.0.0.1:$port"
    broker_admin=""
}

# --- What the report needs besides the runs --------------------------------------------------------
{
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'quick\t%s\n' "$quick"
    printf 'clk_tck\t%s\n' "$clk_tck"
    printf 'cpu\t%s\n' "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    printf 'cores\t%s\n' "$ncores (broker on CPU $broker_cpu, petrel-bench on CPU $bench_cpu)"
    printf 'ram\t%s\n' "$(awk '/^MemTotal:/ { printf "%.1f GB", $2 / 1048576 }' /proc/meminfo)"
    printf 'kernel\t%s\n' "$(uname -sr)"
    printf 'debian\t%s\n' "$(cat /etc/debian_version 2>/dev/null || echo '?')"
    printf 'mosquitto_version\t%s\n' "$("$MOSQUITTO_BIN" -h 2>&1 | sed -n 's/^mosquitto version //p' | head -1) ($MOSQUITTO_BIN)"
    printf 'petrel_version\t%s\n' "$("$PETREL_BIN" --version 2>&1 | head -1) ($PETREL_BIN)"
    printf 'bench_version\t%s\n' "$("$PETREL_BENCH" --version 2>&1 | head -1) ($PETREL_BENCH)"
    commit="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        commit="$commit (with uncommitted changes)"
    fi
    [ "$build" -eq 0 ] && commit="$commit; --no-build: the binaries were built beforehand"
    printf 'petrel_commit\t%s\n' "$commit"
    printf 'pinning\t%s\n' "taskset -c $broker_cpu for the broker, taskset -c $bench_cpu for petrel-bench, this script and its /proc sampler"
    printf 'loadavg_start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'invocation\t%s\n' "$invocation"
    printf 'results_dir\t%s\n' "$results"
    printf 'petrel_cmd\t%s\n' "env PETREL_MQTT__MAX_QUEUED_MESSAGES=$max_queued taskset -c $broker_cpu petrel --mqtt-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --data-dir <empty tmp dir> --ready-file <tmp>/ready.json"
    printf 'mosquitto_cmd\t%s\n' "taskset -c $broker_cpu mosquitto -c <tmp>/mosquitto.conf"
    printf 'equal_settings\t%s\n' "max_queued_messages = $max_queued (Petrel mqtt.max_queued_messages, default 1000; Mosquitto max_queued_messages, default 1000): room for the $offline_count messages of the offline drain and for fan-in flat out, where the subscriber's queue grows while its window is full (max_queued_bytes stays at both brokers' default, 0 = no byte limit) | outbound in-flight window $inflight_out: Petrel's default mqtt.max_inflight_messages, set as Mosquitto's max_inflight_messages (default 20) | connections: Petrel's default limits.max_connections is 100000 and Mosquitto's default is unlimited, so neither needs a change for $conns idle connections; the open-files limit of both (and petrel-bench) is raised to $nofile | persistence on for both: Petrel always writes persistent sessions to RocksDB (storage.durable_acks = true, fsync = false, the defaults); Mosquitto keeps them in memory and saves to persistence_location at autosave_interval (default 1800 s) and at exit | TCP_NODELAY: Petrel sets it on every connection; Mosquitto's set_tcp_nodelay stays at its default (false) | logging: each broker's default; Mosquitto logs every connect and disconnect (to a file here), Petrel logs none at its default level (info)${MOSQUITTO_EXTRA_CONF:+ | extra Mosquitto lines from MOSQUITTO_EXTRA_CONF: $(printf '%s' "$MOSQUITTO_EXTRA_CONF" | tr '\n' ';')}"
} >"$results/machine.tsv"
mosquitto_conf '<port>' '<empty tmp dir>' >"$results/mosquitto.conf.example"

# --- One run ---------------------------------------------------------------------------------------
failures=0

# run_one ROUND SEQ SCENARIO BROKER
run_one() {
    local round="$1" seq="$2" scen="$3" broker="$4"
    local run tmp rc=0 t_start t_ready="" t_end died="" generic
    run="$results/run-$(printf '%03d' "$seq")-r$round-$scen-$broker"
    tmp="$work/$seq"
    mkdir -p "$run" "$tmp"
    say "round $round: $scen against $broker"

    if ! "start_$broker" "$tmp" "$run"; then
        say "$broker did not start; its log:"
        tail -n 20 "$run/broker.log" >&2 || true
        stop_pid "$broker_pid" 30
        broker_pid=""
        printf 'round\t%s\nseq\t%s\nscenario\t%s\nbroker\t%s\nbench_rc\tbroker did not start\n' \
            "$round" "$seq" "$scen" "$broker" >"$run/meta.tsv"
        failures=$((failures + 1))
        return 0
    fi

    local -a args cmd
    read -r -a args <<<"$(scenario_args "$scen")"
    cmd=(taskset -c "$bench_cpu" "$PETREL_BENCH" "${args[@]}" --broker "$broker_addr" --json --quiet --threads 1)
    [ "$scen" = conn ] && cmd+=(--ready-file "$tmp/bench-ready.json")
    generic="taskset -c $bench_cpu petrel-bench ${args[*]} --broker HOST:PORT --json --quiet --threads 1"
    [ "$scen" = conn ] && generic="$generic --ready-file PATH"

    py snap "$broker_pid" before >>"$run/snaps.jsonl"
    python3 "$here/bench_report.py" sample "$broker_pid" "$run/samples.tsv" 0.1 &
    sampler_pid=$!
    # The sampler shares petrel-bench's core: its start-up (tens of ms of Python) must be over
    # before the measurement starts, or it lands in the first fraction of a second (the whole
    # connect phase of `conn`). Its first line says it is running.
    poll 30 "the /proc sampler" "$sampler_pid" test -s "$run/samples.tsv" || true
    t_start="$EPOCHREALTIME"
    "${cmd[@]}" >"$run/bench.json" 2>"$run/bench.stderr" &
    bench_pid=$!
    if [ "$scen" = conn ]; then
        # The connections are all up: read the RSS while petrel-bench holds them idle.
        if poll 300 "petrel-bench's connections" "$bench_pid" test -s "$tmp/bench-ready.json"; then
            t_ready="$EPOCHREALTIME"
            py snap "$broker_pid" held >>"$run/snaps.jsonl"
        fi
    fi
    wait "$bench_pid" || rc=$?
    bench_pid=""
    t_end="$EPOCHREALTIME"
    alive "$broker_pid" || died=1
    py snap "$broker_pid" after >>"$run/snaps.jsonl" || true
    # Petrel's counters (queue drops, limit hits) explain losses; read after the CPU sample.
    if [ -n "$broker_admin" ] && [ -z "$died" ]; then
        py metrics "$broker_admin" >"$run/metrics.txt" 2>/dev/null || true
    fi
    stop_pid "$sampler_pid" 5
    sampler_pid=""
    stop_pid "$broker_pid" 30
    broker_pid=""

    {
        printf 'round\t%s\nseq\t%s\nscenario\t%s\nbroker\t%s\n' "$round" "$seq" "$scen" "$broker"
        printf 'broker_addr\t%s\nbench_rc\t%s\nt_start\t%s\nt_end\t%s\n' "$broker_addr" "$rc" "$t_start" "$t_end"
        [ -n "$t_ready" ] && printf 't_ready\t%s\nhold_s\t%s\n' "$t_ready" "$hold_s"
        [ -n "$died" ] && printf 'broker_died\t1\n'
        printf 'bench_cmd\t%s\n' "${cmd[*]}"
        printf 'bench_cmd_generic\t%s\n' "$generic"
    } >"$run/meta.tsv"
    if [ "$rc" -ne 0 ] || [ -n "$died" ]; then
        failures=$((failures + 1))
        say "$scen against $broker failed (petrel-bench exit $rc${died:+, broker died}):"
        tail -n 5 "$run/bench.stderr" >&2 || true
        [ -n "$died" ] && tail -n 20 "$run/broker.log" >&2
    fi
    rm -rf "$tmp"
}

say "scenarios: ${scenarios[*]}; $rounds round(s); raw data in $results"
seq=0
for ((round = 1; round <= rounds; round++)); do
    if ((round % 2 == 1)); then order=(petrel mosquitto); else order=(mosquitto petrel); fi
    for scen in "${scenarios[@]}"; do
        for broker in "${order[@]}"; do
            seq=$((seq + 1))
            run_one "$round" "$seq" "$scen" "$broker"
        done
    done
done
printf 'loadavg_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$results/machine.tsv"

py report "$results" "$out" || true
say "report: $out"
if [ "$failures" -gt 0 ]; then
    say "$failures run(s) failed; see the Checks section of the report and $results"
    exit 1
fi
