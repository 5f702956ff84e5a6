"""Job store scaling: 1M finished job records in SQLite (embedded) and in Redis (shared).

Fills each store with N finished jobs (small results, as most calls return), then
measures what the framework does with them: ``get`` (a poll of ``GET /jobs/{id}``)
on random ids, ``counts`` (every ``/metrics`` scrape), ``purge`` of the oldest 10%
(the reaper), and the size on disk / in Redis memory.

Usage: .venv/bin/python bench/scale_jobs.py [jobs, default 1000000] [--skip-redis]
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.jobs import _INSERT, SqliteJobStore
from framework.jobs_redis import RedisJobStore, connect
from tests.helpers import free_port, wait_for_port

LOOKUPS = 10_000
BATCH = 2_000


def rows(n: int, start: float) -> list[tuple]:
    """n finished jobs, one per millisecond from ``start``."""
    out = []
    for i in range(n):
        t = start + i / 1000
        out.append((uuid.uuid4().hex, "acme", "orders", "create", f"user{i % 1000}",
                    uuid.uuid4().hex, "succeeded", json.dumps({"ok": True, "n": i}), None,
                    t, t, t + 0.002, f"host:{1000 + i % 8}:123", t + 30))
    return out


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def sqlite_point(n: int, data: list[tuple], root: Path) -> dict[str, float]:
    path = root / "jobs.sqlite3"
    store = SqliteJobStore(path)
    conn = sqlite3.connect(path)
    start = time.perf_counter()
    with conn:
        conn.executemany(_INSERT, data)
    fill = time.perf_counter() - start
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    ids = [row[0] for row in random.sample(data, LOOKUPS)]
    it = iter(ids)
    get = timed(lambda: store.get(next(it)), LOOKUPS)
    counts = timed(store.counts, 5)
    size = sum(p.stat().st_size for p in root.glob("jobs.sqlite3*"))
    cutoff = data[n // 10][11]
    start = time.perf_counter()
    purged = store.purge(cutoff)
    purge = time.perf_counter() - start
    return {"fill_s": fill, "get_us": get * 1e6, "counts_ms": counts * 1e3,
            "bytes_per_job": size / n, "size_mb": size / 1e6, "purge_s": purge,
            "purged": purged}


def redis_point(n: int, data: list[tuple], url: str) -> dict[str, float]:
    client = connect(url)
    client.flushdb()
    store = RedisJobStore(client, "acme", 7 * 86400)
    base = client.info("memory")["used_memory"]
    start = time.perf_counter()
    for offset in range(0, n, BATCH):
        pipe = client.pipeline(transaction=False)
        for row in data[offset:offset + BATCH]:
            key = store.key(row[0])
            pipe.hset(key, mapping={
                "tenant": row[1], "service": row[2], "operation": row[3], "owner": row[4],
                "request_id": row[5], "status": row[6], "result": row[7],
                "created": repr(row[9]), "started": repr(row[10]),
                "finished": repr(row[11]), "runner": row[12], "deadline": repr(row[13])})
            pipe.expire(key, store.retention)
            pipe.zadd(store.index + "succeeded", {row[0]: row[11]})
        pipe.execute()
    fill = time.perf_counter() - start
    grown = client.info("memory")["used_memory"] - base
    ids = [row[0] for row in random.sample(data, LOOKUPS)]
    it = iter(ids)
    get = timed(lambda: store.get(next(it)), LOOKUPS)
    counts = timed(store.counts, 5)
    start = time.perf_counter()
    purged = store.purge(data[n // 10][11])
    purge = time.perf_counter() - start
    client.flushdb()
    client.close()
    return {"fill_s": fill, "get_us": get * 1e6, "counts_ms": counts * 1e3,
            "bytes_per_job": grown / n, "size_mb": grown / 1e6, "purge_s": purge,
            "purged": purged}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 1_000_000
    data = rows(n, time.time() - n / 1000)
    results = {}
    with tempfile.TemporaryDirectory(prefix="mtp-bench-jobs-") as tmp:
        results["SQLite (embedded)"] = sqlite_point(n, data, Path(tmp))
    if "--skip-redis" not in sys.argv:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="mtp-bench-redis-")
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", workdir],
                                  stdout=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            results["Redis (shared)"] = redis_point(n, data, f"redis://127.0.0.1:{port}/0")
        finally:
            server.terminate()
            server.wait(10)
    print(f"{n:,} finished jobs")
    print("| store | fill | get (µs) | counts (ms) | purge oldest 10% | size | bytes/job |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['fill_s']:.1f} s | {r['get_us']:.0f} | {r['counts_ms']:.1f} | "
              f"{r['purge_s']:.2f} s ({r['purged']:,.0f}) | {r['size_mb']:.0f} MB | "
              f"{r['bytes_per_job']:.0f} |")


if __name__ == "__main__":
    main()
