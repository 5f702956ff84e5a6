"""What `mtp check` says about a tenant.toml that runs in a fleet (the store holds a registry)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from framework.control.store import DB_NAME, PLANS, tenant_key
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


def plan_prices(redis_url: str, data_dir: Path, tenant: TenantConfig) -> BillingSettings:
    """The prices the tenant's usage is charged at: its plan's in a fleet, else its own.

    A one-off read of the registry, for the rare usage reports (never on a service
    call). The plan's prices keep the tenant's own webhook settings.
    """
    import json

    doc, plan = None, ""
    try:
        if redis_url:
            from redis import Redis

            with Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2,
                                decode_responses=True) as r:
                # Its own record's key: all the tenant's ACL user may read of the registry.
                raw, rec = r.get(PLANS), r.get(tenant_key(tenant.tenant_id))
            doc = json.loads(raw) if raw else None
            plan = json.loads(rec)["plan"] if rec else ""
        elif (data_dir / DB_NAME).is_file():
            conn = sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=5)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'plans'").fetchone()
                found = conn.execute("SELECT plan FROM tenants WHERE id = ?",
                                     (tenant.tenant_id,)).fetchone()
            finally:
                conn.close()
            doc = json.loads(row[0]) if row else None
            plan = found[0] if found else ""
    except Exception:
        return tenant.billing
    prices = (doc or {}).get("plans", {}).get(plan, {}).get("prices")
    if prices is None:
        return tenant.billing
    return replace(tenant.billing, currency=prices.get("currency", "EUR"),
                   per_call=prices.get("per_call", 0.0),
                   per_cpu_second=prices.get("per_cpu_second", 0.0),
                   per_gb=prices.get("per_gb", 0.0))
