"""`mtp run` end to end: SIGTERM with accepted async jobs, then a start on the same data dir.

No accepted job is lost (issue 14, "Faults"): the jobs that were running finish within the
grace period, the queued ones are run by the next start, and every one ends `succeeded`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, stop
from tests.sidecar.run_stack import RunStack, run_env, start_run, tenant_toml, write_tenant
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, token

pytestmark = pytest.mark.slow

NAP = '''"""Async: sleep payload["s"] seconds."""
import time

MODE = "async"


def handle(context):
    time.sleep(float(context.payload.get("s", 1)))
    return {"n": context.payload.get("n")}
'''
WHO = {"Authorization": f"Bearer {token(sub='alice')}", "Content-Type": "application/json"}
N = 6


def start(root: Path, tenant: Path, port: int) -> RunStack:
    env = run_env(root, port, MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
                  MTP_JOB_WORKERS="1")
    return start_run(root, tenant, env)


def test_sigterm_to_mtp_run_loses_no_accepted_job(tmp_path: Path) -> None:
    tenant = write_tenant(tmp_path, tenant_toml().replace(
        '[[authz.rules]]\nservice = "slow"', '[[authz.rules]]\nservice = "nap"'))
    (tenant / "services" / "nap.py").write_text(NAP)
    port = free_port()
    stack = start(tmp_path, tenant, port)
    try:
        ids = []
        for n in range(N):
            answer = stack.call("POST", "/services/nap", WHO,
                                json.dumps({"s": 1, "n": n}).encode())
            assert answer.status == 202, answer.body
            ids.append(answer.json()["job_id"])
        deadline = time.monotonic() + 20
        while stack.call("GET", f"/jobs/{ids[0]}", WHO).json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stop(stack.proc, timeout=40) == 0
    finally:
        stop(stack.proc)
    stack = start(tmp_path, tenant, port)
    try:
        deadline = time.monotonic() + 40
        while True:
            jobs = [stack.call("GET", f"/jobs/{j}", WHO).json() for j in ids]
            if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            assert time.monotonic() < deadline, [j["status"] for j in jobs]
            time.sleep(0.1)
        assert [j["status"] for j in jobs] == ["succeeded"] * N, jobs
        assert sorted(j["result"]["n"] for j in jobs) == list(range(N))
    finally:
        stop(stack.proc)
