"""Warm-call CPU of one tenant served by a pool against the same tenant's own stack.

The same tenant directory (one trivial service, an API key) is served by ``mtp pool``
(the pool's sidecar, the warm parent, the tenant's process) and by ``mtp run`` (the
tenant image's two processes: sidecar and framework), both with one gunicorn worker of
four threads (the pool's default). wrk (2 threads, 16 connections) calls it for
``--seconds``; CPU per request = user+system time of the whole process tree over the
run divided by the requests wrk completed. A and B alternate ``--rounds`` times on fresh
processes; the ratio is the median of each round's pool / image.

    .venv/bin/python bench/pool_vs_image.py [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pool_bench import write_bundles
from tests.helpers import base_env, free_port, spawn, stop, wait_for_port

TICKS = os.sysconf("SC_CLK_TCK")
LUA = """wrk.method = "POST"
wrk.body = "{}"
wrk.headers["X-API-Key"] = "key-t00000"
wrk.headers["X-Tenant-ID"] = "t00000"
"""


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant."""
    found = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for kid in (task / "children").read_text().split():
                found += tree(int(kid))
    except OSError:
        pass
    return found


def cpu(pid: int) -> float:
    """User+system seconds of ``pid``'s tree (children that exited are not counted)."""
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def measure(pid: int, port: int, seconds: int, script: Path) -> tuple[float, float]:
    """(requests/s, CPU µs per request) of one wrk run."""
    before = cpu(pid)
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", "-s", str(script),
                          f"http://127.0.0.1:{port}/services/hello"],
                         capture_output=True, text=True, check=True).stdout
    used = cpu(pid) - before
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise SystemExit(f"errors during the run:\n{out}")
    return done / seconds, used / done * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mtp-pool-vs-image-"))
    write_bundles(tmp, 1)
    toml = tmp / "bundles" / "t00000" / "tenant.toml"  # no rate limit in the way
    toml.write_text(toml.read_text().replace("rate = 1000\nburst = 1000",
                                             "rate = 1000000\nburst = 1000000"))
    script = tmp / "hello.lua"
    script.write_text(LUA)
    common = dict(MTP_SIDECAR_SECRET="bench-pool-secret-0123456789abcdef", MTP_WORKERS="1",
                  MTP_THREADS="4", MTP_LOG_LEVEL="WARNING")
    rows: dict[str, list[tuple[float, float]]] = {"pool": [], "image": []}
    for round_no in range(args.rounds):
        for kind in ("pool", "image"):
            port = free_port()
            data = tmp / f"{kind}-{round_no}"
            data.mkdir()
            env = base_env(**common, MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(data),
                           MTP_AUDIT_FILE=str(data / "audit.log"))
            if kind == "pool":
                cmd = [sys.executable, "-m", "framework", "pool", "--name", "bench",
                       "--bundles", str(tmp / "bundles")]
                env["MTP_POOL_RUN_DIR"] = str(tmp / f"run-{round_no}")
            else:
                cmd = [sys.executable, "-m", "framework", "run", "--tenant-dir",
                       str(tmp / "bundles" / "t00000")]
            proc = spawn(cmd, env, log=tmp / f"{kind}-{round_no}.log")
            try:
                wait_for_port(port, proc, timeout=60)
                measure(proc.pid, port, 2, script)  # warm: the tenant's process, caches
                time.sleep(0.5)
                rows[kind].append(measure(proc.pid, port, args.seconds, script))
            finally:
                stop(proc, timeout=60)
    ratios = [p[1] / i[1] for p, i in zip(rows["pool"], rows["image"], strict=True)]
    print(f"Command: `.venv/bin/python bench/pool_vs_image.py --rounds {args.rounds} "
          f"--seconds {args.seconds}`; load average {os.getloadavg()[0]:.2f} at the end")
    print("| round | pool req/s | pool CPU µs/req | image req/s | image CPU µs/req | ratio |")
    print("|---|---|---|---|---|---|")
    for n, (p, i) in enumerate(zip(rows["pool"], rows["image"], strict=True)):
        print(f"| {n + 1} | {p[0]:.0f} | {p[1]:.0f} | {i[0]:.0f} | {i[1]:.0f} | "
              f"{p[1] / i[1]:.2f} |")
    print(f"median ratio (pool / image CPU per warm call): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
