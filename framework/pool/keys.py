"""Per-tenant keys and secrets in a pool.

A tenant's framework process verifies the sidecar's signature with a key derived for
that tenant alone (HKDF-SHA256 of the pool secret, info = the tenant id): tenant A's
code, which can read its own key, cannot sign a request that B's process accepts.
A tenant's own secrets (its JWT secret, its webhook secret) are read from the pool's
environment under a per-tenant name, never shared between tenants.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT = b"mtp-pool-tenant-signing-v1"
KEY_BYTES = 32


def derive_key(pool_secret: bytes, tenant_id: str) -> bytes:
    """The signing key of ``tenant_id`` (hex, 64 bytes): HKDF(pool secret, tenant id)."""
    raw = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=SALT,
               info=b"tenant:" + tenant_id.encode()).derive(pool_secret)
    return raw.hex().encode()


def redis_password(pool_secret: bytes, pool_name: str, tenant_id: str) -> str:
    """The password a pool gives tenant ``tenant_id``'s Redis user for its processes.

    Derived (another HKDF info than the signing key's), so a restarted pool adds the
    same one again instead of leaving one more behind; per pool, so two pools serving
    the tenant during a migration never remove each other's.
    """
    raw = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=SALT,
               info=f"redis:{pool_name}:{tenant_id}".encode()).derive(pool_secret)
    return raw.hex()


def secret_name(name: str, tenant_id: str) -> str:
    """Where a pool finds a tenant's secret ``name``: ``<name>__<TENANT>``.

    ``MTP_JWT_SECRET`` of tenant ``acme-eu`` is ``MTP_JWT_SECRET__ACME_EU``. There is no
    fallback to the bare name: two tenants never share a secret by accident.
    """
    return f"{name}__{re.sub(r'[^A-Za-z0-9]', '_', tenant_id).upper()}"


def tenant_secret(environ: Mapping[str, str], name: str, tenant_id: str) -> str:
    """The tenant's own value of secret ``name``, or '' when the pool has none."""
    return environ.get(secret_name(name, tenant_id), "") if name else ""
