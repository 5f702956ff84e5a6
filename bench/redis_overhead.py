"""Redis mode vs embedded mode, same run: wrk through the sidecar of a real `mtp run`.

For each mode (alternated for ``--rounds`` rounds, so drift on a shared machine hits
both alike): sync calls (``POST /services/echo``: the limiter decision is in Redis
or in memory), then async submits (``?mode=async``: a job recorded and queued in
Redis via RQ, or in SQLite and a local thread pool), then the time until every
accepted job has finished (how fast the job workers drain what was accepted).

Usage: .venv/bin/python bench/redis_overhead.py [--seconds 10] [--connections 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import free_port, wait_for_port  # noqa: E402

LUA = ROOT / "bench" / "redis_overhead.lua"
SIDECAR_SECRET = "bench-sidecar-secret-0123456789abcdef"
JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
TOML = """[tenant]
id = "bench"
framework_version = "0.1.0"

[auth.jwt]
algorithms = ["HS256"]

[limits]
rate = 1000000
burst = 1000000
"""
LINE = re.compile(r"RESULT (.*)")


def wrk(url: str, path: str, seconds: int, connections: int, token: str) -> dict[str, float]:
    env = dict(os.environ, MTP_TOKEN=token, BENCH_PATH=path)
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(LUA), url], env=env, capture_output=True, text=True,
                         check=True).stdout
    match = LINE.search(out)
    if match is None:
        raise RuntimeError(out)
    return {k: float(v) for k, v in (p.split("=") for p in match.group(1).split())}


def stack(mode: str, root: Path) -> tuple[subprocess.Popen, list[subprocess.Popen], str, str]:
    """Start `mtp run` (and redis-server for mode redis); returns procs, url, redis url."""
    tenant = root / mode / "tenant"
    (tenant / "services").mkdir(parents=True)
    (tenant / "tenant.toml").write_text(TOML)
    (tenant / "services" / "echo.py").write_text(
        'def handle(context):\n    return {"echo": context.payload}\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTP_")}
    env.update(MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(root / mode / "data"),
               MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
               MTP_WORKERS="2", MTP_THREADS="8", MTP_JOB_WORKERS="3",
               MTP_JOB_QUEUE="100000", MTP_LOG_LEVEL="WARNING",
               MTP_AUDIT_FILE=str(root / mode / "audit.log"))
    extra: list[subprocess.Popen] = []
    redis_url = ""
    if mode == "redis":
        rport = free_port()
        extra.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL))
        wait_for_port(rport)
        redis_url = env["MTP_REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
    run = subprocess.Popen([sys.executable, "-m", "framework", "run", "--tenant-dir",
                            str(tenant)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port, run, timeout=30)
    time.sleep(2)
    return run, extra, f"http://127.0.0.1:{port}", redis_url


def unfinished(mode: str, root: Path, redis_url: str) -> int:
    if mode == "redis":
        import redis

        client = redis.Redis.from_url(redis_url)
        try:
            return sum(client.zcard(f"mtp:bench:jobs:{s}") for s in ("queued", "running"))
        finally:
            client.close()
    import sqlite3

    conn = sqlite3.connect(root / mode / "data" / "jobs.sqlite3")
    try:
        return conn.execute("SELECT COUNT(*) FROM jobs WHERE status IN "
                            "('queued', 'running')").fetchone()[0]
    finally:
        conn.close()


def measure(mode: str, root: Path, seconds: int, connections: int,
            token: str) -> dict[str, float]:
    run, extra, url, redis_url = stack(mode, root)
    try:
        wrk(url, "/services/echo", 3, connections, token)  # warm up
        sync = wrk(url, "/services/echo", seconds, connections, token)
        submit = wrk(url, "/services/echo?mode=async", seconds, connections, token)
        start = time.monotonic()
        while unfinished(mode, root, redis_url) and time.monotonic() - start < 600:
            time.sleep(0.2)
        drain = time.monotonic() - start
        return {"sync_rps": sync["rps"], "sync_p50": sync["p50_ms"], "sync_p99": sync["p99_ms"],
                "sync_bad": sync["unexpected"], "async_rps": submit["rps"],
                "async_p99": submit["p99_ms"], "async_bad": submit["unexpected"],
                "accepted": submit["accepted"], "drain_s": drain,
                "jobs_per_s": submit["accepted"] / (seconds + drain)}
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
        for proc in extra:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    token = jwt.encode({"sub": "bench", "tenant_id": "bench", "exp": int(time.time()) + 86400},
                       JWT_SECRET, algorithm="HS256")
    print("| round | mode | sync req/s | sync p50 ms | sync p99 ms | async submits/s | "
          "async p99 ms | jobs accepted | drain after load | jobs finished/s | "
          "unexpected answers |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rnd in range(1, args.rounds + 1):
        for mode in ("embedded", "redis"):
            with tempfile.TemporaryDirectory(prefix="mtp-overhead-") as tmp:
                r = measure(mode, Path(tmp), args.seconds, args.connections, token)
            print(f"| {rnd} | {mode} | {r['sync_rps']:.0f} | {r['sync_p50']:.1f} | "
                  f"{r['sync_p99']:.1f} | {r['async_rps']:.0f} | {r['async_p99']:.1f} | "
                  f"{r['accepted']:,.0f} | {r['drain_s']:.1f} s | {r['jobs_per_s']:.0f} | "
                  f"{r['sync_bad'] + r['async_bad']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
