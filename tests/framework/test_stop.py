"""Stopping the framework: nothing accepted is lost (issue 14, "Faults").

A graceful stop (SIGTERM) lets running jobs finish, leaves queued jobs queued and
the restarted framework runs them; a job that was running when its process died
is ``interrupted`` after the restart, never ``running`` forever. In process: the
drain refuses new jobs with 503, and a job still running at the end of the grace
period is marked interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from framework.cli.serve import master_hook, metrics_base
from framework.errors import Unavailable
from framework.jobrunner import Reaper, Stopping, call_of, rebuild_call
from framework.jobs import Job, SqliteJobStore, new_job_id, runner_id
from framework.tenant_config import ConfigError
from tests.framework.conftest import Server, start_server
from tests.helpers import stop

N = 5


@pytest.fixture(autouse=True)
def _mtp_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    # framework.logs.setup (run by create_app) stops propagation to the root logger.
    monkeypatch.setattr(logging.getLogger("mtp"), "propagate", True)


def statuses(data: Path) -> dict[str, str]:
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        return dict(db.execute("SELECT id, status FROM jobs"))


def wait_all(server: Server, ids: list[str], until: tuple[str, ...],
             timeout: float = 30) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j: server.client.get(f"/jobs/{j}").json() for j in ids}
        if all(job["status"] in until for job in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, {j: b["status"] for j, b in jobs.items()}
        time.sleep(0.1)


def restart(server: Server, tmp: Path) -> Server:
    """The framework again, on the same data dir (and the same tenant)."""
    return start_server(tmp, MTP_WORKERS="1", MTP_JOB_WORKERS="1")


def test_sigterm_keeps_queued_jobs_and_the_restart_runs_them(tmp_path: Path):
    server = start_server(tmp_path, MTP_WORKERS="1", MTP_JOB_WORKERS="1")
    try:
        ids = []
        for n in range(N):
            answer = server.client.post("/services/slow", {"seconds": 1, "n": n})
            assert answer.status == 202, answer.body
            ids.append(answer.json()["job_id"])
        wait_all(server, ids[:1], ("running",))
        assert stop(server.proc) == 0  # SIGTERM: a graceful stop
        after_stop = statuses(server.data)
        # The running job finished within the grace period; the others were not touched.
        assert after_stop[ids[0]] == "succeeded"
        assert {after_stop[j] for j in ids[1:]} == {"queued"}
    finally:
        stop(server.proc)
    server = restart(server, tmp_path)
    try:
        jobs = wait_all(server, ids, ("succeeded", "failed", "cancelled"))
        assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
        assert all(j["result"] == {"done": True, "by": "alice"} for j in jobs.values())
    finally:
        stop(server.proc)


def test_a_job_running_when_its_process_died_is_interrupted_after_the_restart(
        tmp_path: Path):
    server = start_server(tmp_path, MTP_WORKERS="1", MTP_JOB_WORKERS="1")
    try:
        ids = [server.client.post("/services/slow", {"seconds": s}).json()["job_id"]
               for s in (20, 0.1)]
        wait_all(server, ids[:1], ("running",))
        os.killpg(server.proc.pid, signal.SIGKILL)  # no grace at all: a crash
        server.proc.wait(10)
        assert statuses(server.data) == {ids[0]: "running", ids[1]: "queued"}
    finally:
        stop(server.proc)
    server = restart(server, tmp_path)
    try:
        cut, queued = wait_all(server, ids, ("succeeded", "failed")).values()
        assert cut["status"] == "failed" and cut["error"]["reason"] == "interrupted"
        assert queued["status"] == "succeeded"
    finally:
        stop(server.proc)


@pytest.mark.slow
def test_a_job_still_running_at_the_end_of_the_grace_period_is_interrupted(tmp_path: Path):
    """Cut off by the stop itself: marked before the worker leaves, no restart needed.

    The worker drains until the graceful timeout minus 2 s (MTP_GRACE_SECONDS sets it)."""
    server = start_server(tmp_path, MTP_WORKERS="1", MTP_JOB_WORKERS="1",
                          MTP_GRACE_SECONDS="6")
    try:
        ids = [server.client.post("/services/slow", {"seconds": s}).json()["job_id"]
               for s in (60, 0.1)]
        wait_all(server, ids[:1], ("running",))
        assert stop(server.proc, timeout=45) == 0
        with sqlite3.connect(server.data / "jobs.sqlite3") as db:
            rows = dict(db.execute("SELECT id, status || ':' || COALESCE(error, '') FROM jobs"))
        assert rows[ids[0]].startswith("failed:") and '"interrupted"' in rows[ids[0]]
        assert rows[ids[1]] == "queued:"  # never started: kept for the next start
    finally:
        stop(server.proc)


# -- in process -------------------------------------------------------------------------


@pytest.fixture
def runtime(tmp_path: Path):
    from framework.app import build_runtime
    from framework.settings import Settings
    from tests.framework.tenant import SECRET, make_tenant

    root = make_tenant(tmp_path / "tenant")
    settings = Settings.from_env({"MTP_DATA_DIR": str(tmp_path / "data"),
                                  "MTP_SIDECAR_SECRET": SECRET, "MTP_JOB_WORKERS": "1",
                                  "MTP_LOG_LEVEL": "WARNING"}, tenant_dir=root)
    rt = build_runtime(settings, settings.load_tenant(), background=False, secret=b"")
    yield rt
    rt.close()


def context(rt, service: str, payload: dict):
    """A handler's spec and context, as a request by alice (JWT) builds them."""
    return rebuild_call(rt, {"tenant": "acme", "service": service, "operation": None,
                             "user": "alice", "groups": ["sales"], "roles": [],
                             "auth_method": "jwt", "payload": payload, "params": {"p": "1"},
                             "request_id": "req-stop"})


