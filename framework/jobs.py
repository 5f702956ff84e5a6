"""Async job state that every worker process shares.

:class:`JobStore` is the small protocol the rest of the framework uses; the
default :class:`SqliteJobStore` keeps jobs in ``$MTP_DATA_DIR/jobs.sqlite3``
(WAL, one connection per thread, busy timeout), so a job started by one gunicorn
worker is found by every other.

A job belongs to its *principal*: the user id and the auth method together (an
API key named ``ci-bot`` and a JWT with ``sub = ci-bot`` are two principals).
Rows written before the method was recorded have ``auth_method = ''`` and keep
the rule they were created under: the user id alone (see :meth:`Job.belongs_to`).

Every job records its *runner*: the process that queued it and runs it, as
``host:pid:start-time`` (the kernel's start time of the process, so a reused pid
is not taken for the old process). A *running* job whose runner is gone was cut
off: it is marked ``failed`` with reason ``interrupted``. A *queued* job whose
runner is gone never started: it keeps the call it was accepted with (identity,
payload) and another process adopts and runs it (:meth:`SqliteJobStore.orphans`,
:meth:`SqliteJobStore.adopt`); only a queued row without its call (written
before calls were stored) is failed ``interrupted``. The SQLite file is one
machine's (WAL needs shared memory), so a runner of another host name is a
previous incarnation of this machine (a container restarted with a new name)
and is gone too. State changes are single conditional UPDATEs, so claim (queued
-> running), adopt and cancel (queued -> cancelled) cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from framework.diskfull import schema_failed
from framework.errors import Unavailable

log = logging.getLogger("mtp.framework.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelled")
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
INTERRUPTED = "interrupted"


def redis_index(tenant: str) -> str:
    """The prefix of a tenant's job index in Redis (one sorted set per status after it)."""
    return f"mtp:{tenant}:jobs:"


@dataclass
class Job:
    """One async call and what became of it."""

    id: str
    tenant: str
    service: str
    operation: str | None
    owner: str
    request_id: str
    status: str = QUEUED
    result: Any = None  # the handler's return value, when succeeded
    error: dict[str, Any] | None = None  # a problem document, when failed
    created: float = 0.0  # unix seconds
    started: float | None = None
    finished: float | None = None
    runner: str = ""
    deadline: float | None = None  # unix seconds; a running job past it is failed
    auth_method: str = ""  # with ``owner``, the principal; '' on rows from before it
    call: dict[str, Any] | None = None  # what a queued job runs with (never public)

    def belongs_to(self, user: str, auth_method: str) -> bool:
        """Whether this principal created the job.

        A row from before the method was recorded belongs to no principal (role admin
        still sees it): its user id alone could name two principals, and such rows
        live only until the retention ends.
        """
        return self.owner == user and self.auth_method == auth_method != ""

    def public(self) -> dict[str, Any]:
        """The body of ``GET /jobs/{id}``."""
        body: dict[str, Any] = {
            "job_id": self.id,
            "service": self.service,
            "operation": self.operation,
            "status": self.status,
            "request_id": self.request_id,
            "created_at": iso(self.created),
            "started_at": iso(self.started),
            "finished_at": iso(self.finished),
        }
        if self.status == SUCCEEDED:
            body["result"] = self.result
        elif self.error is not None:
            body["error"] = self.error
        return body


def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with milliseconds."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def new_job_id() -> str:
    return uuid.uuid4().hex


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses: split after its ')'.
    return stat.rpartition(")")[2].split()[19]


