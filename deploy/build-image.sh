#!/usr/bin/env bash
# Build the Petrel container image from deploy/Dockerfile.
#
#   deploy/build-image.sh [--tag petrel:dev]                  compile in rust:1-bookworm (default)
#   deploy/build-image.sh --prebuilt BINARY [--tag petrel:dev] package a binary built on the host
#
# --prebuilt strips a copy of BINARY (the original is left alone) into a temporary folder and
# builds the Dockerfile's `prebuilt` stage with that folder as the context, so the image gets
# the same user, volume, ports and entry point as the compiled one. The binary must run on
# Debian bookworm's glibc, which a binary built on a bookworm host does.
#
# If the runtime base image (debian:bookworm-slim) is not there and cannot be pulled, it is
# made from Debian's packages with deploy/base-image.sh (needs root).
#
# Prints the image's tag and size at the end.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag=petrel:dev
prebuilt=""
base=debian:bookworm-slim
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift ;;
        --prebuilt) prebuilt="$2"; shift ;;
        -h | --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build-image: unknown argument $1 (try --help)" >&2
            exit 2
            ;;
    esac
    shift
done

say() { printf 'build-image: %s\n' "$*"; }

if ! docker image inspect "$base" >/dev/null 2>&1; then
    if ! docker pull -q "$base" >/dev/null 2>&1; then
        say "$base cannot be pulled here: making it from Debian's packages"
        "$repo/deploy/base-image.sh"
    fi
fi

if [ -z "$prebuilt" ]; then
    say "docker build -f deploy/Dockerfile -t $tag (compiles in the Rust image)"
    docker build -f "$repo/deploy/Dockerfile" -t "$tag" "$repo"
else
    [ -x "$prebuilt" ] || { say "no executable at $prebuilt" >&2; exit 1; }
    ctx="$(mktemp -d "${TMPDIR:-/tmp}/petrel-image.XXXXXX")"
    trap 'rm -rf "$ctx"' EXIT
    # Line tables and debug info stay on the host (keep the original for a debugger).
    objcopy --strip-all "$prebuilt" "$ctx/petrel"
    chmod 0755 "$ctx/petrel"
    say "stripped $(stat -c %s "$prebuilt") -> $(stat -c %s "$ctx/petrel") bytes"
    say "docker build -f deploy/Dockerfile --target prebuilt -t $tag"
    docker build -f "$repo/deploy/Dockerfile" --target prebuilt -t "$tag" "$ctx"
fi
size="$(docker image inspect -f '{{.Size}}' "$tag")"
say "built $tag: $((size / 1000 / 1000)) MB"
