#!/usr/bin/env bash
# Static checks of the monitoring files in deploy/ (no node, no network):
#
#   promtool check config deploy/prometheus/prometheus.yml   (and the rule files it names)
#   promtool check rules  deploy/prometheus/alerts.yml
#   promtool test rules   deploy/prometheus/alerts_test.yml  the alerts fire when they should
#   python3 -m json.tool  deploy/grafana/dashboards/petrel.json, plus a few structural checks
#                         (unique panel ids, every query on the $datasource variable, PromQL
#                         in every target)
#
# promtool comes with Debian's `prometheus` package (scripts/setup.sh installs it). Whether the
# expressions return data from a live node is tests/python/test_monitoring.py's job.
# Every check runs; the exit status is non-zero if any failed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prom="$repo/deploy/prometheus"
dashboard="$repo/deploy/grafana/dashboards/petrel.json"

if ! command -v promtool >/dev/null 2>&1; then
    echo "check-monitoring: promtool not found; install Debian's prometheus package" \
        "(apt-get install --no-install-recommends prometheus, or scripts/setup.sh)" >&2
    exit 1
fi

passed=0
failed=0
run() {
    local what="$1"
    shift
    printf '\n--- %s\n' "$what"
    if "$@"; then
        echo "ok: $what"
        passed=$((passed + 1))
    else
        echo "FAILED: $what" >&2
        failed=$((failed + 1))
    fi
}

run "promtool check config" promtool check config "$prom/prometheus.yml"
run "promtool check rules" promtool check rules "$prom/alerts.yml"
# Rule unit tests resolve rule_files relative to the test file.
run "promtool test rules" promtool test rules "$prom/alerts_test.yml"
run "dashboard is JSON" python3 -m json.tool "$dashboard" /dev/null

check_dashboard() {
    python3 - "$dashboard" <<'EOF'
import json
import sys

d = json.load(open(sys.argv[1]))
problems = []
ids = {}
queries = 0
variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
for v in ("datasource", "instance"):
    if v not in variables:
        problems.append(f"no ${v} variable")
for p in d["panels"]:
    title = p.get("title", "?")
    if p["id"] in ids:
        problems.append(f"panel id {p['id']} used by {ids[p['id']]!r} and {title!r}")
    ids[p["id"]] = title
    if p["type"] == "row":
        continue
    if "gridPos" not in p:
        problems.append(f"{title!r}: no gridPos")
    if not p.get("targets"):
        problems.append(f"{title!r}: no query")
    for t in p.get("targets", []):
        queries += 1
        ds = t.get("datasource", p.get("datasource", {}))
        if ds.get("uid") != "${datasource}":
            problems.append(f"{title!r} {t.get('refId')}: data source {ds} is not ${{datasource}}")
        if not t.get("expr", "").strip():
            problems.append(f"{title!r} {t.get('refId')}: empty expr")
for line in problems:
    print("  " + line)
print(f"{len(ids)} panels, {queries} queries, {len(problems)} problems")
sys.exit(1 if problems else 0)
EOF
}
run "dashboard structure" check_dashboard

echo
# (the last line has the shape scripts/test.sh counts: "NAME: N passed, M failed")
echo "check-monitoring: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
