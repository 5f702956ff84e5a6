"""The tenant registry: one protocol, two backends (Redis when MTP_REDIS_URL, else SQLite).

Records are the fields of DESIGN.md: ``id``, ``name``, ``plan``, ``status``,
``placement``, ``created``, ``updated``. Every write also says "something changed"
so data planes update their cached view at once (Redis: a version counter and a
PUBLISH on :data:`CHANNEL`; SQLite: the commit itself, which SQLite's
``PRAGMA data_version`` shows to every other connection).

Redis keys live under ``mtp:_fleet:``: ``_`` cannot start a tenant id, so no
tenant's ``mtp:<tenant>:*`` keys (and no purge of them) can ever reach the registry.
Each record is kept twice, in the hash :data:`TENANTS` (the control plane's lists)
and in its own key :func:`tenant_key` (what the tenant's data plane reads), written
together by one script, and announced on :data:`CHANNEL` and :func:`tenant_channel`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

ACTIVE, SUSPENDED, OFFBOARDING = "active", "suspended", "offboarding"
STATUSES = (ACTIVE, SUSPENDED, OFFBOARDING)
REFUSED = frozenset((SUSPENDED, OFFBOARDING))

PREFIX = "mtp:_fleet:"
TENANTS = PREFIX + "tenants"  # hash: id -> record JSON
IDS = PREFIX + "ids"  # sorted set, all scores 0: ids in lexical order for cursors
VERSION = PREFIX + "version"  # bumped by every write
PLANS = PREFIX + "plans"  # the plans in force, JSON, for data planes
CHANNEL = PREFIX + "changes"  # PUBLISH <tenant id> (or "*" for plans) after each write
# Each record also in a key of its own, and each change also on a channel of its own: a
# tenant's data plane, connected as the tenant's ACL user, may read (never write) its
# own record and the plans, and hear of its own changes, but see no other tenant's.
TENANT_KEY = PREFIX + "tenant:"  # + id: the record JSON, the same as the hash field
TENANT_CHANNEL = PREFIX + "changed:"  # + id: PUBLISH <tenant id> after each write of it


def tenant_key(tenant_id: str) -> str:
    """The key holding one tenant's record (read-only for the tenant's ACL user)."""
    return TENANT_KEY + tenant_id


def tenant_channel(tenant_id: str) -> str:
    """The channel announcing changes of one tenant's record."""
    return TENANT_CHANNEL + tenant_id
DB_NAME = "fleet.db"


