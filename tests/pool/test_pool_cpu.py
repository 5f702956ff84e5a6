"""A plan's daily_cpu_seconds in a pool: each tenant's handler CPU, read from the usage
store its own process writes (its SQLite, or Redis with its own URL), caps that tenant
alone; a plan without the cap serves it again."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from framework.pool.keys import secret_name
from tests.control.fleet import ControlPlane
from tests.helpers import eventually
from tests.pool.support import Pool, Tenant, fleet_pool, fleet_store
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
    url = fleet_store(request)
    # Redis: the pool's limits there, and each tenant's process its own URL (jobs, usage).
    own = {secret_name("MTP_REDIS_URL", t.id): url for t in (ACME, GLOBEX)} if url else {}
    with fleet_pool(tmp_path_factory.mktemp("pool-cpu"), PLANS,
                    [(ACME, "capped", "pool:alpha"), (GLOBEX, "capped", "pool:alpha"),
                     (INITECH, "capped-shared", "pool:alpha")],
                    [ACME, GLOBEX, INITECH], url, MTP_POOL_DOMAIN=DOMAIN,
                    MTP_LOG_LEVEL="INFO", **own) as started:
        yield started


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
