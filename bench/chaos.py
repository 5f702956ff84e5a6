"""Chaos: the platform under steady mixed load while its parts fail, one after another.

Starts a real stack (`mtp run` with a redis-server that persists with AOF
``appendfsync always``, a slapd behind ``[auth.ldap]``, the data dir on a small tmpfs
where the machine lets root mount one), measures capacity with the same request mix
flat out, then drives ``--fraction`` of it (sync calls and async jobs mixed) for
``--minutes``. The run is cut into phases; each phase but the first starts with one
fault:

  kill-fw-worker   SIGKILL one gunicorn worker of the framework
  kill-job-worker  SIGKILL one RQ worker process of `mtp worker`
  kill-redis       SIGKILL redis-server, restart it from its AOF 8 s later
  stop-ldap        stop slapd for 10 s
  stop-framework   SIGSTOP every framework process for 10 s, then SIGCONT
  disk-full        fill the data dir's filesystem for 10 s (skipped, with the
                   reason, where no tmpfs can be mounted)

`mtp run` exiting (a hung child is a dead one) is a container restart: the script
starts it again and counts it. Every accepted job is followed to its end. Reported
per phase: answers by status, the longest client wait, jobs accepted and lost
(not ``succeeded`` in the end), and the stack's RSS over time. Not a test: numbers
for docs/benchmarks.md.

Usage: .venv/bin/python bench/chaos.py [--minutes 10] [--fraction 0.5]   (make chaos)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.soak import cmdline, parent_of  # noqa: E402
from tests.helpers import free_port, wait_for_port  # noqa: E402
from tests.redis.stack import descendants  # noqa: E402
from tests.servers import RedisServer, SlapdServer  # noqa: E402

SIDECAR_SECRET = "chaos-sidecar-secret-0123456789abcdef"
JWT_SECRET = "chaos-jwt-secret-0123456789abcdef0123456789"
TENANT = "chaos"
SYNC_TIMEOUT = 2.0  # [services.echo] timeout: a client waits at most this + 1 s
JOB_TIMEOUT = 10.0  # [services.work] timeout: the deadline of the call that queues a job
JOB_SECONDS = 0.05
# One call in JOB_EVERY queues a job: at half the measured HTTP capacity (~600/s here)
# that is ~30 jobs/s, half of what three job workers finish (0.05 s each), so the
# queue only fills while a fault holds the workers up.
JOB_EVERY = 20
USERS = ("alice", "bob", "carol")  # in tests/data/directory.ldif
FAULTS = ("kill-fw-worker", "kill-job-worker", "kill-redis", "stop-ldap", "stop-framework",
          "disk-full")
ECHO = 'def handle(context):\n    return {"echo": context.payload}\n'
WORK = ('"""A short job."""\nimport time\n\n\ndef handle(context):\n'
        f'    time.sleep({JOB_SECONDS})\n    return {{"n": (context.payload or {{}}).get("n")}}\n')


def tenant_toml(ldap: SlapdServer) -> str:
    return f"""[tenant]
id = "{TENANT}"
framework_version = "0.1.0"

[services.echo]
mode = "sync"
timeout = {SYNC_TIMEOUT}

[services.work]
mode = "async"
timeout = {JOB_TIMEOUT:g}

[auth.jwt]
algorithms = ["HS256"]

[limits]
rate = 1000000
burst = 1000000

