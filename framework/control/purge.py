"""Offboarding: export a tenant's state to a file, then remove it from every store.

Redis: ``mtp:<tenant>:*`` (jobs, usage, events, quotas, and every RQ key of the
tenant: ``mtp:<tenant>:rq:*``, framework/rq_keys.py), the limiter's
``mtp:rl:<tenant>`` and ``mtp:rl:<tenant>\\0*`` (sidecar/limiter_redis.py), and its
Redis ACL user. Data planes from before the per-tenant RQ prefix kept RQ's keys
under the global ``rq:``: the tenant's queue ``mtp-<tenant>`` with its registries,
the RQ keys of its jobs and of its workers there are removed too. A data plane
still running when the purge runs may write again (a worker's heartbeat, a job that
was running): stop it, then DELETE again, which purges again and keeps the first
export. SQLite: the tenant's rows in the data dir's usage, jobs and config-version
files. Every key and row is matched by the exact tenant id, so a tenant whose id is a
prefix of another's (``acme``/``acme-eu``) never loses anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from framework.control.tenant_data import CONFIG_DB, JOBS_DB, USAGE_DB, TenantData
from framework.tenant_config import BillingSettings

log = logging.getLogger("mtp.control.purge")

LIMITER_PREFIX = "mtp:rl:"  # sidecar/limiter_redis.py PREFIX
# Seconds between refusing a tenant and purging it: data planes see the refusal within
# ~100 ms, and their usage meters flush what they counted before it every second.
DRAIN_SECONDS = 2.0
EXPORTS = "exports"


@dataclass
class PurgeReport:
    """What a purge removed (for the audit line and the tests)."""

    redis_keys: int = 0
    sqlite_rows: dict[str, int] = field(default_factory=dict)


def export_path(data_dir: Path, tenant: str) -> Path:
    """Where the export written at offboarding is kept."""
    return data_dir / EXPORTS / f"{tenant}.jsonl"


def write_export(data: TenantData, tenant: str, prices: BillingSettings) -> Path:
    """Write the export atomically (a crash never leaves half an export as the export)."""
    path = export_path(data.data_dir, tenant)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for line in data.export(tenant, prices):
            out.write(json.dumps(line, default=str, separators=(",", ":")) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return path


def _unlink(client: object, keys: list[str]) -> int:
    removed = 0
    for i in range(0, len(keys), 500):
        removed += int(client.unlink(*keys[i:i + 500]))  # type: ignore[attr-defined]
    return removed


def purge_redis(client: object, tenant: str) -> int:
    """Remove every Redis key of the tenant; the number removed."""
    scan = client.scan_iter  # type: ignore[attr-defined]
    keys = [k for k in scan(match=f"mtp:{tenant}:*", count=1000)]
    job_ids = {k.rsplit(":", 1)[1] for k in keys if k.startswith(f"mtp:{tenant}:job:")}
    keys += [k for k in scan(match=f"{LIMITER_PREFIX}{tenant}*", count=1000)
             if k == LIMITER_PREFIX + tenant or k.startswith(f"{LIMITER_PREFIX}{tenant}\x00")]
    # Before the per-tenant RQ prefix: RQ's global rq:* keys (none left once drained).
    queue = f"mtp-{tenant}"
    queue_key = f"rq:queue:{queue}"
    job_ids.update(client.lrange(queue_key, 0, -1))  # type: ignore[attr-defined]
    workers = []
    for key in scan(match="rq:*", count=1000):
        parts = key.split(":")
        if len(parts) >= 3 and parts[2] == queue:
            # The queue, its registries and sets: rq:<kind>:mtp-<tenant>[:<part>]
            keys.append(key)
            if client.type(key) == "zset":  # type: ignore[attr-defined]
                job_ids.update(client.zrange(key, 0, -1))  # type: ignore[attr-defined]
        elif len(parts) == 3 and parts[1] == "worker" and parts[2].startswith(queue + "."):
            workers.append(key)  # the tenant's workers (named after its queue; ids have no ".")
    if job_ids:
        for key in scan(match="rq:*", count=1000):
            parts = key.split(":")
            if len(parts) >= 3 and parts[2] in job_ids:
                keys.append(key)  # rq:job:<id>, rq:results:<id>, rq:executions:<id>...
    client.srem("rq:queues", queue_key)  # type: ignore[attr-defined]
    if workers:
        client.srem("rq:workers", *workers)  # type: ignore[attr-defined]
    removed = _unlink(client, sorted(set(keys + workers)))
    from redis.exceptions import ResponseError

    with contextlib.suppress(ResponseError):  # no ACL support: there is no user to remove
        client.acl_deluser(f"t-{tenant}")  # type: ignore[attr-defined]
    return removed


def purge_sqlite(data_dir: Path, tenant: str) -> dict[str, int]:
    """Remove the tenant's rows from the data dir's SQLite files; rows removed per file."""
    plan = {
        USAGE_DB: ("usage_hourly", "tenant = ?"),
        JOBS_DB: ("jobs", "tenant = ?"),
        CONFIG_DB: ("config_versions", "json_extract(config, '$.tenant.id') = ?"),
    }
    out: dict[str, int] = {}
    for name, (table, where) in plan.items():
        path = data_dir / name
        if not path.is_file():
            continue
        conn = sqlite3.connect(path, timeout=10, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                            (table,)).fetchone() is None:
                continue
            cur = conn.execute(f"DELETE FROM {table} WHERE {where}", (tenant,))  # noqa: S608
            out[name] = cur.rowcount
        finally:
            conn.close()
    return out


def offboard(data: TenantData, tenant: str, prices: BillingSettings,
             drain: float = DRAIN_SECONDS) -> PurgeReport:
    """Wait for data planes to drain, export, then purge every store (the export is kept
    in the data dir; a second offboarding keeps the first export and purges again)."""
    time.sleep(drain)
    if not export_path(data.data_dir, tenant).is_file():
        write_export(data, tenant, prices)
    report = PurgeReport()
    if data.redis is not None:
        report.redis_keys = purge_redis(data.redis, tenant)
    report.sqlite_rows = purge_sqlite(data.data_dir, tenant)
    log.info("tenant %s purged: %d Redis keys, SQLite rows %s", tenant, report.redis_keys,
             report.sqlite_rows)
    return report
