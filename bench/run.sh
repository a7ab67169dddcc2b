#!/usr/bin/env bash
# One command for the load benchmarks: bash bench/run.sh [bench.py options, e.g. --quick]
# Installs wrk (and nginx-light, best effort), prepares the project venv, then runs bench/bench.py.
# BENCH_SKIP_INSTALL=1 skips the pip step (venv already set up).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "run.sh: need root (or sudo) for: $*" >&2; return 1; fi
}

apt_install() {
    # Try without a refresh first: apt-get update is slow and usually not needed.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" \
        || { as_root apt-get update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"; }
}

if ! command -v wrk >/dev/null; then
    echo "run.sh: installing wrk" >&2
    apt_install wrk
fi
if ! command -v nginx >/dev/null; then
    echo "run.sh: installing nginx-light (best effort; the nginx target is skipped without it)" >&2
    apt_install nginx-light || echo "run.sh: nginx not installed; continuing without it" >&2
fi

if ! command -v caddy >/dev/null; then
    echo "run.sh: installing caddy (best effort; the caddy targets are skipped without it)" >&2
    apt_install caddy || echo "run.sh: caddy not installed; continuing without it" >&2
fi

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
if [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
    .venv/bin/python -m pip install --quiet -e '.[dev]'
fi

exec .venv/bin/python bench/bench.py "$@"
