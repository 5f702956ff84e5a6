"""Two sidecar builds against one upstream, in alternating rounds: the paired CPU ratio.

    bench/sidecar_ab.py OTHER [--kind flask|echo] [--rounds 12] [--seconds 4]
                              [--connections 32]

``OTHER`` is a second checkout (a ``git worktree``, or a build with compiled modules);
``A`` is this checkout. One upstream (the issue's bare Flask route under gunicorn
gthread, or the tests' echo server) listens on a unix socket; both sidecars (JWT
bearer auth, limits, signing, audit) run in front of it at once, and ``wrk`` drives
them in turn, A then B, then B then A, for ``--rounds`` pairs. Per round: requests/s
and CPU µs per request of each sidecar process from /proc.

Why paired: on this machine whole phases run at half speed, so the CPU per request of
one build moves by ±20% from one run to the next. Each pair runs seconds apart under
the same load, and the median of the pairs' ratios (B/A) is what a change is judged by.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sidecar_rate import measure  # noqa: E402
from sidecar_wrk import (  # noqa: E402
    JWT_SECRET,
    PATH,
    bench_dir,
    bench_env,
    start,
    start_upstream,
    stop,
)

from tests.helpers import free_port, wait_for_port, wait_for_unix  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("other", type=Path, help="the checkout of build B")
    parser.add_argument("--kind", choices=("flask", "echo"), default="flask")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mtp-bench-ab-"))
    bench_dir(tmp)
    upstream = f"unix:{tmp}/upstream.sock"
    env = bench_env(tmp, upstream)
    py = sys.executable
    up = start_upstream(args.kind, upstream, env, tmp)
    sidecars: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        wait_for_unix(upstream[5:], up, timeout=30)
        # "python -m" imports from the working directory first: each checkout's sidecar.
        for name, checkout in (("A", ROOT), ("B", args.other.resolve())):
            port = free_port()
            proc = start([py, "-m", "framework", "sidecar"],
                         {**env, "MTP_LISTEN": f"127.0.0.1:{port}"}, tmp / f"{name}.log",
                         cwd=str(checkout))
            sidecars[name] = (proc, port)
            wait_for_port(port, proc, timeout=30)
        token = jwt.encode({"sub": "alice", "tenant_id": "bench",
                            "exp": int(time.time()) + 3600}, JWT_SECRET, "HS256")
        bearer = ["-H", f"Authorization: Bearer {token}"]
        rounds: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
        print(f"{args.kind} upstream, unix socket; wrk -t1 -c{args.connections} "
              f"-d{args.seconds}s per round (after 1 s of warm-up); 2 cores; load average "
              f"{os.getloadavg()[0]:.2f}")
        print("| round | A req/s | A CPU µs/req | B req/s | B CPU µs/req | B/A CPU |")
        print("|---|---|---|---|---|---|")
        for i in range(args.rounds):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                proc, port = sidecars[name]
                rounds[name].append(measure(port, PATH, bearer, args.seconds,
                                            args.connections, proc.pid))
            (ar, ac, _), (br, bc, _) = rounds["A"][-1], rounds["B"][-1]
            print(f"| {i + 1} | {ar:.0f} | {ac:.0f} | {br:.0f} | {bc:.0f} | {bc / ac:.3f} |",
                  flush=True)
        ratios = [b[1] / a[1] for a, b in zip(rounds["A"], rounds["B"], strict=True)]
        ratio = statistics.median(ratios)
        med = {n: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
               for n, rs in rounds.items()}
        print(f"| median | {med['A'][0]:.0f} | {med['A'][1]:.1f} | {med['B'][0]:.0f} | "
              f"{med['B'][1]:.1f} | **{ratio:.3f}** |")
        print(f"\npaired B/A CPU ratio: median {ratio:.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}; no errors (any stops the run); "
              f"load average {os.getloadavg()[0]:.2f}")
    finally:
        for proc, _ in sidecars.values():
            stop(proc)
        stop(up)


if __name__ == "__main__":
    main()
