"""Fleet control plane: suspension latency at a running sidecar, and admin API throughput.

Suspension latency: PATCH {"status": "suspended"} is sent at t0 while a client
calls the tenant's running `mtp run` in a tight loop (one keep-alive connection);
the latency is the time from t0 to the first 403 tenant-suspended. Resume, wait
for 200, repeat. Done on Redis (pub/sub) and on SQLite (data_version polled every
50 ms), each with its own control plane and stack.

Admin API throughput: `mtp control` (one process) answering GET /admin/tenants/{id}
(with today's usage), GET /admin/tenants?limit=50 and POST /admin/tenants from
several client threads, each on its own keep-alive connection.

Usage: .venv/bin/python bench/fleet_control.py [rounds, default 20] [seconds per
throughput point, default 3]. Needs `redis-server` on PATH (a throwaway one starts).
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.control.fleet import ControlPlane, op_headers
from tests.control.test_data_plane import PLANS, start_replica
from tests.redis.stack import Replica, auth, write_tenant
from tests.servers import RedisServer

CLIENTS = 4


def suspension_latency(root: Path, redis_url: str, rounds: int) -> list[float]:
    """Milliseconds from PATCH suspend to the first 403 at the running sidecar."""
    replica = Replica("acme", root, write_tenant(root, "rate = 100000\nburst = 100000"),
                      redis_url)
    cp = ControlPlane(root / "control", redis_url=redis_url, plans=PLANS,
                      extra_env={"MTP_DATA_DIR": str(root / "acme-data"),
                                 "MTP_AUDIT_FILE": str(root / "admin-audit.log")})
    cp.start()
    try:
        assert cp.call("POST", "/admin/tenants", {"id": "acme", "name": "Acme",
                                                  "plan": "std"}).status == 201
        start_replica(replica)
        conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=10)
        headers, body = auth(), json.dumps({"x": 1})

        def status() -> int:
            conn.request("POST", "/services/echo", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status

        admin = http.client.HTTPConnection("127.0.0.1", cp.port, timeout=10)

        def patch(value: str) -> None:
            admin.request("PATCH", "/admin/tenants/acme", json.dumps({"status": value}),
                          op_headers())
            resp = admin.getresponse()
            resp.read()
            assert resp.status == 200

        out = []
        for _ in range(rounds):
            while status() != 200:
                time.sleep(0.005)
            done = threading.Event()
            t0 = time.perf_counter()
            threading.Thread(target=lambda ev=done: (patch("suspended"), ev.set())).start()
            while status() != 403:
                pass
            out.append((time.perf_counter() - t0) * 1000)
            done.wait(10)
            patch("active")
        return out
    finally:
        replica.stop()
        cp.stop()


def throughput(cp: ControlPlane, method: str, make_path, seconds: float) -> float:
    """Requests per second over CLIENTS keep-alive connections."""
    counts = [0] * CLIENTS
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", cp.port, timeout=10)
        headers = op_headers()
        n = 0
        while time.perf_counter() < stop_at:
            path, body = make_path(i, n)
            conn.request(method, path, body=json.dumps(body) if body else None,
                         headers=headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status < 300, resp.status
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def admin_throughput(root: Path, redis_url: str, seconds: float) -> dict[str, float]:
    cp = ControlPlane(root / "control-tp", redis_url=redis_url, plans=PLANS,
                      extra_env={"MTP_AUDIT_FILE": str(root / "tp-audit.log")})
    cp.start()
    try:
        for i in range(200):
            cp.call("POST", "/admin/tenants", {"id": f"t{i:04d}", "name": f"T{i}",
                                               "plan": "std"})
        return {
            "show": throughput(cp, "GET", lambda i, n: (f"/admin/tenants/t{n % 200:04d}", None),
                               seconds),
            "list50": throughput(cp, "GET", lambda i, n: ("/admin/tenants?limit=50", None),
                                 seconds),
            "create": throughput(cp, "POST", lambda i, n: (
                "/admin/tenants", {"id": f"c{i}-{n}", "name": "x", "plan": "std"}), seconds),
        }
    finally:
        cp.stop()


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    return (f"median {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, max {ms[-1]:.1f} ms "
            f"({len(ms)} rounds)")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = RedisServer(root / "redis")
        server.start()
        try:
            for name, url in (("redis", server.url), ("sqlite", "")):
                if url:
                    from redis import Redis

                    Redis.from_url(url).flushdb()
                lat = suspension_latency(root / f"lat-{name}", url, rounds)
                print(f"suspension latency ({name}): {summary(lat)}")
                if url:
                    Redis.from_url(url).flushdb()
                tp = admin_throughput(root / f"tp-{name}", url, seconds)
                print(f"admin API ({name}, {CLIENTS} clients): " + ", ".join(
                    f"{k} {v:.0f} req/s" for k, v in tp.items()))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
