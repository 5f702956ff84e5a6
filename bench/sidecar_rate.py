"""The sidecar's CPU per request as a function of the request rate, with an idle upstream.

    bench/sidecar_rate.py [seconds per run, default 5] [connections, default 32]

The upstream is the tests' echo server answering ``GET /slow?s=D`` after sleeping D
seconds, so it uses almost no CPU whatever D is, and 32 connections make the rate
about 32/D. The sidecar (JWT bearer auth, limits, signing, audit, unix-socket
upstream) and, for reference, the naive aiohttp proxy (bench/naive_proxy.py) are
measured in the same interleaved rounds: requests/s and CPU µs per request of each
process tree from /proc, the median of 3 rounds.

Why: with a fast upstream many requests arrive per event-loop wake-up; with a slower
one each request wakes the process on its own, twice (the client's request, then the
upstream's answer), and pays a context switch and cold caches each time. This run
shows how much of the per-request figure of bench/sidecar_wrk.py is that.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sidecar_wrk import (  # noqa: E402
    JWT_SECRET,
    SIDECAR_SECRET,
    TENANT,
    TICK,
    bench_env,
    start,
    start_upstream,
    stop,
    tree_cpu_ticks,
)

from framework import signing  # noqa: E402
from tests.helpers import free_port, wait_for_port, wait_for_unix  # noqa: E402

DELAYS = (0.0, 0.002, 0.004, 0.008, 0.016)
ROUNDS = 3


def signed(path: str) -> list[str]:
    """wrk arguments for identity headers signed as the sidecar would (valid 30 s)."""
    ident = {"X-Request-ID": "bench", "X-Tenant-ID": "bench", "X-User-ID": "alice",
             "X-User-Groups": "", "X-User-Roles": "", "X-Auth-Method": "jwt"}
    ident.update(signing.sign(SIDECAR_SECRET.encode(), "GET", path, ident))
    return [arg for k, v in ident.items() for arg in ("-H", f"{k}: {v}")]


def measure(port: int, path: str, headers: list[str] | None, seconds: int, conns: int,
            pid: int) -> tuple[float, float, float]:
    """(requests/s, CPU µs per request, user CPU µs per request) of ``pid``'s tree.

    ``headers`` None: identity headers signed for ``path`` (for the naive proxy, which
    passes them through and does not sign).
    """
    url = f"http://127.0.0.1:{port}{path}"
    args = ["wrk", "-t1", f"-c{conns}", *(signed(path) if headers is None else headers)]
    subprocess.run([*args, "-d1s", url], capture_output=True, check=True)  # warm up
    user0, sys0 = tree_cpu_ticks(pid)
    out = subprocess.run([*args, f"-d{seconds}s", url], capture_output=True, text=True,
                         check=True).stdout
    user1, sys1 = tree_cpu_ticks(pid)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if re.search(r"Non-2xx|Socket errors", out):
        sys.exit(f"errors in the run:\n{out}")
    per = 1e6 / TICK / max(requests, 1)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, (user1 - user0 + sys1 - sys0) * per, (user1 - user0) * per


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    conns = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    load_before = f"{os.getloadavg()[0]:.2f}"
    tmp = Path(tempfile.mkdtemp(prefix="mtp-bench-rate-"))
    procs = []
    try:
        (tmp / "tenant").mkdir()
        (tmp / "tenant" / "tenant.toml").write_text(TENANT)
        (tmp / "data").mkdir()
        upstream = f"unix:{tmp / 'data' / 'echo.sock'}"
        env = bench_env(tmp, upstream)
        py = sys.executable
        echo = start_upstream("echo", upstream, env, tmp)
        procs.append(echo)
        wait_for_unix(upstream[5:], echo, timeout=30)
        sc_port, nv_port = free_port(), free_port()
        sc = start([py, "-m", "framework", "sidecar"],
                   {**env, "MTP_LISTEN": f"127.0.0.1:{sc_port}"}, tmp / "sidecar.log")
        nv = start([py, str(ROOT / "bench" / "naive_proxy.py"), str(nv_port), upstream], env,
                   tmp / "naive.log")
        procs += [sc, nv]
        wait_for_port(sc_port, sc, timeout=30)
        wait_for_port(nv_port, nv, timeout=30)
        token = jwt.encode({"sub": "alice", "tenant_id": "bench",
                            "exp": int(time.time()) + 3600}, JWT_SECRET, "HS256")
        variants = (("sidecar+JWT", sc_port, ["-H", f"Authorization: Bearer {token}"], sc),
                    ("naive aiohttp", nv_port, None, nv))
        rows: list[tuple[float, dict[str, tuple[float, float, float]]]] = []
        for delay in DELAYS:
            path = f"/slow?s={delay}"
            runs: dict[str, list[tuple[float, float, float]]] = {v[0]: [] for v in variants}
            for _ in range(ROUNDS):
                for name, port, headers, proc in variants:
                    runs[name].append(measure(port, path, headers, seconds, conns, proc.pid))
            rows.append((delay, {name: sorted(r)[ROUNDS // 2] for name, r in runs.items()}))
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrk -t1 -c{conns} -d{seconds}s, GET /slow?s=D on the echo upstream (unix socket); "
          f"median of {ROUNDS} rounds; {os.cpu_count()} cores; load average before/after: "
          f"{load_before} / {os.getloadavg()[0]:.2f}")
    print("| upstream delay | sidecar req/s | sidecar CPU µs/req | naive req/s "
          "| naive CPU µs/req | sidecar / naive |")
    print("|---|---|---|---|---|---|")
    for delay, r in rows:
        sc_rps, sc_cpu, sc_user = r["sidecar+JWT"]
        nv_rps, nv_cpu, nv_user = r["naive aiohttp"]
        print(f"| {delay * 1000:g} ms | {sc_rps:.0f} | {sc_cpu:.0f} ({sc_user:.0f} user) | "
              f"{nv_rps:.0f} | {nv_cpu:.0f} ({nv_user:.0f} user) | {sc_cpu / nv_cpu:.2f} |")


if __name__ == "__main__":
    main()
