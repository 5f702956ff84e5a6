"""A full data disk degrades the framework instead of stopping it (issue 14 "Faults", issue 20).

On a really full filesystem (a small tmpfs mounted as MTP_DATA_DIR): sync calls that
need no store keep answering 200, async calls answer 503 problem+json, a worker that
dies and is replaced boots all the same (the gunicorn master's child_exit hook writes
to the job store on that disk and must not take the master down), and once space
returns async calls work again and the usage of the full period is counted, without
a restart.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework.diskfull import disk_trouble
from framework.usage import DROPPED, UsageMeter
from tests.framework.conftest import Server, start_server
from tests.framework.test_worker_death import runners
from tests.helpers import stop, unavailable

SIZE = "4m"


@pytest.fixture(autouse=True)
def _mtp_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    # framework.logs.setup (run by create_app) stops propagation to the root logger.
    monkeypatch.setattr(logging.getLogger("mtp"), "propagate", True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at tmp_path/data, unmounted afterwards."""
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs",
                              str(data)], capture_output=True, text=True)
    if mounted.returncode != 0:  # root with CAP_SYS_ADMIN can; CI runs as root
        unavailable("could not mount a tmpfs: "
                    + (mounted.stderr.strip() or f"mount exited {mounted.returncode}"))
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write zeros until the filesystem says ENOSPC; returns the filler file.

    The job store's WAL is truncated first: SQLite reuses a checkpointed WAL's blocks,
    so without this a write could still fit in space the file holds already.
    """
    jobs = disk / "jobs.sqlite3"
    if jobs.exists():
        with sqlite3.connect(jobs, timeout=10) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):  # big blocks, then what is left
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def wait_status(server: Server, job_id: str, until: tuple[str, ...], timeout: float = 15):
    deadline = time.monotonic() + timeout
    while (job := server.client.get(f"/jobs/{job_id}").json())["status"] not in until:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def usage_calls(server: Server, service: str) -> int:
    rows = server.client.get("/usage", roles="admin").json()["rows"]
    return sum(r["calls"] for r in rows if r["service"] == service)


def test_a_full_data_disk_degrades_and_recovers_without_a_restart(small_disk: Path,
                                                                    tmp_path: Path):
    server = start_server(tmp_path, MTP_JOB_WORKERS="2")
    c = server.client
    try:
        before = c.post("/services/slow", {"seconds": 0.01})
        assert before.status == 202, before.body
        wait_status(server, before.json()["job_id"], ("succeeded",))
        filler = fill(small_disk)
        for _ in range(5):
            sync = c.post("/services/echo", {"x": 1})
            assert sync.status == 200, sync.body
            refused = c.post("/services/slow", {"seconds": 0.01})
            assert refused.status == 503, refused.body
            assert refused.header("Content-Type") == "application/problem+json"
            assert refused.json()["request_id"] and refused.header("Retry-After")
        time.sleep(1.5)  # usage flushes fail meanwhile: the counts stay in memory
        assert server.proc.poll() is None

        filler.unlink()  # space returns: everything works again, no restart
        again = c.post("/services/slow", {"seconds": 0.01})
        assert again.status == 202, again.body
        assert wait_status(server, again.json()["job_id"], ("succeeded",))["result"]["done"]
        deadline = time.monotonic() + 10
        while usage_calls(server, "echo") < 5:  # the full period's calls were kept
            assert time.monotonic() < deadline, "usage of the full period was lost"
            time.sleep(0.2)
        log = server.log_text()
        # One line per worker and spell, not one per refused call.
        assert 1 <= log.count("the job store refuses new jobs") <= 2, log[-3000:]
    finally:
        stop(server.proc)


def test_the_master_survives_a_worker_dying_on_a_full_disk(small_disk: Path, tmp_path: Path):
    """The master's child_exit hook fails the dead worker's running job in the job store
    on the full disk: logged once, the master goes on and the new worker boots."""
    server = start_server(tmp_path, MTP_JOB_WORKERS="2")
    c = server.client
    try:
        running = c.post("/services/slow", {"seconds": 30}).json()["job_id"]
        wait_status(server, running, ("running",))
        victim = int(runners(server)[running].rsplit(":", 2)[1])
        filler = fill(small_disk)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(_workers(server)) < 2 or victim in _workers(server):
            assert server.proc.poll() is None, server.log_text()[-3000:]
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.1)
        for _ in range(4):  # both workers, the new one included, answer
            assert c.post("/services/echo", {}).status == 200
        assert c.get("/healthz").status == 200 and server.proc.poll() is None
        assert "gunicorn hook child_exit failed" in server.log_text()
        filler.unlink()
        # The cut-off job is interrupted once the store takes writes again (a reaper pass).
        job = wait_status(server, running, ("failed",), timeout=20)
        assert job["error"]["reason"] == "interrupted"
    finally:
        stop(server.proc)


def test_a_running_job_keeps_its_result_until_the_disk_has_room(small_disk: Path,
                                                                 tmp_path: Path):
    server = start_server(tmp_path, MTP_WORKERS="1", MTP_JOB_WORKERS="1")
    c = server.client
    try:
        running = c.post("/services/slow", {"seconds": 1}).json()["job_id"]
        wait_status(server, running, ("running",))
        filler = fill(small_disk)
        time.sleep(2)  # finished meanwhile; the store refused its result
        assert c.get(f"/jobs/{running}").json()["status"] == "running"
        filler.unlink()
        job = wait_status(server, running, ("succeeded", "failed"))
        assert job["status"] == "succeeded" and job["result"]["done"] is True
        assert "could record its result again" in server.log_text()
    finally:
        stop(server.proc)


def _workers(server: Server) -> list[int]:
    """The gunicorn master's live children."""
    path = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    return [pid for pid in map(int, path.read_text().split()) if _pid_alive(pid)]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# -- in process ---------------------------------------------------------------------------