def runner_id(pid: int | None = None) -> str:
    """This process's identity: ``host:pid:start-time``."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid) or '0'}"


def runner_alive(runner: str, host: str | None = None, foreign: bool = True) -> bool:
    """False only when ``runner`` ran on this host and that exact process is gone.

    ``foreign`` is the verdict for a runner of another host name: alive (its own
    reaper judges it) unless the store is this machine's alone.
    """
    parts = runner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True  # not ours to judge
    rhost, pid, start = parts
    if rhost != (host or socket.gethostname()):
        return foreign
    return process_start(int(pid)) == start


def local_runner_alive(runner: str) -> bool:
    """:func:`runner_alive` for a one-machine store: another host name is a gone process."""
    return runner_alive(runner, foreign=False)


class JobStore(Protocol):
    """Where jobs live. Every method is safe to call from any thread and process."""

    def create(self, job: Job) -> None:
        """Insert a new job (status queued)."""

    def get(self, job_id: str) -> Job | None:
        """The job, or None."""

    def claim(self, job_id: str, runner: str, deadline: float) -> bool:
        """queued -> running, only if still queued. True when this caller won."""

    def finish(self, job_id: str, status: str, result_json: bytes | None = None,
               error: dict[str, Any] | None = None) -> bool:
        """running -> succeeded/failed, only if still running; the result comes encoded."""

    def cancel(self, job_id: str) -> bool:
        """queued -> cancelled, only if still queued."""

    def fail(self, job_ids: Iterable[str], reason: str, detail: str,
             status_code: int = 500) -> int:
        """queued/running -> failed with ``reason`` (interrupted, deadline...)."""

    def reap(self, alive: Any = runner_alive) -> int:
        """Fail running jobs whose runner is dead or whose deadline passed."""

    def purge(self, older_than: float) -> int:
        """Delete finished jobs that finished before ``older_than`` (unix seconds)."""

    def counts(self) -> dict[str, int]:
        """Number of jobs per status."""

    def usable(self) -> bool:
        """True when the store answers (readiness)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    service TEXT NOT NULL,
    operation TEXT,
    owner TEXT NOT NULL,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    runner TEXT NOT NULL,
    deadline REAL,
    auth_method TEXT NOT NULL DEFAULT '',
    call TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished);
