#!/usr/bin/env bash
# Prove the Helm chart's start-up logic on Docker, without Kubernetes: render the chart, then
# start one container per pod exactly as the StatefulSet describes it (image, command, args,
# env with the pod's name and Kubernetes' $(VAR) expansion, the ConfigMap's petrel.toml, the
# Secrets, the security context: user 10001, read-only root, no capabilities, a /tmp tmpfs,
# and a volume per pod), on a Docker network where each container answers to its pod's DNS
# name under the headless Service (<pod>.<release>-headless.<ns>.svc.cluster.local). Then
# check that:
#
#   1. every node's /readyz answers 200 and `petrel cluster status` shows one cluster of 3
#   2. a message published on one node reaches subscribers on the two others
#      (mosquitto_pub / mosquitto_sub), and a retained message set on one is read on another
#   3. a pod stopped as Kubernetes stops it (the preStop command, then SIGTERM within the grace
#      period) exits 0, and a new container on the same volume rejoins: ready again, still
#      3 members, and it gets messages published elsewhere
#
#   scripts/prove-chart.sh [--keep] [--admin-token]
#
# --keep leaves the containers running at the end; --admin-token gives the chart an admin
# token (a Secret, PETREL_ADMIN_TOKEN), which the preStop drain then uses, instead of the
# token each node makes in its data dir.
#
# The image is $PETREL_IMAGE when set; otherwise petrel:prove, built for every run with
# deploy/build-image.sh --prebuilt from $PETREL_BIN (default: the release binary in
# $CARGO_TARGET_DIR, else the debug one), after deploy/base-image.sh where no base image can
# be pulled. The host reaches the nodes only through ports
# published on 127.0.0.1. Everything it starts is named petrel-prove-* and removed at the end.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
keep=0
token_values=()
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        --admin-token) token_values=(--set "adminToken.value=prove-admin-token-$RANDOM$RANDOM$RANDOM") ;;
        *) echo "usage: $0 [--keep] [--admin-token]" >&2; exit 2 ;;
    esac
done

image="${PETREL_IMAGE:-petrel:prove}"
target="${CARGO_TARGET_DIR:-$HOME/.cache/petrel-target}"
release=petrel
namespace=prove
prefix=petrel-prove
network="$prefix-net"
replicas=3

say() { printf 'prove-chart: %s\n' "$*"; }
passed=0
ok() { say "ok: $*"; passed=$((passed + 1)); }
fail() {
    printf 'prove-chart: FAILED: %s\n' "$*" >&2
    for i in $(seq 0 $((replicas - 1))); do
        if docker container inspect "$prefix-$i" >/dev/null 2>&1; then
            printf -- '----- log of %s-%d (last 30 lines) -----\n' "$prefix" "$i" >&2
            docker logs --tail 30 "$prefix-$i" >&2 2>&1 || true
        fi
    done
    echo "prove-chart: $passed passed, 1 failed"
    exit 1
}

remove_containers() {
    for i in $(seq 0 $((replicas - 1))); do
        docker rm -f "$prefix-$i" >/dev/null 2>&1 || true
        docker volume rm "$prefix-data-$i" >/dev/null 2>&1 || true
    done
    docker network rm "$network" >/dev/null 2>&1 || true
}

work=""
cleanup() {
    [ "$keep" = 1 ] || remove_containers
    [ -z "$work" ] || rm -rf "$work"
}

helm="$("$repo/scripts/check-helm.sh" --helm)"
if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null; then
    say "needs mosquitto_pub and mosquitto_sub (Debian: mosquitto-clients)"
    exit 1
fi

# Leftovers of an earlier run that was killed or kept.
remove_containers
work="$(mktemp -d "${TMPDIR:-/tmp}/petrel-prove.XXXXXX")"
chmod 0755 "$work"  # the ConfigMap's files are bind-mounted for uid 10001
trap cleanup EXIT