{ldap.toml()}"""


@dataclass
class Phase:
    """What one phase saw."""

    name: str
    note: str = ""
    statuses: Counter = field(default_factory=Counter)
    longest: float = 0.0
    late: int = 0  # answered after deadline + 1 s (or never)
    accepted: list[str] = field(default_factory=list)
    restarts: int = 0
    lost: int = 0


@dataclass
class Stack:
    root: Path
    tenant: Path
    env: dict[str, str]
    redis: RedisServer
    ldap: SlapdServer
    data: Path
    tmpfs: bool
    run: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "run.log", "ab")  # noqa: SIM115
        self.run = subprocess.Popen(
            [sys.executable, "-m", "framework", "run", "--tenant-dir", str(self.tenant)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(int(self.env["MTP_LISTEN"].rpartition(":")[2]), self.run, timeout=60)

    def alive(self) -> bool:
        return self.run is not None and self.run.poll() is None

    def processes(self, role: str) -> list[int]:
        """Pids of ``role`` ("framework", "worker", ...) below `mtp run`."""
        if self.run is None:
            return []
        return [p for p in descendants(self.run.pid) if cmdline(p) == role]

    def children_of(self, role: str) -> list[int]:
        """Forked children of a ``role`` process (gunicorn workers, RQ workers)."""
        procs = self.processes(role)
        return [p for p in procs if cmdline(parent_of(p)) == role]

    def rss_kib(self) -> int:
        total = 0
        pids = (descendants(self.run.pid) if self.run else []) + [
            p for p in (self.redis.pid, self.ldap.pid) if p]
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def stop(self) -> None:
        if self.run is not None and self.run.poll() is None:
            self.run.send_signal(signal.SIGTERM)
            try:
                self.run.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.run.pid, signal.SIGKILL)
        self.redis.stop()
        self.ldap.stop()
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.data)], check=False)


def build(root: Path) -> Stack:
    ldap = SlapdServer(root / "slapd").setup()
    ldap.start()
    redis = RedisServer(root / "redis", persist=True)
    redis.start()
    tenant = root / "tenant"
    (tenant / "services").mkdir(parents=True)
    (tenant / "tenant.toml").write_text(tenant_toml(ldap))
    (tenant / "services" / "echo.py").write_text(ECHO)
    (tenant / "services" / "work.py").write_text(WORK)
    data = root / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)],
                             capture_output=True, check=False).returncode == 0
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTP_")}
    env.update(MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(data),
               MTP_UPSTREAM=f"unix:{root / 'fw.sock'}",
               MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
               MTP_LDAP_PASSWORD=ldap.bind_password, MTP_REDIS_URL=redis.url,
               MTP_WORKERS="2", MTP_THREADS="8", MTP_JOB_WORKERS="3", MTP_JOB_QUEUE="5000",
               MTP_LOG_LEVEL="WARNING", MTP_AUDIT_FILE=str(root / "audit.log"))
    return Stack(root, tenant, env, redis, ldap, data, mounted)


class Load:
    """An open-loop client: requests start on schedule whatever the answers do."""

    def __init__(self, url: str, stack: Stack) -> None:
        self.url, self.stack = url, stack
        self.tokens = [jwt.encode({"sub": u, "tenant_id": TENANT,
                                   "exp": int(time.time()) + 86400}, JWT_SECRET,
                                  algorithm="HS256") for u in USERS]
        self.phase = Phase("warm-up")
        self.session: aiohttp.ClientSession | None = None
        self.n = 0

    async def one(self, phase: Phase) -> None:
        assert self.session is not None
        self.n += 1
        n, token = self.n, random.choice(self.tokens)
        is_job = n % JOB_EVERY == 0
        path = "/services/work" if is_job else "/services/echo"
        started = time.monotonic()
        limit = (JOB_TIMEOUT if is_job else SYNC_TIMEOUT) + 1
        try:
            async with self.session.post(
                    self.url + path, json={"n": n},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=aiohttp.ClientTimeout(total=limit + 30)) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            status, body = type(exc).__name__, b""
        waited = time.monotonic() - started
        phase.statuses[status] += 1
        phase.longest = max(phase.longest, waited)
        if waited > limit:
            phase.late += 1
        if is_job and status == 202:
            phase.accepted.append(json.loads(body)["job_id"])

    async def drive(self, rps: float, seconds: float, phase: Phase) -> None:
        """``rps`` requests a second for ``seconds``, each on its own task."""
        tasks: set[asyncio.Task] = set()
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            due = start + i / rps
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self.one(phase))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def capacity(self, seconds: float, concurrency: int = 16) -> float:
        phase = Phase("capacity")
        end = time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < end:
                await self.one(phase)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return sum(phase.statuses.values()) / seconds


async def fault(stack: Stack, name: str) -> str:
    """Start one fault; returns a note (what was done, or why it was skipped)."""
    if name == "kill-fw-worker":
        pids = stack.children_of("framework")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
        return f"SIGKILL gunicorn worker {pids[:1]}"
    if name == "kill-job-worker":
        pids = stack.children_of("worker")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
        return f"SIGKILL RQ worker {pids[:1]}"
    if name == "kill-redis":
        assert stack.redis.proc is not None
        stack.redis.proc.send_signal(signal.SIGKILL)
        stack.redis.proc.wait(10)
        stack.redis.proc = None
        await asyncio.sleep(8)
        stack.redis.start()
        return "SIGKILL redis-server, restarted from AOF after 8 s"
    if name == "stop-ldap":
        stack.ldap.stop()
        await asyncio.sleep(10)
        stack.ldap.start()
        return "slapd stopped for 10 s"
    if name == "stop-framework":
        pids = stack.processes("framework")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP {len(pids)} framework processes for 10 s"
    if name == "disk-full":
        if not stack.tmpfs:
            return "skipped: no tmpfs could be mounted here (needs root and mount rights)"
        filler = stack.data / "filler"
        with open(filler, "wb") as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * (1 << 20))
        await asyncio.sleep(10)
        filler.unlink()
        return "data dir's tmpfs filled for 10 s"
    raise ValueError(name)


async def settle(load: Load, phases: list[Phase], timeout: float = 300) -> None:
    """Follow every accepted job to its end; what is not ``succeeded`` then is lost."""
    assert load.session is not None
    session = load.session
    # A job is visible to its creator and to role admin: one admin token reads them all.
    admin = jwt.encode({"sub": "chaos-admin", "tenant_id": TENANT, "roles": ["admin"],
                        "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256")
    deadline = time.monotonic() + timeout
    gate = asyncio.Semaphore(16)

    async def final(job_id: str) -> str:
        status = "?"
        while time.monotonic() < deadline:
            async with gate:
                try:
                    async with session.get(
                            f"{load.url}/jobs/{job_id}",
                            headers={"Authorization": f"Bearer {admin}"}) as resp:
                        doc = await resp.json(content_type=None)
                        status = doc.get("status", str(resp.status))
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    status = "unreachable"
            if status in ("succeeded", "failed", "cancelled", "404"):
                return status
            await asyncio.sleep(0.5)
        return status

    for phase in phases:
        ends = await asyncio.gather(*(final(job_id) for job_id in phase.accepted))
        lost = [(j, e) for j, e in zip(phase.accepted, ends, strict=True) if e != "succeeded"]
        phase.note += f"; lost {lost[:3]}" if lost else ""
        phase.lost = len(lost)


async def main_async(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mtp-chaos-"))
    stack = build(root)
    report: dict = {"tmpfs": stack.tmpfs, "phases": [], "rss_kib": []}
    try:
        stack.start()
        load = Load(f"http://127.0.0.1:{stack.env['MTP_LISTEN'].rpartition(':')[2]}", stack)
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256)) as session:
            load.session = session
            await asyncio.sleep(3)  # gunicorn and job workers up
            await load.capacity(3)
            capacity = await load.capacity(args.capacity_seconds)
            rps = args.fraction * capacity
            report.update(capacity_rps=round(capacity, 1), target_rps=round(rps, 1))
            print(f"capacity {capacity:.0f} req/s, driving {rps:.0f} req/s", flush=True)
            names = ["baseline", *FAULTS]
            seconds = args.minutes * 60 / len(names)
            phases: list[Phase] = []
            started = time.monotonic()

            async def sample_rss() -> None:
                while True:
                    report["rss_kib"].append((round(time.monotonic() - started),
                                              stack.rss_kib()))
                    await asyncio.sleep(10)

            sampler = asyncio.ensure_future(sample_rss())
            for name in names:
                phase = Phase(name)
                phases.append(phase)
                driving = asyncio.ensure_future(load.drive(rps, seconds, phase))
                if name != "baseline":
                    phase.note = await fault(stack, name)
                while not driving.done():
                    if not stack.alive():
                        phase.restarts += 1
                        code = stack.run.returncode if stack.run else None
                        phase.note += f"; mtp run exited {code}, restarted"
                        stack.start()
                    await asyncio.sleep(0.5)
                await driving
                print(f"{name}: {dict(phase.statuses)} longest {phase.longest:.2f}s "
                      f"late {phase.late} accepted {len(phase.accepted)} {phase.note}",
                      flush=True)
            sampler.cancel()
            await settle(load, phases)
            for phase in phases:
                report["phases"].append({
                    "phase": phase.name, "note": phase.note.lstrip("; "),
                    "statuses": {str(k): v for k, v in sorted(phase.statuses.items(),
                                                              key=lambda kv: str(kv[0]))},
                    "longest_wait_s": round(phase.longest, 2), "late": phase.late,
                    "jobs_accepted": len(phase.accepted), "jobs_lost": phase.lost,
                    "restarts": phase.restarts})
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    return report


def markdown(report: dict) -> str:
    rows = ["| phase | fault | answers by status | longest wait | late (> deadline + 1 s) "
            "| jobs accepted | jobs lost | `mtp run` restarts |",
            "|---|---|---|---|---|---|---|---|"]
    for p in report["phases"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in p["statuses"].items())
        rows.append(f"| {p['phase']} | {p['note'] or '—'} | {statuses} | "
                    f"{p['longest_wait_s']} s | {p['late']} | {p['jobs_accepted']} | "
                    f"{p['jobs_lost']} | {p['restarts']} |")
    rss = report["rss_kib"]
    if rss:
        rows.append("")
        rows.append(f"RSS of the whole stack (MiB): start {rss[0][1] / 1024:.0f}, "
                    f"max {max(r for _, r in rss) / 1024:.0f}, end {rss[-1][1] / 1024:.0f} "
                    f"({len(rss)} samples, every 10 s)")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--capacity-seconds", type=float, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    print(markdown(report))


if __name__ == "__main__":
    main()