"""

# Columns added after the first release: (name, definition) for ALTER TABLE on older files.
_ADDED = (("auth_method", "TEXT NOT NULL DEFAULT ''"), ("call", "TEXT"))
_COLUMNS = ("id, tenant, service, operation, owner, request_id, status, result, error, "
            "created, started, finished, runner, deadline, auth_method, call")
_INSERT = f"INSERT INTO jobs ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"  # noqa: S608 - constants
_SELECT = f"SELECT {_COLUMNS} FROM jobs"  # noqa: S608 - constants
_PURGE = ("DELETE FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
          "AND finished < ?")


class SqliteJobStore:
    """Jobs in one SQLite file (WAL) shared by the worker processes of one machine."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 10000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        try:
            conn = self._conn()
            conn.executescript(_SCHEMA)
            _migrate(conn)
        except sqlite3.OperationalError as exc:
            schema_failed(self.path, exc, log)  # a worker booting on a full disk

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            # A connection must not cross a fork: a child opens its own.
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                   isolation_level=None, check_same_thread=True)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def usable(self) -> bool:
        """True when the database answers (for /readyz)."""
        try:
            self._conn().execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
            return True
        except sqlite3.Error:
            return False

    def create(self, job: Job) -> None:
        self._conn().execute(
            _INSERT,
            (job.id, job.tenant, job.service, job.operation, job.owner, job.request_id,
             job.status, _dump(job.result), _dump(job.error), job.created, job.started,
             job.finished, job.runner, job.deadline, job.auth_method, _dump(job.call)))

    def get(self, job_id: str) -> Job | None:
        try:
            row = self._conn().execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone()
        except sqlite3.Error as exc:  # GET/DELETE /jobs: the store is down, 503 not 500
            raise Unavailable("the job store is unavailable") from exc
        return None if row is None else _row_job(row)

    def claim(self, job_id: str, runner: str, deadline: float) -> bool:
        cur = self._conn().execute(
            "UPDATE jobs SET status = ?, started = ?, runner = ?, deadline = ? "
            "WHERE id = ? AND status = ?",
            (RUNNING, time.time(), runner, deadline, job_id, QUEUED))
        return cur.rowcount == 1

    def finish(self, job_id: str, status: str, result_json: bytes | None = None,
               error: dict[str, Any] | None = None) -> bool:
        result = result_json.decode() if result_json is not None else None
        # The call (payload, identity) is dropped once the job is done with it.
        cur = self._conn().execute(
            "UPDATE jobs SET status = ?, result = ?, error = ?, finished = ?, call = NULL "
            "WHERE id = ? AND status = ?",
            (status, result, _dump(error), time.time(), job_id, RUNNING))
        return cur.rowcount == 1

    def cancel(self, job_id: str) -> bool:
        try:
            cur = self._conn().execute(
                "UPDATE jobs SET status = ?, finished = ?, call = NULL "
                "WHERE id = ? AND status = ?",
                (CANCELLED, time.time(), job_id, QUEUED))
        except sqlite3.Error as exc:
            raise Unavailable("the job store is unavailable") from exc
        return cur.rowcount == 1

    def fail(self, job_ids: Iterable[str], reason: str, detail: str,
             status_code: int = 500) -> int:
        """Mark unfinished jobs failed with ``reason`` (e.g. interrupted)."""
        error = _dump({"status": status_code, "reason": reason, "detail": detail})
        now, n = time.time(), 0
        for job_id in job_ids:
            n += self._conn().execute(
                "UPDATE jobs SET status = ?, error = ?, finished = ?, call = NULL "
                "WHERE id = ? AND status IN (?, ?)",
                (FAILED, error, now, job_id, QUEUED, RUNNING)).rowcount
        return n

    def reap(self, alive: Any = local_runner_alive) -> int:
        """Fail running jobs of gone processes (cut off) and late ones.

        Queued jobs of gone processes never started: they wait for :meth:`adopt`,
        except rows without their call (from before calls were stored).
        """
        conn = self._conn()
        rows = conn.execute(
            "SELECT id, runner, status, deadline, call IS NULL FROM jobs "
            "WHERE status IN (?, ?)", (QUEUED, RUNNING)).fetchall()
        verdicts: dict[str, bool] = {}
        dead, late = [], []
        now = time.time()
        for job_id, runner, status, deadline, no_call in rows:
            if runner not in verdicts:
                verdicts[runner] = alive(runner)
            if not verdicts[runner]:
                if status == RUNNING or no_call:
                    dead.append(job_id)
            elif status == RUNNING and deadline is not None and deadline < now:
                late.append(job_id)
        n = self.fail(dead, INTERRUPTED, "the process running this job stopped")
        n += self.fail(late, "deadline", "the job did not finish within its timeout", 504)
        return n

    def orphans(self, limit: int, alive: Any = local_runner_alive) -> list[Job]:
        """Up to ``limit`` queued jobs (oldest first) whose process is gone: to adopt."""
        if limit <= 0:
            return []
        rows = self._conn().execute(
            _SELECT + " WHERE status = ? AND call IS NOT NULL ORDER BY created",
            (QUEUED,)).fetchall()
        verdicts: dict[str, bool] = {}
        found = []
        for row in rows:
            runner = row[12]
            if runner not in verdicts:
                verdicts[runner] = alive(runner)
            if not verdicts[runner]:
                found.append(_row_job(row))
                if len(found) == limit:
                    break
        return found

    def adopt(self, job_id: str, old_runner: str, runner: str) -> bool:
        """Make ``runner`` the queued job's process, only if still queued under ``old_runner``."""
        cur = self._conn().execute(
            "UPDATE jobs SET runner = ? WHERE id = ? AND status = ? AND runner = ?",
            (runner, job_id, QUEUED, old_runner))
        return cur.rowcount == 1

    def purge(self, older_than: float) -> int:
        return self._conn().execute(_PURGE, (older_than,)).rowcount

    def counts(self) -> dict[str, int]:
        try:
            rows = self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            found = dict(rows.fetchall())
        except sqlite3.Error as exc:  # GET /metrics
            raise Unavailable("the job store is unavailable") from exc
        return {status: found.get(status, 0) for status in STATUSES}


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a file from an older release lacks (its rows keep their meaning)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    for name, definition in _ADDED:
        if name in have:
            continue
        try:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it meanwhile
                raise


def _row_job(row: Iterable[Any]) -> Job:
    values = list(row)
    for i in (7, 8, 15):  # result, error, call
        values[i] = _load(values[i])
    return Job(*values)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)
