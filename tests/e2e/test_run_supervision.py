"""`mtp run` as a supervisor, with real processes: the stop budget, hung children, and
which secrets each child can see."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from framework.jobs import SqliteJobStore
from tests.framework.client import Client
from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.sidecar.run_stack import (
    RunStack,
    pids_in_group,
    run_env,
    start_run,
    tenant_toml,
    write_tenant,
)
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, Reply, token

pytestmark = pytest.mark.slow

GRACE = 8  # small, to keep the tests short: work needing GRACE - 5 s must finish
WORK = GRACE - 5

SLOW_JOB = '''"""Sleep payload["s"] seconds, as a job."""
import time

MODE = "async"


def handle(context):
    time.sleep(float((context.payload or {}).get("s", 0.5)))
    return {"slept": True}
'''

ENVIRON = '''"""What tenant code can see of its process's environment."""
import os

MODE = "both"


def handle(context):
    with open("/proc/self/environ", "rb") as f:
        proc = f.read().decode(errors="replace")
    return {"environ": dict(os.environ), "proc": proc}
'''

LDAP_PASSWORD = "ldap-bind-password-never-in-tenant-code"
BILLING_SECRET = "billing-webhook-secret-never-in-env"
OPERATOR_SECRET = "operator-jwt-secret-never-in-tenant-code"


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {token(roles=['admin'])}",
            "Content-Type": "application/json"}


def start(root: Path, toml: str = "", **extra: str) -> RunStack:
    tdir = write_tenant(root, tenant_toml() + toml)
    (tdir / "services" / "slow_job.py").write_text(SLOW_JOB)
    (tdir / "services" / "environ.py").write_text(ENVIRON)
    env = run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET, MTP_GRACE_SECONDS=str(GRACE),
                  MTP_HEALTH_INTERVAL="1", MTP_HEALTH_MISSES="3", **extra)
    return start_run(root, tdir, env)


def children(stack: RunStack) -> dict[str, int]:
    import re

    return {n: int(p) for n, p in re.findall(r"(\w+) pid (\d+)", stack.output())}


def wait_running(stack: RunStack, job_id: str) -> None:
    for _ in range(100):
        if stack.call("GET", f"/jobs/{job_id}", admin()).json()["status"] == "running":
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran")


def assert_all_gone(stack: RunStack, kids: dict[str, int]) -> None:
    for pgid in (stack.proc.pid, *kids.values()):
        assert pids_in_group(pgid) == [], f"left running in group {pgid}"


def test_sigterm_lets_a_sync_call_and_a_job_needing_grace_minus_5_s_finish(
        tmp_path: Path) -> None:
    stack = start(tmp_path)
    kids = children(stack)
    submitted = stack.call("POST", "/services/slow_job", admin(), json.dumps({"s": WORK}).encode())
    assert submitted.status == 202
    job_id = submitted.json()["job_id"]
    wait_running(stack, job_id)
    answers: list[Reply] = []
    sync = threading.Thread(target=lambda: answers.append(stack.call(
        "POST", "/services/slow", admin(), json.dumps({"s": WORK}).encode())))
    sync.start()
    time.sleep(0.5)  # the call is in the framework's hands when the stop begins
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(GRACE) == 0  # within the grace
    sync.join(5)
    assert [a.status for a in answers] == [200] and answers[0].json() == {"slept": True}
    job = SqliteJobStore(tmp_path / "data" / "jobs.sqlite3").get(job_id)
    assert job is not None and job.status == "succeeded" and job.result == {"slept": True}
    assert_all_gone(stack, kids)


def test_with_redis_a_job_needing_grace_minus_5_s_finishes_in_the_worker_across_sigterm(
        tmp_path: Path, redis_server) -> None:
    stack = start(tmp_path, MTP_REDIS_URL=redis_server.url)
    kids = children(stack)
    assert "worker" in kids
    submitted = stack.call("POST", "/services/slow_job", admin(), json.dumps({"s": WORK}).encode())
    assert submitted.status == 202
    job_id = submitted.json()["job_id"]
    wait_running(stack, job_id)
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(GRACE) == 0
    assert_all_gone(stack, kids)
    again = start_run(tmp_path, tmp_path / "tenant", run_env(
        tmp_path, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
        MTP_REDIS_URL=redis_server.url))
    try:
        job = again.call("GET", f"/jobs/{job_id}", admin()).json()
        assert job["status"] == "succeeded" and job["result"] == {"slept": True}
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(30) == 0


def test_a_job_still_running_when_the_grace_ends_is_interrupted_after_the_restart(
        tmp_path: Path) -> None:
    stack = start(tmp_path)
    kids = children(stack)
    submitted = stack.call("POST", "/services/slow_job", admin(), b'{"s": 25}')
    job_id = submitted.json()["job_id"]
    wait_running(stack, job_id)
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(GRACE) == 0  # the job did not hold the stop past the grace
    assert_all_gone(stack, kids)
    again = start_run(tmp_path, tmp_path / "tenant", run_env(
        tmp_path, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
        MTP_GRACE_SECONDS=str(GRACE)))
    try:
        job = again.call("GET", f"/jobs/{job_id}", admin()).json()
        assert job["status"] == "failed" and job["error"]["reason"] == "interrupted"
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(GRACE) == 0


@pytest.mark.parametrize("child", ["framework", "sidecar"])
def test_a_stopped_child_is_found_killed_and_mtp_run_exits_non_zero(
        tmp_path: Path, child: str) -> None:
    stack = start(tmp_path)
    kids = children(stack)
    assert stack.call("POST", "/services/whoami", admin(), b"{}").status == 200
    # A child that never answered is starting, not hung (for 30 s): let the watch,
    # probing 1 s apart, see it answer first.
    time.sleep(3)
    os.killpg(kids[child], signal.SIGSTOP)  # a deadlock looks the same from outside
    try:
        # 3 misses 1 s apart, then the others' drain: bounded well inside this wait.
        assert stack.proc.wait(GRACE + 15) == 4
    finally:
        if stack.proc.poll() is None:  # a failed assertion must not leave it stopped
            os.killpg(kids[child], signal.SIGCONT)
            stack.proc.kill()
    assert_all_gone(stack, kids)
    assert f"{child} did not answer its health check 3 times in a row" in stack.output()


def test_busy_is_not_hung_calls_on_every_thread_longer_than_the_misses_allow_are_answered(
        tmp_path: Path) -> None:
    # Busy means every request thread of the one gunicorn worker runs a call; the
    # framework must still answer /healthz, on its side threads.
    pytest.importorskip("framework.worker", reason="needs /healthz off the request threads")
    tdir = write_tenant(tmp_path, tenant_toml())
    env = run_env(tmp_path, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET, MTP_GRACE_SECONDS=str(GRACE),
                  MTP_HEALTH_INTERVAL="1", MTP_HEALTH_MISSES="3")
    env["MTP_THREADS"] = "2"
    stack = start_run(tmp_path, tdir, env)
    time.sleep(3)  # the watch has seen it answer: from now on a silence is a miss
    answers: list[int] = []
    calls = [threading.Thread(target=lambda: answers.append(stack.call(
        "POST", "/services/slow", admin(), b'{"s": 6}').status)) for _ in range(2)]
    for call in calls:
        call.start()
    for call in calls:
        call.join(30)
    # 6 s on both threads, probes 1 s apart, 3 misses allowed: still alive, both answered.
    assert answers == [200, 200] and stack.proc.poll() is None, stack.output()
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(GRACE) == 0


# A webhook nobody listens on: what matters is that its secret reaches the exporters.
BILLING = '\n[billing]\nwebhook_url = "http://127.0.0.1:9/usage"\n'


def _secrets_env() -> dict[str, str]:
    return {"MTP_LDAP_PASSWORD": LDAP_PASSWORD, "MTP_BILLING_SECRET": BILLING_SECRET,
            "MTP_OPERATOR_JWT_SECRET": OPERATOR_SECRET}


def assert_sees_no_secret(seen: dict[str, object]) -> None:
    environ, proc = json.dumps(seen["environ"]), str(seen["proc"])
    for value in (JWT_SECRET, LDAP_PASSWORD, OPERATOR_SECRET, BILLING_SECRET,
                  SIDECAR_SECRET):
        assert value not in environ and value not in proc
    for name in ("MTP_JWT_SECRET", "MTP_LDAP_PASSWORD", "MTP_OPERATOR_JWT_SECRET",
                 "MTP_BILLING_SECRET", "MTP_SIDECAR_SECRET"):
        assert name not in seen["environ"] and f"{name}=" not in proc  # type: ignore[operator]
    assert "MTP_TENANT_DIR" in seen["environ"]  # type: ignore[operator]


def test_tenant_code_in_the_framework_sees_none_of_the_sidecars_secrets(
        tmp_path: Path) -> None:
    stack = start(tmp_path, BILLING, **_secrets_env())
    try:
        r = stack.call("POST", "/services/environ", admin(), b"{}")  # a signed call works
        assert r.status == 200
        assert_sees_no_secret(r.json())
        assert "billing webhook disabled" not in stack.output()  # its secret did arrive
    finally:
        stack.proc.send_signal(signal.SIGTERM)
        assert stack.proc.wait(GRACE) == 0


def test_tenant_code_in_the_job_worker_sees_none_of_the_secrets(
        tmp_path: Path, redis_server) -> None:
    stack = start(tmp_path, BILLING, MTP_REDIS_URL=redis_server.url, **_secrets_env())
    try:
        assert "worker" in children(stack)
        headers = {**admin(), "Prefer": "respond-async, wait=30"}
        r = stack.call("POST", "/services/environ", headers, b"{}")
        assert r.status == 200, r.body
        assert_sees_no_secret(r.json())
        assert "billing webhook disabled" not in stack.output()  # its secret did arrive
    finally:
        stack.proc.send_signal(signal.SIGTERM)
        assert stack.proc.wait(GRACE) == 0


def test_mtp_framework_alone_drops_its_secrets_from_os_environ_before_tenant_code(
        tmp_path: Path) -> None:
    tdir = write_tenant(tmp_path, tenant_toml())
    (tdir / "services" / "environ.py").write_text(ENVIRON)
    port = free_port()
    env = base_env(MTP_TENANT_DIR=str(tdir), MTP_DATA_DIR=str(tmp_path / "data"),
                   MTP_UPSTREAM=f"127.0.0.1:{port}", MTP_WORKERS="1",
                   MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_BILLING_SECRET=BILLING_SECRET)
    proc = spawn([sys.executable, "-m", "framework", "framework"], env,
                 log=tmp_path / "fw.log")
    try:
        wait_for_port(port, proc)
        seen = Client(port, secret=SIDECAR_SECRET).request(
            "POST", "/services/environ", {}, roles="admin").json()  # a signed call works
        assert "MTP_SIDECAR_SECRET" not in seen["environ"]
        assert "MTP_BILLING_SECRET" not in seen["environ"]
        assert SIDECAR_SECRET not in json.dumps(seen["environ"])
    finally:
        assert stop(proc) == 0
