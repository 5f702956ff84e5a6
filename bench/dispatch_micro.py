"""Cached dispatch overhead per call, and cold load time of a small service.

    .venv/bin/python bench/dispatch_micro.py

Per-call costs are the best of several repeats (CPU time of this process, so
time spent waiting for another thread is not counted twice). Cold load is a
fresh Registry loading a small module (docstring, OPERATIONS, INPUT_SCHEMA
checked with jsonschema), in this process and in fresh interpreters.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framework import logs  # noqa: E402
from framework.controller import make_context  # noqa: E402
from framework.execute import Executor, run_handler  # noqa: E402
from framework.registry import Registry  # noqa: E402
from framework.tenant_config import parse_tenant  # noqa: E402
from framework.verify import Identity  # noqa: E402

SMALL = '''"""A small service: operations and an input schema."""
OPERATIONS = ["create", "get"]
INPUT_SCHEMA = {
    "type": "object",
    "properties": {"item": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
    "additionalProperties": False,
}


def handle(context):
    return {"op": context.operation, "item": context.payload.get("item")}
'''
PING = 'def handle(context):\n    return {"ok": True}\n'
N = 20000
REPEATS = 5


def per_call(fn, n: int = N) -> float:
    """Best-of CPU microseconds per call."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


class _Rt:
    """Just what make_context reads from the Runtime."""

    def __init__(self, tenant):
        self.tenant = tenant


def cold_load_in_process(tenant_dir: Path, tenant, runs: int = 50) -> list[float]:
    times = []
    for _ in range(runs):
        reg = Registry(tenant_dir, tenant)
        t0 = time.perf_counter()
        reg.resolve("small")
        times.append((time.perf_counter() - t0) * 1000)
    return times


FRESH = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from framework.registry import Registry
from framework.tenant_config import parse_tenant
reg = Registry(Path({tdir!r}), parse_tenant({{"tenant": {{"id": "bench"}}}}))
t0 = time.perf_counter()
reg.resolve("small")
print((time.perf_counter() - t0) * 1000)
"""


def cold_load_fresh(tenant_dir: Path, runs: int = 5) -> list[float]:
    code = FRESH.format(root=str(ROOT), tdir=str(tenant_dir))
    return [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(runs)]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mtp-micro-"))
    (tmp / "services").mkdir()
    (tmp / "services" / "small.py").write_text(SMALL)
    (tmp / "services" / "ping.py").write_text(PING)
    tenant = parse_tenant({"tenant": {"id": "bench"}})
    logs.setup("WARNING", "bench")
    reg = Registry(tmp, tenant)
    spec = reg.resolve("ping")
    ident = Identity("bench", "alice", ("g",), ("r",), "jwt")
    rt = _Rt(tenant)
    ctx = make_context(rt, spec, None, ident, {}, {}, "rid")  # type: ignore[arg-type]
    executor = Executor(10 << 20)

    def call(s, c):
        return run_handler(s, c, 10 << 20)

    rows = {
        "handle(context) called directly": per_call(lambda: spec.handle(ctx)),
        "registry.resolve (cached)": per_call(lambda: reg.resolve("ping")),
        "make_context (flags, logger, deadline)": per_call(
            lambda: make_context(rt, spec, None, ident, {}, {}, "rid")),  # type: ignore[arg-type]
        "run_handler (call + JSON encode + timing)": per_call(lambda: call(spec, ctx)),
        "Executor.run_sync (inline, in-flight bookkeeping)": per_call(
            lambda: executor.run_sync(spec, ctx)),
        "resolve + context + run_sync (cached dispatch)": per_call(
            lambda: executor.run_sync(reg.resolve("ping"),
                                      make_context(rt, spec, None, ident, {}, {}, "rid"))),
    }
    direct = rows["handle(context) called directly"]
    print("cached dispatch, CPU microseconds per call (best of 5 x 20000):")
    for name, us in rows.items():
        print(f"  {name:50} {us:7.1f} us")
    overhead = rows["resolve + context + run_sync (cached dispatch)"] - direct
    print(f"  dispatch overhead over a direct call:              {overhead:7.1f} us")
    inproc = cold_load_in_process(tmp, tenant)
    fresh = cold_load_fresh(tmp)
    print("cold load of services/small.py (target < 20 ms):")
    print(f"  in a warm process: median {statistics.median(inproc):.2f} ms, "
          f"max {max(inproc):.2f} ms over {len(inproc)} loads")
    print(f"  first load in a fresh interpreter: median {statistics.median(fresh):.2f} ms, "
          f"max {max(fresh):.2f} ms over {len(fresh)} processes")
    executor.close()


if __name__ == "__main__":
    main()