if [ -n "${PETREL_IMAGE:-}" ]; then
    docker image inspect "$image" >/dev/null 2>&1 || { say "no image $image"; exit 1; }
else
    # The image of the binary at hand, made afresh every run (a few seconds: only the
    # binary's layer changes), so an old image never stands in for the code under test.
    bin="${PETREL_BIN:-}"
    if [ -z "$bin" ]; then
        bin="$target/release/petrel"
        [ -x "$bin" ] || bin="$target/debug/petrel"
    fi
    old_id="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
    say "building $image from $bin"
    "$repo/deploy/build-image.sh" --prebuilt "$bin" --tag "$image" >"$work/build.log" 2>&1 ||
        { cat "$work/build.log" >&2; fail "image build"; }
    new_id="$(docker image inspect -f '{{.Id}}' "$image")"
    # The previous run's image, if nothing else names it now.
    if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ] &&
        [ "$(docker image inspect -f '{{len .RepoTags}}' "$old_id" 2>/dev/null)" = 0 ]; then
        docker rmi "$old_id" >/dev/null 2>&1 || true
    fi
fi


say "helm template $release helm/petrel -n $namespace"
# shellcheck disable=SC2016 # $SYS is an MQTT topic, not a variable
"$helm" template "$release" "$repo/helm/petrel" -n "$namespace" \
    --set "image.repository=${image%:*},image.tag=${image##*:},replicaCount=$replicas" \
    "${token_values[@]}" \
    --set-json 'auth.acl="[all]\nallow all #\nallow subscribe $SYS/#\n"' \
    >"$work/rendered.yaml"

# One `docker run` argument list per pod (NUL-separated), from the rendered objects.
python3 - "$work" "$prefix" "$network" "$replicas" <<'EOF'
import base64, json, re, sys
from pathlib import Path
import yaml

work, prefix, network, replicas = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
objs = [o for o in yaml.safe_load_all((work / "rendered.yaml").read_text()) if o]
(sts,) = [o for o in objs if o["kind"] == "StatefulSet"]
secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
spec = sts["spec"]
pod = spec["template"]["spec"]
(c,) = pod["containers"]
name = sts["metadata"]["name"]
ns = sts["metadata"]["namespace"]
headless = spec["serviceName"]
domain = f"{headless}.{ns}.svc.cluster.local"

# ConfigMap volumes become read-only folders of files.
volumes = {v["name"]: v for v in pod["volumes"]}
mounts = []
for m in c["volumeMounts"]:
    v = volumes.get(m["name"])
    if v is None:  # the volume claim template
        mounts.append(("data", m["mountPath"]))
    elif "configMap" in v:
        d = work / m["name"]
        d.mkdir(exist_ok=True)
        for key, text in configmaps[v["configMap"]["name"]]["data"].items():
            (d / key).write_text(text)
            (d / key).chmod(0o644)
        d.chmod(0o755)
        mounts.append(("bind", str(d), m["mountPath"]))
    elif "emptyDir" in v:
        mounts.append(("tmpfs", m["mountPath"]))
    elif "secret" in v:
        raise SystemExit(f"secret volumes are not emulated here: {m['name']}")

sc, psc = c["securityContext"], pod["securityContext"]
assert sc["readOnlyRootFilesystem"] and psc["runAsNonRoot"]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
grace = pod["terminationGracePeriodSeconds"]
prestop = c["lifecycle"]["preStop"]["exec"]["command"]

