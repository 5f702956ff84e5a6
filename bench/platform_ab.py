"""The whole platform against a bare Flask route, in alternating rounds: issue 13's ratio.

    .venv/bin/python bench/platform_ab.py [--rounds 6] [--seconds 8] [--connections 32]

A: the trivial Flask route (``{"ok": true}``) under gunicorn gthread, 2 workers x 8
threads, hit directly over TCP. B: ``mtp sidecar`` (HS256 JWT bearer) in front of
``mtp framework`` (2 workers x 8 threads, TCP upstream) serving the same trivial
service. ``wrk -t2 -cN`` drives A then B, then B then A, for ``--rounds`` pairs;
per round: requests/s and CPU µs per request of each side's process trees (A: the
gunicorn tree; B: sidecar + framework trees), from /proc. Printed: every round and
the medians of the pairs' ratios B/A (throughput: target >= 0.55; CPU per
request: target <= 1.8). Every answer must be 2xx: an error answer stops the run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sidecar_wrk import (
    JWT_SECRET,
    PATH,
    TICK,
    bench_dir,
    bench_env,
    free_port,
    start,
    start_upstream,
    stop,
    tree_cpu_ticks,
    wait_for_port,
)


def drive(port: int, headers: dict[str, str], seconds: int, conns: int,
          trees: list[int]) -> tuple[float, float]:
    """(requests/s, CPU µs per request of ``trees``) of one wrk run."""
    args = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    url = f"http://127.0.0.1:{port}{PATH}"
    before = sum(sum(tree_cpu_ticks(p)) for p in trees)
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    after = sum(sum(tree_cpu_ticks(p)) for p in trees)
    errors = re.findall(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        raise SystemExit(f"wrk saw errors on port {port}:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, (after - before) * 1e6 / TICK / max(requests, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="mtp-platform-ab-"))
    procs = []
    try:
        bench_dir(tmp)
        flask_port, fw_port, sc_port = free_port(), free_port(), free_port()
        env = bench_env(tmp, f"127.0.0.1:{fw_port}", MTP_WORKERS="2", MTP_THREADS="8")
        bare = start_upstream("flask", f"127.0.0.1:{flask_port}", env, tmp)
        framework = start_upstream("framework", f"127.0.0.1:{fw_port}", env, tmp)
        procs += [bare, framework]
        wait_for_port(flask_port, bare, timeout=30)
        wait_for_port(fw_port, framework, timeout=30)
        sidecar = start([sys.executable, "-m", "framework", "sidecar"],
                        {**env, "MTP_LISTEN": f"127.0.0.1:{sc_port}"}, tmp / "sidecar.log")
        procs.append(sidecar)
        wait_for_port(sc_port, sidecar, timeout=30)
        time.sleep(3)  # the sidecar loads the service catalog
        token = jwt.encode({"sub": "alice", "tenant_id": "bench",
                            "exp": int(time.time()) + 3600}, JWT_SECRET, "HS256")
        sides = {"A": (flask_port, {}, [bare.pid]),
                 "B": (sc_port, {"Authorization": f"Bearer {token}"},
                       [sidecar.pid, framework.pid])}
        for port, headers, trees in sides.values():  # warm-up: threads, imports, caches
            drive(port, headers, 2, args.connections, trees)
        rps_ratios, cpu_ratios = [], []
        print(f"wrk -t2 -c{args.connections} -d{args.seconds}s, GET {PATH}; "
              f"load average {os.getloadavg()[0]:.2f}")
        print("| round | A req/s | A CPU µs/req | B req/s | B CPU µs/req | B/A req/s | "
              "B/A CPU |")
        print("|---|---|---|---|---|---|---|")
        for n in range(args.rounds):
            order = ("A", "B") if n % 2 == 0 else ("B", "A")
            got = {side: drive(sides[side][0], sides[side][1], args.seconds,
                               args.connections, sides[side][2]) for side in order}
            (a_rps, a_cpu), (b_rps, b_cpu) = got["A"], got["B"]
            rps_ratios.append(b_rps / a_rps)
            cpu_ratios.append(b_cpu / a_cpu)
            print(f"| {n + 1} ({''.join(order)}) | {a_rps:.0f} | {a_cpu:.0f} | {b_rps:.0f} | "
                  f"{b_cpu:.0f} | {rps_ratios[-1]:.2f} | {cpu_ratios[-1]:.2f} |")
        print(f"\nmedian B/A throughput {statistics.median(rps_ratios):.2f} (target >= 0.55), "
              f"CPU per request {statistics.median(cpu_ratios):.2f} (target <= 1.8); "
              f"load average after {os.getloadavg()[0]:.2f}")
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
