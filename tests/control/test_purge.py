"""Offboarding purges everything of the tenant, and nothing of anyone else.

A real `mtp run` of tenant acme on the fleet's redis-server makes real state (sync
and async calls: RQ keys under ``mtp:acme:rq:``, job records, usage hours, limiter
keys, config versions in the shared data dir); other tenants' state sits beside it,
including ``acme-eu`` whose id starts with ``acme``. After DELETE the test SCANs
Redis and reads every SQLite file: nothing of acme, everything of the others.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from redis import Redis

from tests.control.fleet import ControlPlane
from tests.control.seed import seed_redis, seed_sqlite
from tests.control.test_data_plane import PLANS, echo, start_replica, wait_until
from tests.redis.stack import Replica, auth, wait_job, write_tenant

OTHERS = ("acme-eu", "beta")


def snapshot(client: Redis) -> dict[bytes, bytes]:
    """Every key with its DUMP (value and type), except the fleet registry's own."""
    return {k: client.dump(k) for k in client.scan_iter(count=1000)
            if not k.startswith(b"mtp:_fleet:")}


def of_acme(key: bytes) -> bool:
    """Every key of the others names them whole (``acme-eu``); acme's name ``acme``."""
    return b"acme" in key and b"acme-eu" not in key


def sqlite_rows(data_dir: Path) -> dict[str, list[tuple]]:
    """Every row of every table of every SQLite file in the data dir but the registry's."""
    out: dict[str, list[tuple]] = {}
    for path in sorted(data_dir.iterdir()):
        if path.suffix not in (".db", ".sqlite3") or path.name == "fleet.db":
            continue
        conn = sqlite3.connect(path)
        try:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                out[f"{path.name}:{table}"] = conn.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
        finally:
            conn.close()
    return out


def mentions(row: tuple, tenant: str) -> bool:
    """A row belongs to ``tenant``: a tenant column, or a config document naming it."""
    for value in row:
        if value == tenant:
            return True
        if isinstance(value, str) and value.startswith("{"):
            try:
                doc = json.loads(value)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("tenant", {}).get("id") == tenant:
                return True
    return False


def test_offboarding_purges_acme_and_nothing_else(redis_server, tmp_path: Path) -> None:
    client = Redis.from_url(redis_server.url)
    client.flushdb()
    data_dir = tmp_path / "acme-data"  # one machine: control plane and stack share it
    cp = ControlPlane(tmp_path / "control", redis_url=redis_server.url, plans=PLANS,
                      extra_env={"MTP_DATA_DIR": str(data_dir)}).start()
    replica = Replica("acme", tmp_path, write_tenant(tmp_path, "rate = 1000\nburst = 1000\n"
                                                     "user_rate = 100\nuser_burst = 100\n"
                                                     "concurrency = 10\ndaily_quota = 100000"),
                      redis_server.url)
    try:
        for tid in ("acme", *OTHERS):
            assert cp.call("POST", "/admin/tenants", {"id": tid, "name": tid,
                                                      "plan": "std"}).status == 201
        start_replica(replica)
        replica.workers_ready()
        for _ in range(3):
            assert echo(replica).status == 200
        job = replica.call("POST", "/services/echo?mode=async", auth(), {"n": 1}).json()
        assert wait_job(replica, job["job_id"])["status"] == "succeeded"
        queued = replica.call("POST", "/services/sleepy?mode=async", auth(), {"s": 0}).json()
        wait_until(lambda: client.exists("mtp:acme:usage:hours") == 1)  # flushed each second
        decoded = Redis.from_url(redis_server.url, decode_responses=True)
        for tid in ("acme", *OTHERS):
            seed_redis(decoded, tid)  # also RQ keys where deployments before kept them: rq:*
            seed_sqlite(data_dir, tid)
        before = snapshot(client)
        mine = [k for k in before if of_acme(k)]
        # The stack's RQ keys are acme's (its workers, its queue set), none RQ's global ones.
        assert b"mtp:acme:rq:workers" in mine and b"mtp:acme:rq:queues" in mine
        assert not any(k.startswith(b"rq:worker") for k in before)
        assert any(k.startswith(b"rq:job:") for k in mine) and b"rq:queues" not in mine  # legacy
        assert any(k.startswith(b"mtp:rl:acme") for k in mine)
        assert f"mtp:acme:job:{queued['job_id']}".encode() in mine
        rows_before = sqlite_rows(data_dir)
        assert any(mentions(r, "acme") for rows in rows_before.values() for r in rows)

        assert cp.call("DELETE", "/admin/tenants/acme").status == 202
        wait_until(lambda: echo(replica).status == 403)
        cp.wait_offboarded("acme")
        # The operator stops acme's stack, then offboards again: its workers' heartbeats
        # (and anything else still running) wrote after the first purge.
        replica.stop()
        log = cp.root / "control.log"
        purges = log.read_text().count("tenant acme purged")
        assert cp.call("DELETE", "/admin/tenants/acme").status == 202
        wait_until(lambda: log.read_text().count("tenant acme purged") > purges)

        after = snapshot(client)
        left = [k for k in after if of_acme(k)]
        assert left == [], left
        members = client.smembers("rq:queues")
        assert b"rq:queue:mtp-acme" not in members and b"rq:queue:mtp-beta" in members
        shared = (b"rq:queues", b"rq:workers")  # sets of every tenant's queues and workers
        assert not any(b"acme" in m and b"acme-eu" not in m
                       for m in client.smembers("rq:workers"))
        others = {k: v for k, v in before.items() if not of_acme(k) and k not in shared}
        assert {k: after.get(k) for k in others} == others  # byte for byte
        rows_after = sqlite_rows(data_dir)
        for table, rows in rows_after.items():
            assert not any(mentions(r, "acme") for r in rows), table
            assert [r for r in rows_before[table] if not mentions(r, "acme")] == rows, table
        assert any(mentions(r, "acme-eu") for rows in rows_after.values() for r in rows)

        export = cp.call("GET", "/admin/tenants/acme/export")
        lines = [json.loads(x) for x in export.body.decode().splitlines()]
        jobs = {x["id"] for x in lines if x["kind"] == "job"}
        assert job["job_id"] in jobs and all(x["tenant"] == "acme" for x in lines)
        assert any(x["kind"] == "usage" and x["calls"] >= 3 for x in lines)
        assert "acme-eu" not in export.body.decode()
    finally:
        replica.stop()
        cp.stop()
