"""A plan's daily_cpu_seconds in a pool: each tenant's handler CPU, read from the usage
store its own process writes (its SQLite, or Redis with its own URL), caps that tenant
alone; a plan without the cap serves it again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework.pool.keys import secret_name
from tests.control.fleet import ControlPlane
from tests.helpers import eventually
from tests.pool.support import Pool, Tenant, start_pool, stop_pool
from tests.pool.test_pool import bearer, problem_type

ACME, GLOBEX, INITECH = Tenant("acme"), Tenant("globex"), Tenant("initech")
DOMAIN = "fleet.test"

PLANS = """
[plans.capped]
isolation = "process"
services = ["*"]
limits = { rate = 1000, burst = 1000, daily_cpu_seconds = 0.3 }

[plans.capped-shared]
isolation = "shared"
services = ["*"]
limits = { rate = 1000, burst = 1000, daily_cpu_seconds = 0.3 }

[plans.std]
isolation = "process"
services = ["*"]
limits = { rate = 1000, burst = 1000 }
"""


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def fleet(request, tmp_path_factory) -> Iterator[tuple[Pool, ControlPlane]]:
    url = ""
    if request.param == "redis":
        from redis import Redis

        url = request.getfixturevalue("redis_server").url
        Redis.from_url(url).flushdb()
    base: Path = tmp_path_factory.mktemp("pool-cpu")
    cp = ControlPlane(base / "control", redis_url=url, plans=PLANS).start()
    # Redis: the pool's limits there, and each tenant's process its own URL (jobs, usage).
    store = ({"MTP_REDIS_URL": url, **{secret_name("MTP_REDIS_URL", t.id): url
                                       for t in (ACME, GLOBEX)}}
             if url else {"MTP_DATA_DIR": str(cp.data_dir)})
    pool = None
    try:
        for tenant, plan in ((ACME, "capped"), (GLOBEX, "capped"),
                             (INITECH, "capped-shared")):
            assert cp.call("POST", "/admin/tenants", {
                "id": tenant.id, "name": tenant.id, "plan": plan,
                "placement": "pool:alpha"}).status == 201
        pool = start_pool(base / "alpha", "alpha", [ACME, GLOBEX, INITECH],
                          MTP_POOL_DOMAIN=DOMAIN,
                          MTP_LOG_LEVEL="INFO", **store)
        yield pool, cp
    finally:
        if pool is not None:
            stop_pool(pool)
        cp.stop()


def call(pool: Pool, tenant: Tenant, payload: dict):
    return pool.call("POST", "/services/slow", {"Host": f"{tenant.id}.{DOMAIN}",
                                                **bearer(tenant.token())},
                     json.dumps({"seconds": 0, **payload}).encode())


def test_each_tenants_cpu_caps_that_tenant_alone(fleet) -> None:
    pool, cp = fleet
    eventually(lambda: call(pool, ACME, {}).status == 200)
    assert call(pool, GLOBEX, {}).status == 200
    for _ in range(4):  # 0.4 s of handler CPU against acme's cap of 0.3 s
        assert call(pool, ACME, {"burn": 0.1}).status == 200
    # Usage is flushed each second and read by the pool every two: then refused.
    refused = eventually(lambda: (r := call(pool, ACME, {})).status == 429 and r, timeout=30)
    assert problem_type(refused).endswith("too-many-requests")
    assert int(refused.headers["Retry-After"]) > 1  # until midnight UTC
    assert refused.json()["request_id"]
    # The same plan, another tenant of the pool: its own CPU, not acme's.
    assert call(pool, GLOBEX, {}).status == 200
    # A plan without the cap: acme is served again.
    assert cp.call("PATCH", "/admin/tenants/acme", {"plan": "std"}).status == 200
    eventually(lambda: call(pool, ACME, {}).status == 200, timeout=30)
    assert "Traceback" not in pool.log.read_text(errors="replace")


def test_a_shared_tenants_cpu_is_read_where_the_shared_process_writes_it(fleet) -> None:
    pool, _cp = fleet
    eventually(lambda: call(pool, INITECH, {}).status == 200)
    for _ in range(4):  # its usage in its SQLite, even in a pool with Redis
        assert call(pool, INITECH, {"burn": 0.1}).status == 200
    refused = eventually(lambda: (r := call(pool, INITECH, {})).status == 429 and r,
                         timeout=30)
    assert problem_type(refused).endswith("too-many-requests")
