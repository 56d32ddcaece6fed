#!/usr/bin/env bash
# Interoperability with Debian's mosquitto-clients (mosquitto_pub / mosquitto_sub), in MQTT 3.1.1
# and 5.0: QoS 0/1/2, retained messages, wills, persistent sessions, v5 properties and $SYS.
#
#   tests/interop/mosquitto.sh            (PETREL_BIN selects the binary; default: debug build)
#
# No sleeps to synchronise: a subscriber counts as ready once its debug output shows the SUBACK,
# every receive is bounded by mosquitto_sub's -C (count) and -W (timeout), and other waits poll
# a named condition until a deadline.
set -euo pipefail

PETREL_BIN="${PETREL_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/petrel-target}/debug/petrel}"
for tool in mosquitto_pub mosquitto_sub python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (run scripts/setup.sh)" >&2; exit 2; }
done
[ -x "$PETREL_BIN" ] || { echo "petrel binary not found at $PETREL_BIN" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/petrel-interop.XXXXXX")"
broker_pid=""
bg_pids=()

cleanup() {
    local pid
    for pid in "${bg_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    if [ -n "$broker_pid" ]; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# --- helpers -----------------------------------------------------------------------------------------

# poll DEADLINE_SECS DESCRIPTION COMMAND...: run COMMAND until it succeeds or the deadline passes.
poll() {
    local deadline=$((SECONDS + $1)) what="$2"
    shift 2
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "    timed out waiting for $what" >&2
            return 1
        fi
        sleep 0.05 # polling pace, not synchronisation
    done
}

start_broker() {
    mkdir -p "$work/broker"
    PETREL_MQTT__SYS_INTERVAL_SECS=1 PETREL_LOG="${PETREL_LOG:-debug,openraft=info}" "$PETREL_BIN" \
        --mqtt-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 \
        --data-dir "$work/broker/data" --ready-file "$work/broker/ready.json" \
        >"$work/broker/log" 2>&1 &
    broker_pid=$!
    if ! poll 30 "the ready file" test -s "$work/broker/ready.json"; then
        echo "petrel did not start; log:" >&2
        cat "$work/broker/log" >&2
        exit 1
    fi
    PORT="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mqtt"].rsplit(":",1)[1])' \
        "$work/broker/ready.json")"
    ADMIN="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' \
        "$work/broker/ready.json")"
}

metric() { # metric NAME -> the sum of its samples
    python3 - "$ADMIN" "$1" <<'EOF'
import re, sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
total = 0.0
for line in text.splitlines():
    m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)", line)
    if m and m.group(1) == sys.argv[2]:
        total += float(m.group(3))
print(int(total))
EOF
}

pub() { # pub VERSION ARGS...
    local v="$1"
    shift
    timeout 10 mosquitto_pub -h 127.0.0.1 -p "$PORT" -V "$v" "$@"
}

# sub_start NAME VERSION ARGS...: a background mosquitto_sub, ready once its SUBACK arrived.
# Output lines look like MSG|topic|qos|retain|payload (plus mosquitto's debug lines); stdbuf
# makes its stdout line-buffered so the debug lines show up while it runs.
sub_start() {
    local name="$1" v="$2"
    shift 2
    stdbuf -oL mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$v" -d -F 'MSG|%t|%q|%r|%p' "$@" \
        >"$work/$name.out" 2>&1 &
    echo $! >"$work/$name.pid"
    bg_pids+=($!)
    poll 10 "$name's SUBACK" grep -qs "received SUBACK" "$work/$name.out"
}

# sub_wait NAME: wait for a background mosquitto_sub to finish (its -C/-W bound it). Call it in
# the shell that started it (not inside $(...)), then read what it got with `messages NAME`.
sub_wait() {
    wait "$(cat "$work/$1.pid")" || true
}

messages() { grep '^MSG|' "$work/$1.out" || true; }

expect_eq() { # expect_eq WHAT EXPECTED ACTUAL
    if [ "$2" != "$3" ]; then
        printf '    %s:\n      expected: %q\n      actual:   %q\n' "$1" "$2" "$3" >&2
        return 1
    fi
}

