"""Where one tenant's state lives, read for usage and export.

SQLite files in the data dir (``usage.db``, ``jobs.sqlite3``, ``config.db``) and,
with the fleet's Redis, ``mtp:<tenant>:*`` (usage hours, job records). Every
query names the tenant: nothing here can return another tenant's rows.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework.tenant_config import BillingSettings

USAGE_DB = "usage.db"
JOBS_DB = "jobs.sqlite3"
CONFIG_DB = "config.db"
DAY = 86400


def midnight(now: float | None = None) -> float:
    """The start of today (UTC)."""
    now = time.time() if now is None else now
    return now - now % DAY


def _ro(path: Path) -> sqlite3.Connection | None:
    """A read-only connection to an existing file (never creates one)."""
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                        (name,)).fetchone() is not None


@dataclass
class TenantData:
    """The stores of a fleet: its Redis client (or None) and its data dir."""

    data_dir: Path
    redis: Any = None
    _usage: Any = field(default=None, repr=False)

    def usage_store(self) -> Any:
        """The usage store as ``GET /usage`` reads it, or None when there is none yet
        (made once: building one checks its schema)."""
        if self._usage is not None:
            return self._usage
        if self.redis is not None:
            from framework.usage_redis import RedisUsageStore

            self._usage = RedisUsageStore(self.redis)
        elif (self.data_dir / USAGE_DB).is_file():
            from framework.usage import UsageStore

            self._usage = UsageStore(self.data_dir / USAGE_DB)
        return self._usage

    def usage_today(self, tenant: str, prices: BillingSettings) -> dict[str, Any]:
        """Calls and cost of the tenant since midnight UTC."""
        store = self.usage_store()
        rows = store.query(tenant, prices, start=midnight(), group_by=()) if store else []
        calls = sum(int(r["calls"]) for r in rows)
        cost = sum(float(r["cost"]) for r in rows)
        return {"calls": calls, "cost": round(cost, 6), "currency": prices.currency}

    def usage_rows(self, tenant: str, prices: BillingSettings) -> list[dict[str, Any]]:
        """Every usage row the store still holds, per hour, service, operation and user."""
        store = self.usage_store()
        if store is None:
            return []
        return store.query(tenant, prices, group_by=("service", "operation", "user", "hour"))

    def config_versions(self, tenant: str) -> list[dict[str, Any]]:
        """Config versions whose config is this tenant's (the data dir's config.db)."""
        conn = _ro(self.data_dir / CONFIG_DB)
        if conn is None:
            return []
        try:
            if not _has_table(conn, "config_versions"):
                return []
            rows = conn.execute(
                "SELECT id, hash, time, source, diff, overlay, config FROM config_versions "
                "WHERE json_extract(config, '$.tenant.id') = ? ORDER BY id", (tenant,))
            return [{"id": r[0], "hash": r[1], "time": r[2], "source": r[3],
                     "diff": json.loads(r[4]), "overlay": r[5], "config": json.loads(r[6])}
                    for r in rows]
        finally:
            conn.close()

    def jobs(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's job records (with their results: they are the tenant's own)."""
        out: list[dict[str, Any]] = []
        conn = _ro(self.data_dir / JOBS_DB)
        if conn is not None:
            try:
                if _has_table(conn, "jobs"):
                    cur = conn.execute("SELECT * FROM jobs WHERE tenant = ? ORDER BY created",
                                       (tenant,))
                    names = [d[0] for d in cur.description]
                    out.extend(dict(zip(names, row, strict=True)) for row in cur)
            finally:
                conn.close()
        if self.redis is not None:
            prefix = f"mtp:{tenant}:job:"
            for key in self.redis.scan_iter(match=prefix + "*", count=500):
                fields = self.redis.hgetall(key)
                if fields:
                    out.append({"id": _text(key)[len(prefix):], "tenant": tenant,
                                **{_text(k): _text(v) for k, v in fields.items()}})
        return out

    def export(self, tenant: str, prices: BillingSettings) -> Iterator[dict[str, Any]]:
        """The export's JSON lines: usage rows, config versions, job records."""
        for row in self.usage_rows(tenant, prices):
            yield {"kind": "usage", "tenant": tenant, **row}
        for version in self.config_versions(tenant):
            yield {"kind": "config_version", "tenant": tenant, **version}
        for job in self.jobs(tenant):
            yield {"kind": "job", **job, "tenant": tenant}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
