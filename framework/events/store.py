"""The embedded engine: events and their deliveries in SQLite in MTP_DATA_DIR.

One row per accepted event and one per (event, matching route): a delivery. Every
gunicorn worker of the tenant shares the file (WAL, one connection per thread) and
claims due deliveries in one write transaction, so a delivery runs in one worker at a
time. A delivery is *due* when its time has come and no earlier delivery of the same
route and subject is still pending or running: that is the per-subject order. A
claimed delivery holds a lease; a worker that stops gracefully hands its deliveries
back, and one that was killed loses its lease when it runs out (at-least-once).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework.events.binding import Event
from framework.events.config import EventRoute

DB_NAME = "events.sqlite3"  # in the tenant's MTP_DATA_DIR
DEDUP_SECONDS = 24 * 3600
PENDING, RUNNING, DONE, DEAD = "pending", "running", "done", "dead"

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL, source TEXT NOT NULL, type TEXT NOT NULL, subject TEXT,
    time TEXT NOT NULL, data TEXT NOT NULL, extra TEXT NOT NULL,
    user TEXT NOT NULL, groups TEXT NOT NULL, roles TEXT NOT NULL, auth_method TEXT NOT NULL,
    request_id TEXT NOT NULL, published REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen (
    source TEXT NOT NULL, id TEXT NOT NULL, published REAL NOT NULL,
    PRIMARY KEY (source, id));
CREATE TABLE IF NOT EXISTS deliveries (
    did INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL, route_key TEXT NOT NULL, route TEXT NOT NULL, subject TEXT,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0, owner TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_at);
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (route_key, subject, status);
CREATE INDEX IF NOT EXISTS seen_age ON seen (published);
"""


# The due deliveries, earliest first; a subject's later ones wait for its earlier ones.
# In (next_at, did) order the due index is walked and the scan stops after LIMIT rows:
# ordered by did alone, SQLite sorted the whole backlog on every claim, so a backlog
# made each claim slower (0.8 ms at 3,000 pending) and an overloaded tenant's
# throughput collapsed to 270 events/s from the 400 it sustains.
ANY_OPEN = "SELECT 1 FROM deliveries WHERE status IN (?, ?) LIMIT 1"
DUE = ("SELECT d.did FROM deliveries d WHERE d.status = ? AND d.next_at <= ?"
       " AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.route_key = d.route_key"
       " AND e.subject = d.subject AND e.did < d.did AND e.status IN (?, ?))"
       " ORDER BY d.next_at, d.did LIMIT ?")


@dataclass(frozen=True)
class Publisher:
    """Who published an event: deliveries run as this principal."""

    user: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    auth_method: str
    request_id: str


@dataclass
class Delivery:
    """One claimed delivery: the event, the route, who published it, the attempt."""

    did: int
    event: Event
    route: EventRoute
    publisher: Publisher
    attempts: int
    published: float