def test_drain_refuses_new_jobs_keeps_queued_ones_and_interrupts_what_outlives_it(runtime):
    rt = runtime
    spec, ctx = context(rt, "slow", {"seconds": 3})
    long_job, _ = rt.runner.submit(spec, ctx, owner="alice")
    spec, ctx = context(rt, "slow", {"seconds": 0.01})
    queued_job, _ = rt.runner.submit(spec, ctx, owner="alice")
    deadline = time.monotonic() + 5
    while rt.jobs.get(long_job.id).status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not rt.runner.drain(time.monotonic() + 0.3)  # the long job outlives the drain
    with pytest.raises(Stopping) as refused:
        rt.runner.submit(spec, ctx, owner="alice")
    assert isinstance(refused.value, Unavailable) and refused.value.status == 503
    cut = rt.jobs.get(long_job.id)
    assert cut.status == "failed" and cut.error["reason"] == "interrupted"
    kept = rt.jobs.get(queued_job.id)
    assert kept.status == "queued" and kept.call["payload"] == {"seconds": 0.01}


def test_drain_with_nothing_running_is_clean(runtime):
    assert runtime.runner.drain(time.monotonic() + 5)


def test_orphaned_jobs_are_adopted_and_run_here(runtime):
    rt = runtime
    store: SqliteJobStore = rt.jobs
    _, ctx = context(rt, "slow", {"seconds": 0.01})
    gone = f"{os.uname().nodename}-old:1:1"  # a previous incarnation (another host name)
    calls = [dict(call_of(ctx), service="nosuchservice"), call_of(ctx), call_of(ctx)]
    ids = [new_job_id() for _ in calls]
    for job_id, call in zip(ids, calls, strict=True):
        store.create(Job(id=job_id, tenant="acme", service=call["service"], operation=None,
                         owner="alice", request_id="req-stop", created=time.time(),
                         runner=gone, auth_method="jwt", call=call))
    Reaper(store, 3600, adopt=rt.runner.adopt).sweep()
    deadline = time.monotonic() + 10
    while {store.get(j).status for j in ids} & {"queued", "running"}:
        assert time.monotonic() < deadline, [store.get(j).status for j in ids]
        time.sleep(0.02)
    first, *rest = (store.get(j) for j in ids)
    # The service went away between accepting the job and running it: failed, named.
    assert first.status == "failed" and first.error["type"].endswith("service-not-found")
    assert [j.status for j in rest] == ["succeeded", "succeeded"]
    assert rest[0].runner == rt.runner.runner and rest[0].result == {"done": True, "by": "alice"}


def test_a_stopping_runner_adopts_nothing(runtime):
    runtime.runner.stop_accepting()
    assert runtime.runner.adopt() == 0


def test_a_stored_call_rebuilds_the_same_context(runtime):
    spec, ctx = context(runtime, "echo", {"k": 1})
    again_spec, again = rebuild_call(runtime, call_of(ctx))
    assert again_spec is spec
    assert (again.user, again.groups, again.auth_method, again.payload, again.params,
            again.request_id) == (ctx.user, ctx.groups, ctx.auth_method, ctx.payload,
                                  ctx.params, ctx.request_id)


# -- the gunicorn master's hooks and the metrics directory ---------------------------------