for i in range(replicas):
    pod_name = f"{name}-{i}"
    env = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                    lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
        else:
            raise SystemExit(f"cannot emulate env {e}")
    args = ["--name", f"{prefix}-{i}", "--hostname", pod_name,
            "--network", network, "--network-alias", f"{pod_name}.{domain}",
            "--user", f"{psc['runAsUser']}:{psc['runAsGroup']}",
            "--group-add", str(psc["fsGroup"]),
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--stop-timeout", str(grace),
            "-p", f"127.0.0.1::{ports['mqtt']}", "-p", f"127.0.0.1::{ports['admin']}"]
    for m in mounts:
        if m[0] == "data":
            args += ["-v", f"{prefix}-data-{i}:{m[1]}"]
        elif m[0] == "bind":
            args += ["-v", f"{m[1]}:{m[2]}:ro"]
        else:
            args += ["--tmpfs", f"{m[1]}:rw,size=64m,uid={psc['runAsUser']}"]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    command = c["command"]
    args += ["--entrypoint", command[0], "IMAGE"] + command[1:] + c.get("args", [])
    (work / f"run-{i}").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
(work / "prestop").write_bytes(b"\0".join(a.encode() for a in prestop) + b"\0")
(work / "facts").write_text(json.dumps({
    "grace": grace, "prestop": prestop, "mqtt": ports["mqtt"], "admin": ports["admin"],
    "grpc": ports["grpc"], "join": dict((e["name"], e.get("value")) for e in c["env"])["PETREL_JOIN"]}))
EOF
facts="$work/facts"
fact() {
    python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))[sys.argv[2]]
print(" ".join(v) if isinstance(v, list) else v)' "$facts" "$1"
}
mqtt_port="$(fact mqtt)"
admin_port="$(fact admin)"
grpc_port="$(fact grpc)"
grace="$(fact grace)"
prestop=()
while IFS= read -r -d '' a; do prestop+=("$a"); done <"$work/prestop"
say "seeds (PETREL_JOIN): $(fact join)"

docker network create "$network" >/dev/null

start_pod() {
    local i="$1" args=()
    while IFS= read -r -d '' a; do
        [ "$a" = IMAGE ] && a="$image"
        args+=("$a")
    done <"$work/run-$i"
    docker run -d "${args[@]}" >/dev/null
}

# log_has I PATTERN: node I's log so far matches PATTERN (read whole: `docker logs | grep -q`
# under pipefail fails when grep stops reading early).
log_has() {
    docker logs "$prefix-$1" >"$work/log-$1" 2>&1 || true
    grep -qE "$2" "$work/log-$1"
}

host_port() { docker port "$prefix-$1" "$2/tcp" | sed -n '1s/.*://p'; }

readyz() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$(host_port "$1" "$admin_port")/readyz" || true; }

wait_ready() {
    local i="$1" deadline=$((SECONDS + 120)) code=""
    while [ $SECONDS -lt $deadline ]; do
        code="$(readyz "$i")"
        [ "$code" = 200 ] && return 0
        [ "$(docker container inspect -f '{{.State.Running}}' "$prefix-$i" 2>/dev/null)" = true ] ||
            fail "$prefix-$i exited: $(docker container inspect -f '{{.State.ExitCode}}' "$prefix-$i")"
        sleep 0.5
    done
    fail "$prefix-$i: /readyz answered '$code' for 120 s"
}

# members I: how many members node I sees, after "node_id=grpc_addr" of each (to stderr).
members() {
    docker exec "$prefix-$1" petrel cluster --addr "127.0.0.1:$grpc_port" status --json |
        python3 -c '
import json, sys
s = json.load(sys.stdin)
print(" ".join("%s=%s" % (m["node_id"], m["grpc_addr"]) for m in s["members"]), file=sys.stderr)
print(len(s["members"]))'
}