# --- tests -----------------------------------------------------------------------------------------
# Each runs in a subshell with `set -e`; V is mqttv311 or mqttv5.

t_qos_round_trip() {
    local q
    for q in 0 1 2; do
        sub_start "qos$q-$V" "$V" -q 2 -t "it/$V/qos$q" -C 1 -W 10
        pub "$V" -q "$q" -t "it/$V/qos$q" -m "hello $q"
        sub_wait "qos$q-$V"
        expect_eq "QoS $q message" "MSG|it/$V/qos$q|$q|0|hello $q" "$(messages "qos$q-$V")"
    done
}

t_qos_downgrade() {
    sub_start "down-$V" "$V" -q 1 -t "it/$V/down" -C 1 -W 10
    pub "$V" -q 2 -t "it/$V/down" -m "downgraded"
    sub_wait "down-$V"
    expect_eq "delivered at the subscription's QoS" "MSG|it/$V/down|1|0|downgraded" \
        "$(messages "down-$V")"
}

t_large_payload() {
    head -c 200000 /dev/zero | tr '\0' 'x' >"$work/big-$V"
    stdbuf -oL mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$V" -d -q 1 -t "it/$V/big" -C 1 -W 10 -F 'MSG|%l' \
        >"$work/big-$V.out" 2>&1 &
    echo $! >"$work/big-$V.pid"
    bg_pids+=($!)
    poll 10 "SUBACK" grep -qs "received SUBACK" "$work/big-$V.out"
    pub "$V" -q 1 -t "it/$V/big" -f "$work/big-$V"
    sub_wait "big-$V"
    expect_eq "payload length" "MSG|200000" "$(messages "big-$V")"
}

t_retained() {
    pub "$V" -q 1 -r -t "it/$V/ret" -m "first"
    pub "$V" -q 1 -r -t "it/$V/ret" -m "second"
    sub_start "ret1-$V" "$V" -q 1 -t "it/$V/ret" -C 1 -W 10
    sub_wait "ret1-$V"
    expect_eq "replaced retained message" "MSG|it/$V/ret|1|1|second" "$(messages "ret1-$V")"

    pub "$V" -q 1 -r -n -t "it/$V/ret" # clear it
    # --retained-only prints retained messages and exits at the first live one: nothing retained
    # may come before the live marker published after the SUBACK.
    sub_start "ret2-$V" "$V" -q 1 -t "it/$V/ret" --retained-only -W 10
    pub "$V" -q 1 -t "it/$V/ret" -m "live marker"
    sub_wait "ret2-$V"
    expect_eq "messages after the clear" "" "$(messages "ret2-$V")"
}

t_retained_wildcard() {
    pub "$V" -q 1 -r -t "it/$V/rw/a" -m "a"
    pub "$V" -q 1 -r -t "it/$V/rw/b/c" -m "c"
    sub_start "rw-$V" "$V" -q 1 -t "it/$V/rw/#" -C 2 -W 10
    sub_wait "rw-$V"
    expect_eq "retained via wildcard" "MSG|it/$V/rw/a|1|1|a
MSG|it/$V/rw/b/c|1|1|c" "$(messages "rw-$V" | sort)"
}

t_will() {
    sub_start "willwatch-$V" "$V" -q 1 -t "it/$V/will" -C 1 -W 10
    # a client holding a will: a subscriber that stays connected until killed
    sub_start "willer-$V" "$V" -t "it/$V/idle" -i "willer-$V" -W 30 \
        --will-topic "it/$V/will" --will-payload "willer died" --will-qos 1
    kill -9 "$(cat "$work/willer-$V.pid")"
    wait "$(cat "$work/willer-$V.pid")" 2>/dev/null || true
    sub_wait "willwatch-$V"
    expect_eq "will after kill -9" "MSG|it/$V/will|1|0|willer died" "$(messages "willwatch-$V")"
}

