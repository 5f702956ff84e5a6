#!/bin/sh
# Sidecar vs direct vs nginx, same run, same machine: see bench/sidecar_wrk.py.
# Usage: bench/sidecar_wrk.sh [seconds per run, default 10] [connections, default 32]
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/sidecar_wrk.py "$@"