# pub_sub FROM TO...: a QoS 1 message published on node FROM reaches a subscriber on each TO.
pub_sub() {
    local from="$1" tag="$RANDOM$RANDOM" pids=() outs=() i n deadline
    shift
    for i in "$@"; do
        outs+=("$work/sub-$i-$tag")
        # -d: the debug lines tell when the SUBACK is in (the route is then on every live node);
        # stdbuf: line by line, not when the client exits.
        stdbuf -oL mosquitto_sub -d -h 127.0.0.1 -p "$(host_port "$i" "$mqtt_port")" -t "prove/$tag" -q 1 \
            -C 1 -W 20 -i "prove-sub-$i-$tag" >"${outs[-1]}" 2>&1 &
        pids+=($!)
    done
    deadline=$((SECONDS + 10))
    for n in "${!outs[@]}"; do
        until grep -qs SUBACK "${outs[$n]}"; do
            [ $SECONDS -lt $deadline ] || fail "no SUBACK on node ${*:$((n + 1)):1}: $(cat "${outs[$n]}" 2>/dev/null)"
            sleep 0.1
        done
    done
    mosquitto_pub -h 127.0.0.1 -p "$(host_port "$from" "$mqtt_port")" -t "prove/$tag" -q 1 \
        -m "from node $from" -i "prove-pub-$tag"
    for n in "${!pids[@]}"; do
        wait "${pids[$n]}" || fail "subscriber on node ${*:$((n + 1)):1} got nothing from node $from: $(cat "${outs[$n]}" 2>/dev/null)"
        grep -qx "from node $from" "${outs[$n]}" ||
            fail "subscriber on node ${*:$((n + 1)):1}: $(cat "${outs[$n]}" 2>/dev/null)"
    done
    ok "a message published on node $from reached subscribers on nodes $*"
}

say "starting $replicas containers from $image"
for i in $(seq 0 $((replicas - 1))); do
    start_pod "$i"
done
t0=$SECONDS
for i in $(seq 0 $((replicas - 1))); do
    wait_ready "$i"
done
ok "/readyz is 200 on every node ($((SECONDS - t0)) s after the start)"
for i in $(seq 0 $((replicas - 1))); do
    n="$(members "$i")"
    [ "$n" = "$replicas" ] || fail "node $i sees $n members, not $replicas"
done
ok "every node sees one cluster of $replicas members"
log_has "0" 'started a new cluster' || fail "node 0 did not start the cluster"
for i in $(seq 1 $((replicas - 1))); do
    log_has "$i" 'started a new cluster' && fail "node $i started a cluster of its own"
done
ok "node 0 started the cluster, the others joined it"
if [ "${#token_values[@]}" -gt 0 ]; then
    admin_url="http://127.0.0.1:$admin_port"
    docker exec "$prefix-1" petrel ctl --url "$admin_url" cluster status >/dev/null ||
        fail "petrel ctl with the pod's PETREL_ADMIN_TOKEN was refused"
    if docker exec "$prefix-1" petrel ctl --url "$admin_url" --token not-the-token-0123456789 \
        cluster status >/dev/null 2>&1; then
        fail "the admin API took a wrong token"
    fi
    docker exec "$prefix-1" test ! -e /var/lib/petrel/data/admin-token ||
        fail "the node made a token of its own although PETREL_ADMIN_TOKEN is set"
    ok "the admin API takes the token of the chart's Secret (PETREL_ADMIN_TOKEN) and no other"
fi

pub_sub 0 1 2
pub_sub 2 0 1
retained="prove/retained/$RANDOM"
mosquitto_pub -h 127.0.0.1 -p "$(host_port 1 "$mqtt_port")" -t "$retained" -m kept -r -q 1
got="$(mosquitto_sub -h 127.0.0.1 -p "$(host_port 2 "$mqtt_port")" -t "$retained" -C 1 -W 10)" ||
    fail "no retained message on node 2"
[ "$got" = kept ] || fail "retained message on node 2: $got"
mosquitto_pub -h 127.0.0.1 -p "$(host_port 1 "$mqtt_port")" -t "$retained" -r -n -q 1
ok "a retained message set on node 1 was read on node 2"

