#!/usr/bin/env bash
# Make the runtime base image of deploy/Dockerfile from Debian's packages, for a machine that
# cannot pull images (no registry) but reaches a Debian mirror:
#
#   deploy/base-image.sh [--force] [--suite bookworm] [--mirror URL] [--tag debian:bookworm-slim]
#
# debootstrap --variant=minbase lays a minimal Debian into a folder, the folder is trimmed the
# way Debian's own "-slim" images are (no manual pages, no documentation but copyright files,
# no locales, no apt lists), and `docker import` turns it into an image under the name the
# Dockerfile's runtime stage uses (debian:bookworm-slim by default). The same Dockerfile then
# builds here, offline, with the binary built on the host:
#
#   deploy/base-image.sh
#   docker build -f deploy/Dockerfile --target prebuilt --build-arg PETREL_BINARY=... .
#
# (see the README's "Container image" section). There is no Rust builder image to make: the
# Dockerfile's default path compiles in rust:1-bookworm, which only a registry has; on a
# machine without one, build on the host and use the `prebuilt` target.
#
# An image of that name that is already there is kept (--force remakes it). Needs root (for
# debootstrap) and Docker. Debian packages are cached under ~/.cache/petrel-tools/debootstrap.
set -euo pipefail

suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tag=""
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --suite) suite="$2"; shift ;;
        --mirror) mirror="$2"; shift ;;
        --tag) tag="$2"; shift ;;
        -h | --help)
            sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "base-image: unknown argument $1 (try --help)" >&2
            exit 2
            ;;
    esac
    shift
done
tag="${tag:-debian:$suite-slim}"

say() { printf 'base-image: %s\n' "$*"; }

if [ "$force" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
    say "$tag is there already (--force remakes it)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "debootstrap needs root: run this with sudo" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi

cache="${XDG_CACHE_HOME:-$HOME/.cache}/petrel-tools/debootstrap/$suite"
mkdir -p "$cache"
work="$(mktemp -d "${TMPDIR:-/tmp}/petrel-rootfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"

say "debootstrap --variant=minbase $suite from $mirror"
# minbase already has what the binary links to (libc, libgcc_s, and libstdc++ for RocksDB's
# C++), like the official -slim image, which has nothing more either.
debootstrap --variant=minbase --cache-dir="$cache" \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    say "debootstrap failed" >&2
    exit 1
}

say "trimming it like Debian's -slim images"
# Keep later `apt-get install`s in derived images slim too (the same rules the official
# -slim images carry).
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* "$root"/var/cache/apt/* \
    "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
    -exec rm -rf {} + 2>/dev/null || true
# No machine id, so every container gets its own; the mirror the image will use.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF
# debootstrap leaves the build host's name and resolver behind; Docker provides both.
: >"$root/etc/hostname"
: >"$root/etc/resolv.conf"

say "docker import as $tag"
tar --numeric-owner --xattrs -C "$root" -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $suite (deploy/base-image.sh)" \
        - "$tag" >/dev/null
size="$(docker image inspect -f '{{.Size}}' "$tag")"
say "made $tag ($((size / 1000 / 1000)) MB)"
