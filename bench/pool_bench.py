"""Pool benchmark: memory of a pool with many registered tenants, PSS per live tenant
process, and cold-start latency (the first call of a tenant with no process yet).

Writes ``--tenants`` small bundles (Ed25519 JWT key file shared, one API key each),
starts ``mtp pool`` on them, then calls ``--active`` tenants once each (each call is a
cold start: the tenant's process is forked from the warm parent) and a few more warm
calls. Reports: the pool process's RSS with every tenant registered and none active,
and again with ``--active`` active; the PSS (proportional set size, shared pages
divided among sharers) of each live tenant process (gunicorn master + worker); cold
and warm call latency p50/p99; then the pool is started again on the same data and each
active tenant called once more: the cold start of a tenant whose process was reaped
(its databases exist; the first calls also created them).

With ``--shared``, the active tenants are on a plan with isolation `shared` (a real
`mtp control` with its SQLite registry places them in the pool): they are all served
by the pool's one shared process, whose tenant apps are kept up to
``--shared-apps`` (MTP_POOL_SHARED_APPS, default: every active tenant). Reports the
shared process's PSS and threads instead of the per-tenant processes'.

Usage: .venv/bin/python bench/pool_bench.py [--tenants 10000] [--active 200] [--wrk 20]
       [--shared [--shared-apps N]] [--workers 1] [--threads 4]
The machine is shared: a short run is e.g. --tenants 1000 --active 10.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import base_env, free_port, stop, wait_for_port

SERVICE = '''"""Answers with its process id."""
import os


def handle(context):
    return {"tenant": context.tenant_id, "pid": os.getpid()}
'''


def write_bundles(root: Path, count: int) -> None:
    """``count`` bundles ``t00000``...; each its own API key ``key-<id>``."""
    pem = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_file = root / "jwt.pem"
    key_file.write_bytes(pem)
    bundles = root / "bundles"
    bundles.mkdir()
    for i in range(count):
        tid = f"t{i:05d}"
        d = bundles / tid
        (d / "services").mkdir(parents=True)
        digest = hashlib.sha256(f"key-{tid}".encode()).hexdigest()
        (d / "tenant.toml").write_text(
            f'[tenant]\nid = "{tid}"\nname = "{tid}"\n\n[auth.jwt]\nalgorithms = ["EdDSA"]\n'
            f'public_key_file = "{key_file}"\n\n[auth.api_keys.bench]\n'
            f'hash = "sha256:{digest}"\n\n[limits]\nrate = 1000\nburst = 1000\n')
        (d / "services" / "hello.py").write_text(SERVICE)


def call(port: int, tid: str) -> tuple[float, dict]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/services/hello", body=b"{}",
                 headers={"X-Tenant-ID": tid, "X-API-Key": f"key-{tid}"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    elapsed = time.perf_counter() - started
    if r.status != 200:
        raise RuntimeError(f"{tid}: HTTP {r.status} {body[:200]!r}")
    return elapsed, json.loads(body)


WRK_LUA = """
local ids = {%s}
local n = 0
request = function()
  n = n + 1
  local tid = ids[(n %% #ids) + 1]
  return wrk.format("POST", "/services/hello",
                    {["X-Tenant-ID"] = tid, ["X-API-Key"] = "key-" .. tid}, "{}")
end
"""


def run_wrk(port: int, ids: list[str], seconds: int, tmp: Path) -> dict[str, float]:
    """wrk over every active tenant in turn (each request another tenant's process)."""
    script = tmp / "pool.lua"
    script.write_text(WRK_LUA % ", ".join(f'"{t}"' for t in ids))
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", "-s",
                          str(script), f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {"wrk_tenants": len(ids), "wrk_requests_per_s": rate,
            "wrk_non_2xx": int(bad.group(1)) if bad else 0,
            "wrk_socket_errors": errors.group(0) if errors else "none",
            "wrk_p99_ms": round(float(p99.group(1)) * scale[p99.group(2)], 2) if p99 else -1}


def kib(pid: int, field: str, name: str = "status") -> int:
    """A ``field:`` line of /proc/<pid>/<name>, in KiB."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def family(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        for kid in kids:
            found += family(int(kid))
    return found


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


SHARED_PLANS = """
[plans.trusted]
isolation = "shared"
services = ["*"]
limits = { rate = 100000, burst = 100000 }
"""


def shared_fleet(tmp: Path, ids: list[str]):  # -> tests.control.fleet.ControlPlane
    """A control plane whose registry places ``ids`` in pool ``bench`` on a shared plan."""
    from tests.control.fleet import ControlPlane

    cp = ControlPlane(tmp / "control", plans=SHARED_PLANS).start()
    for tid in ids:
        reply = cp.call("POST", "/admin/tenants", {"id": tid, "name": tid, "plan": "trusted",
                                                   "placement": "pool:bench"})
        if reply.status != 201:
            cp.stop()
            raise RuntimeError(f"{tid}: registry answered {reply.status}")
    return cp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=10000)
    ap.add_argument("--active", type=int, default=200)
    ap.add_argument("--warm", type=int, default=200, help="warm calls after the cold ones")
    ap.add_argument("--wrk", type=int, default=0, metavar="SECONDS",
                    help="then wrk (2 threads, 32 connections) round-robin over the active "
                         "tenants for SECONDS: requests/s and non-2xx answers")
    ap.add_argument("--workers", type=int, default=1,
                    help="MTP_WORKERS of every tenant process (and the shared one)")
    ap.add_argument("--threads", type=int, default=4,
                    help="MTP_THREADS of every tenant process (and the shared one)")
    ap.add_argument("--shared", action="store_true",
                    help="the active tenants in isolation `shared` (one process)")
    ap.add_argument("--shared-apps", type=int, default=0, metavar="N",
                    help="MTP_POOL_SHARED_APPS (default: --active)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mtp-pool-bench-"))
    t0 = time.perf_counter()
    write_bundles(tmp, args.tenants)
    print(f"{args.tenants} bundles written in {time.perf_counter() - t0:.1f}s")
    port = free_port()
    ids = [f"t{i * max(1, args.tenants // args.active):05d}" for i in range(args.active)]
    cp = shared_fleet(tmp, ids) if args.shared else None
    data = cp.data_dir if cp is not None else tmp / "data"
    env = base_env(MTP_SIDECAR_SECRET="bench-pool-secret-0123456789abcdef",
                   MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(data),
                   MTP_POOL_RUN_DIR=str(tmp / "run"), MTP_POOL_IDLE="3600",
                   MTP_POOL_MAX_PROCS=str(args.active + 1), MTP_LOG_LEVEL="WARNING",
                   MTP_AUDIT_FILE=str(tmp / "audit.log"),
                   MTP_POOL_SHARED_APPS=str(args.shared_apps or args.active),
                   # Admission is MTP_WORKERS x MTP_THREADS per process: one shared
                   # process needs more threads than a tenant's own for wrk's connections.
                   MTP_THREADS=str(args.threads), MTP_WORKERS=str(args.workers))
    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "framework", "pool", "--name", "bench",
                                 "--bundles", str(tmp / "bundles")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    proc = start()
    try:
        wait_for_port(port, proc, timeout=60)
        time.sleep(0.5)
        rss_idle = kib(proc.pid, "VmRSS")
        cold, masters = [], []
        for tid in ids:
            elapsed, body = call(port, tid)
            cold.append(elapsed)
            masters.append(body["pid"])
        warm = [call(port, ids[i % len(ids)])[0] for i in range(args.warm)]
        rss_active = kib(proc.pid, "VmRSS")
        if args.shared:
            report_shared(args, port, tmp, rss_idle, kib(proc.pid, "VmRSS"), cold, warm,
                          masters)
            return
        pss = [sum(kib(p, "Pss", "smaps_rollup") for p in family(m)) for m in masters]
        report = {
            "tenants_registered": args.tenants, "tenants_active": args.active,
            "pool_rss_mib_registered": round(rss_idle / 1024, 1),
            "pool_rss_mib_active": round(rss_active / 1024, 1),
            "tenant_process_pss_mib_mean": round(statistics.mean(pss) / 1024, 1),
            "tenant_process_pss_mib_max": round(max(pss) / 1024, 1),
            "cold_ms_p50": round(pct(cold, 0.5) * 1000, 1),
            "cold_ms_p99": round(pct(cold, 0.99) * 1000, 1),
            "warm_ms_p50": round(pct(warm, 0.5) * 1000, 2),
            "warm_ms_p99": round(pct(warm, 0.99) * 1000, 2),
        }
        if args.wrk:
            report.update(run_wrk(port, ids, args.wrk, tmp))
        # The cold start: a tenant whose process was reaped (its data dir, job
        # and events databases exist). A pool started again on the same data has no
        # tenant process, as after an idle reap; the first calls above also created
        # each tenant's databases.
        stop(proc, timeout=60)
        proc = start()
        wait_for_port(port, proc, timeout=60)
        time.sleep(0.5)
        again = [call(port, tid)[0] for tid in ids]
        report["cold_after_reap_ms_p50"] = round(pct(again, 0.5) * 1000, 1)
        report["cold_after_reap_ms_p99"] = round(pct(again, 0.99) * 1000, 1)
        print(json.dumps(report, indent=2))
    finally:
        stop(proc, timeout=60)
        if cp is not None:
            cp.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def report_shared(args: argparse.Namespace, port: int, tmp: Path, rss_idle: int,
                  rss_active: int, cold: list[float], warm: list[float],
                  pids: list[int]) -> None:
    """The --shared run's numbers: one process for every active tenant."""
    shared = max(set(pids), key=pids.count)  # the shared process (replaced at most rarely)
    report: dict[str, object] = {
        "tenants_registered": args.tenants, "tenants_active_shared": args.active,
        "shared_apps_kept": args.shared_apps or args.active,
        "shared_processes_seen": len(set(pids)),
        "pool_rss_mib_registered": round(rss_idle / 1024, 1),
        "pool_rss_mib_active": round(rss_active / 1024, 1),
        "shared_process_pss_mib": round(kib(shared, "Pss", "smaps_rollup") / 1024, 1),
        "shared_process_threads": kib(shared, "Threads"),
        "first_call_ms_p50": round(pct(cold, 0.5) * 1000, 1),
        "first_call_ms_p99": round(pct(cold, 0.99) * 1000, 1),
        "warm_ms_p50": round(pct(warm, 0.5) * 1000, 2),
        "warm_ms_p99": round(pct(warm, 0.99) * 1000, 2),
    }
    if args.wrk:
        ids = [f"t{i * max(1, args.tenants // args.active):05d}" for i in range(args.active)]
        report.update(run_wrk(port, ids, args.wrk, tmp))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
