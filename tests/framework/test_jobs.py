"""SQLite job store: atomic transitions, runner identity, reaping, retention."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from framework.jobrunner import JobRunner
from framework.jobs import (
    Job,
    SqliteJobStore,
    iso,
    process_start,
    runner_alive,
    runner_id,
)


@pytest.fixture(autouse=True)
def _mtp_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    # framework.logs.setup (run by create_app) stops propagation to the root logger.
    monkeypatch.setattr(logging.getLogger("mtp"), "propagate", True)


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "sub" / "jobs.sqlite3")


def job(job_id: str = "a" * 32, runner: str | None = None, **kw) -> Job:
    return Job(id=job_id, tenant="acme", service="svc", operation=None, owner="alice",
               request_id="r", created=time.time(), runner=runner or runner_id(), **kw)


def dead_runner() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:{12345}"


def test_create_get_and_public_shape(store: SqliteJobStore):
    store.create(job())
    got = store.get("a" * 32)
    assert got is not None and got.status == "queued" and got.owner == "alice"
    public = got.public()
    assert public["job_id"] == "a" * 32 and public["status"] == "queued"
    assert public["started_at"] is None and "result" not in public and "error" not in public
    assert public["created_at"].endswith("Z")
    assert store.get("b" * 32) is None
    assert store.usable()


def test_claim_finish_and_cancel_are_conditional(store: SqliteJobStore):
    store.create(job())
    assert store.claim("a" * 32, runner_id(), time.time() + 10)
    assert not store.claim("a" * 32, runner_id(), time.time() + 10)
    assert not store.cancel("a" * 32)  # running: too late
    assert store.finish("a" * 32, "succeeded", result_json=b'{"x":1}')
    assert not store.finish("a" * 32, "failed", error={"status": 500})
    done = store.get("a" * 32)
    assert done.status == "succeeded" and done.result == {"x": 1}
    assert done.public()["result"] == {"x": 1}


def test_cancel_versus_claim_only_one_wins(store: SqliteJobStore):
    ids = [f"{i:032x}" for i in range(40)]
    for job_id in ids:
        store.create(job(job_id))
    wins: dict[str, list[str]] = {"claim": [], "cancel": []}

    def claimer():
        for job_id in ids:
            if store.claim(job_id, runner_id(), time.time() + 5):
                wins["claim"].append(job_id)

    def canceller():
        for job_id in ids:
            if store.cancel(job_id):
                wins["cancel"].append(job_id)

    threads = [threading.Thread(target=claimer), threading.Thread(target=canceller)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins["claim"] + wins["cancel"]) == ids
    assert not set(wins["claim"]) & set(wins["cancel"])


def test_reap_fails_jobs_of_dead_processes_only(store: SqliteJobStore):
    dead = dead_runner()
    store.create(job("1" * 32, runner=dead))  # queued, no stored call (an older row)
    store.create(job("2" * 32, runner=dead))
    store.claim("2" * 32, dead, time.time() + 100)  # running when its process died
    store.create(job("3" * 32))  # this live process
    # Another host name on a one-machine (WAL) file: a previous incarnation of this one.
    store.create(job("4" * 32, runner="elsewhere:1:1"))
    store.create(job("5" * 32, runner="garbage"))
    assert store.reap() == 3
    for job_id in ("1" * 32, "2" * 32, "4" * 32):
        failed = store.get(job_id)
        assert failed.status == "failed" and failed.error["reason"] == "interrupted"
        assert failed.public()["error"]["reason"] == "interrupted"
    for job_id in ("3" * 32, "5" * 32):
        assert store.get(job_id).status == "queued"


def test_a_queued_job_of_a_dead_process_waits_to_be_adopted(store: SqliteJobStore):
    dead = dead_runner()
    call = {"service": "svc", "payload": {"n": 1}}
    store.create(job("1" * 32, runner=dead, call=call))
    store.create(job("2" * 32, runner=dead, call=call))
    store.create(job("3" * 32, call=call))  # this live process keeps its own
    assert store.reap() == 0  # never started: not interrupted
    orphans = store.orphans(limit=10)
    assert [j.id for j in orphans] == ["1" * 32, "2" * 32]
    assert orphans[0].call == call and store.orphans(limit=1)[0].id == "1" * 32
    assert store.orphans(limit=0) == []
    me = runner_id()
    assert store.adopt("1" * 32, dead, me)
    assert not store.adopt("1" * 32, dead, "someone-else")  # one process wins
    assert store.get("1" * 32).runner == me and store.get("1" * 32).status == "queued"
    assert [j.id for j in store.orphans(limit=10)] == ["2" * 32]
    # Once done with, the call (payload, identity) is not kept.
    assert store.claim("1" * 32, me, time.time() + 10)
    assert store.finish("1" * 32, "succeeded", result_json=b"1")
    assert store.get("1" * 32).call is None
    assert store.cancel("3" * 32) and store.get("3" * 32).call is None


def test_a_job_belongs_to_its_principal_not_to_its_user_id():
    mine = job(auth_method="api_key")
    assert mine.belongs_to("alice", "api_key")
    assert not mine.belongs_to("alice", "jwt") and not mine.belongs_to("bob", "api_key")
    # A row from before the method was recorded belongs to no principal (fail closed:
    # its user id alone could be two principals); role admin still sees it.
    legacy = job()
    assert legacy.auth_method == ""
    assert not legacy.belongs_to("alice", "jwt") and not legacy.belongs_to("alice", "")


def test_a_jobs_file_of_an_older_release_is_migrated_and_its_rows_kept(tmp_path: Path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:  # the schema of the first release
        db.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
                service TEXT NOT NULL, operation TEXT, owner TEXT NOT NULL,
                request_id TEXT NOT NULL, status TEXT NOT NULL, result TEXT, error TEXT,
                created REAL NOT NULL, started REAL, finished REAL, runner TEXT NOT NULL,
                deadline REAL);
        """)
        db.execute("INSERT INTO jobs VALUES (?, 'acme', 'svc', NULL, 'alice', 'r', "
                   "'succeeded', '{\"x\":1}', NULL, 1.0, 2.0, 3.0, 'h:1:1', NULL)",
                   ("a" * 32,))
    db.close()
    store = SqliteJobStore(path)
    old = store.get("a" * 32)
    assert old.status == "succeeded" and old.result == {"x": 1}
    assert old.auth_method == "" and old.call is None and not old.belongs_to("alice", "ldap")
    store.create(job("b" * 32, auth_method="jwt", call={"k": "v"}))
    assert store.get("b" * 32).auth_method == "jwt" and store.get("b" * 32).call == {"k": "v"}
    SqliteJobStore(path)  # opening it again changes nothing


