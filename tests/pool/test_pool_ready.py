"""`GET /readyz` naming a tenant starts its process without a credential (it is how a
target pool warms a tenant before a migration switches): a client naming tenant after
tenant gets 503 past a small start budget instead of churning the pool's processes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sidecar.tenant_routing import READY_STARTS_BURST, StartBudget
from tests.helpers import eventually
from tests.pool.support import Tenant, start_pool, stop_pool

TENANTS = [Tenant(f"t{i:02d}") for i in range(12)]


def test_readyz_starts_are_budgeted(tmp_path: Path) -> None:
    pool = start_pool(tmp_path, "alpha", TENANTS, MTP_POOL_MAX_PROCS="20")
    try:
        def ready(tenant: Tenant):
            return pool.call("GET", "/readyz", {"X-Tenant-ID": tenant.id})

        with ThreadPoolExecutor(len(TENANTS)) as workers:
            replies = list(workers.map(ready, TENANTS))
        started = [t for t, r in zip(TENANTS, replies, strict=True) if r.status == 200]
        refused = [r for r in replies if r.status != 200]
        # All arrive within a moment: the burst starts, the rest wait their turn.
        assert READY_STARTS_BURST <= len(started) < len(TENANTS), [r.status for r in replies]
        for reply in refused:
            assert reply.status == 503 and reply.headers["Retry-After"] == "1"
            assert reply.headers["Content-Type"] == "application/problem+json"
            assert reply.json()["request_id"] and "readyz" in reply.json()["detail"]
        # A live process costs nothing from the budget; the refused ones come in time.
        assert all(ready(t).status == 200 for t in started)
        for tenant in TENANTS:
            eventually(lambda t=tenant: ready(t).status == 200)
        assert pool.call("GET", "/readyz").status == 200  # the pool's own: never limited
    finally:
        stop_pool(pool)


def test_the_budget_refills_at_its_rate() -> None:
    budget = StartBudget(rate=10.0, burst=2, tokens=2)
    assert budget.take() and budget.take() and not budget.take()
    budget.at -= 0.1  # a tenth of a second later: one more
    assert budget.take() and not budget.take()
    budget.at = time.monotonic() - 60  # never more than the burst
    assert budget.take() and budget.take() and not budget.take()
