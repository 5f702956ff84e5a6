"""Soak: steady mixed load through the sidecar at a fraction of measured capacity.

Starts a real stack (`mtp run`, and a redis-server in ``--mode redis``), measures
capacity with the same request mix flat out (wrk, bench/soak.lua), lets the
job queue drain, then drives ``--fraction`` of that rate for ``--minutes``
one-minute wrk runs back to back: unexpected answers, p99 per minute, and the
RSS of every process (sidecar, framework master and workers, job workers, redis)
at the start and the end. Not a test: numbers for docs/benchmarks.md.

Usage: bench/soak.sh [--minutes 5] [--mode redis|embedded] [--fraction 0.7]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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
from tests.redis.stack import descendants  # noqa: E402

LUA = ROOT / "bench" / "soak.lua"
SIDECAR_SECRET = "soak-sidecar-secret-0123456789abcdef"
JWT_SECRET = "soak-jwt-secret-0123456789abcdef0123456789"
ECHO = 'def handle(context):\n    return {"echo": context.payload}\n'
BROKEN = 'def handle(context):\n    raise ValueError("failing on purpose")\n'
TOML = """[tenant]
id = "soak"
framework_version = "0.1.0"

[auth.jwt]
algorithms = ["HS256"]

[limits]
rate = 1000000
burst = 1000000
"""
SOAK_RE = re.compile(r"SOAK (.*)")


def wrk(url: str, seconds: int, connections: int, rps: float, token: str) -> dict:
    """One wrk run of the mix at ``rps`` in all (0: flat out), two threads."""
    env = dict(os.environ, MTP_TOKEN=token, SOAK_THREAD_RPS=f"{rps / 2:.3f}")
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                          "-s", str(LUA), url], env=env, capture_output=True, text=True,
                         check=True).stdout
    match = SOAK_RE.search(out)
    if match is None:
        raise RuntimeError(out)
    fields = dict(item.split("=", 1) for item in match.group(1).split())
    return {k: (v if k == "statuses" else float(v)) for k, v in fields.items()}


def rss(pids: list[int]) -> dict[str, int]:
    """RSS in KiB per process, named by its role (forked children say whose)."""
    cmds = {pid: cmdline(pid) for pid in pids}
    found = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        ppid = int(re.search(r"PPid:\s+(\d+)", status).group(1))
        role = cmds[pid]
        if cmds.get(ppid) == role:
            grandparent = parent_of(ppid)
            if cmds.get(grandparent) == role or role == "?":
                continue  # an RQ work horse: one per job, short-lived
            role += " (child)"  # a gunicorn worker or an RQ worker
        kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) if "VmRSS" in status else 0
        found[f"{pid} {role}"] = kib
    return found


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return 0


def cmdline(pid: int) -> str:
    """`mtp run`, `framework`, `sidecar`, `worker` or `redis-server`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return "?"
    if "framework" in argv:
        rest = argv[argv.index("framework") + 1:]
        return rest[0] if rest and rest[0] else "?"
    return Path(argv[0]).name


def queue_empty(redis_url: str) -> bool:
    import redis

    from framework.rq_keys import prefix as rq_prefix

    client = redis.Redis.from_url(redis_url)
    try:
        return client.llen(f"{rq_prefix('soak')}:queue:mtp-soak") == 0
    finally:
        client.close()


def job_counts(redis_url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return {s: client.zcard(f"mtp:soak:jobs:{s}")
                for s in ("queued", "running", "succeeded", "failed", "cancelled")}
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=int, default=5)
    ap.add_argument("--mode", choices=("redis", "embedded"), default="redis")
    ap.add_argument("--fraction", type=float, default=0.7)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--capacity-seconds", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mtp-soak-"))
    tenant = root / "tenant"
    (tenant / "services").mkdir(parents=True)
    (tenant / "tenant.toml").write_text(TOML)
    (tenant / "services" / "echo.py").write_text(ECHO)
    (tenant / "services" / "broken.py").write_text(BROKEN)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTP_")}
    env.update(MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(root / "data"),
               MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
               MTP_WORKERS="2", MTP_THREADS="8", MTP_JOB_WORKERS="3",
               MTP_JOB_QUEUE="5000", MTP_LOG_LEVEL="WARNING",
               MTP_AUDIT_FILE=str(root / "audit.log"))
    procs: list[subprocess.Popen] = []
    redis_url = ""
    if args.mode == "redis":
        rport = free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL,
            start_new_session=True))
        wait_for_port(rport)
        redis_url = env["MTP_REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
    log = open(root / "run.log", "ab")  # noqa: SIM115
    run = subprocess.Popen([sys.executable, "-m", "framework", "run", "--tenant-dir",
                            str(tenant)], env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    procs.append(run)
    token = jwt.encode({"sub": "soak", "tenant_id": "soak", "exp": int(time.time()) + 86400},
                       JWT_SECRET, algorithm="HS256")
    url = f"http://127.0.0.1:{port}"
    report: dict = {"mode": args.mode, "connections": args.connections}
    try:
        wait_for_port(port, run, timeout=30)
        time.sleep(2)  # gunicorn workers and job workers up
        wrk(url, 3, args.connections, 0, token)  # warm up
        cap = wrk(url, args.capacity_seconds, args.connections, 0, token)
        report["capacity"] = cap
        deadline = time.monotonic() + 120
        while redis_url and not queue_empty(redis_url) and time.monotonic() < deadline:
            time.sleep(1)
        target = args.fraction * cap["rps"]
        report["target_rps"] = target
        pids = descendants(run.pid) + [p.pid for p in procs if p is not run]
        report["rss_start_kib"] = rss(pids)
        minutes = []
        for minute in range(args.minutes):
            load = Path("/proc/loadavg").read_text().split()[0]
            result = wrk(url, 60, args.connections, target, token)
            result["loadavg_before"] = float(load)
            minutes.append(result)
            print(f"minute {minute + 1}: {json.dumps(result)}", flush=True)
        report["minutes"] = minutes
        report["rss_end_kib"] = rss(pids)
        if redis_url:
            time.sleep(5)
            report["jobs"] = job_counts(redis_url)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
