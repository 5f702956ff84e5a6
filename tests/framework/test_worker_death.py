"""A gunicorn worker killed mid-job: its jobs end `failed` (interrupted), others' live on."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator

import pytest

from framework.cli.serve import metrics_base
from tests.framework.conftest import Server, start_server
from tests.helpers import base_env, stop


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("fw-kill"), MTP_JOB_WORKERS="4")
    yield srv
    stop(srv.proc)


def runners(server: Server) -> dict[str, str]:
    with sqlite3.connect(server.data / "jobs.sqlite3") as db:
        return dict(db.execute("SELECT id, runner FROM jobs WHERE status = 'running'"))


def test_killed_worker_fails_only_its_own_jobs(server: Server):
    c = server.client
    ids: list[str] = []
    deadline = time.monotonic() + 20
    # Submit long jobs until both workers run at least one.
    while len(set(runners(server).values())) < 2:
        assert time.monotonic() < deadline, "jobs never spread over both workers"
        answer = c.post("/services/slow", {"seconds": 4})
        assert answer.status == 202, answer.body
        ids.append(answer.json()["job_id"])
        time.sleep(0.05)
    running = runners(server)
    victim = next(iter(running.values()))
    pid = int(victim.rsplit(":", 2)[1])
    os.kill(pid, signal.SIGKILL)

    doomed = [j for j, r in running.items() if r == victim]
    survivors = [j for j, r in running.items() if r != victim]
    deadline = time.monotonic() + 10
    for job_id in doomed:
        while (job := c.get(f"/jobs/{job_id}").json())["status"] == "running":
            assert time.monotonic() < deadline, "the dead worker's job stayed running"
            time.sleep(0.1)
        assert job["status"] == "failed"
        assert job["error"]["reason"] == "interrupted"
    for job_id in survivors:
        assert c.get(f"/jobs/{job_id}").json()["status"] == "running"
    # The arbiter replaced the worker; the runtime still answers.
    assert c.post("/services/echo", {}).status == 200


def test_a_worker_leaving_gracefully_keeps_the_shared_metrics_dir(server: Server):
    """A worker exits through SystemExit up the master's stack: it must not clean up."""
    # Off the data disk: a RAM-backed runtime directory, named by the master's pid.
    assert not list(server.data.glob("metrics-*"))
    base = metrics_base(base_env())  # $XDG_RUNTIME_DIR where set, else /dev/shm
    (metrics_dir,) = base.glob(f"mtp-{os.getuid()}-{server.proc.pid}-*")
    c = server.client
    pid = int(_any_runner(server).rsplit(":", 2)[1])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "worker did not leave"
        time.sleep(0.05)
    assert metrics_dir.is_dir()
    assert c.post("/services/echo", {}).status == 200
    assert c.get("/metrics").status == 200
    stop(server.proc)
    assert not metrics_dir.exists()  # removed at exit


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _any_runner(server: Server) -> str:
    answer = server.client.post("/services/slow", {"seconds": 2})
    job_id = answer.json()["job_id"]
    deadline = time.monotonic() + 10
    while True:
        job = server.client.get(f"/jobs/{job_id}").json()
        if job["status"] == "running":
            return runners(server)[job_id]
        assert time.monotonic() < deadline
        time.sleep(0.05)
