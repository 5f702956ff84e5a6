"""What `mtp check` says about a tenant.toml that runs in a fleet (the store holds a registry)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from framework.control.store import DB_NAME, PLANS
from framework.tenant_config import TenantConfig

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
