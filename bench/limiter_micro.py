"""Limiter micro-benchmark: cost per decision and memory per key with 10,000 tenants.

Usage: ``.venv/bin/python bench/limiter_micro.py [keys] [decisions]``. Measures the
in-memory GCRA backend (sidecar/limiter.py): the synchronous decision, the async
``admit`` the sidecar awaits, and tracemalloc's count of bytes held per key (the key
string, its float TAT and the dict slot).
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.limiter import Limit, MemoryBackend


def per_key_bytes(keys: int) -> float:
    """Bytes held by the backend per key, keys created as the sidecar creates them."""
    gc.collect()
    tracemalloc.start()
    backend = MemoryBackend()
    base = tracemalloc.take_snapshot()
    now = time.monotonic()
    for i in range(keys):
        backend.decide([Limit(f"tenant-{i:05d}", 100.0, 50)], now)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(s.size_diff for s in after.compare_to(base, "filename"))
    assert len(backend.tat) == keys
    return held / keys


def decision_cost(keys: int, decisions: int) -> tuple[float, float, float]:
    """µs per decision: sync, sync with a user limit, and the awaited admit()."""
    backend = MemoryBackend()
    names = [f"tenant-{i:05d}" for i in range(keys)]
    picks = [random.choice(names) for _ in range(decisions)]
    limits = [[Limit(n, 1e6, 1000)] for n in picks]
    both = [[Limit(n, 1e6, 1000), Limit(f"{n}\x00alice", 1e6, 1000)] for n in picks]
    clock = time.monotonic
    t0 = time.perf_counter()
    for lim in limits:
        backend.decide(lim, clock())
    sync = (time.perf_counter() - t0) / decisions * 1e6
    t0 = time.perf_counter()
    for lim in both:
        backend.decide(lim, clock())
    two = (time.perf_counter() - t0) / decisions * 1e6

    async def awaited() -> float:
        start = time.perf_counter()
        for lim in limits:
            await backend.admit(lim, clock())
        return (time.perf_counter() - start) / decisions * 1e6

    return sync, two, asyncio.run(awaited())


def main() -> None:
    keys = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    decisions = int(sys.argv[2]) if len(sys.argv) > 2 else 300_000
    best = [min(v) for v in zip(*(decision_cost(keys, decisions) for _ in range(3)), strict=True)]
    print(f"keys={keys} decisions={decisions} python={sys.version.split()[0]}")
    print(f"decision (tenant limit)        {best[0]:.2f} µs")
    print(f"decision (tenant + user)       {best[1]:.2f} µs")
    print(f"awaited admit (tenant limit)   {best[2]:.2f} µs")
    print(f"memory per key                 {per_key_bytes(keys):.0f} bytes")


if __name__ == "__main__":
    main()
