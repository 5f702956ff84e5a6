"""Limiter scaling: decision cost and memory with 1, 100 and 10,000 tenants' keys,
in memory and in Redis, in the same run.

Each tenant key has rate 100, burst 50 (the defaults); decisions go round robin over
the keys, so every key stays live. Memory: tracemalloc's bytes held by the
in-memory table; Redis's ``used_memory`` growth once the keys exist.
Redis decisions are measured one at a time (the latency a request sees) and with
32 in flight on one event loop (what one sidecar process gets through).

Usage: .venv/bin/python bench/scale_limiter.py [decisions per point, default 20000]
Needs `redis-server` on PATH (a throwaway one on a free port is started).
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.limiter import Limit, MemoryBackend
from sidecar.limiter_redis import RedisBackend, connect
from tests.helpers import free_port, wait_for_port

SIZES = (1, 100, 10_000)
IN_FLIGHT = 32


def memory_point(n: int, decisions: int) -> tuple[float, float]:
    """(µs per decision, bytes per key) of the in-memory backend."""
    keys = [[Limit(f"tenant-{i}", 100.0, 50)] for i in range(n)]
    gc.collect()
    tracemalloc.start()
    backend = MemoryBackend()
    before = tracemalloc.get_traced_memory()[0]
    now = time.monotonic()
    for lim in keys:
        backend.decide(lim, now)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    start = time.perf_counter()
    for i in range(decisions):
        backend.decide(keys[i % n], time.monotonic())
    cost = (time.perf_counter() - start) / decisions * 1e6
    return cost, held / n


async def redis_point(url: str, n: int, decisions: int) -> tuple[float, float, float]:
    """(µs per decision one at a time, decisions/s with 32 in flight, bytes per key)."""
    backend = RedisBackend(connect(url))
    keys = [[Limit(f"tenant-{i}", 100.0, 50)] for i in range(n)]
    await backend.client.flushdb()
    await backend.admit([Limit("warm-up", 1.0, 0)], 0.0)  # script cached, connection open
    base = (await backend.client.info("memory"))["used_memory"]
    # A slow rate keeps these keys (TAT 100 s ahead) for the memory reading; at rate
    # 100 a key lives only until its TAT passes, a few ms after its last request.
    for i in range(n):
        await backend.admit([Limit(f"mem-tenant-{i}", 0.01, 50)], 0.0)
    grown = (await backend.client.info("memory"))["used_memory"] - base
    start = time.perf_counter()
    for i in range(decisions):
        await backend.admit(keys[i % n], 0.0)
    serial = (time.perf_counter() - start) / decisions * 1e6

    async def lane(offset: int) -> None:
        for i in range(offset, decisions, IN_FLIGHT):
            await backend.admit(keys[i % n], 0.0)

    start = time.perf_counter()
    await asyncio.gather(*(lane(k) for k in range(IN_FLIGHT)))
    rate = decisions / (time.perf_counter() - start)
    if backend.degraded:
        print(f"note: Redis timed out during the {n}-key point (local fallback used)")
    await backend.close()
    return serial, rate, grown / n


def main() -> None:
    decisions = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="mtp-bench-redis-")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", workdir],
                              stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        url = f"redis://127.0.0.1:{port}/0"
        print("| tenants' keys | memory: µs/decision | memory: bytes/key | "
              "Redis: µs/decision (one at a time) | Redis: decisions/s (32 in flight) | "
              "Redis: bytes/key |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n in SIZES:
            mem_cost, mem_bytes = memory_point(n, decisions)
            serial, rate, redis_bytes = asyncio.run(redis_point(url, n, decisions))
            # used_memory moves by whole allocator pages: per-key figures need many keys.
            per_key = f"{redis_bytes:.0f}" if n >= 100 else "n/a"
            print(f"| {n:,} | {mem_cost:.2f} | {mem_bytes:.0f} | {serial:.0f} | "
                  f"{rate:,.0f} | {per_key} |", flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
