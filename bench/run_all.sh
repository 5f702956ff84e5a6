#!/usr/bin/env bash
# Every benchmark of docs/benchmarks.md in one go, with short settings (~22 min on
# 2 cores). Run on a quiet machine: each script compares figures of its own run.
# The 5-minute soak is separate: bench/soak.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
command -v wrk >/dev/null || { echo "wrk is needed: make servers" >&2; exit 1; }
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.txt"
}
run framework    $PY bench/framework_wrk.py --duration 5 --rounds 3 --breakdown
run dispatch     $PY bench/dispatch_micro.py
run sidecar      bench/sidecar_wrk.sh 5 32
run sidecar-py   $PY bench/sidecar_micro.py 20000
run sidecar-rate $PY bench/sidecar_rate.py 3 32
run halfload     $PY bench/sidecar_halfload.py 5 1
run tracing      $PY bench/tracing_cost.py 5000
run limiter      $PY bench/limiter_micro.py
run scale-limit  $PY bench/scale_limiter.py
run ldap         $PY bench/ldap_cost.py --seconds 3
run metering     $PY bench/ops_metering.py
run overlay      $PY bench/ops_overlay.py --rounds 20
run attribution  $PY bench/ops_load.py --seconds 10
run redis        $PY bench/redis_overhead.py --seconds 5
echo "results in $out"
