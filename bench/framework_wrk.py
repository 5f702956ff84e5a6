"""Framework path vs bare Flask under the same gunicorn (gthread, 2 workers), with wrk.

Both servers run in this one invocation, alternating, so the ratio compares like
with like on the same machine state; every round starts fresh server processes.
CPU per request is the user+system time of the gunicorn process tree
(/proc/<pid>/stat, master and workers) over the wrk run
divided by the requests wrk completed. Signed headers are generated just before
each framework run (the signature window is 30 s; runs are shorter).

    .venv/bin/python bench/framework_wrk.py [--duration 8] [--rounds 3] [--connections 16]
                                            [--breakdown]

``--breakdown`` adds framework servers with parts switched off
(bench/framework_variant.py) to show what each part costs: "-ops" without the
operations layer (metering, breaker, overlay), "-handoff" running sync handlers
in the request thread (no deadline), "-log -metrics" without the request log
line and Prometheus updates.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framework import signing  # noqa: E402
from tests.helpers import base_env, free_port, spawn, stop, wait_for_port  # noqa: E402

SECRET = "bench-sidecar-secret-0123456789"
TICKS = os.sysconf("SC_CLK_TCK")
SERVICE = '"""Trivial sync service for the benchmark."""\n\n\ndef handle(context):\n' \
          '    return {"ok": True}\n'
TOML = '[tenant]\nid = "bench"\nframework_version = "0.1.0"\n'
THREADS = os.environ.get("BENCH_THREADS", "8")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user+system) of ``pid`` and its children, from /proc."""
    total = 0.0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            pids += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


def lua_headers(headers: dict[str, str], path: Path) -> Path:
    lines = ['wrk.method = "GET"'] + [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(url: str, seconds: int, conns: int, script: Path) -> tuple[float, int]:
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"wrk saw {non2xx.group(1)} error answers:\n{out}")
    return rps, total


def measure(pid: int, url: str, seconds: int, conns: int, script: Path) -> dict:
    run_wrk(url, 1, conns, script)  # warm-up: threads, imports, caches
    before = tree_cpu(pid)
    rps, total = run_wrk(url, seconds, conns, script)
    cpu = tree_cpu(pid) - before
    return {"rps": rps, "requests": total, "cpu_us_per_req": cpu / total * 1e6}


# label -> bench/framework_variant.py switches
VARIANTS = {
    "fw -ops": "noops",
    "fw -ops -watch": "noops,nowatch",
    "fw -ops -watch -log -metrics": "noops,nowatch,nolog,nometrics",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--breakdown", action="store_true",
                    help="also measure the framework with parts switched off")
    args = ap.parse_args()
    if args.duration > 20:
        raise SystemExit("keep runs under the 30 s signature window")
    tmp = Path(tempfile.mkdtemp(prefix="mtp-bench-"))
    tenant = tmp / "tenant"
    (tenant / "services").mkdir(parents=True)
    (tenant / "tenant.toml").write_text(TOML)
    (tenant / "services" / "ping.py").write_text(SERVICE)
    targets = {"bare": [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread",
                        "--threads", THREADS, "--keep-alive", "75", "--no-control-socket",
                        "--chdir", str(ROOT / "bench"), "framework_bare:app", "-b"],
               "framework": [sys.executable, "-m", "framework", "framework",
                             "--tenant-dir", str(tenant)]}
    if args.breakdown:
        for label, variant in VARIANTS.items():
            targets[label] = [
                sys.executable, str(ROOT / "bench" / "framework_variant.py"), str(tenant),
                variant]
    path = "/services/ping"
    results: dict[str, list[dict]] = {name: [] for name in targets}
    for round_no in range(args.rounds):
        # Fresh processes every round: where the scheduler places a server's threads
        # moves its CPU per request by up to +-150 us here, so the median should sample
        # placements, not one placement several times.
        procs, ports = start_all(targets, tmp, round_no)
        try:
            for name, proc in procs.items():
                who = {signing.REQUEST_ID: "bench-1", signing.TENANT: "bench",
                       signing.USER: "bench", signing.GROUPS: "", signing.ROLES: "",
                       signing.AUTH_METHOD: "jwt"}
                who.update(signing.sign(SECRET.encode(), "GET", path, who))  # fresh, just now
                # Every target gets the very same request bytes: equal header parsing.
                script = lua_headers(who, tmp / "signed.lua")
                results[name].append(measure(proc.pid, f"http://127.0.0.1:{ports[name]}{path}",
                                             args.duration, args.connections, script))
        finally:
            for proc in procs.values():
                stop(proc)
    report(results)


def start_all(targets: dict[str, list[str]], tmp: Path,
              round_no: int) -> tuple[dict[str, subprocess.Popen], dict[str, int]]:
    """Start every target on its own port; return once all of them listen."""
    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    try:
        for name, cmd in targets.items():
            port = ports[name] = free_port()
            if name == "bare":
                cmd, env = [*cmd, f"127.0.0.1:{port}"], base_env()
            else:
                env = base_env(MTP_SIDECAR_SECRET=SECRET,
                               MTP_DATA_DIR=str(tmp / f"{name}-{round_no}"),
                               MTP_UPSTREAM=f"127.0.0.1:{port}", MTP_WORKERS="2",
                               MTP_THREADS=THREADS, MTP_LOG_LEVEL="INFO")
            procs[name] = spawn(cmd, env, log=tmp / f"{name}-{round_no}.log")
        for name, proc in procs.items():
            wait_for_port(ports[name], proc)
    except BaseException:
        for proc in procs.values():
            stop(proc)
        raise
    time.sleep(0.5)
    return procs, ports


def report(results: dict[str, list[dict]]) -> None:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "cpu_us_per_req")}
           for k, v in results.items()}
    for name, rows in results.items():
        for i, r in enumerate(rows, 1):
            print(f"{name:31} round {i}: {r['rps']:7.0f} req/s {r['cpu_us_per_req']:6.0f} "
                  f"us CPU/request ({r['requests']} requests)")
    base = med["bare"]
    for name, m in med.items():
        print(f"median {name:31} {m['rps']:7.0f} req/s {m['cpu_us_per_req']:6.0f} us CPU/req"
              f"  CPU x{m['cpu_us_per_req'] / base['cpu_us_per_req']:.2f}"
              f"  throughput x{m['rps'] / base['rps']:.2f}")
    print("target: framework CPU/request <= 1.15 x bare")


if __name__ == "__main__":
    main()
