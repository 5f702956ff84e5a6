"""`mtp run` and `mtp sidecar` as processes: template mode, drain, dead child, refusals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.sidecar.run_stack import (
    pids_in_group,
    run_env,
    start_default,
    start_run,
    tenant_toml,
    write_tenant,
)
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, call, token

pytestmark = pytest.mark.slow


def child_pids(output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"(\w+) pid (\d+)", output)}


def test_template_mode_prints_a_working_curl_and_sigterm_leaves_nothing(tmp_path: Path) -> None:
    env = run_env(tmp_path, free_port())  # no secrets, no tenant dir
    stack = start_run(tmp_path, None, env, cwd=tmp_path)
    out = stack.output()
    for _ in range(50):
        if "curl -s" in out:
            break
        time.sleep(0.1)
        out = stack.output()
    token = re.search(r"Authorization: Bearer ([\w.-]+)", out).group(1)
    url = re.search(r"(http://127\.0\.0\.1:\d+)/services/hello", out).group(1)
    assert url == f"http://127.0.0.1:{stack.port}"
    r = stack.call("POST", "/services/hello", {"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"},
                   b'{"name": "Ada"}')
    assert r.status == 200 and r.json()["message"] == "Hello, Ada!"
    groups = [stack.proc.pid, *child_pids(out).values()]
    assert len(groups) == 3
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(40) == 0
    for pgid in groups:
        assert pids_in_group(pgid) == [], f"left running in group {pgid}"
    assert "SIGTERM, draining" in stack.output()


def test_a_dead_child_stops_everything_with_exit_3(tmp_path: Path) -> None:
    stack = start_default(tmp_path)
    kids = child_pids(stack.output())
    os.kill(kids["framework"], signal.SIGKILL)
    assert stack.proc.wait(40) == 3
    for pgid in (stack.proc.pid, *kids.values()):
        assert pids_in_group(pgid) == []
    assert "framework exited" in stack.output()


def test_run_refuses_a_tenant_pinned_to_another_version(tmp_path: Path) -> None:
    tdir = write_tenant(tmp_path, tenant_toml().replace('"0.1.0"', '"9.9.9"'))
    env = run_env(tmp_path, free_port())
    done = subprocess.run([sys.executable, "-m", "framework", "run", "--tenant-dir", str(tdir)],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "9.9.9" in done.stderr and "0.1.0" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_refuses_a_tenant_without_its_jwt_secret(tmp_path: Path) -> None:
    tdir = write_tenant(tmp_path, tenant_toml())
    done = subprocess.run([sys.executable, "-m", "framework", "run", "--tenant-dir", str(tdir)],
                          env=run_env(tmp_path, free_port()), capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "MTP_JWT_SECRET" in done.stderr
    assert "Traceback" not in done.stderr


def _sidecar(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "framework", "sidecar"],
                          env=base_env(MTP_TENANT_DIR=str(tmp_path / "tenant"), **env),
                          capture_output=True, text=True, timeout=30)


def test_sidecar_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    write_tenant(tmp_path, tenant_toml())
    no_sidecar_secret = _sidecar(tmp_path, MTP_JWT_SECRET=JWT_SECRET)
    assert no_sidecar_secret.returncode == 2
    assert "MTP_SIDECAR_SECRET" in no_sidecar_secret.stderr
    no_jwt_secret = _sidecar(tmp_path, MTP_SIDECAR_SECRET=SIDECAR_SECRET)
    assert no_jwt_secret.returncode == 2 and "MTP_JWT_SECRET" in no_jwt_secret.stderr
    for done in (no_sidecar_secret, no_jwt_secret):
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_sidecar_alone_against_a_dead_framework_answers_502(tmp_path: Path) -> None:
    tdir = write_tenant(tmp_path, tenant_toml())
    port = free_port()
    env = base_env(MTP_TENANT_DIR=str(tdir), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                   MTP_JWT_SECRET=JWT_SECRET, MTP_LISTEN=f"127.0.0.1:{port}",
                   MTP_UPSTREAM=f"unix:{tmp_path / 'nobody.sock'}",
                   MTP_AUDIT_FILE=str(tmp_path / "audit.log"))
    proc = spawn([sys.executable, "-m", "framework", "sidecar"], env, log=tmp_path / "sc.log")
    try:
        wait_for_port(port, proc)
        r = call(port, "POST", "/services/whoami", {"Authorization": f"Bearer {token()}"}, b"{}")
        assert r.status == 502 and r.headers["Content-Type"] == "application/problem+json"
        assert call(port, "GET", "/healthz").status == 200
        ready = call(port, "GET", "/readyz")
        assert ready.status == 503 and b"not reachable" in ready.body
    finally:
        assert stop(proc) == 0


def test_with_redis_a_worker_joins_and_everything_stops(tmp_path: Path, redis_server) -> None:
    stack = start_default(tmp_path, MTP_REDIS_URL=redis_server.url)
    out = stack.output()
    kids = child_pids(out)
    assert set(kids) == {"framework", "worker", "sidecar"}
    r = stack.call("POST", "/services/whoami", {"Authorization": f"Bearer {token()}"}, b"{}")
    assert r.status == 200
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(40) == 0
    for pgid in (stack.proc.pid, *kids.values()):
        assert pids_in_group(pgid) == []
