"""A tenant.toml in a fleet (the store holds a registry): what `mtp check` says about it,
and the prices its usage is charged at (the plan's, failing closed)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

from framework.control.store import DB_NAME, PLANS, tenant_key
from framework.errors import Unavailable
from framework.tenant_config import BillingSettings, TenantConfig

PRICE_KEYS = ("currency", "per_call", "per_cpu_second", "per_gb")


def fleet_present(redis_url: str, data_dir: Path) -> bool:
    """True when this data plane's store holds a fleet registry (a one-off look)."""
    if redis_url:
        from redis import Redis
        from redis.exceptions import RedisError

        try:
            with Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) as r:
                return bool(r.exists(PLANS))
        except RedisError:
            return False
    path = data_dir / DB_NAME
    if not path.is_file():
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT 1 FROM meta WHERE key = 'plans'").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def fleet_warnings(tenant: TenantConfig) -> list[str]:
    """What the fleet's plan overrides in this tenant.toml."""
    out = []
    billing = tenant.raw.get("billing", {})
    own = [k for k in PRICE_KEYS if k in billing]
    if own:
        out.append(f"{tenant.source}: billing: prices ({', '.join(own)}) are ignored in this "
                   "fleet: the operator's plan sets them")
    if tenant.raw.get("plans"):
        out.append(f"{tenant.source}: plans: ignored in this fleet: the operator's plan "
                   "decides the entitlements")
    if "limits" in tenant.raw:
        out.append(f"{tenant.source}: limits: in this fleet each limit is the lower of "
                   "these and the plan's")
    return out


class PricesUnavailable(Unavailable):
    """503: in a fleet, the plan's prices cannot be known right now, so nothing is priced.

    The registry cannot be read (Redis down, ``fleet.db`` unreadable), it no longer
    holds the tenant or its plan, or it vanished after this process had seen it. The
    tenant's own ``[billing]`` prices are never the fallback: they are the tenant's.
    """

    kind = "registry-unavailable"


def _read_registry(redis_url: str, data_dir: Path,
                   tenant_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the plans document, the tenant's plan): (None, _) when the store holds no registry.

    Raises PricesUnavailable when the store cannot be read.
    """
    try:
        if redis_url:
            from redis import Redis

            with Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2,
                                decode_responses=True) as r:
                # Its own record's key: all the tenant's ACL user may read of the registry.
                raw, rec = r.get(PLANS), r.get(tenant_key(tenant_id))
            plan = json.loads(rec)["plan"] if rec else None
            return (json.loads(raw) if raw else None), plan
        if not (data_dir / DB_NAME).is_file():
            return None, None
        conn = sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'plans'").fetchone()
            found = conn.execute("SELECT plan FROM tenants WHERE id = ?",
                                 (tenant_id,)).fetchone()
        finally:
            conn.close()
        return (json.loads(row[0]) if row else None), (found[0] if found else None)
    except Exception as exc:  # Redis, SQLite, JSON or record shape: all mean "unknown"
        name = type(exc).__name__
        if redis_url and name in ("ConnectionError", "TimeoutError"):
            # Without an answer there is no telling whether a fleet's plan applies.
            raise PricesUnavailable(f"the store (Redis) is unreachable ({name}); usage is "
                                    "not priced until it answers, try again shortly") from None
        raise PricesUnavailable(f"the fleet's registry cannot be read ({name}); usage is "
                                "not priced until it can") from None


def plan_prices(redis_url: str, data_dir: Path, tenant: TenantConfig) -> BillingSettings:
    """The prices the tenant's usage is charged at: its plan's in a fleet, else its own.

    A one-off read of the registry (a report, never a service call); see PlanPrices.
    """
    return PlanPrices(redis_url, data_dir)(tenant)


class PlanPrices:
    """The prices of one process's usage reports and hourly export, read from the registry.

    One read of the registry per call (never on a service call). In a fleet the plan's
    prices, with the tenant's own webhook settings; without one the tenant's own
    ``[billing]``. Fails closed (PricesUnavailable) when the registry cannot be read,
    does not hold the tenant or its plan, or is gone after this process saw it (a
    deleted ``fleet.db``, a flushed Redis): in a fleet the tenant's own prices are
    never used.
    """

    def __init__(self, redis_url: str, data_dir: Path) -> None:
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.fleet_seen = False

    def __call__(self, tenant: TenantConfig) -> BillingSettings:
        doc, plan = _read_registry(self.redis_url, self.data_dir, tenant.tenant_id)
        if doc is None:
            if self.fleet_seen:  # a registry this process saw vanished: not "no fleet"
                raise PricesUnavailable("the fleet's registry is gone; usage is not priced")
            return tenant.billing  # no fleet: a self-managed tenant prices itself
        self.fleet_seen = True
        if plan is None:
            raise PricesUnavailable(f"tenant {tenant.tenant_id} is not in the fleet's "
                                    "registry; usage is not priced")
        found = doc.get("plans", {}).get(plan) if isinstance(doc, dict) else None
        if not isinstance(found, dict):
            raise PricesUnavailable(f"plan {plan!r} of tenant {tenant.tenant_id} is not in "
                                    "the plans in force; usage is not priced")
        prices = found.get("prices") or {}
        free = BillingSettings()  # a plan without prices charges nothing, as the control plane
        return replace(tenant.billing, currency=prices.get("currency", free.currency),
                       per_call=prices.get("per_call", free.per_call),
                       per_cpu_second=prices.get("per_cpu_second", free.per_cpu_second),
                       per_gb=prices.get("per_gb", free.per_gb))
