# Sourced by scripts/setup.sh and loadtest/bench.sh: run a command as root, directly when we
# are root, through sudo when it is there; otherwise say so on stderr and return 1.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        printf 'need root to run: %s\n' "$*" >&2
        return 1
    fi
}
