"""Events through the real `mtp run`: publish -> handled, one command per row of issue 17.

Usage: .venv/bin/python bench/events_bench.py [--engine embedded|redis] [--tenants 1]
       [--seconds 60] [--rate 1000] [--via http|emit] [--publishers 4] [--connections 16]
       [--subjects 0] [--workers N] [--job-workers N] [--settle 6] [--drain 60]
       [--emit 0] [--emit-only]

Each tenant is its own `mtp run` (sidecar, gunicorn framework; with ``--engine redis``
also the `mtp worker` that `mtp run` starts then), as one container per tenant runs
it. ``--engine redis`` starts a throwaway redis-server (no persistence) and sets
MTP_REDIS_URL: every tenant then has its stream ``mtp:<tenant>:events``, consumed by
its framework workers and its `mtp worker` processes. Embedded: each tenant's
``events.sqlite3`` in its own MTP_DATA_DIR.

One route per tenant sends ``bench.*`` to a trivial handler that appends, per event,
the publisher's stream and sequence number, the publish time carried in the data
(``time.time()`` just before the POST or the ``context.emit``) and ``time.time()`` at
the handler's start. Same machine, same clock: publish -> handler start is honest.

Load (``--rate`` events/s *per tenant*, for ``--seconds``), on a fixed schedule: an
event that is late is sent at once, none is skipped, so a system that cannot keep up
shows as a lower achieved rate and a longer run, not as fewer events.

- ``--via http``: ``--publishers`` processes POST binary-mode CloudEvents to
  ``/events`` through the sidecar, ``--connections`` kept-alive connections per
  tenant spread over them (one thread each): the outside publish path.
- ``--via emit``: ``--publishers`` callers per tenant call a service, ``pump``, in 1 s
  chunks; it calls ``context.emit`` on the schedule and answers each call's time in
  µs: the publish path inside a service, and its cost under delivery load.

``--emit N`` (and ``--emit-only``): ``context.emit`` in this process against the
real engine objects (SQLite in a temp dir, or the throwaway Redis), one matching
route, nothing delivering: µs per call.

Output: a markdown block (the command, the settings, the load average, a table with
one line per tenant and the total) ready to paste into docs/benchmarks.md. Columns:
*published/s* accepted events (202, or confirmed by ``pump``) over first scheduled
publish -> last accepted; *handled/s* distinct events handled over first scheduled
publish -> last handler start; *backlog* accepted events not started when publishing
ended; *lost* accepted and never handled (the drain waits up to ``--drain`` s, and
gives up after 10 s without progress); *duplicated* handler runs past the first of an
event (at-least-once), "+N unconfirmed" events handled whose publish had no 202;
*sent behind schedule* how late the publishers were (large: the publishers or the
server they wait on set the rate, not the engine). The platform's CPU (every `mtp
run` process tree, and redis-server) and the publishers' CPU are given in cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import base_env, free_port, spawn, stop  # noqa: E402

JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
SIDECAR_SECRET = "bench-sidecar-secret-0123456789abcdef"
CHUNK_SECONDS = 1.0  # one pump call emits this much of its schedule
WARMUP_EVENTS = 20


def tenant_toml(tenant_id: str, out: Path) -> str:
    return f"""
[tenant]
id = "{tenant_id}"
framework_version = "0.1.0"

[limits]
rate = 1000000
burst = 1000000

[services.sink]
config = {{ out = "{out}" }}

[services.pump]
timeout = 30

[[events.routes]]
types = ["bench.*"]
service = "sink"
"""


SINK = '''"""Note the event's stream, number and publish time, and when this handler started."""
import os
import time


