"""Usage metering: every call counted into hourly buckets in SQLite, then priced.

Recording is in memory (a dict of accumulators under one lock, a few µs per
call); the process's flush thread (framework/ticker.py) writes the totals every ``flush_interval``
seconds with one UPSERT transaction, so several gunicorn workers can share one
database (WAL) without a write per request. A bucket is keyed by
(tenant, hour, service, operation, user); a call is counted in the hour it ended.

A store that refuses the flush (a full data disk, Redis away) loses nothing at
first: the counts stay in memory and the next flush that works writes them. The
memory is bounded (:data:`MAX_PENDING` buckets); past it, and at an exit that
cannot flush, calls are dropped, counted in ``mtp_usage_dropped_total`` and logged
once per transition (not per call).
"""

from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import statistics
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from framework.diskfull import schema_failed
from framework.tenant_config import BillingSettings
from framework.ticker import USAGE_FLUSH, Cancel

log = logging.getLogger("mtp.usage")

MAX_PENDING = 10000  # buckets kept in memory while the store refuses flushes
DROPPED = Counter("mtp_usage_dropped", "Calls whose usage could not be stored (lost).",
                  ["tenant"])

DB_NAME = "usage.db"
HOUR = 3600
GB = 10**9
GROUP_FIELDS = ("service", "operation", "user", "hour")
DEFAULT_GROUP_BY = ("service", "operation")
_COLUMNS = {"service": "service", "operation": "operation", "user": "user_id", "hour": "hour"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_hourly (
    tenant TEXT NOT NULL,
    hour INTEGER NOT NULL,
    service TEXT NOT NULL,
    operation TEXT NOT NULL,
    user_id TEXT NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    wall_seconds REAL NOT NULL DEFAULT 0,
    cpu_seconds REAL NOT NULL DEFAULT 0,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0,
    queue_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour, service, operation, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_UPSERT = """
INSERT INTO usage_hourly (tenant, hour, service, operation, user_id, calls, errors,
                          wall_seconds, cpu_seconds, bytes_in, bytes_out, queue_seconds)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, hour, service, operation, user_id) DO UPDATE SET
    calls = calls + excluded.calls,
    errors = errors + excluded.errors,
    wall_seconds = wall_seconds + excluded.wall_seconds,
    cpu_seconds = cpu_seconds + excluded.cpu_seconds,
    bytes_in = bytes_in + excluded.bytes_in,
    bytes_out = bytes_out + excluded.bytes_out,
    queue_seconds = queue_seconds + excluded.queue_seconds
"""


def connect(path: str | Path, timeout: float = 10.0) -> sqlite3.Connection:
    """A connection to an ops database: WAL, waits for other writers instead of failing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def hour_of(ts: float) -> int:
    """Start (unix seconds) of the UTC hour holding ``ts``."""
    return int(ts // HOUR) * HOUR


def iso_hour(hour: int) -> str:
    """An hour start as ISO 8601 UTC (``2026-11-22T15:00:00Z``)."""
    return datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str, name: str = "time") -> float:
    """ISO 8601 date or date-time to unix seconds; a naive value is UTC."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{name}: not an ISO 8601 date or time: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_group_by(value: str | None) -> tuple[str, ...]:
    """``service,operation`` -> fields, checked against :data:`GROUP_FIELDS`."""
    if not value:
        return DEFAULT_GROUP_BY
    fields = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    unknown = [f for f in fields if f not in GROUP_FIELDS]
    if unknown or not fields:
        raise ValueError(f"group_by: unknown field {unknown[0] if unknown else value!r}; "
                         f"use {', '.join(GROUP_FIELDS)}")
    return fields


def cost(prices: BillingSettings, calls: float, cpu_seconds: float, bytes_total: float) -> float:
    """Price of some usage: per call + per CPU-second + per 10^9 bytes in and out."""
    value = (calls * prices.per_call + cpu_seconds * prices.per_cpu_second
             + bytes_total / GB * prices.per_gb)
    return round(value, 10)  # hide float noise; far below any currency's smallest unit


def usage_row(keys: dict[str, Any], totals: Any, prices: BillingSettings) -> dict[str, Any]:
    """One row of ``GET /usage``: the grouping keys, the six totals and their cost."""
    calls, errors, wall, cpu, b_in, b_out = totals
    row: dict[str, Any] = {
        "service": keys.get("service"),
        "operation": keys.get("operation") or None,
        "calls": calls, "errors": errors,
        "wall_seconds": round(wall, 6), "cpu_seconds": round(cpu, 6),
        "bytes_in": b_in, "bytes_out": b_out,
        "cost": cost(prices, calls, cpu, b_in + b_out),
    }
    if "user" in keys:
        row["user"] = keys["user"]
    if "hour" in keys:
        row["hour"] = iso_hour(keys["hour"])
    return row


class UsageStore:
    """The hourly buckets in SQLite: written by :class:`UsageMeter`, read by ``query``."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)  # a flush retries after these

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout  # how long to wait for another process's write
        try:
            with self.connect() as conn:
                conn.executescript(SCHEMA)
        except sqlite3.OperationalError as exc:
            schema_failed(self.path, exc, log)  # a worker booting on a full disk

    def connect(self) -> _Conn:
        """A short-lived connection, closed by ``with``."""
        return _Conn(self.path, self.timeout)

    @property
    def store_id(self) -> str:
        """A random id made once per database: tells replicas' exports apart."""
        with self.connect() as conn:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)",
                         (uuid.uuid4().hex,))
            return conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]

    def add(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Add bucket deltas (UPSERT rows) in one transaction."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, tenant: str, prices: BillingSettings, start: float | None = None,
              end: float | None = None,
              group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[dict[str, Any]]:
        """Usage and cost rows between ``start`` (rounded down to its hour) and ``end``.

        Every row has the fields service, operation, calls, errors, wall_seconds,
        cpu_seconds, bytes_in, bytes_out and cost; a field not grouped by is null,
        and ``user``/``hour`` appear when grouped by.
        """
        fields = [f for f in GROUP_FIELDS if f in group_by]  # a stable column order
        cols = [_COLUMNS[f] for f in fields]
        select = ", ".join([
            *cols, "SUM(calls)", "SUM(errors)", "SUM(wall_seconds)", "SUM(cpu_seconds)",
            "SUM(bytes_in)", "SUM(bytes_out)",
        ])
        where, args = _range(tenant, start, end)
        sql = f"SELECT {select} FROM usage_hourly WHERE {where}"  # noqa: S608 - whitelisted
        if cols:
            sql += f" GROUP BY {', '.join(cols)} ORDER BY {', '.join(cols)}"
        with self.connect() as conn:
            found = conn.execute(sql, args).fetchall()
        rows = []
        for raw in found:
            if raw[len(fields)] is None:  # SUM over no rows (no GROUP BY)
                continue
            rows.append(usage_row(dict(zip(fields, raw[:len(fields)], strict=True)),
                                  raw[len(fields):], prices))
        return rows

    def hourly(self, tenant: str, prices: BillingSettings, start: float | None = None,
               end: float | None = None) -> list[HourTotal]:
        """Calls and cost per hour, gaps between the first and last hour with calls filled
        with zeros."""
        where, args = _range(tenant, start, end)
        sql = ("SELECT hour, SUM(calls), SUM(cpu_seconds), SUM(bytes_in + bytes_out) "  # noqa: S608
               f"FROM usage_hourly WHERE {where} GROUP BY hour ORDER BY hour")
        with self.connect() as conn:
            found = {h: HourTotal(h, c, cost(prices, c, cpu, b))
                     for h, c, cpu, b in conn.execute(sql, args)}
        if not found:
            return []
        # From the first hour with calls: a range reaching back years adds no information.
        first, last = min(found), max(found)
        return [found.get(h, HourTotal(h, 0, 0.0)) for h in range(first, last + HOUR, HOUR)]

    def hour_rows(self, tenant: str, hour: int) -> list[tuple[Any, ...]]:
        """Raw bucket rows of one hour: (service, operation, user, calls, errors, wall,
        cpu, bytes_in, bytes_out, queue_seconds)."""
        with self.connect() as conn:
            return conn.execute(
                "SELECT service, operation, user_id, calls, errors, wall_seconds, cpu_seconds,"
                " bytes_in, bytes_out, queue_seconds FROM usage_hourly"
                " WHERE tenant = ? AND hour = ? ORDER BY service, operation, user_id",
                (tenant, hour)).fetchall()


class _Conn:
    """``with`` opens a connection and always closes it (sqlite3's own only commits)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout = path, timeout

    def __enter__(self) -> sqlite3.Connection:
        self.conn = connect(self.path, self.timeout)
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _range(tenant: str, start: float | None, end: float | None) -> tuple[str, list[Any]]:
    where, args = ["tenant = ?"], [tenant]
    if start is not None:
        where.append("hour >= ?")
        args.append(hour_of(start))
    if end is not None:
        where.append("hour < ?")
        args.append(end)
    return " AND ".join(where), args


class UsageMeter:
    """Per-process, in-memory aggregation of calls, flushed to a :class:`UsageStore`.

    ``record`` is cheap and thread-safe; the flush thread starts on first use
    (and again in a forked child, whose copy of the parent's totals is dropped:
    the parent flushes those).
    """

    def __init__(self, store: UsageStore, tenant: str, *, flush_interval: float = 1.0,
                 clock: Callable[[], float] = time.time, max_pending: int = MAX_PENDING
                 ) -> None:
        self.store = store
        self.tenant = tenant
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.lost = 0  # calls dropped since the store last took a flush
        self._clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[tuple[int, str, str, str], list[float]] = {}
        self._flushing: Cancel | None = None  # its chore on the process's flush thread
        self._failing = False
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (m := ref()) and m._after_fork())

    def record(self, service: str, operation: str | None, user: str, status: int,
               wall_seconds: float, cpu_seconds: float, bytes_in: int, bytes_out: int,
               queue_seconds: float = 0.0) -> None:
        """Count one finished call (``status`` >= 500 is an error)."""
        key = (int(self._clock() // HOUR) * HOUR, service, operation or "", user)
        with self._lock:
            acc = self._pending.get(key)
            if acc is None:
                if len(self._pending) >= self.max_pending:
                    # Only while flushes fail: memory is bounded, the loss is counted.
                    self.lost += 1
                    first = self.lost == 1
                else:
                    first = False
                    self._pending[key] = [1, status >= 500, wall_seconds, cpu_seconds,
                                          bytes_in, bytes_out, queue_seconds]
                    if self._flushing is None:
                        self._start()
                    return
            else:
                acc[0] += 1
                acc[1] += status >= 500
                acc[2] += wall_seconds
                acc[3] += cpu_seconds
                acc[4] += bytes_in
                acc[5] += bytes_out
                acc[6] += queue_seconds
                return
        DROPPED.labels(self.tenant).inc()
        if first:
            log.error("usage store unreachable and %d buckets held in memory: further "
                      "calls' usage is dropped (counted in mtp_usage_dropped_total)",
                      self.max_pending)

    def flush(self) -> int:
        """Write what is pending; returns the number of buckets written."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                return 0
            rows = [(self.tenant, hour, service, op, user, int(a[0]), int(a[1]), a[2], a[3],
                     int(a[4]), int(a[5]), a[6])
                    for (hour, service, op, user), a in pending.items()]
            try:
                self.store.add(rows)
            except self.store.errors as exc:
                # Keep the counts for the next flush rather than lose billable usage.
                if not self._failing:  # one line per transition, not one per second
                    log.warning("usage flush failed (%s: %s); counts kept in memory, "
                                "retrying with every flush", type(exc).__name__, exc)
                    self._failing = True
                self._merge_back(pending)
                return 0
            if self._failing or self.lost:
                with self._lock:
                    lost, self.lost = self.lost, 0
                log.warning("usage flush works again; the kept counts are written"
                            + (f" ({lost} calls' usage was dropped meanwhile)" if lost else ""))
                self._failing = False
            return len(rows)

    def close(self) -> None:
        """Stop the periodic flush and write what is left (what cannot be is counted lost)."""
        with self._lock:
            flushing, self._flushing = self._flushing, _closed
        if flushing is not None:
            flushing()  # a flush running now finishes first: flush() takes its lock
        self.flush()
        with self._lock:
            pending, self._pending = self._pending, {}
        calls = int(sum(acc[0] for acc in pending.values()))
        if calls:
            DROPPED.labels(self.tenant).inc(calls)
            log.error("exiting with %d calls' usage that the store refused: dropped", calls)

    def _merge_back(self, pending: dict[tuple[int, str, str, str], list[float]]) -> None:
        with self._lock:
            for key, acc in pending.items():
                mine = self._pending.setdefault(key, [0, 0, 0.0, 0.0, 0, 0, 0.0])
                for i, value in enumerate(acc):
                    mine[i] += value

    def _start(self) -> None:
        # Called with self._lock held, so the flush is registered once.
        self._flushing = USAGE_FLUSH.every(self.flush_interval, self.flush)
        atexit.register(self.close)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending = {}
        self._flushing = None


def _closed() -> None:
    """The flush of a closed meter: nothing to cancel, and no new one starts."""


@dataclass(frozen=True)
class HourTotal:
    """Calls and cost of one hour of one tenant."""

    hour: int
    calls: int
    cost: float


@dataclass(frozen=True)
class Anomaly:
    """An hour whose calls or cost stand out from the trailing window."""

    hour: int
    metric: str  # "calls" or "cost"
    value: float
    expected: float  # the trailing window's median
    score: float  # robust z-score: (value - median) / (1.4826 * MAD)

    def as_dict(self) -> dict[str, Any]:
        return {"hour": iso_hour(self.hour), "metric": self.metric, "value": self.value,
                "expected": self.expected, "score": round(self.score, 2)}


def anomalies(series: Sequence[HourTotal], window: int = 24, threshold: float = 3.5,
              min_history: int = 6, last: int = 30 * 24) -> list[Anomaly]:
    """Hours whose calls or cost deviate more than ``threshold`` robust sigmas.

    The median and MAD of the ``window`` hours before each hour are the baseline
    (robust to the spikes being looked for). A flat history has MAD 0, so the
    scale has a floor of 10 % of the median and of one call (for cost: the mean
    cost of one call) to keep small wobbles on a steady load from being flagged.
    """
    found = []
    for i in range(max(min_history, len(series) - last), len(series)):  # the ``last`` hours
        past = series[max(0, i - window):i]
        seen = [*past, series[i]]
        calls = sum(h.calls for h in seen)
        per_call = sum(h.cost for h in seen) / calls if calls else 0.0
        for metric, unit in (("calls", 1.0), ("cost", per_call)):
            values = [getattr(h, metric) for h in past]
            value = getattr(series[i], metric)
            median = statistics.median(values)
            mad = statistics.median(abs(v - median) for v in values)
            floor = max(0.1 * median, unit, 1e-12)
            score = (value - median) / max(1.4826 * mad, floor)
            if abs(score) > threshold:
                found.append(Anomaly(series[i].hour, metric, value, median, score))
    return found


def forecast(series: Sequence[HourTotal], horizon_hours: int,
             window: int = 7 * 24) -> dict[str, float]:
    """Calls and cost expected in the next ``horizon_hours``: trailing hourly mean x hours."""
    past = series[-window:]
    if not past:
        return {"calls": 0.0, "cost": 0.0}
    calls = sum(h.calls for h in past) / len(past) * horizon_hours
    spent = sum(h.cost for h in past) / len(past) * horizon_hours
    return {"calls": round(calls, 3), "cost": round(spent, 10)}


def forecasts(series: Sequence[HourTotal]) -> dict[str, dict[str, float]]:
    """The next day's and next 30 days' forecast."""
    return {"next_day": forecast(series, 24), "next_month": forecast(series, 30 * 24)}