def iso_now(now: float | None = None) -> str:
    """UTC, ISO 8601, milliseconds, ``Z``."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class TenantRecord:
    """One tenant of the fleet, as the admin API shows it."""

    id: str
    name: str
    plan: str
    status: str
    placement: str
    created: str
    updated: str
    # A placement change in progress (framework/control/migration.py); not stored when None.
    migration: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        if doc["migration"] is None:
            del doc["migration"]
        return doc

    @classmethod
    def from_json(cls, text: str | bytes) -> TenantRecord:
        doc = json.loads(text)
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


class Registry(Protocol):
    """What the control plane (and, for reading, data planes) needs of a registry."""

    def create(self, record: TenantRecord) -> bool:
        """Store a new record; False when the id exists."""

    def get(self, tenant_id: str) -> TenantRecord | None:
        """The record, or None."""

    def page(self, after: str, limit: int) -> list[TenantRecord]:
        """Up to ``limit`` records with ids after ``after``, in id order."""

    def update(self, tenant_id: str, changes: dict[str, Any],
               check: Callable[[TenantRecord], bool] | None = None) -> TenantRecord | None:
        """Apply field changes (``updated`` set here); None when the id is unknown, or
        when ``check`` refuses the record as it is now (a compare-and-set)."""

    def put_plans(self, plans: dict[str, Any]) -> None:
        """Publish the plans in force for data planes."""

    def backfill(self) -> int:
        """Bring what data planes read up to date with the records (at start); how many."""

    def has_plans(self) -> bool:
        """True while the published plans are there (a store restarted empty lost them)."""

    def get_plans(self) -> dict[str, Any] | None:
        """The published plans (``version``, ``hash``, ``plans``), or None."""

    def close(self) -> None:
        """Release connections."""


def list_records(registry: Registry, *, after: str = "", limit: int = 50,
                 plan: str = "", status: str = "", placement: str = "",
                 ) -> tuple[list[TenantRecord], str]:
    """A filtered page and the id to continue after ('' at the end).

    Filters are applied while walking the id order, so a page is full unless the
    registry ends: the cursor is the last id looked at, never an offset.
    """
    found: list[TenantRecord] = []
    cursor = after
    batch = max(limit, 100)
    while True:
        chunk = registry.page(cursor, batch)
        for i, rec in enumerate(chunk):
            cursor = rec.id
            if ((not plan or rec.plan == plan) and (not status or rec.status == status)
                    and (not placement or rec.placement == placement)):
                found.append(rec)
                if len(found) == limit:
                    more = i + 1 < len(chunk) or bool(registry.page(cursor, 1))
                    return found, cursor if more else ""
        if len(chunk) < batch:
            return found, ""


class SqliteRegistry:
    """The registry in ``<MTP_DATA_DIR>/fleet.db`` (one machine)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS tenants (
        id TEXT PRIMARY KEY, doc TEXT NOT NULL, status TEXT NOT NULL, plan TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 10000")
        if create:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.executescript(self.SCHEMA)

    def _write(self, sql: str, args: Iterable[Any]) -> int:
        cur = self._conn.execute(sql, tuple(args))
        return cur.rowcount

    def create(self, record: TenantRecord) -> bool:
        try:
            self._write("INSERT INTO tenants (id, doc, status, plan) VALUES (?, ?, ?, ?)",
                        (record.id, json.dumps(record.as_dict()), record.status, record.plan))
        except sqlite3.IntegrityError:
            return False
        return True

    def get(self, tenant_id: str) -> TenantRecord | None:
        row = self._conn.execute("SELECT doc FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return TenantRecord.from_json(row[0]) if row else None

    def page(self, after: str, limit: int) -> list[TenantRecord]:
        rows = self._conn.execute("SELECT doc FROM tenants WHERE id > ? ORDER BY id LIMIT ?",
                                  (after, limit)).fetchall()
        return [TenantRecord.from_json(r[0]) for r in rows]

    def update(self, tenant_id: str, changes: dict[str, Any],
               check: Callable[[TenantRecord], bool] | None = None) -> TenantRecord | None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = self.get(tenant_id)
            if old is None or (check is not None and not check(old)):
                conn.execute("ROLLBACK")
                return None
            new = replace(old, **changes, updated=iso_now())
            conn.execute("UPDATE tenants SET doc = ?, status = ?, plan = ? WHERE id = ?",
                         (json.dumps(new.as_dict()), new.status, new.plan, tenant_id))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return new

    def backfill(self) -> int:
        return 0  # data planes read the same table

    def has_plans(self) -> bool:
        return self._conn.execute("SELECT 1 FROM meta WHERE key = 'plans'").fetchone() is not None

    def get_plans(self) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'plans'").fetchone()
        return json.loads(row[0]) if row else None

    def put_plans(self, plans: dict[str, Any]) -> None:
        self._write("INSERT INTO meta (key, value) VALUES ('plans', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (json.dumps(plans),))

    def close(self) -> None:
        self._conn.close()


# Create only when the id is free; bump the version; announce.
_CREATE_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('SET', KEYS[5], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('INCR', KEYS[3])
redis.call('PUBLISH', KEYS[4], ARGV[1])
redis.call('PUBLISH', KEYS[6], ARGV[1])
return 1
"""
# Replace a record only if it is still the one read (optimistic, no WATCH round trips).
_UPDATE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SET', KEYS[4], ARGV[3])
redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], ARGV[1])
redis.call('PUBLISH', KEYS[5], ARGV[1])
return 1
"""
# Copy records of the hash into their own keys (ARGV: ids; KEYS: the hash, their keys):
# the hash's current value, read in the script, so a concurrent update is never undone.
_COPY_LUA = """
local n = 0
for i, id in ipairs(ARGV) do
  local doc = redis.call('HGET', KEYS[1], id)
  if doc and redis.call('GET', KEYS[i + 1]) ~= doc then
    redis.call('SET', KEYS[i + 1], doc)
    n = n + 1
  end
end
return n
"""


class RedisRegistry:
    """The registry in the fleet's shared Redis."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._create = client.register_script(_CREATE_LUA)
        self._update = client.register_script(_UPDATE_LUA)
        self._copy = client.register_script(_COPY_LUA)

    def create(self, record: TenantRecord) -> bool:
        doc = json.dumps(record.as_dict())
        keys = [TENANTS, IDS, VERSION, CHANNEL, tenant_key(record.id), tenant_channel(record.id)]
        return bool(self._create(keys=keys, args=[record.id, doc]))

    def backfill(self) -> int:
        """Give each record made before the per-tenant keys its own key (idempotent);
        the number written."""
        written, cursor = 0, "0"
        while True:
            cursor, found = self.client.hscan(TENANTS, cursor, count=500)
            ids = sorted(found)
            if ids:
                written += int(self._copy(keys=[TENANTS, *map(tenant_key, ids)], args=ids))
            if str(cursor) == "0":
                return written

    def get(self, tenant_id: str) -> TenantRecord | None:
        raw = self.client.hget(TENANTS, tenant_id)
        return TenantRecord.from_json(raw) if raw else None

    def page(self, after: str, limit: int) -> list[TenantRecord]:
        start = f"({after}" if after else "-"
        ids = self.client.zrangebylex(IDS, start, "+", start=0, num=limit)
        if not ids:
            return []
        docs = self.client.hmget(TENANTS, ids)
        return [TenantRecord.from_json(d) for d in docs if d]

    def update(self, tenant_id: str, changes: dict[str, Any],
               check: Callable[[TenantRecord], bool] | None = None) -> TenantRecord | None:
        for _ in range(20):
            raw = self.client.hget(TENANTS, tenant_id)
            if not raw or (check is not None and not check(TenantRecord.from_json(raw))):
                return None
            new = replace(TenantRecord.from_json(raw), **changes, updated=iso_now())
            keys = [TENANTS, VERSION, CHANNEL, tenant_key(tenant_id), tenant_channel(tenant_id)]
            if self._update(keys=keys, args=[tenant_id, raw, json.dumps(new.as_dict())]):
                return new
        raise RuntimeError(f"tenant {tenant_id} changed 20 times while being updated")

    def has_plans(self) -> bool:
        return bool(self.client.exists(PLANS))

    def get_plans(self) -> dict[str, Any] | None:
        raw = self.client.get(PLANS)
        return json.loads(raw) if raw else None

    def put_plans(self, plans: dict[str, Any]) -> None:
        pipe = self.client.pipeline()
        pipe.set(PLANS, json.dumps(plans))
        pipe.incr(VERSION)
        pipe.publish(CHANNEL, "*")
        pipe.execute()

    def close(self) -> None:
        self.client.close()


def connect_redis(url: str) -> Any:
    """A small client that fails fast (the admin API answers 503 rather than hangs)."""
    from redis import Redis

    return Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0,
                          decode_responses=True)


def open_registry(redis_url: str, data_dir: Path) -> Registry:
    """The fleet's registry: Redis when a URL is given, else SQLite in the data dir."""
    if redis_url:
        return RedisRegistry(connect_redis(redis_url))
    return SqliteRegistry(data_dir / DB_NAME)
