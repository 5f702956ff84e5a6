#!/bin/sh
# Soak: 5 minutes of mixed load (sync, async, failing) through the sidecar at 70% of
# the capacity measured in the same run; see bench/soak.py for what is reported.
# Usage: bench/soak.sh [--minutes 5] [--mode redis|embedded] [--fraction 0.7] [--out FILE]
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/soak.py "$@"