t_no_will_after_disconnect() {
    # The watcher is the only connection left once earlier tests' subscribers are gone: wait
    # for exactly that, so the count below cannot be met by someone else leaving.
    sub_start "nowill-$V" "$V" -q 1 -t "it/$V/nowill" -C 1 -W 10
    poll 10 "only the watcher connected" test "$(metric petrel_mqtt_connections)" -eq 1
    # connects with a will, publishes, disconnects normally
    pub "$V" -q 1 -t "it/$V/other" -m x --will-topic "it/$V/nowill" --will-payload "wrong"
    # The broker publishes a will (or not) before it stops counting the connection, so once
    # the count is back to 1 a will would be queued for the watcher before the marker. (0:
    # the watcher got a message, the will, and left.)
    poll 10 "the publisher's connection to close" \
        test "$(metric petrel_mqtt_connections)" -le 1
    pub "$V" -q 1 -t "it/$V/nowill" -m "marker"
    sub_wait "nowill-$V"
    expect_eq "first message on the will topic" "MSG|it/$V/nowill|1|0|marker" \
        "$(messages "nowill-$V")"
}

t_persistent_session() {
    local id="persist-$V"
    # create the session and its subscription, then go away (-E exits after the SUBACK)
    timeout 10 mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$V" -c -i "$id" -q 1 -t "it/$V/ps" -E
    pub "$V" -q 1 -t "it/$V/ps" -m "one"
    pub "$V" -q 2 -t "it/$V/ps" -m "two"
    pub "$V" -q 0 -t "it/$V/ps" -m "zero (not queued)"
    pub "$V" -q 1 -t "it/$V/ps" -m "three"
    timeout 15 mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$V" -c -i "$id" -q 1 -t "it/$V/ps" \
        -C 3 -W 10 -F 'MSG|%t|%q|%r|%p' >"$work/ps-$V.out"
    expect_eq "queued messages after resuming" "MSG|it/$V/ps|1|0|one
MSG|it/$V/ps|1|0|two
MSG|it/$V/ps|1|0|three" "$(messages "ps-$V")"
}

t_clean_session_drops_queue() {
    local id="clean-$V"
    timeout 10 mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$V" -c -i "$id" -q 1 -t "it/$V/cs" -E
    pub "$V" -q 1 -t "it/$V/cs" -m "queued"
    # the same id with a clean session: the old session and its queue are gone
    sub_start "cs-$V" "$V" -i "$id" -q 1 -t "it/$V/cs-marker" -C 1 -W 10
    pub "$V" -q 1 -t "it/$V/cs-marker" -m "marker"
    sub_wait "cs-$V"
    expect_eq "messages for the clean session" "MSG|it/$V/cs-marker|1|0|marker" "$(messages "cs-$V")"
}

t_sys_topics() {
    local got t topics=() args=()
    topics=(version uptime clients/connected clients/total clients/disconnected messages/received
        messages/sent subscriptions/count "retained messages/count" messages/stored messages/queued)
    for t in "${topics[@]}"; do
        args+=(-t "\$SYS/broker/$t")
    done
    # retained ones come at once, the rest within one 1 s interval: two rounds are enough
    timeout 15 mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$V" "${args[@]}" -C 22 -W 5 \
        -F '%t|%p' >"$work/sys-$V.out" || true
    for t in "${topics[@]}"; do
        grep -q "^\$SYS/broker/$t|" "$work/sys-$V.out" || {
            echo "    \$SYS/broker/$t not seen; got:" >&2
            cut -d'|' -f1 "$work/sys-$V.out" | sort -u | sed 's/^/      /' >&2
            return 1
        }
    done
    # shellcheck disable=SC2016 # a literal $SYS
    got="$(grep '^\$SYS/broker/uptime|' "$work/sys-$V.out" | head -n 1 | cut -d'|' -f2)"
    [[ "$got" =~ ^[0-9]+\ seconds$ ]] || { echo "    uptime '$got'" >&2; return 1; }
    # a '#' subscription must not see them (spec 4.7.2), not even the retained ones that a
    # subscription gets at once: everything before the marker is checked
    sub_start "hash-$V" "$V" -q 1 -t '#' -W 20
    pub "$V" -q 1 -t "it/$V/after-sys" -m "marker"
    poll 10 "the marker" grep -q "^MSG|it/$V/after-sys|" "$work/hash-$V.out"
    kill "$(cat "$work/hash-$V.pid")"
    wait "$(cat "$work/hash-$V.pid")" 2>/dev/null || true
    expect_eq "\$SYS messages seen by '#'" "" "$(grep '^MSG|\$' "$work/hash-$V.out" || true)"
}

