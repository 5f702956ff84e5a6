"""Put a tenant's state where data planes keep it (usage, jobs, config versions, limits)."""

from __future__ import annotations

import time
from pathlib import Path

from framework.jobs import Job, SqliteJobStore
from framework.tenant_config import parse_tenant
from framework.usage import UsageStore, hour_of
from framework.versions import VersionStore


def usage_row(tenant: str, calls: int, cpu: float = 0.5) -> tuple:
    return (tenant, hour_of(time.time()), "echo", "", "alice", calls, 0, 0.1 * calls, cpu,
            100 * calls, 200 * calls, 0.0)


def seed_sqlite(data_dir: Path, tenant: str, calls: int = 7) -> None:
    """Usage rows, one job and one config version of ``tenant`` in the data dir's files."""
    data_dir.mkdir(parents=True, exist_ok=True)
    UsageStore(data_dir / "usage.db").add([usage_row(tenant, calls)])
    SqliteJobStore(data_dir / "jobs.sqlite3").create(Job(
        id=f"job-{tenant}", tenant=tenant, service="echo", operation=None,
        owner="jwt:alice", request_id="r1", status="succeeded",
        result={"secret": f"result-of-{tenant}"}, created=time.time(), finished=time.time()))
    cfg = parse_tenant({"tenant": {"id": tenant}}, f"{tenant}/tenant.toml")
    VersionStore(data_dir / "config.db").record(cfg, None, "startup", None)


def seed_redis(client, tenant: str, calls: int = 7) -> None:
    """Usage, a job record, an RQ queue entry and limiter keys of ``tenant`` in Redis."""
    from framework.usage_redis import RedisUsageStore

    RedisUsageStore(client).add([usage_row(tenant, calls)])
    job = f"rjob-{tenant}"
    client.hset(f"mtp:{tenant}:job:{job}", mapping={
        "service": "echo", "status": "queued", "owner": "jwt:alice",
        "result": f'{{"secret": "result-of-{tenant}"}}'})
    client.zadd(f"mtp:{tenant}:jobs:queued", {job: time.time()})
    client.rpush(f"rq:queue:mtp-{tenant}", job)
    client.sadd("rq:queues", f"rq:queue:mtp-{tenant}")
    client.hset(f"rq:job:{job}", mapping={"origin": f"mtp-{tenant}", "status": "queued"})
    client.zadd(f"rq:finished:mtp-{tenant}", {f"old-{tenant}": 1.0})
    client.hset(f"rq:job:old-{tenant}", mapping={"origin": f"mtp-{tenant}"})
    client.set(f"mtp:rl:{tenant}", "123.0")
    client.set(f"mtp:rl:{tenant}\x00alice", "123.0")
    client.set(f"mtp:rl:{tenant}\x00quota\x002026-12-03", "5")