def test_a_master_hook_with_a_failing_store_logs_once_and_keeps_going(tmp_path: Path, caplog):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    broken = threading.Event()

    def child_exit(server, worker):
        if broken.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        store.reap()

    hook = master_hook("child_exit", child_exit)
    broken.set()
    with caplog.at_level(logging.INFO, logger="mtp.framework.serve"):
        for _ in range(3):
            hook(None, None)  # never raises
        broken.clear()
        hook(None, None)
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "failed" in m]) == 1, lines
    assert any("works again" in m for m in lines)


def test_the_metrics_directory_is_off_the_data_disk(tmp_path: Path):
    mine = tmp_path / "metrics"
    mine.mkdir()
    assert metrics_base({"MTP_METRICS_DIR": str(mine)}) == mine
    with pytest.raises(ConfigError, match="MTP_METRICS_DIR"):
        metrics_base({"MTP_METRICS_DIR": str(tmp_path / "missing")})
    assert metrics_base({"XDG_RUNTIME_DIR": str(mine)}) == mine
    fallback = metrics_base({"XDG_RUNTIME_DIR": str(tmp_path / "missing")})
    assert fallback == (Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else
                        Path(__import__("tempfile").gettempdir()))


def test_the_framework_uses_mtp_metrics_dir_fresh_per_start(tmp_path: Path):
    base = tmp_path / "shm"
    base.mkdir()
    server = start_server(tmp_path, MTP_METRICS_DIR=str(base))
    try:
        (made,) = base.iterdir()
        assert made.name.startswith(f"mtp-{os.getuid()}-{server.proc.pid}-")
        assert server.client.get("/metrics").status == 200
        assert not list(server.data.glob("metrics-*"))
    finally:
        stop(server.proc)
    assert not list(base.iterdir())  # removed at exit


def test_runner_identity_is_this_process():
    assert runner_id().rsplit(":", 2)[1] == str(os.getpid())


def test_a_waiting_request_whose_job_is_left_queued_by_the_stop_gets_202(tmp_path: Path):
    from framework.app import create_app
    from framework.settings import Settings
    from tests.framework.client import signed_headers
    from tests.framework.tenant import SECRET, make_tenant

    root = make_tenant(tmp_path / "t")
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SECRET, "MTP_DATA_DIR": str(tmp_path),
                                  "MTP_JOB_WORKERS": "1", "MTP_LOG_LEVEL": "WARNING"},
                                 tenant_dir=root)
    app = create_app(settings, settings.load_tenant(), background=False)
    rt = app.extensions["mtp"]

    def post(seconds: float, prefer: str):
        path = "/services/slow"
        body = json.dumps({"seconds": seconds}).encode()  # the signature covers the body
        headers = signed_headers("POST", path, body=body)
        headers.update({"Prefer": prefer, "Content-Type": "application/json"})
        return app.test_client().post(path, headers=headers, data=body)

    try:
        busy = post(1, "respond-async").get_json()["job_id"]
        while rt.jobs.get(busy).status != "running":
            time.sleep(0.02)
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(
            post(0.01, "respond-async, wait=10")))
        waiter.start()
        while rt.jobs.counts()["queued"] == 0:
            time.sleep(0.02)
        assert rt.runner.drain(time.monotonic() + 5)  # the busy job ends within it
        waiter.join(10)
        (answer,) = answers
        assert answer.status_code == 202, answer.data  # not done: polled later, never a 500
        assert rt.jobs.get(answer.get_json()["job_id"]).status == "queued"
        refused = post(0.01, "respond-async")
        assert refused.status_code == 503 and refused.content_type == "application/problem+json"
        assert refused.get_json()["type"].endswith(":stopping")
    finally:
        rt.close()


def test_adoption_skips_what_it_cannot_take(runtime, monkeypatch):
    rt = runtime
    store: SqliteJobStore = rt.jobs
    _, ctx = context(rt, "slow", {"seconds": 0.01})
    gone = f"{os.uname().nodename}-old:1:1"
    ids = [new_job_id() for _ in range(2)]
    for job_id in ids:
        store.create(Job(id=job_id, tenant="acme", service="slow", operation=None,
                         owner="alice", request_id="r", created=time.time(), runner=gone,
                         auth_method="jwt", call=call_of(ctx)))
    # Another process adopts the first one between the listing and the update.
    real_adopt = store.adopt
    monkeypatch.setattr(store, "adopt", lambda job_id, old, new: job_id != ids[0] and
                        real_adopt(job_id, old, new))
    assert rt.runner.adopt() == 1
    monkeypatch.setattr(store, "orphans", None)  # a store without orphans (Redis)
    assert rt.runner.adopt() == 0