@dataclass(frozen=True)
class DeadLetter:
    """A delivery given up on, for ``GET /events/dead``."""

    did: int
    event: Event
    route: EventRoute
    attempts: int
    error: str
    updated: float

    def public(self) -> dict[str, Any]:
        target = self.route.sink or self.route.service
        return {"id": str(self.did), "event": self.event.public(), "target": target,
                "operation": self.route.operation or None, "attempts": self.attempts,
                "error": self.error,
                "dead_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.updated))}


class EventStore:
    """SQLite-backed events, deliveries and dead letters of one tenant."""

    lease = 30.0  # seconds; renewed every lease / 3 while the handler runs
    def __init__(self, path: str | Path, busy_timeout_ms: int = 10000) -> None:
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn().executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                   isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
        return conn

    def publish(self, event: Event, publisher: Publisher,
                routes: list[EventRoute]) -> bool:
        """Store ``event`` and one delivery per route; False for a duplicate (same
        ``id`` and ``source`` within 24 h), which is accepted and not delivered again."""
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT published FROM seen WHERE source = ? AND id = ?",
                               (event.source, event.id)).fetchone()
            if row is not None and now - row[0] < DEDUP_SECONDS:
                conn.execute("COMMIT")
                return False
            conn.execute("INSERT OR REPLACE INTO seen (source, id, published) VALUES (?, ?, ?)",
                         (event.source, event.id, now))
            seq = conn.execute(
                "INSERT INTO events (id, source, type, subject, time, data, extra, user, groups,"
                " roles, auth_method, request_id, published)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (event.id, event.source, event.type, event.subject, event.time,
                 json.dumps(event.data), json.dumps(event.extra), publisher.user,
                 json.dumps(publisher.groups), json.dumps(publisher.roles),
                 publisher.auth_method, publisher.request_id, now)).lastrowid
            conn.executemany(
                "INSERT INTO deliveries (seq, route_key, route, subject, status, next_at, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(seq, r.key(), r.snapshot(), event.subject, PENDING, now, now) for r in routes])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return True

    def claim(self, owner: str, limit: int, lease: float) -> list[Delivery]:
        """Up to ``limit`` due deliveries, now RUNNING for ``owner`` until the lease ends."""
        now = time.time()
        conn = self._conn()
        # Idle (the usual case between events): a read, not a write lock per poll.
        if conn.execute(ANY_OPEN, (PENDING, RUNNING)).fetchone() is None:
            return []
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Leases that ran out (their worker was killed): due again.
            conn.execute("UPDATE deliveries SET status = ?, owner = '' WHERE status = ?"
                         " AND lease_until < ?", (PENDING, RUNNING, now))
            rows = conn.execute(DUE, (PENDING, now, PENDING, RUNNING, limit)).fetchall()
            ids = [r[0] for r in rows]
            if ids:
                conn.executemany("UPDATE deliveries SET status = ?, owner = ?, lease_until = ?,"
                                 " attempts = attempts + 1, updated = ? WHERE did = ?",
                                 [(RUNNING, owner, now + lease, now, did) for did in ids])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return [self._delivery(did) for did in ids]

    def _delivery(self, did: int) -> Delivery:
        row = self._conn().execute(
            "SELECT d.route, d.attempts, e.id, e.source, e.type, e.subject, e.time, e.data,"
            " e.extra, e.user, e.groups, e.roles, e.auth_method, e.request_id, e.published"
            " FROM deliveries d JOIN events e ON e.seq = d.seq WHERE d.did = ?",
            (did,)).fetchone()
        event = Event(row[2], row[3], row[4], row[5], row[6], json.loads(row[7]),
                      json.loads(row[8]))
        publisher = Publisher(row[9], tuple(json.loads(row[10])), tuple(json.loads(row[11])),
                              row[12], row[13])
        return Delivery(did, event, EventRoute.from_snapshot(row[0]), publisher, row[1],
                        row[14])

    def finish(self, did: int, owner: str, status: str, error: str = "",
               next_at: float = 0.0) -> None:
        """Record an attempt's outcome (DONE, DEAD, or PENDING again at ``next_at``)."""
        self._conn().execute(
            "UPDATE deliveries SET status = ?, error = ?, next_at = ?, owner = '', updated = ?"
            " WHERE did = ? AND owner = ?",
            (status, error[:500], next_at, time.time(), did, owner))

    def renew(self, owner: str, lease: float) -> None:
        """Extend the leases of ``owner``'s running deliveries (its handlers still run)."""
        self._conn().execute("UPDATE deliveries SET lease_until = ? WHERE status = ?"
                             " AND owner = ?", (time.time() + lease, RUNNING, owner))

    def release(self, owner: str) -> int:
        """Hand ``owner``'s running deliveries back (a graceful stop): due again at once."""
        cur = self._conn().execute(
            "UPDATE deliveries SET status = ?, owner = '', attempts = MAX(attempts - 1, 0)"
            " WHERE status = ? AND owner = ?", (PENDING, RUNNING, owner))
        return cur.rowcount

    def dead(self, limit: int = 100) -> list[DeadLetter]:
        """The dead letters, newest first."""
        rows = self._conn().execute(
            "SELECT did FROM deliveries WHERE status = ? ORDER BY updated DESC LIMIT ?",
            (DEAD, limit)).fetchall()
        out = []
        for (did,) in rows:
            d = self._delivery(did)
            info = self._conn().execute("SELECT error, updated FROM deliveries WHERE did = ?",
                                        (did,)).fetchone()
            out.append(DeadLetter(did, d.event, d.route, d.attempts, info[0], info[1]))
        return out

    def replay(self, did: int) -> bool:
        """A dead letter due again with fresh retries; False if there is no such one."""
        cur = self._conn().execute(
            "UPDATE deliveries SET status = ?, attempts = 0, next_at = ?, error = '',"
            " updated = ? WHERE did = ? AND status = ?",
            (PENDING, time.time(), time.time(), did, DEAD))
        return cur.rowcount == 1

    def prune(self, keep: float) -> None:
        """Forget delivered events older than ``keep`` seconds and dedup keys past 24 h."""
        now = time.time()
        conn = self._conn()
        conn.execute("DELETE FROM seen WHERE published < ?", (now - DEDUP_SECONDS,))
        conn.execute("DELETE FROM deliveries WHERE status = ? AND updated < ?",
                     (DONE, now - keep))
        conn.execute("DELETE FROM events WHERE published < ? AND NOT EXISTS"
                     " (SELECT 1 FROM deliveries d WHERE d.seq = events.seq)", (now - keep,))

    def counts(self) -> dict[str, int]:
        """Deliveries per status (tests, metrics)."""
        rows = self._conn().execute(
            "SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall()
        return {status: n for status, n in rows}


def next_due(path: Path) -> float | None:
    """When the earliest undone delivery in the database at ``path`` is due (epoch
    seconds; a running one is due now), or None when there is nothing to deliver.

    Read-only and without the schema (a pool asks this of a tenant's database while
    that tenant's process is stopped or about to be).
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return None  # no database: the tenant never published
    try:
        if conn.execute("SELECT 1 FROM deliveries WHERE status = ? LIMIT 1",
                        (RUNNING,)).fetchone():
            return time.time()
        row = conn.execute("SELECT MIN(next_at) FROM deliveries WHERE status = ?",
                           (PENDING,)).fetchone()
    except sqlite3.Error:
        return None  # not an events database (yet): nothing this pool can run
    finally:
        conn.close()
    return row[0] if row and row[0] is not None else None
