"""A pool in a fleet: the registry decides which tenants it serves, and how.

A real `mtp control` and a real `mtp pool` on one redis-server: a tenant placed in
another pool or not registered is 403 unknown-tenant although its bundle is there;
suspended and offboarding tenants are 403 tenant-suspended, as in a dedicated stack;
the plan's entitlements apply. Plus the placement decision itself (unit level).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from framework.control.registry_view import RegistryView
from framework.pool.placement import RegistryPlacement, serves
from tests.control.fleet import ControlPlane
from tests.helpers import eventually as wait_until
from tests.pool.support import Pool, Tenant, fleet_pool, fleet_store
from tests.pool.test_pool import bearer, problem_type

ACME, GLOBEX, INITECH = Tenant("acme"), Tenant("globex"), Tenant("initech")
DOMAIN = "fleet.test"  # the control plane's MTP_POOL_DOMAIN in tests/control/fleet.py

PLANS = """
[plans.std]
isolation = "process"
services = ["*"]
limits = { rate = 1000, burst = 1000 }

[plans.narrow]
isolation = "process"
services = ["whoami"]
"""


def test_the_placement_decision() -> None:
    assert serves("alpha", "pool:alpha", "")
    assert not serves("alpha", "pool:beta", "")
    assert not serves("alpha", "dedicated", "")
    # Migrating away from alpha: served until the migration is cleared.
    assert serves("alpha", "pool:beta", "pool:alpha")
    assert serves("alpha", "dedicated", "pool:alpha")
    # Migrating into alpha: served (warming starts its process here).
    assert serves("alpha", "pool:alpha", "pool:beta")
    assert not serves("alpha", "pool:gamma", "pool:beta")
    assert not serves("alpha", "pool:alphabet", "")


def test_the_placement_of_a_pool_follows_the_view() -> None:
    view = RegistryView()  # never started: filled by hand as the store would
    placement = RegistryPlacement("alpha", view)
    assert placement.placed_here("anyone")  # no registry in the store: every bundle
    view.fleet = True
    assert not placement.placed_here("anyone")  # a fleet: unregistered is not placed
    view.placements = {"acme": ("pool:alpha", ""), "globex": ("pool:beta", "pool:alpha"),
                       "initech": ("dedicated", "")}
    assert placement.placed_here("acme") and placement.placed_here("globex")
    assert not placement.placed_here("initech")



@pytest.fixture(scope="module", params=["redis", "sqlite"])
def fleet(request, tmp_path_factory) -> Iterator[tuple[Pool, ControlPlane]]:
    """The fleet's store: Redis, or on one machine the control plane's MTP_DATA_DIR."""
    with fleet_pool(tmp_path_factory.mktemp("pool-fleet"), PLANS,
                    [(ACME, "std", "pool:alpha"), (GLOBEX, "std", "pool:beta")],
                    [ACME, GLOBEX, INITECH], fleet_store(request),
                    MTP_POOL_DOMAIN=DOMAIN) as started:
        yield started


def whoami(pool: Pool, tenant: Tenant, service: str = "whoami"):
    return pool.call("POST", f"/services/{service}",
                     {"Host": f"{tenant.id}.{DOMAIN}", **bearer(tenant.token())}, b"{}")


def refused(reply) -> str:
    return f"{reply.status} {problem_type(reply).rsplit(':', 1)[-1]}" \
        if reply.status >= 400 else str(reply.status)


def test_the_registry_decides_which_bundles_a_pool_serves(fleet) -> None:
    pool, _cp = fleet
    wait_until(lambda: whoami(pool, ACME).status == 200)
    assert whoami(pool, ACME).json()["tenant"] == "acme"
    # Its bundle is here, but the registry places it in beta: not served here.
    assert refused(whoami(pool, GLOBEX)) == "403 unknown-tenant"
    # Its bundle is here, but it is not registered.
    assert refused(whoami(pool, INITECH)) == "403 unknown-tenant"
    # By API key too: the key index does not serve a tenant placed elsewhere.
    reply = pool.call("POST", "/services/whoami", {"X-API-Key": GLOBEX.api_key}, b"{}")
    assert refused(reply) == "403 unknown-tenant"
    doc = whoami(pool, INITECH).json()
    assert doc["request_id"] and "Traceback" not in str(doc)


def test_suspended_and_offboarding_tenants_are_refused_as_in_a_dedicated_stack(fleet) -> None:
    pool, cp = fleet
    wait_until(lambda: whoami(pool, ACME).status == 200)
    assert cp.call("PATCH", "/admin/tenants/acme", {"status": "suspended"}).status == 200
    wait_until(lambda: refused(whoami(pool, ACME)) == "403 tenant-suspended")
    assert refused(pool.call("POST", "/services/whoami?mode=async", {
        "Host": f"acme.{DOMAIN}", **bearer(ACME.token())}, b"{}")) == "403 tenant-suspended"
    assert cp.call("PATCH", "/admin/tenants/acme", {"status": "active"}).status == 200
    wait_until(lambda: whoami(pool, ACME).status == 200)
    # The plan's entitlements: only whoami.
    assert cp.call("PATCH", "/admin/tenants/acme", {"plan": "narrow"}).status == 200
    wait_until(lambda: refused(whoami(pool, ACME, "slow")) == "403 not-entitled")
    assert whoami(pool, ACME).status == 200
    assert cp.call("DELETE", "/admin/tenants/acme").status == 202
    wait_until(lambda: refused(whoami(pool, ACME)) == "403 tenant-suspended")
    assert pool.call("GET", "/healthz").status == 200  # the pool itself stays live
