"""Overlay propagation delay through the real `mtp run`: file replaced -> next answer changed.

Usage: .venv/bin/python bench/ops_overlay.py [--rounds N]

Starts `mtp run` (2 gunicorn workers + sidecar) on loopback with a tenant whose
service returns a flag's value, then N times replaces the overlay file
atomically and polls (one request at a time, on a kept-alive connection) until
the answer shows the change. Framework side: a feature flag read by the
service. Sidecar side: an authz rule set that refuses the service (403).
Reported: the delay from os.replace() to the first changed answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import base_env, free_port, spawn, stop  # noqa: E402

JWT_SECRET = "bench-jwt-secret-0123456789abcdef"
TENANT = """
[tenant]
id = "bench"
framework_version = "0.1.0"

[limits]
rate = 100000
burst = 100000

[flags.beta]
enabled = false

[authz]
enabled = true
[[authz.rules]]
service = "flag"
"""
SERVICE = '''"""Return the beta flag."""


def handle(context):
    return {"beta": context.flags.enabled("beta")}
'''
ALLOW = '[[authz.rules]]\nservice = "flag"\n'


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        claims = {"sub": "bench", "tenant_id": "bench", "exp": int(time.time()) + 3600}
        self.headers = {"Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET)}"}

    def get(self) -> tuple[int, bytes]:
        self.conn.request("GET", "/services/flag", headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()


def wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> Conn:
    """A connection to `mtp run` once it answers 200 (its log in the error otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = Conn(port)
            if conn.get()[0] == 200:
                return conn
        except OSError:
            time.sleep(0.1)
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log.read_text())


def replace(path: Path, text: str) -> float:
    tmp = path.with_name(".bench.tmp")
    tmp.write_text(text)
    started = time.perf_counter()
    os.replace(tmp, path)
    return started


def measure(conn: Conn, overlay: Path, text: str, done: Callable[[int, bytes], bool]) -> float:
    started = replace(overlay, text)
    while not done(*conn.get()):
        if time.perf_counter() - started > 5:
            raise TimeoutError("change not visible after 5 s")
    return time.perf_counter() - started


def report(name: str, delays: list[float]) -> None:
    ms = sorted(d * 1000 for d in delays)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    print(f"{name}: n={len(ms)} median {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, "
          f"max {ms[-1]:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "tenant" / "services").mkdir(parents=True)
        (tmp / "tenant" / "tenant.toml").write_text(TENANT)
        (tmp / "tenant" / "services" / "flag.py").write_text(SERVICE)
        overlay = tmp / "overlay.toml"
        overlay.write_text("")
        port = free_port()
        env = base_env(MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(tmp / "data"),
                       MTP_UPSTREAM=f"unix:{tmp / 'fw.sock'}", MTP_CONFIG_OVERLAY=str(overlay),
                       MTP_WORKERS="2", MTP_SIDECAR_SECRET="bench-sidecar-secret-0123456789",
                       MTP_JWT_SECRET=JWT_SECRET, MTP_LOG_LEVEL="WARNING")
        proc = spawn([sys.executable, "-m", "framework", "run", "--tenant-dir",
                      str(tmp / "tenant")], env, log=tmp / "run.log")
        try:
            conn = wait_ready(port, proc, tmp / "run.log")
            flag, authz = [], []
            for _ in range(args.rounds):
                flag.append(measure(conn, overlay, "[flags.beta]\nenabled = true\n",
                                    lambda s, b: s == 200 and json.loads(b)["beta"]))
                measure(conn, overlay, "", lambda s, b: s == 200 and not json.loads(b)["beta"])
                authz.append(measure(conn, overlay, '[[authz.rules]]\nservice = "other"\n',
                                     lambda s, b: s == 403))
                measure(conn, overlay, ALLOW, lambda s, b: s == 200)
                time.sleep(0.02)
            report("framework (flag) overlay -> next answer", flag)
            report("sidecar (authz) overlay -> next answer", authz)
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