t_v5_properties() {
    sub_start "props" mqttv5 -q 1 -t "it/v5/props" -C 1 -W 10 \
        -F 'MSG|%t|%C|%R|%P|%E|%p'
    pub mqttv5 -q 1 -t "it/v5/props" -m "with props" \
        -D publish user-property colour blue -D publish content-type text/plain \
        -D publish response-topic "it/v5/reply" -D publish message-expiry-interval 120
    local line
    sub_wait props
    line="$(messages props)"
    case "$line" in
        "MSG|it/v5/props|text/plain|it/v5/reply|colour:blue|"1[01][0-9]"|with props" | \
            "MSG|it/v5/props|text/plain|it/v5/reply|colour:blue|120|with props") ;;
        *)
            expect_eq "properties" "MSG|it/v5/props|text/plain|it/v5/reply|colour:blue|120|with props" \
                "$line"
            ;;
    esac
}

t_v5_subscription_identifier() {
    sub_start "subid" mqttv5 -q 1 -t "it/v5/subid/+" -D subscribe subscription-identifier 42 \
        -C 1 -W 10 -F 'MSG|%t|%S|%p'
    pub mqttv5 -q 1 -t "it/v5/subid/x" -m "tagged"
    sub_wait subid
    expect_eq "subscription identifier" "MSG|it/v5/subid/x|42|tagged" "$(messages subid)"
}

t_mixed_versions() {
    sub_start "mixed" mqttv311 -q 1 -t "it/mixed" -C 2 -W 10
    pub mqttv5 -q 1 -t "it/mixed" -m "from v5" -D publish user-property k v
    pub mqttv31 -q 1 -t "it/mixed" -m "from v3.1"
    sub_wait mixed
    expect_eq "3.1.1 subscriber gets 5.0 and 3.1 publishes" "MSG|it/mixed|1|0|from v5
MSG|it/mixed|1|0|from v3.1" "$(messages mixed)"
}

# --- run -----------------------------------------------------------------------------------------
start_broker
echo "petrel ($PETREL_BIN) on 127.0.0.1:$PORT"

passed=0
failed=0
run() { # run TEST VERSION
    local name="$1" rc
    export V="$2"
    set +e
    (
        set -e
        trap 'kill $(jobs -p) 2>/dev/null || true' EXIT # background subscribers of this test
        "$name"
    )
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "ok     ${name#t_} [$V]"
    else
        failed=$((failed + 1))
        echo "FAILED ${name#t_} [$V]"
    fi
}

for V in mqttv311 mqttv5; do
    for t in t_qos_round_trip t_qos_downgrade t_large_payload t_retained t_retained_wildcard \
        t_will t_no_will_after_disconnect t_persistent_session t_clean_session_drops_queue \
        t_sys_topics; do
        run "$t" "$V"
    done
done
run t_v5_properties mqttv5
run t_v5_subscription_identifier mqttv5
run t_mixed_versions mqttv311

if ! kill -0 "$broker_pid" 2>/dev/null; then
    echo "FAILED petrel exited during the run" >&2
    failed=$((failed + 1))
fi
if [ "$failed" -gt 0 ]; then
    echo "----- petrel log (last 200 lines) -----"
    tail -n 200 "$work/broker/log"
fi
echo "mosquitto: $passed passed, $failed failed, 0 skipped" # nothing here skips a test
[ "$failed" -eq 0 ]
