"""Metering overhead per call and attribution throughput of framework.usage.

Usage: .venv/bin/python bench/ops_metering.py [--calls N] [--threads T]

Records N calls over a realistic key spread (10 services x 3 operations x 200
users) with the flush thread running against a real SQLite file, and compares
with the same loop that does not record (so the loop's own cost is subtracted,
measured in the same run). Throughput counts the final flush too. Last, the
whole metered execute seam of a real framework app (context vars, context.call
attachment, record) around a handler that does nothing, against the bare one.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from framework.app import create_app
from framework.cli import template_dir
from framework.context import Context
from framework.execute import Outcome
from framework.flags import FlagSet
from framework.settings import Settings
from framework.tenant_config import BillingSettings
from framework.usage import UsageMeter, UsageStore

SERVICES = [f"svc{i}" for i in range(10)]
OPERATIONS = ["create", "get", None]
USERS = [f"user{i}" for i in range(200)]


def keys(n: int) -> list[tuple[str, str | None, str]]:
    return [(SERVICES[i % 10], OPERATIONS[i % 3], USERS[i % 200]) for i in range(n)]


def nothing(*args: object) -> None:
    """The baseline: a call with the same arguments that records nothing."""


def loop(meter: UsageMeter | None, work: list[tuple[str, str | None, str]]) -> float:
    record = nothing if meter is None else meter.record
    start = time.perf_counter()
    for service, operation, user in work:
        record(service, operation, user, 200, 0.001, 0.0005, 120, 640)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    work = keys(args.calls)
    with tempfile.TemporaryDirectory() as tmp:
        store = UsageStore(Path(tmp) / "usage.db")
        meter = UsageMeter(store, "bench", flush_interval=1.0)
        base = loop(None, work)
        spent = loop(meter, work)
        per_call = (spent - base) / args.calls * 1e6
        print(f"single thread: {args.calls} calls, record {spent:.3f}s, empty loop {base:.3f}s")
        print(f"metering overhead per call: {per_call:.2f} us")

        share = len(work) // args.threads
        start = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(meter, work[i * share:(i + 1) * share]))
                   for i in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        meter.close()
        elapsed = time.perf_counter() - start
        total = share * args.threads
        print(f"{args.threads} threads: {total} calls recorded and flushed in {elapsed:.3f}s")
        print(f"attribution throughput: {total / elapsed:,.0f} calls/s = "
              f"{total / elapsed * 3600 / 1e6:,.0f} M calls/hour per process")
        rows = store.query("bench", BillingSettings(per_call=0.0001), group_by=())
        assert rows[0]["calls"] == args.calls + total, rows
        print(f"check: {rows[0]['calls']} calls in SQLite (expected {args.calls + total})")

        seam(Path(tmp), min(args.calls, 200_000))


def seam(tmp: Path, n: int) -> None:
    """Per-call cost of Operations.metered around a no-op call, in a real app."""
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": "bench-secret-0123456789abcdef",
                                  "MTP_DATA_DIR": str(tmp / "app"),
                                  "MTP_TENANT_DIR": str(template_dir()),
                                  "MTP_LOG_LEVEL": "ERROR"})
    tenant = settings.load_tenant()
    app = create_app(settings, tenant, background=False)
    ops = app.extensions["mtp.operations"]
    spec = ops.rt.registry.resolve("hello")
    done = Outcome(200, body=b'{"ok":true}')

    def bare(s: object, c: object) -> Outcome:
        return done

    ctx = Context(tenant_id=tenant.tenant_id, service="hello", operation=None, user="u",
                  groups=(), roles=(), auth_method="jwt", payload={}, params={},
                  request_id="r", config={}, flags=FlagSet({}, tenant.tenant_id, "u"),
                  logger=ops.rt.log, deadline=time.monotonic() + 3600)
    metered = ops.metered(bare)
    timings = {}
    for name, fn in (("bare", bare), ("metered", metered), ("bare again", bare)):
        start = time.perf_counter()
        for _ in range(n):
            fn(spec, ctx)
        timings[name] = time.perf_counter() - start
    base = (timings["bare"] + timings["bare again"]) / 2
    print(f"metered execute seam: {(timings['metered'] - base) / n * 1e6:.2f} us per call "
          f"over the bare call ({n} calls)")
    ops.close()
    app.extensions["mtp"].close()


if __name__ == "__main__":
    main()