def handle(context):
    now = time.time()
    d = context.payload
    fd = os.open(context.config["out"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{d['p']} {d['n']} {d['t']} {now}\\n".encode())
    finally:
        os.close(fd)
    return None
'''

PUMP = '''"""context.emit on a schedule: events first..first+count-1 at start + n / rate."""
import time


def handle(context):
    d = context.payload
    p, rate, start, subjects = d["p"], d["rate"], d["start"], d["subjects"]
    took, late = [], []
    for n in range(d["first"], d["first"] + d["count"]):
        delay = start + n / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        t = time.time()
        late.append(round((t - start - n / rate) * 1e6))
        began = time.perf_counter()
        context.emit("bench.tick", {"p": p, "n": n, "t": t},
                     subject=f"s{n % subjects}" if subjects else None)
        took.append(round((time.perf_counter() - began) * 1e6))
    return {"us": took, "late_us": late}
'''


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def token(tenant_id: str) -> str:
    return "Bearer " + jwt.encode({"sub": "bench", "tenant_id": tenant_id,
                                   "exp": int(time.time()) + 7200}, JWT_SECRET)


@dataclass
class Tenant:
    """One tenant's `mtp run` and what the bench learns about it."""

    index: int
    root: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    accepted: set[tuple[int, int]] = field(default_factory=set)
    publish_times: list[float] = field(default_factory=list)  # 202 latency (s) or emit (µs)
    late: list[float] = field(default_factory=list)  # send time - scheduled time (s)
    errors: Counter = field(default_factory=Counter)
    last_publish: float = 0.0

    @property
    def tenant_id(self) -> str:
        return f"bench{self.index}"

    @property
    def out(self) -> Path:
        return self.root / "handled.txt"

    def handled(self) -> list[tuple[int, int, float, float]]:
        if not self.out.exists():
            return []
        rows = []
        for line in self.out.read_text().splitlines():
            p, n, t, started = line.split()
            rows.append((int(p), int(n), float(t), float(started)))
        return rows


# ---------------------------------------------------------------------------- stacks

def start_redis(tmp: Path, appendfsync: str = "off") -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server: no persistence, or an append-only file fsynced
    ``everysec`` or ``always`` (what production runs)."""
    port = free_port()
    aof = (["--appendonly", "no"] if appendfsync == "off" else
           ["--appendonly", "yes", "--appendfsync", appendfsync])
    proc = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  *aof, "--dir", str(tmp)], base_env(), log=tmp / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        time.sleep(0.05)
    stop(proc)
    raise SystemExit("redis-server did not start: " + (tmp / "redis.log").read_text()[-1000:])


def start_tenant(t: Tenant, redis_url: str, args: argparse.Namespace) -> None:
    (t.root / "tenant" / "services").mkdir(parents=True)
    (t.root / "tenant" / "tenant.toml").write_text(tenant_toml(t.tenant_id, t.out))
    (t.root / "tenant" / "services" / "sink.py").write_text(SINK)
    (t.root / "tenant" / "services" / "pump.py").write_text(PUMP)
    t.port = free_port()
    extra = {"MTP_REDIS_URL": redis_url} if redis_url else {}
    if args.workers:
        extra["MTP_WORKERS"] = str(args.workers)
    if args.job_workers:
        extra["MTP_JOB_WORKERS"] = str(args.job_workers)
    env = base_env(MTP_LISTEN=f"127.0.0.1:{t.port}", MTP_DATA_DIR=str(t.root / "data"),
                   MTP_UPSTREAM=f"unix:{t.root / 'fw.sock'}", MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                   MTP_JWT_SECRET=JWT_SECRET, MTP_LOG_LEVEL="WARNING",
                   MTP_AUDIT_FILE=str(t.root / "audit.log"), **extra)
    t.proc = spawn([sys.executable, "-m", "framework", "run", "--tenant-dir",
                    str(t.root / "tenant")], env, log=t.root / "run.log")


def stop_all(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM to every stack at once (each drains in parallel); killed if not gone."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_ready(t: Tenant, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        assert t.proc is not None
        if t.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{t.tenant_id} did not start:\n"
                             + (t.root / "run.log").read_text()[-3000:])
        time.sleep(0.1)


def post_event(conn: http.client.HTTPConnection, auth: str, p: int, n: int,
               subjects: int) -> int:
    headers = {"Authorization": auth, "Content-Type": "application/json",
               "ce-id": f"{p}-{n}-{uuid.uuid4().hex[:8]}", "ce-source": "/bench",
               "ce-type": "bench.tick", "ce-specversion": "1.0"}
    if subjects:
        headers["ce-subject"] = f"s{n % subjects}"
    conn.request("POST", "/events", body=json.dumps({"p": p, "n": n, "t": time.time()}),
                 headers=headers)
    reply = conn.getresponse()
    reply.read()
    return reply.status


def warm_up(tenants: list[Tenant], drain: float) -> None:
    """A few events per tenant by each path, handled before the clock starts (imports,
    connections); stream -1, left out of the results."""
    for t in tenants:
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=30)
        for n in range(WARMUP_EVENTS):
            status = post_event(conn, token(t.tenant_id), -1, n, 0)
            if status != 202:
                raise SystemExit(f"{t.tenant_id}: warm-up publish answered {status}")
        body = json.dumps({"p": -1, "rate": 1000, "start": time.time(),
                           "first": WARMUP_EVENTS, "count": WARMUP_EVENTS, "subjects": 0})
        conn.request("POST", "/services/pump", body=body, headers={
            "Authorization": token(t.tenant_id), "Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise SystemExit(f"{t.tenant_id}: warm-up pump answered {reply.status}: "
                             f"{reply.read()[:500]!r}")
        reply.read()
        conn.close()
    deadline = time.monotonic() + drain
    for t in tenants:
        while len(t.handled()) < 2 * WARMUP_EVENTS:
            if time.monotonic() > deadline:
                raise SystemExit(f"{t.tenant_id}: warm-up events not handled in {drain:.0f}s:\n"
                                 + (t.root / "run.log").read_text()[-3000:])
            time.sleep(0.1)


# ---------------------------------------------------------------------------- load: http

def share(total: int, parts: int, i: int) -> int:
    """Part ``i`` of ``total`` events split over ``parts`` (they add up to ``total``)."""
    return total // parts + (1 if i < total % parts else 0)


def http_stream(port: int, auth: str, p: int, rate: float, count: int, start: float,
                give_up: float, subjects: int) -> dict[str, Any]:
    """One kept-alive connection: events 0..count-1 at start + n / rate (late: at once)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    accepted, latencies, late, errors = [], [], [], Counter()
    last = start
    for n in range(count):
        delay = start + n / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        if time.time() > give_up:
            errors["not sent (run too slow)"] += count - n
            break
        sent = time.time()
        late.append(sent - start - n / rate)
        try:
            status = post_event(conn, auth, p, n, subjects)
        except (OSError, http.client.HTTPException) as exc:
            errors[type(exc).__name__] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        last = time.time()
        latencies.append(last - sent)
        if status == 202:
            accepted.append(n)
        else:
            errors[str(status)] += 1
    conn.close()
    return {"p": p, "accepted": accepted, "latencies": latencies, "late": late,
            "errors": dict(errors), "last": last}


def http_process(streams: list[tuple[int, int, str, int, float, int, float]],
                 give_up: float, subjects: int, results: Any) -> None:
    """A publisher process: one thread per stream (tenant index, port, token, p, rate,
    count, start)."""
    out: list[dict[str, Any]] = []

    def run(tenant: int, port: int, auth: str, p: int, rate: float, count: int,
            start: float) -> None:
        result = http_stream(port, auth, p, rate, count, start, give_up, subjects)
        result["tenant"] = tenant
        out.append(result)

    threads = [threading.Thread(target=run, args=s) for s in streams]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    used = os.times()
    results.put((out, used.user + used.system))


def load_http(tenants: list[Tenant], args: argparse.Namespace, start: float,
              give_up: float) -> float:
    """Publish through POST /events; the CPU seconds the publisher processes used."""
    per_stream, total = args.rate / args.connections, round(args.rate * args.seconds)
    # Stream p of a tenant sends its events p, p + S, p + 2S, ... of the tenant's schedule.
    streams = [(t.index, t.port, token(t.tenant_id), p, per_stream,
                share(total, args.connections, p), start + p / args.rate)
               for t in tenants for p in range(args.connections)]
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=http_process, args=(streams[i::args.publishers], give_up,
                                                    args.subjects, results))
             for i in range(min(args.publishers, len(streams)))]
    for proc in procs:
        proc.start()
    cpu = 0.0
    for _ in procs:
        out, used = results.get()
        cpu += used
        for result in out:
            t = tenants[result["tenant"]]
            t.accepted.update((result["p"], n) for n in result["accepted"])
            t.publish_times.extend(result["latencies"])
            t.late.extend(result["late"])
            t.errors.update(result["errors"])
            t.last_publish = max(t.last_publish, result["last"])
    for proc in procs:
        proc.join()
    return cpu


# ---------------------------------------------------------------------------- load: emit

def pump_caller(t: Tenant, p: int, rate: float, count: int, start: float, give_up: float,
                subjects: int, lock: threading.Lock) -> None:
    """Calls ``pump`` for consecutive 1 s chunks of one schedule."""
    conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=60)
    auth = token(t.tenant_id)
    step = max(1, round(rate * CHUNK_SECONDS))
    for first in range(0, count, step):
        if time.time() > give_up:
            with lock:
                t.errors["not sent (run too slow)"] += count - first
            break
        n = min(step, count - first)
        body = json.dumps({"p": p, "rate": rate, "start": start, "first": first, "count": n,
                           "subjects": subjects})
        try:
            conn.request("POST", "/services/pump", body=body,
                         headers={"Authorization": auth, "Content-Type": "application/json"})
            reply = conn.getresponse()
            raw = reply.read()
        except (OSError, http.client.HTTPException) as exc:
            with lock:
                t.errors[type(exc).__name__] += n
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=60)
            continue
        with lock:
            if reply.status != 200:
                t.errors[f"pump {reply.status}"] += n  # some may have been emitted: "extra"
                continue
            t.accepted.update((p, k) for k in range(first, first + n))
            answer = json.loads(raw)
            t.publish_times.extend(answer["us"])
            t.late.extend(x / 1e6 for x in answer["late_us"])
            t.last_publish = max(t.last_publish, time.time())
    conn.close()


def load_emit(tenants: list[Tenant], args: argparse.Namespace, start: float,
              give_up: float) -> float:
    """Publish with context.emit in the ``pump`` service; the CPU seconds of the callers
    here (the emits themselves run in the stacks)."""
    used = os.times()
    per_caller, total = args.rate / args.publishers, round(args.rate * args.seconds)
    lock = threading.Lock()
    threads = [threading.Thread(target=pump_caller, args=(
        t, p, per_caller, share(total, args.publishers, p), start + p / args.rate, give_up,
        args.subjects, lock)) for t in tenants for p in range(args.publishers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    now = os.times()
    return now.user + now.system - used.user - used.system


# ---------------------------------------------------------------------------- report

@dataclass
class Row:
    name: str
    accepted: int
    published_rate: float
    handled: int
    handled_rate: float
    backlog: int
    lags: list[float]
    lost: int
    duplicates: int
    extra: int
    publish: list[float]
    errors: Counter
    late: list[float]


def analyse(t: Tenant, start: float) -> Row:
    rows = [r for r in t.handled() if r[0] >= 0]  # p = -1: warm-up
    seen = Counter((p, n) for p, n, _, _ in rows)
    unique = set(seen)
    first = {}
    for p, n, sent, began in rows:  # the first run of each event: its lag
        if (p, n) not in first or began < first[(p, n)][1]:
            first[(p, n)] = (sent, began)
    lags = [began - sent for sent, began in first.values()]
    last_start = max((b for _, b in first.values()), default=start)
    end = t.last_publish or start
    return Row(t.tenant_id, len(t.accepted), len(t.accepted) / max(1e-9, end - start),
               len(unique), len(unique) / max(1e-9, last_start - start),
               len(t.accepted) - sum(1 for key, (_, b) in first.items()
                                     if b <= end and key in t.accepted),
               lags, len(t.accepted - unique), sum(seen.values()) - len(seen),
               len(unique - t.accepted), t.publish_times, t.errors, t.late)


def total(rows: list[Row], start: float, tenants: list[Tenant]) -> Row:
    last_start = max((max((r[3] for r in t.handled() if r[0] >= 0), default=start)
                      for t in tenants), default=start)
    end = max((t.last_publish for t in tenants), default=start)
    errors: Counter = Counter()
    for r in rows:
        errors.update(r.errors)
    accepted = sum(r.accepted for r in rows)
    handled = sum(r.handled for r in rows)
    return Row("all", accepted, accepted / max(1e-9, end - start), handled,
               handled / max(1e-9, last_start - start), sum(r.backlog for r in rows),
               [x for r in rows for x in r.lags], sum(r.lost for r in rows),
               sum(r.duplicates for r in rows), sum(r.extra for r in rows),
               [x for r in rows for x in r.publish], errors, [x for r in rows for x in r.late])


@dataclass
class Usage:
    """The machine while the load ran: load averages, CPU of the platform and publishers."""

    load_before: str
    load_after: str
    drained: float  # seconds from the last publish until all were handled (or gave up)
    wall: float  # seconds from the first publish until drained
    platform_cpu: float  # CPU seconds of every `mtp run` process tree (and redis-server)
    publisher_cpu: float  # CPU seconds of the publishers of this script
    idle_cores: float  # the platform's CPU with nothing published, just before the load


def report(shown: list[Row], args: argparse.Namespace, usage: Usage) -> None:
    via = ("POST /events (binary mode), "
           f"{args.publishers} publisher processes, {args.connections} kept-alive "
           "connections per tenant" if args.via == "http" else
           f"context.emit in a service (`pump`), {args.publishers} callers per tenant, "
           f"{CHUNK_SECONDS:.0f} s chunks")
    pub_col = "POST 202 p50 / p99 ms" if args.via == "http" else "context.emit p50 / p99 µs"
    scale = 1000 if args.via == "http" else 1

    def ms(values: list[float], q: float) -> str:
        return f"{pct(values, q) * 1000:.1f}"

    aof = (f"Redis append-only file fsync {args.redis_appendfsync}; "
           if args.engine == "redis" else "")
    print()
    print(f"Command: `.venv/bin/python {shlex.join(['bench/events_bench.py', *sys.argv[1:]])}`")
    print()
    print(f"Engine {args.engine}, {args.tenants} tenant(s) (one `mtp run` each"
          f"{', each with its `mtp worker`' if args.engine == 'redis' else ''}), "
          f"MTP_WORKERS={args.workers or 'default'}, "
          f"MTP_JOB_WORKERS={args.job_workers or 'default'}; publish path: {via}; "
          f"{aof}"
          f"{args.rate:.0f} events/s per tenant offered for {args.seconds:.0f} s, "
          f"{args.subjects or 'no'} subjects; {os.cpu_count()} CPUs, load average "
          f"{usage.load_before} before, {usage.load_after} after; drained "
          f"{usage.drained:.1f} s after the last publish; CPU over the "
          f"{usage.wall:.1f} s of load and drain: platform {usage.platform_cpu / usage.wall:.2f}"
          f" cores{' (redis-server included)' if args.engine == 'redis' else ''} (idle "
          f"just before: {usage.idle_cores:.2f}), this script's publishers "
          f"{usage.publisher_cpu / usage.wall:.2f} cores.")
    print()
    print(f"| tenant | published | published/s | handled/s | backlog at end of publishing "
          f"| publish → handler start p50 / p99 / max ms | lost | duplicated | {pub_col} "
          "| sent behind schedule p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in shown:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        extra = f" (+{r.extra} unconfirmed)" if r.extra else ""
        pub = (f"{pct(r.publish, 0.5) * scale:.1f} / {pct(r.publish, 0.99) * scale:.1f}"
               if r.publish else "-")
        name = f"**{r.name}**" if r.name == "all" else r.name
        print(f"| {name} | {r.accepted} | {r.published_rate:.0f} | {r.handled_rate:.0f} "
              f"| {r.backlog} | {ms(r.lags, 0.5)} / {ms(r.lags, 0.99)} / "
              f"{max(r.lags, default=0) * 1000:.1f} | {r.lost} | {r.duplicates}{extra} "
              f"| {pub} | {ms(r.late, 0.99)} | {errors} |")
    print()


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds (user + system) of the live processes under ``roots``, roots included."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    inside = set(roots)
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in inside} - inside
        inside |= more
        grew = bool(more)
    return sum(times.get(pid, 0.0) for pid in inside)


def run_platform(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mtp-evbench-") as tmp_name:
        tmp = Path(tmp_name)
        redis_proc, redis_url = (start_redis(tmp, args.redis_appendfsync)
                                 if args.engine == "redis" else (None, ""))
        tenants = [Tenant(i, tmp / f"t{i}") for i in range(args.tenants)]
        try:
            for t in tenants:
                start_tenant(t, redis_url, args)
            for t in tenants:
                wait_ready(t)
            emitted = run_emit(args.emit, redis_url) if args.emit else ""
            warm_up(tenants, args.drain)
            roots = [t.proc.pid for t in tenants if t.proc is not None]
            roots += [redis_proc.pid] if redis_proc is not None else []
            # Start-up work (imports, workers registering) out of the measure, then the
            # platform's idle CPU: what every process costs with nothing to deliver.
            time.sleep(args.settle / 2)
            idle_before = tree_cpu(roots)
            time.sleep(args.settle / 2)
            idle_cores = (tree_cpu(roots) - idle_before) / max(1e-9, args.settle / 2)
            load_before = load_average()
            start = time.time() + 0.5
            give_up = start + args.seconds * 3 + 10
            cpu_before = tree_cpu(roots)
            publisher_cpu = (load_http if args.via == "http" else load_emit)(
                tenants, args, start, give_up)
            published = time.monotonic()
            # Drain: until every accepted event is handled, or nothing moves for 10 s.
            deadline, moved, last_count = published + args.drain, published, -1
            while time.monotonic() < deadline and time.monotonic() - moved < 10:
                counts = [len({(p, n) for p, n, _, _ in t.handled() if p >= 0} & t.accepted)
                          for t in tenants]
                if all(c >= len(t.accepted) for c, t in zip(counts, tenants, strict=True)):
                    break
                if sum(counts) != last_count:
                    last_count, moved = sum(counts), time.monotonic()
                time.sleep(0.25)
            drained = time.monotonic() - published
            usage = Usage(load_before, load_average(), drained, time.time() - start,
                          tree_cpu(roots) - cpu_before, publisher_cpu, idle_cores)
            time.sleep(0.5)  # a duplicate delivery shortly after the last one counts too
            rows = [analyse(t, start) for t in tenants]
            shown = rows if len(rows) == 1 else [*rows, total(rows, start, tenants)]
            report(shown, args, usage)
            if emitted:
                print(emitted)
                print()
        finally:
            stop_all([t.proc for t in tenants if t.proc is not None])
            if redis_proc is not None:
                stop(redis_proc)


def run_emit(count: int, redis_url: str = "") -> str:
    """``context.emit`` in-process against the real engine objects: one route, nothing
    delivering (SQLite in a temp dir, or the tenant's stream on ``redis_url``), the
    audit line written to a file as in production. The line to print."""
    from flask import Flask

    from framework.context import Context
    from framework.events.install import install
    from framework.settings import Settings
    from framework.tenant_config import parse_tenant

    with tempfile.TemporaryDirectory() as tmp:
        env = {"MTP_DATA_DIR": tmp, "MTP_TENANT_DIR": tmp,
               "MTP_AUDIT_FILE": str(Path(tmp) / "audit.log")}
        if redis_url:
            env["MTP_REDIS_URL"] = redis_url
        settings = Settings.from_env(env)
        config = parse_tenant({"tenant": {"id": "benchemit"}, "events": {"routes": [
            {"types": ["bench.*"], "service": "sink"}]}})

        class _Rt:  # what install() reads of a Runtime
            executor = type("X", (), {"call": None})()

        rt = _Rt()
        rt.settings, rt.tenant = settings, config  # type: ignore[attr-defined]
        events = install(Flask("bench"), rt, background=False)  # type: ignore[arg-type]
        ctx = Context("benchemit", "svc", None, "u", (), (), "jwt", None, {}, "rid", {}, None,
                      None, 0.0)  # type: ignore[arg-type]
        for _ in range(200):
            events.emit(ctx, "bench.warm", {"n": 0})
        took = []
        for n in range(count):
            began = time.perf_counter()
            events.emit(ctx, "bench.tick", {"n": n, "t": time.time()})
            took.append((time.perf_counter() - began) * 1e6)
        engine = "Redis" if redis_url else "embedded"
        return (f"context.emit in-process against the real {engine} engine objects: mean "
                f"{sum(took) / count:.1f} µs, p50 {pct(took, 0.5):.1f} µs, p99 "
                f"{pct(took, 0.99):.1f} µs per event ({count} events, one matching route, "
                "nothing delivering, audit to a file).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("embedded", "redis"), default="embedded")
    parser.add_argument("--redis-appendfsync", choices=("off", "everysec", "always"),
                        default="off", help="the throwaway Redis: no persistence (off), or "
                                            "an append-only file fsynced so")
    parser.add_argument("--tenants", type=int, default=1, help="one `mtp run` per tenant")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=float, default=1000, help="events/s per tenant")
    parser.add_argument("--via", choices=("http", "emit"), default="http",
                        help="publish with POST /events, or context.emit in a service")
    parser.add_argument("--publishers", type=int, default=4,
                        help="http: publisher processes in all; emit: pump callers per tenant")
    parser.add_argument("--connections", type=int, default=16,
                        help="http: kept-alive connections per tenant")
    parser.add_argument("--subjects", type=int, default=0,
                        help="spread events over N subjects (0: none, no order constraint)")
    parser.add_argument("--workers", type=int, default=0, help="MTP_WORKERS (0: default)")
    parser.add_argument("--job-workers", type=int, default=0,
                        help="MTP_JOB_WORKERS (0: default): delivery threads per process "
                             "and, with Redis, `mtp worker` processes")
    parser.add_argument("--settle", type=float, default=6,
                        help="seconds between warm-up and load (the second half measures "
                             "the idle CPU)")
    parser.add_argument("--drain", type=float, default=60,
                        help="seconds to wait for the last deliveries")
    parser.add_argument("--emit", type=int, default=0,
                        help="also measure context.emit in-process, N calls")
    parser.add_argument("--emit-only", action="store_true",
                        help="only the in-process context.emit measure")
    args = parser.parse_args()
    if args.emit_only:
        with tempfile.TemporaryDirectory(prefix="mtp-evbench-") as tmp:
            redis_proc, redis_url = (start_redis(Path(tmp), args.redis_appendfsync)
                                     if args.engine == "redis" else (None, ""))
            try:
                print(f"Command: `.venv/bin/python "
                      f"{shlex.join(['bench/events_bench.py', *sys.argv[1:]])}`")
                print()
                print(run_emit(args.emit or 20000, redis_url))
            finally:
                if redis_proc is not None:
                    stop(redis_proc)
        return
    run_platform(args)


if __name__ == "__main__":
    main()
