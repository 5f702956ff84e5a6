"""Sidecar benchmark: direct to the framework vs through the sidecar (JWT) vs nginx.

Everything runs in one invocation on this machine, on loopback, with ``wrk --latency``:

1. the framework (``mtp framework``, gunicorn gthread) on 127.0.0.1 TCP, hit directly with
   valid sidecar-signed identity headers (the baseline);
2. nginx as a reference reverse proxy (keep-alive upstream) in front of the same framework,
   and a naive aiohttp proxy (bench/naive_proxy.py: no auth, the issue's reference point);
   on unix-socket upstreams also bench/raw_proxy_probe.py (a raw-protocol floor, GET only);
3. ``mtp sidecar`` with JWT bearer auth in front of the same framework (TCP upstream);
4. then the framework again on a unix socket (the default deployment), with the sidecar and
   nginx in front of it.

For each: requests/s, p50/p99 latency, CPU time per request of each process tree (utime +
stime of the process and its descendants, from /proc), and the ratio to direct. A second,
light pass (1 connection) gives the latency the sidecar adds when it is not saturated.
Usage: ``bench/sidecar_wrk.sh [seconds] [connections]``. With
``MTP_BENCH_COMPARE=/path/to/another/checkout``, the sidecar of that checkout runs in
the same rounds too ("compared sidecar"): an A/B of two versions.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framework import signing  # noqa: E402
from tests.helpers import free_port, wait_for_port, wait_for_unix  # noqa: E402

SIDECAR_SECRET = "bench-sidecar-secret-" + "x" * 32
JWT_SECRET = "bench-jwt-secret-" + "y" * 48
PATH = "/services/hello"
TICK = os.sysconf("SC_CLK_TCK")
ROUNDS = 3

TENANT = """
[tenant]
id = "bench"
framework_version = "0.1.0"
[auth.jwt]
algorithms = ["HS256"]
[limits]
rate = 1000000
burst = 1000000
"""
SERVICE = '''"""Trivial service for the benchmark."""


def handle(context):
    return {"ok": True}
'''
# The reference upstream: a trivial Flask route, gunicorn gthread, 2 workers.
TRIVIAL = '''from flask import Flask

app = Flask(__name__)


@app.route("/services/hello")
def hello():
    return {"ok": True}
'''

NGINX = """
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream framework {{ server {upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://framework;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def bench_dir(tmp: Path) -> None:
    """The benchmarks' tenant (``hello`` service), the trivial Flask app and a data dir."""
    (tmp / "tenant" / "services").mkdir(parents=True)
    (tmp / "tenant" / "tenant.toml").write_text(TENANT)
    (tmp / "tenant" / "services" / "hello.py").write_text(SERVICE)
    (tmp / "trivial.py").write_text(TRIVIAL)
    (tmp / "data").mkdir()


def bench_env(tmp: Path, upstream: str, **extra: str) -> dict[str, str]:
    """The environment of the benchmarks' processes: this one's without MTP_*, then theirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTP_")}
    env.update(MTP_TENANT_DIR=str(tmp / "tenant"), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
               MTP_JWT_SECRET=JWT_SECRET, MTP_DATA_DIR=str(tmp / "data"),
               MTP_UPSTREAM=upstream, MTP_LOG_LEVEL="WARNING",
               MTP_AUDIT_FILE=str(tmp / "audit.log"), **extra)
    return env


def start_upstream(kind: str, upstream: str, env: dict[str, str],
                   tmp: Path) -> subprocess.Popen:
    """``flask`` (the trivial route, gunicorn gthread, 2 workers), ``echo`` or ``framework``."""
    py = sys.executable
    if kind == "flask":
        return start([py, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "8",
                      "--keep-alive", "75", "-b", upstream, "--chdir", str(tmp),
                      "--no-control-socket", "trivial:app"], env, tmp / "trivial.log")
    if kind == "echo":
        return start([py, "-m", "tests.sidecar.echo_upstream", upstream],
                     {**env, "PYTHONPATH": str(ROOT)}, tmp / "echo.log")
    return start([py, "-m", "framework", "framework"], env, tmp / "framework.log")


def tree_cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of ``pid`` and every live descendant."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, tuple[int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        p = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(p)
        ticks[p] = (int(fields[11]), int(fields[12]))
    user = system = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        u, s = ticks.get(p, (0, 0))
        user, system = user + u, system + s
        todo.extend(children.get(p, []))
    return user, system


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us: dict[str, float]
    proxy_user_us: float = 0.0


def _ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(name: str, port: int, headers: dict[str, str], seconds: int, conns: int,
        trees: dict[str, int]) -> Result:
    args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    url = f"http://127.0.0.1:{port}{PATH}"
    subprocess.run([*args[:3], "-d1s", url], capture_output=True, check=True)  # warm up
    before = {k: tree_cpu_ticks(p) for k, p in trees.items()}
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    after = {k: tree_cpu_ticks(p) for k, p in trees.items()}
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    per = 1e6 / TICK / max(requests, 1)
    cpu = {k: (sum(after[k]) - sum(before[k])) * per for k in trees}
    user = (after["proxy"][0] - before["proxy"][0]) * per if "proxy" in trees else 0.0
    return Result(name, rps, _ms(out, "50"), _ms(out, "99"), requests, errors, cpu, user)


def signed_headers() -> dict[str, str]:
    ident = {"X-Request-ID": "bench", "X-Tenant-ID": "bench", "X-User-ID": "alice",
             "X-User-Groups": "", "X-User-Roles": "", "X-Auth-Method": "jwt"}
    return {**ident, **signing.sign(SIDECAR_SECRET.encode(), "GET", PATH, ident)}


def start(args: list[str], env: dict[str, str], log: Path,
          cwd: str | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def phase(tmp: Path, upstream: str, seconds: int, conns: int, direct: bool,
          kind: str) -> list[Result]:
    """One upstream on ``upstream``; direct (TCP only), nginx, sidecar in front of it.

    ``kind``: ``flask``, a bare Flask route under gunicorn (the issue's reference point);
    ``framework``, the full framework; ``echo``, the tests' aiohttp echo upstream, fast
    enough that the proxies, not the upstream, are the limit.
    """
    env = bench_env(tmp, upstream, MTP_WORKERS="2", MTP_THREADS="8")
    py = sys.executable
    fw = start_upstream(kind, upstream, env, tmp)
    if upstream.startswith("unix:"):
        wait_for_unix(upstream[5:], fw, timeout=30)
        nginx_up = upstream
    else:
        wait_for_port(int(upstream.rsplit(":", 1)[1]), fw, timeout=30)
        nginx_up = upstream
    sc_port, ng_port, nv_port = free_port(), free_port(), free_port()
    sc = start([py, "-m", "framework", "sidecar"], {**env, "MTP_LISTEN": f"127.0.0.1:{sc_port}"},
               tmp / "sidecar.log")
    ndir = tmp / f"nginx-{ng_port}"
    ndir.mkdir()
    (ndir / "nginx.conf").write_text(NGINX.format(dir=ndir, upstream=nginx_up, port=ng_port))
    ng = start(["nginx", "-p", str(ndir), "-c", str(ndir / "nginx.conf"), "-g", "daemon off;"],
               env, ndir / "stdout.log")
    nv = start([py, str(ROOT / "bench" / "naive_proxy.py"), str(nv_port), upstream], env,
               tmp / "naive.log")
    other, ot_port = None, free_port()
    if os.environ.get("MTP_BENCH_COMPARE"):
        # "python -m" imports from the working directory first: that checkout's sidecar.
        other = start([py, "-m", "framework", "sidecar"],
                      {**env, "MTP_LISTEN": f"127.0.0.1:{ot_port}"}, tmp / "other.log",
                      cwd=os.environ["MTP_BENCH_COMPARE"])
    probe, pr_port = None, free_port()
    if upstream.startswith("unix:"):
        probe = start([py, str(ROOT / "bench" / "raw_proxy_probe.py"), str(pr_port),
                       upstream[5:]], env, tmp / "probe.log")
    results = []
    try:
        wait_for_port(sc_port, sc, timeout=30)
        wait_for_port(ng_port, ng, timeout=30)
        wait_for_port(nv_port, nv, timeout=30)
        if probe is not None:
            wait_for_port(pr_port, probe, timeout=30)
        if other is not None:
            wait_for_port(ot_port, other, timeout=30)
        where = ("unix" if upstream.startswith("unix:") else "tcp") + f", {kind}"
        token = jwt.encode({"sub": "alice", "tenant_id": "bench",
                            "exp": int(time.time()) + 3600}, JWT_SECRET, "HS256")
        bearer = {"Authorization": f"Bearer {token}"}
        fw_tree = {"framework": fw.pid}
        runs: list[tuple[str, int, dict[str, str] | None, int, dict[str, int]]] = []
        if direct:
            runs.append((f"direct ({where})", int(upstream.rsplit(":", 1)[1]), None, conns,
                         fw_tree))
        runs.append((f"nginx -> {where}", ng_port, None, conns, {**fw_tree, "proxy": ng.pid}))
        runs.append((f"naive aiohttp -> {where}", nv_port, None, conns,
                     {**fw_tree, "proxy": nv.pid}))
        if probe is not None:
            runs.append((f"raw probe -> {where}", pr_port, None, conns,
                         {**fw_tree, "proxy": probe.pid}))
        runs.append((f"sidecar+JWT -> {where}", sc_port, bearer, conns,
                     {**fw_tree, "proxy": sc.pid}))
        if other is not None:
            runs.append((f"compared sidecar+JWT -> {where}", ot_port, bearer, conns,
                         {**fw_tree, "proxy": other.pid}))
        # Interleaved rounds, median kept: other load on the machine hits every variant alike.
        rounds: dict[str, list[Result]] = {name: [] for name, *_ in runs}
        for _ in range(ROUNDS):
            for name, port, headers, n, trees in runs:
                rounds[name].append(wrk(name, port, headers or signed_headers(), seconds, n,
                                        trees))
        for name, *_ in runs:
            results.append(sorted(rounds[name], key=lambda r: r.rps)[ROUNDS // 2])
        light = max(3, seconds // 2)
        if direct:
            results.append(wrk(f"direct ({where}), 1 conn", int(upstream.rsplit(":", 1)[1]),
                               signed_headers(), light, 1, fw_tree))
        results.append(wrk(f"nginx -> {where}, 1 conn", ng_port, signed_headers(), light, 1,
                           {**fw_tree, "proxy": ng.pid}))
        results.append(wrk(f"sidecar+JWT -> {where}, 1 conn", sc_port, bearer, light, 1,
                           {**fw_tree, "proxy": sc.pid}))
    finally:
        for proc in (sc, other, ng, nv, probe, fw):
            if proc is not None:
                stop(proc)
    return results


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    conns = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    if not shutil.which("wrk") or not shutil.which("nginx"):
        sys.exit("wrk and nginx are needed (apt-get install wrk nginx)")
    load_before = f"{os.getloadavg()[0]:.2f}"
    tmp = Path(tempfile.mkdtemp(prefix="mtp-bench-"))
    try:
        bench_dir(tmp)
        results = []
        for kind in ("flask", "framework"):
            group = phase(tmp, f"127.0.0.1:{free_port()}", seconds, conns, True, kind)
            group += phase(tmp, f"unix:{tmp / 'data' / 'up.sock'}", seconds, conns, False, kind)
            results.append(group)
        echo = phase(tmp, f"unix:{tmp / 'data' / 'echo.sock'}", seconds, conns, False, "echo")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrk -t1 -c{conns} -d{seconds}s --latency, GET {PATH}; CPU µs per request of each "
          f"process tree; {os.cpu_count()} cores; load average before/after: {load_before} / "
          f"{os.getloadavg()[0]:.2f}")
    print("| variant | req/s | ratio to direct | p50 ms | p99 ms | upstream CPU µs/req "
          "| proxy CPU µs/req | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for group in results:
        base = group[0]
        light = next(r for r in group if r.name.endswith("1 conn"))
        for r in group:
            ref = light if r.name.endswith("1 conn") else base
            proxy = (f"{r.cpu_us['proxy']:.0f} ({r.proxy_user_us:.0f} user)"
                     if "proxy" in r.cpu_us else "-")
            print(f"| {r.name} | {r.rps:.0f} | {r.rps / ref.rps:.2f} | {r.p50_ms:.2f} | "
                  f"{r.p99_ms:.2f} | {r.cpu_us['framework']:.0f} | {proxy} | {r.errors} |")
        for r in group:
            if r.name.startswith("sidecar") and r.name.endswith("1 conn"):
                print(f"| added p50 at 1 connection, {r.name} | | | "
                      f"{r.p50_ms - light.p50_ms:+.2f} | | | | |")
    print("\nFast upstream (the aiohttp echo server of the tests): the proxies' own ceiling")
    print("| variant | req/s | p50 ms | p99 ms | upstream CPU µs/req | proxy CPU µs/req "
          "| errors |")
    print("|---|---|---|---|---|---|---|")
    for r in echo:
        print(f"| {r.name} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
              f"{r.cpu_us['framework']:.0f} | {r.cpu_us['proxy']:.0f} "
              f"({r.proxy_user_us:.0f} user) | {r.errors} |")


if __name__ == "__main__":
    main()