class RefusingStore:
    """A usage store on a full disk: every add fails until ``room`` is set."""

    errors = (sqlite3.OperationalError,)

    def __init__(self) -> None:
        self.room = False
        self.rows: list[tuple] = []

    def add(self, rows) -> None:
        if not self.room:
            raise sqlite3.OperationalError("database or disk is full")
        self.rows.extend(rows)


def test_usage_is_kept_in_memory_then_dropped_counted_and_logged_once(caplog):
    store = RefusingStore()
    meter = UsageMeter(store, "acme-disk", flush_interval=3600, max_pending=2)  # type: ignore[arg-type]
    before = DROPPED.labels("acme-disk")._value.get()
    with caplog.at_level(logging.WARNING, logger="mtp.usage"):
        for user in ("a", "b"):  # two buckets fit
            meter.record("svc", None, user, 200, 0.1, 0.1, 1, 1)
        assert meter.flush() == 0  # refused: kept
        for user in ("c", "d", "e"):  # new buckets past the bound: dropped
            meter.record("svc", None, user, 200, 0.1, 0.1, 1, 1)
        meter.record("svc", None, "a", 200, 0.1, 0.1, 1, 1)  # an existing bucket still adds
        assert DROPPED.labels("acme-disk")._value.get() - before == 3
        store.room = True
        assert meter.flush() == 2
        meter.close()
    assert sorted((r[4], r[5]) for r in store.rows) == [("a", 2), ("b", 1)]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "is dropped" in m]) == 1, messages
    assert any("3 calls' usage was dropped meanwhile" in m for m in messages)
    assert len([m for m in messages if "usage flush failed" in m]) == 1


def test_usage_that_cannot_be_written_at_exit_is_counted_lost(caplog):
    store = RefusingStore()
    meter = UsageMeter(store, "acme-exit", flush_interval=3600)  # type: ignore[arg-type]
    before = DROPPED.labels("acme-exit")._value.get()
    for _ in range(4):
        meter.record("svc", None, "u", 200, 0.1, 0.1, 1, 1)
    with caplog.at_level(logging.ERROR, logger="mtp.usage"):
        meter.close()
    assert DROPPED.labels("acme-exit")._value.get() - before == 4
    assert any("4 calls' usage" in r.getMessage() for r in caplog.records)


def test_disk_trouble_is_told_apart():
    assert disk_trouble(sqlite3.OperationalError("database or disk is full"))
    assert disk_trouble(sqlite3.OperationalError("disk I/O error"))
    assert disk_trouble(OSError(errno.ENOSPC, "No space left on device"))
    assert not disk_trouble(sqlite3.OperationalError("no such table: jobs"))
    assert not disk_trouble(OSError(errno.EACCES, "Permission denied"))


def test_stores_open_and_versions_degrade_on_a_full_disk(small_disk: Path, tmp_path: Path,
                                                         caplog):
    """What a worker booting on the full disk opens: the files are there, nothing stops it."""
    from framework.jobs import SqliteJobStore
    from framework.tenant_config import load_tenant
    from framework.usage import UsageStore
    from framework.versions import VersionStore
    from tests.framework.tenant import TENANT_TOML, make_tenant

    jobs_path, usage_path, config_path = (small_disk / n for n in
                                          ("jobs.sqlite3", "usage.db", "config.db"))
    keeper = SqliteJobStore(jobs_path)  # the running platform holds the file open
    assert keeper.usable()
    UsageStore(usage_path)
    tenant = load_tenant(make_tenant(tmp_path / "t") / "tenant.toml")
    assert VersionStore(config_path).record(tenant, None, "tenant.toml", None).id == 1
    filler = fill(small_disk)
    with caplog.at_level(logging.WARNING, logger="mtp"):  # whatever level a test set
        jobs = SqliteJobStore(jobs_path)
        assert jobs.get("0" * 32) is None  # reads work
        UsageStore(usage_path)
        versions = VersionStore(config_path)
        changed = load_tenant(make_tenant(tmp_path / "t2", TENANT_TOML.replace(
            'name = "Acme"', 'name = "Acme 2"')) / "tenant.toml")
        unrecorded = versions.record(changed, None, "tenant.toml", 1)
    assert unrecorded.id == 0 and unrecorded.hash == changed.digest
    assert any("config version not recorded" in r.getMessage() for r in caplog.records)
    filler.unlink()
    assert versions.record(changed, None, "tenant.toml", 1).id == 2  # recorded once room


def test_a_store_that_cannot_be_made_is_still_an_error(small_disk: Path):
    from framework.jobs import SqliteJobStore

    fill(small_disk)
    with pytest.raises(sqlite3.Error):
        SqliteJobStore(small_disk / "new.sqlite3")  # no file to fall back on
