#!/usr/bin/env bash
# Install what building and testing Petrel needs on a Debian machine, and nothing that is
# already there. Safe to run again and again: a prepared machine only pays for a few checks.
#
#   scripts/setup.sh [node|test]
#
#   node  what building and running a node needs: a C/C++ toolchain, pkg-config, clang and
#         libclang (bindgen for librocksdb-sys), protoc
#   test  (default) the above, plus what the test suite and benchmarks use: mosquitto-clients,
#         the mosquitto broker, Prometheus (promtool and the server), and the Python packages
#         in tests/python/requirements.txt
#
# The Rust toolchain itself is not installed here (it comes from rustup, which needs a network
# this script does not assume); if cargo is missing the script says how to get it and fails.
set -euo pipefail

profile="${1:-test}"
case "$profile" in
    node | test) ;;
    *)
        echo "usage: $0 [node|test]" >&2
        exit 2
        ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf 'setup: %s\n' "$*"; }

# shellcheck source=scripts/as-root.sh
. "$repo/scripts/as-root.sh"

deb_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# --- Debian packages ---------------------------------------------------------------------------
# Each entry: package name and a check that tells whether what we need from it is already here,
# so that a machine where the tool came from elsewhere is not touched either.
missing=()
need_deb() {
    local pkg="$1"
    shift
    if "$@" >/dev/null 2>&1 || deb_installed "$pkg"; then
        return 0
    fi
    missing+=("$pkg")
}

have_libclang() {
    # bindgen loads libclang (from LIBCLANG_PATH, or the one a libclang-NN-dev package brings
    # along with clang's own headers such as stddef.h).
    [ -n "${LIBCLANG_PATH:-}" ] && return 0
    local installed
    installed="$(dpkg-query -W -f='${Package} ${Status}\n' 'libclang-*-dev' 2>/dev/null || true)"
    grep -q '^libclang-[0-9][0-9.]*-dev install ok installed$' <<<"$installed"
}

need_deb build-essential command -v c++
need_deb pkg-config command -v pkg-config
need_deb clang command -v clang
need_deb libclang-dev have_libclang
# The build may vendor protoc later (protoc-bin-vendored); Debian's protoc is harmless beside it.
need_deb protobuf-compiler command -v protoc
need_deb ca-certificates test -e /etc/ssl/certs/ca-certificates.crt

if [ "$profile" = test ]; then
    need_deb mosquitto-clients command -v mosquitto_sub
    # The Mosquitto broker is only used by the benchmarks, side by side with Petrel.
    need_deb mosquitto command -v mosquitto
    # promtool for scripts/check-monitoring.sh; the server for tests/python/test_monitoring.py.
    need_deb prometheus command -v promtool
    need_deb python3 command -v python3
    need_deb python3-pip python3 -m pip --version
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get on this machine; install these packages (Debian names) by hand: ${missing[*]}" >&2
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    # A freshly installed mosquitto package would start a broker on :1883 where systemd runs,
    # and take the port a Petrel node wants. Keep it stopped: the benchmarks start their own.
    had_mosquitto=0
    deb_installed mosquitto && had_mosquitto=1
    had_prometheus=0
    deb_installed prometheus && had_prometheus=1
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
    if [ "$had_mosquitto" -eq 0 ] && deb_installed mosquitto && command -v systemctl >/dev/null 2>&1 &&
        systemctl is-active --quiet mosquitto 2>/dev/null; then
        say "stopping and disabling the mosquitto service that the package started (port 1883)"
        as_root systemctl disable --now mosquitto >/dev/null 2>&1 || true
    fi
    if [ "$had_prometheus" -eq 0 ] && deb_installed prometheus && command -v systemctl >/dev/null 2>&1 &&
        systemctl is-active --quiet prometheus 2>/dev/null; then
        say "stopping and disabling the prometheus service that the package started (port 9090)"
        as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
else
    say "Debian packages: all present"
fi

# --- Python packages for tests/python ----------------------------------------------------------
if [ "$profile" = test ]; then
    if python3 - <<'EOF' >/dev/null 2>&1; then
import importlib.metadata as md
import paho.mqtt, pytest, pytest_timeout, schemathesis, yaml, kubernetes_validate  # noqa: F401
assert int(md.version("paho-mqtt").split(".")[0]) >= 2
EOF
        say "Python packages: all present"
    else
        req="$repo/tests/python/requirements.txt"
        say "installing Python packages from $req"
        pip=(python3 -m pip install --quiet --disable-pip-version-check -r "$req")
        if [ "$(id -u)" -ne 0 ] && [ -z "${VIRTUAL_ENV:-}" ]; then
            pip+=(--user)
        fi
        # Debian's own python3 refuses pip installs into it (PEP 668) unless told otherwise; a
        # pyenv or virtualenv python accepts them as they are.
        err="$(mktemp)"
        if ! "${pip[@]}" 2>"$err"; then
            if grep -q externally-managed "$err"; then
                "${pip[@]}" --break-system-packages
            else
                cat "$err" >&2
                rm -f "$err"
                exit 1
            fi
        fi
        rm -f "$err"
    fi
fi

# --- Rust ----------------------------------------------------------------------------------------
# scripts/run-node.sh and scripts/test.sh put ~/.cargo/bin on PATH themselves.
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    cat >&2 <<'EOF'
setup: cargo not found. Install the Rust toolchain with rustup (https://rustup.rs):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . "$HOME/.cargo/env"
then run this command again.
EOF
    exit 1
fi
say "ready ($profile)"
