"""Events on the embedded engine through the real `mtp run`: publish -> handled.

Usage: .venv/bin/python bench/events_embedded.py [--seconds 60] [--rate 1000]
       [--publishers 4] [--subjects 0] [--emit 20000] [--redis-url URL]

One tenant, one route to a trivial handler that appends the time it started and
the time the event was sent (in the data) to a file. Publishers POST binary-mode
CloudEvents on kept-alive connections at ``--rate`` events/s in total for
``--seconds``; then the file is read. Reported: events accepted and handled per
second (first publish to last handler start), publish -> handler start p50/p99,
and the 202 latency. ``--subjects N`` spreads the events over N subjects (0: none,
no ordering constraint). ``--emit N`` also measures ``context.emit`` in-process
(SQLite in a temp dir, nothing delivering): µs per call.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import base_env, free_port, spawn, stop  # noqa: E402

JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
SIDECAR_SECRET = "bench-sidecar-secret-0123456789abcdef"


def tenant(out: Path) -> str:
    return f"""
[tenant]
id = "bench"
framework_version = "0.1.0"

[limits]
rate = 1000000
burst = 1000000

[services.sink]
config = {{ out = "{out}" }}

[[events.routes]]
types = ["bench.*"]
service = "sink"
"""


SERVICE = '''"""Note when the event arrived and when it was sent."""
import os
import time


def handle(context):
    now = time.time()
    fd = os.open(context.config["out"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{context.payload['t']} {now}\\n".encode())
    finally:
        os.close(fd)
    return None
'''


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def publisher(port: int, token: str, rate: float, until: float, subjects: int,
              latencies: list[float], errors: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    interval, next_at, n = 1.0 / rate, time.monotonic(), 0
    while time.monotonic() < until:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        next_at += interval
        n += 1
        headers = {"Authorization": token, "Content-Type": "application/json",
                   "ce-id": uuid.uuid4().hex, "ce-source": "/bench", "ce-type": "bench.tick",
                   "ce-specversion": "1.0"}
        if subjects:
            headers["ce-subject"] = f"s{n % subjects}"
        sent = time.time()
        conn.request("POST", "/events", body=json.dumps({"t": sent}), headers=headers)
        reply = conn.getresponse()
        reply.read()
        latencies.append(time.time() - sent)
        if reply.status != 202:
            errors.append(reply.status)


def run_platform(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / "handled.txt"
        (tmp / "tenant" / "services").mkdir(parents=True)
        (tmp / "tenant" / "tenant.toml").write_text(tenant(out))
        (tmp / "tenant" / "services" / "sink.py").write_text(SERVICE)
        port = free_port()
        env = base_env(MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(tmp / "data"),
                       MTP_UPSTREAM=f"unix:{tmp / 'fw.sock'}", MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                       MTP_JWT_SECRET=JWT_SECRET, MTP_LOG_LEVEL="WARNING",
                       MTP_AUDIT_FILE=str(tmp / "audit.log"),
                       **({"MTP_REDIS_URL": args.redis_url} if args.redis_url else {}))
        proc = spawn([sys.executable, "-m", "framework", "run", "--tenant-dir",
                      str(tmp / "tenant")], env, log=tmp / "run.log")
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/readyz")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit((tmp / "run.log").read_text()[-2000:])
                time.sleep(0.1)
            token = "Bearer " + jwt.encode({"sub": "bench", "tenant_id": "bench",
                                             "exp": int(time.time()) + 3600}, JWT_SECRET)
            latencies: list[float] = []
            errors: list[int] = []
            start = time.time()
            until = time.monotonic() + args.seconds
            threads = [threading.Thread(target=publisher, args=(
                port, token, args.rate / args.publishers, until, args.subjects, latencies,
                errors)) for _ in range(args.publishers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sent = len(latencies)
            drain = time.monotonic() + 30
            while time.monotonic() < drain:
                handled = out.read_text().splitlines() if out.exists() else []
                if len(handled) >= sent - len(errors):
                    break
                time.sleep(0.2)
            pairs = [tuple(map(float, line.split())) for line in handled]
            lags = [b - a for a, b in pairs]
            last = max((b for _, b in pairs), default=start)
            print(f"published {sent} in {args.seconds}s ({sent / args.seconds:.0f}/s offered "
                  f"{args.rate:.0f}/s), errors {len(errors)}")
            print(f"handled {len(pairs)}: {len(pairs) / max(1e-9, last - start):.0f} events/s "
                  "first publish -> last handler start")
            print(f"publish -> handler start: p50 {pct(lags, 0.5) * 1000:.1f} ms, "
                  f"p99 {pct(lags, 0.99) * 1000:.1f} ms, max {max(lags, default=0) * 1000:.1f} ms")
            print(f"POST /events 202: p50 {pct(latencies, 0.5) * 1000:.2f} ms, "
                  f"p99 {pct(latencies, 0.99) * 1000:.2f} ms")
        finally:
            stop(proc)


def run_emit(count: int) -> None:
    """``context.emit`` in-process: SQLite in a temp dir, one route, nothing delivering."""
    from flask import Flask

    from framework.context import Context
    from framework.events.install import install
    from framework.settings import Settings
    from framework.tenant_config import parse_tenant

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"MTP_DATA_DIR": tmp, "MTP_TENANT_DIR": tmp,
                                      "MTP_AUDIT_FILE": os.devnull})
        config = parse_tenant({"tenant": {"id": "bench"}, "events": {"routes": [
            {"types": ["bench.*"], "service": "sink"}]}})

        class _Rt:  # what install() reads of a Runtime
            executor = type("X", (), {"call": None})()

        rt = _Rt()
        rt.settings, rt.tenant = settings, config  # type: ignore[attr-defined]
        events = install(Flask("bench"), rt, background=False)  # type: ignore[arg-type]
        ctx = Context("bench", "svc", None, "u", (), (), "jwt", None, {}, "rid", {}, None,
                      None, 0.0)  # type: ignore[arg-type]
        for _ in range(200):
            events.emit(ctx, "bench.warm", {"n": 0})
        started = time.perf_counter()
        for n in range(count):
            events.emit(ctx, "bench.tick", {"n": n}, subject=f"s{n % 8}")
        per = (time.perf_counter() - started) / count * 1e6
        print(f"context.emit: {per:.1f} µs per event ({count} events, one matching route)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=0)
    parser.add_argument("--emit", type=int, default=20000, help="0: skip the emit measure")
    parser.add_argument("--emit-only", action="store_true")
    parser.add_argument("--redis-url", default="",
                        help="use the shared engine on this Redis (a throwaway one: "
                             "the tenant's stream is not cleaned up)")
    args = parser.parse_args()
    if args.emit:
        run_emit(args.emit)
    if not args.emit_only:
        run_platform(args)


if __name__ == "__main__":
    main()
