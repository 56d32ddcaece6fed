#!/usr/bin/env bash
# Build and run one Petrel node. With no arguments it is the zero-config node: MQTT on
# 0.0.0.0:1883, admin API and /metrics on 0.0.0.0:8080, data under ./data (relative to the
# directory you run this from). Arguments go to the `petrel` binary, e.g.
#
#   scripts/run-node.sh --mqtt-addr 127.0.0.1:1884 --data-dir /tmp/petrel
#   scripts/run-node.sh --print-default-config
#
# Installs what a build needs on a fresh Debian machine first (scripts/setup.sh node).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

bash "$here/setup.sh" node >&2

[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/petrel-target}"

# Build, then exec the binary itself rather than `cargo run`: that way the node is this process,
# and SIGTERM/SIGINT (Ctrl-C, docker stop, kill) reach it directly for a graceful shutdown.
cargo build --release --manifest-path "$repo/Cargo.toml" -p petrel-node --bin petrel >&2
exec "$CARGO_TARGET_DIR/release/petrel" "$@"