# --- a pod stopped and started again on its volume ---------------------------------------------
# status_of I EXPR: a field of `petrel cluster status --json` on node I (members by position).
status_of() {
    docker exec "$prefix-$1" petrel cluster --addr "127.0.0.1:$grpc_port" status --json |
        python3 -c "import json, sys; s = json.load(sys.stdin); s['members'].sort(key=lambda m: m['node_id']); print(s$2)"
}
# The leader, to see the drain hand leadership on.
victim="$(status_of 0 '["leader_id"]')"
say "stopping $prefix-$victim (the leader) as Kubernetes would: the preStop hook, then SIGTERM (grace ${grace} s)"
say "  preStop: ${prestop[*]}"
# An MQTT 5 client on it, to see how it is sent away.
stdbuf -oL mosquitto_sub -d -V mqttv5 -h 127.0.0.1 -p "$(host_port "$victim" "$mqtt_port")" \
    -t "prove/drain" -i "prove-drained" >"$work/drained" 2>&1 &
drained_pid=$!
deadline=$((SECONDS + 10))
until grep -qs SUBACK "$work/drained"; do
    [ $SECONDS -lt $deadline ] || fail "no SUBACK for the client on node $victim"
    sleep 0.1
done
t0=$SECONDS
docker exec "$prefix-$victim" "${prestop[@]}" || fail "the preStop hook failed"
prestop_s=$((SECONDS - t0))
kill "$drained_pid" 2>/dev/null || true
wait "$drained_pid" 2>/dev/null || true
if [[ "${prestop[*]}" == *"cluster drain"* ]]; then
    log_has "$victim" 'draining through the admin API' ||
        fail "the preStop hook did not drain the node"
    log_has "$victim" 'leadership handed away' ||
        fail "the drained leader did not hand leadership on"
    code="$(readyz "$victim")"
    [ "$code" = 503 ] || fail "a drained node answers /readyz with $code, not 503"
    grep -q 'DISCONNECT' "$work/drained" || fail "the client on the drained node was not sent away: $(cat "$work/drained")"
    ok "preStop ($prestop_s s) drained node $victim: /readyz 503, leadership handed on, its client got: $(grep -m1 DISCONNECT "$work/drained" | sed 's/^Client [^ ]* //')"
    leader="$(status_of $(( (victim + 1) % replicas )) '["leader_id"]')"
    [ "$leader" != "$victim" ] || fail "node $victim still leads after its drain"
    [ "$(status_of $(( (victim + 1) % replicas )) "[\"members\"][$victim][\"draining\"]")" = True ] ||
        fail "the cluster does not record node $victim as draining"
fi
t0=$SECONDS
docker stop -t "$grace" "$prefix-$victim" >/dev/null
code="$(docker container inspect -f '{{.State.ExitCode}}' "$prefix-$victim")"
[ "$code" = 0 ] || fail "$prefix-$victim exited with $code after SIGTERM"
log_has "$victim" 'shutting down' || fail "no graceful shutdown in the log"
ok "after SIGTERM it exited 0 in $((SECONDS - t0)) s ($((prestop_s + SECONDS - t0)) s from the preStop hook, grace period ${grace} s)"
docker rm "$prefix-$victim" >/dev/null
start_pod "$victim"
wait_ready "$victim"
log_has "$victim" 'joined the cluster|started a new cluster' &&
    fail "the restarted node joined afresh instead of coming back from its volume"
other=$(( (victim + 1) % replicas ))
n="$(members "$other")"
[ "$n" = "$replicas" ] || fail "after the restart node $other sees $n members"
[ "$(status_of "$other" "[\"members\"][$victim][\"draining\"]")" = False ] ||
    fail "node $victim is still marked draining after its restart"
ok "the new container on the same volume rejoined by itself (ready, not draining); still $n members"
pub_sub "$other" "$victim"

echo "prove-chart: $passed passed, 0 failed"
if [ "$keep" = 1 ]; then
    say "--keep: containers $prefix-0..$((replicas - 1)) stay; MQTT on 127.0.0.1:$(host_port 0 "$mqtt_port")"
fi
