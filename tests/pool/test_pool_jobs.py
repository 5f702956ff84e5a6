"""Async jobs of a pool's tenant whose jobs are in Redis: its own job worker runs them.

A tenant process with a Redis URL (its ACL user's, MTP_REDIS_URL__<TENANT>) only
queues jobs there (framework/jobs_redis.py); the pool starts the tenant's RQ worker
next to it, under the same ACL user, stops it with it, keeps both while jobs are
queued or running, and starts a fresh worker when one died. A real pool, a real
redis-server with the tenant's ACL user.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework.control.acl import set_user
from tests.helpers import eventually
from tests.pool.support import DOMAIN, Pool, Tenant, start_pool, stop_pool
from tests.pool.test_pool import bearer

ACME, GLOBEX = Tenant("acme"), Tenant("globex")


@pytest.fixture
def pool(redis_server, tmp_path: Path) -> Iterator[tuple[Pool, object]]:
    from redis import Redis

    admin = Redis.from_url(redis_server.url)
    admin.flushdb()
    user = set_user(admin, "acme")
    assert user is not None
    # acme's jobs in Redis as its ACL user, the URL given by the operator.
    started = start_pool(tmp_path, "alpha", [ACME, GLOBEX], MTP_REDIS_URL=redis_server.url,
                         MTP_REDIS_URL__ACME=user.url(redis_server.url), MTP_POOL_IDLE="2",
                         MTP_LOG_LEVEL="INFO")
    try:
        yield started, admin
    finally:
        stop_pool(started)
        admin.execute_command("ACL", "DELUSER", "t-acme", "t-globex")


def submit(pool: Pool, tenant: Tenant, seconds: float) -> str:
    reply = pool.call("POST", "/services/slow?mode=async",
                      {"Host": f"{tenant.id}.{DOMAIN}", **bearer(tenant.token())},
                      json.dumps({"seconds": seconds}).encode())
    assert reply.status == 202, reply.body
    return reply.json()["job_id"]


def status(pool: Pool, tenant: Tenant, job_id: str) -> dict:
    reply = pool.call("GET", f"/jobs/{job_id}",
                      {"Host": f"{tenant.id}.{DOMAIN}", **bearer(tenant.token())})
    assert reply.status == 200, reply.body
    return reply.json()


def done(pool: Pool, tenant: Tenant, job_id: str) -> dict:
    return eventually(lambda: (s := status(pool, tenant, job_id))["status"]
                      not in ("queued", "running") and s, timeout=60)


def worker_pids(admin) -> list[int]:
    """The pids of acme's live RQ workers (RQ names them queue.host.pid.n)."""
    names = [m.decode().rsplit(":", 1)[-1] for m in admin.smembers("mtp:acme:rq:workers")]
    return [int(name.split(".")[-2]) for name in names
            if Path(f"/proc/{name.split('.')[-2]}").exists()]


def test_jobs_in_redis_run_in_the_tenants_own_worker_which_outlives_idleness(pool) -> None:
    p, admin = pool
    # Longer than MTP_POOL_IDLE (2 s) with no request meanwhile: the queued and running
    # job keeps the tenant's processes, the job ends succeeded, not interrupted.
    first = submit(p, ACME, 4.0)
    second = submit(p, ACME, 0.1)  # queued behind the first: one job at a time
    assert done(p, ACME, first)["status"] == "succeeded"
    assert done(p, ACME, second)["result"] == {"tenant": "acme"}
    assert admin.zscore("mtp:acme:jobs:succeeded", first) is not None  # in Redis
    [pid] = worker_pids(admin)
    # globex, without a URL of its own: the pool made its user; its jobs in Redis too.
    job = submit(p, GLOBEX, 0.1)
    assert done(p, GLOBEX, job)["status"] == "succeeded"
    assert admin.zscore("mtp:globex:jobs:succeeded", job) is not None
    # Nothing queued or running any more: acme's processes are reaped, worker too.
    eventually(lambda: not Path(f"/proc/{pid}").exists() and not list(
        p.run_dir.glob("acme-*.sock")), timeout=30)
    # The next call starts both again.
    assert done(p, ACME, submit(p, ACME, 0.1))["status"] == "succeeded"
    assert len(worker_pids(admin)) == 1 and worker_pids(admin) != [pid]
    assert "Traceback" not in p.log.read_text(errors="replace")


def test_a_dead_job_worker_is_replaced_at_the_next_call(pool) -> None:
    p, admin = pool
    assert done(p, ACME, submit(p, ACME, 0.1))["status"] == "succeeded"
    [pid] = worker_pids(admin)
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: not Path(f"/proc/{pid}").exists())
    job = submit(p, ACME, 0.1)  # this call finds the worker gone and starts another
    assert done(p, ACME, job)["status"] == "succeeded"
    assert pid not in worker_pids(admin)


def test_without_a_url_of_its_own_the_pool_makes_the_tenants_redis_user(redis_server,
                                                                       tmp_path: Path) -> None:
    from redis import Redis

    admin = Redis.from_url(redis_server.url)
    admin.flushdb()
    for user in ("t-acme", "t-globex"):
        admin.execute_command("ACL", "DELUSER", user)
    # The control plane made globex's user; nobody made acme's.
    made = set_user(admin, "globex")
    assert made is not None
    p = start_pool(tmp_path, "alpha", [ACME, GLOBEX], MTP_REDIS_URL=redis_server.url)
    try:
        for tenant in (ACME, GLOBEX):
            job = submit(p, tenant, 0.1)
            assert done(p, tenant, job)["status"] == "succeeded"
            assert admin.zscore(f"mtp:{tenant.id}:jobs:succeeded", job) is not None
        # Each tenant's processes are connected as its own user, never the pool's.
        users = {line.split(" user=")[1].split()[0]
                 for line in admin.execute_command("CLIENT", "LIST").decode().splitlines()
                 if " name=" in line}
        assert {"t-acme", "t-globex"} <= users
        # acme's user, made by the pool, has the control plane's rules: its keys only.
        assert admin.execute_command("ACL", "DRYRUN", "t-acme", "GET", "mtp:acme:x") == b"OK"
        assert b"no permissions" in admin.execute_command(
            "ACL", "DRYRUN", "t-acme", "GET", "mtp:globex:x")
        # globex's password from the control plane still works next to the pool's.
        assert Redis.from_url(made.url(redis_server.url)).ping()
    finally:
        stop_pool(p)
        for user in ("t-acme", "t-globex"):
            admin.execute_command("ACL", "DELUSER", user)


def test_redis_users_refused_or_unreachable(redis_server) -> None:
    from redis import Redis
    from redis.exceptions import RedisError

    from framework.pool.redis_users import RedisUsers
    from tests.helpers import free_port

    admin = Redis.from_url(redis_server.url)
    # A pool user that may not run ACL commands: tenants keep their SQLite.
    admin.execute_command("ACL", "SETUSER", "plain", "reset", "on", ">plain-pw", "~*", "&*",
                          "+@all", "-acl")
    host = redis_server.url.rpartition("@")[2].split("://")[-1]
    users = RedisUsers(f"redis://plain:plain-pw@{host}", b"s" * 32, "alpha")
    try:
        assert users.url("acme") == "" and users.url("globex") == ""
        assert admin.acl_getuser("t-acme") is None
    finally:
        users.close()
        admin.execute_command("ACL", "DELUSER", "plain")
    # Redis away: an error, not a quiet switch to SQLite.
    nowhere = RedisUsers(f"redis://127.0.0.1:{free_port()}", b"s" * 32, "alpha")
    with pytest.raises(RedisError):
        nowhere.url("acme")
    nowhere.close()