def test_reap_fails_running_jobs_past_their_deadline(store: SqliteJobStore):
    store.create(job())
    store.claim("a" * 32, runner_id(), time.time() - 1)
    assert store.reap() == 1
    late = store.get("a" * 32)
    assert late.status == "failed" and late.error["status"] == 504


def test_purge_drops_old_finished_jobs_only(store: SqliteJobStore):
    store.create(job("1" * 32))
    store.cancel("1" * 32)
    store.create(job("2" * 32))
    assert store.purge(time.time() - 60) == 0
    assert store.purge(time.time() + 1) == 1
    assert store.get("1" * 32) is None and store.get("2" * 32) is not None
    assert store.counts() == {"queued": 1, "running": 0, "succeeded": 0, "failed": 0,
                              "cancelled": 0}


def test_runner_identity_tells_a_reused_pid_apart():
    me = runner_id()
    assert runner_alive(me)
    host, pid, start = me.rsplit(":", 2)
    assert int(pid) == os.getpid() and start == process_start(os.getpid())
    assert not runner_alive(f"{host}:{pid}:{int(start) + 1}")
    assert process_start(2**22 + 12345) is None


def test_connections_are_per_thread_and_closable(store: SqliteJobStore):
    store.create(job())
    seen = []
    t = threading.Thread(target=lambda: seen.append(store.get("a" * 32)))
    t.start()
    t.join()
    assert seen[0].id == "a" * 32
    store.close()
    assert store.get("a" * 32) is not None  # reopens


def test_an_unreadable_store_is_not_usable(tmp_path: Path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store._conn().execute("DROP TABLE jobs")
    assert not store.usable()


def test_iso_timestamps():
    assert iso(None) is None
    assert iso(0.25) == "1970-01-01T00:00:00.250Z"


def test_a_refusing_store_is_logged_once_per_spell(tmp_path: Path, caplog):
    from framework.errors import Unavailable
    from framework.execute import Executor
    from tests.framework.test_execute import ctx, spec

    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    full = {"on": True}
    real_create = store.create

    def create(job):
        if full["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        real_create(job)

    store.create = create  # the disk fills: every insert is refused
    runner = JobRunner(store, lambda: Executor(1000).call, runner_id(), 1, 4)
    with caplog.at_level("WARNING", logger="mtp.framework.jobs"):
        for _ in range(3):
            with pytest.raises(Unavailable):
                runner.submit(spec(lambda c: 1), ctx(), owner="alice")
        full["on"] = False
        job, future = runner.submit(spec(lambda c: 1), ctx(), owner="alice")
        assert future.result(5).status == 200
    runner.shutdown()
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "refuses new jobs" in m]) == 1, lines
    assert len([m for m in lines if "takes new jobs again" in m]) == 1, lines
    assert store.get(job.id).status == "succeeded"


def test_a_result_waits_for_room_on_the_disk(tmp_path: Path, caplog, monkeypatch):
    from framework.execute import Executor
    from tests.framework.test_execute import ctx, spec

    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    refusals = {"left": 2}
    real_finish = store.finish

    def finish(*args, **kw):
        if refusals["left"]:
            refusals["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return real_finish(*args, **kw)

    store.finish = finish
    runner = JobRunner(store, lambda: Executor(1000).call, runner_id(), 1, 4)
    monkeypatch.setattr("framework.jobrunner.WRITE_RETRY", 0.01)
    try:
        with caplog.at_level("WARNING", logger="mtp.framework.jobs"):
            job, future = runner.submit(spec(lambda c: {"v": 1}), ctx(), owner="alice")
            assert future.result(5).status == 200
    finally:
        runner.shutdown()
    done = store.get(job.id)
    assert done.status == "succeeded" and done.result == {"v": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "data disk is full" in m]) == 1, lines
    assert any("could record its result again" in m for m in lines)
