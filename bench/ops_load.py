"""Usage attribution under real load: wrk through `mtp run`, then /usage must count every call.

Usage: .venv/bin/python bench/ops_load.py [--seconds S] [--connections C]

Starts `mtp run` (2 gunicorn workers + sidecar) with the tenant of
bench/ops_overlay.py, drives GET /services/flag with wrk for S seconds, then
compares wrk's request count with the calls /usage attributes to the service
(all of them, none lost or double counted, while being metered).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ops_overlay import JWT_SECRET, SERVICE, TENANT, Conn, wait_ready

from tests.helpers import base_env, free_port, spawn, stop


def admin_usage(port: int) -> dict:
    conn = Conn(port)
    claims = {"sub": "ops", "tenant_id": "bench", "roles": ["admin"],
              "exp": int(time.time()) + 600}
    conn.conn.request("GET", "/usage?group_by=service", headers={
        "Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET)}"})
    return json.loads(conn.conn.getresponse().read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "tenant" / "services").mkdir(parents=True)
        (tmp / "tenant" / "tenant.toml").write_text(TENANT)
        (tmp / "tenant" / "services" / "flag.py").write_text(SERVICE)
        port = free_port()
        env = base_env(MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(tmp / "data"),
                       MTP_UPSTREAM=f"unix:{tmp / 'fw.sock'}", MTP_WORKERS="2",
                       MTP_SIDECAR_SECRET="bench-sidecar-secret-0123456789",
                       MTP_JWT_SECRET=JWT_SECRET, MTP_LOG_LEVEL="WARNING")
        proc = spawn([sys.executable, "-m", "framework", "run", "--tenant-dir",
                      str(tmp / "tenant")], env, log=tmp / "run.log")
        try:
            conn = wait_ready(port, proc, tmp / "run.log")
            before = sum(r["calls"] for r in admin_usage(port)["rows"])
            cmd = ["wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s",
                   "-H", conn.headers["Authorization"].join(["Authorization: ", ""]),
                   f"http://127.0.0.1:{port}/services/flag"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            print(out.replace(conn.headers["Authorization"], "Bearer <token>"))
            sent = int(re.search(r"(\d+) requests in", out).group(1))
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            time.sleep(1.5)  # every worker flushes once a second
            counted = sum(r["calls"] for r in admin_usage(port)["rows"]) - before
            # wrk does not count the requests still in flight when it stops (at most one
            # per connection); the framework did run and meter them.
            print(f"wrk requests: {sent} (non-2xx: {non2xx.group(1) if non2xx else 0}); "
                  f"/usage calls: {counted}; difference {counted - sent} "
                  f"(in flight at wrk's stop: at most {args.connections})")
            print(f"throughput through sidecar+framework: {sent / args.seconds:,.0f} calls/s")
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
