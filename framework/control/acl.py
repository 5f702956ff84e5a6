"""Redis ACL users per tenant: each data plane connects as ``t-<tenant>``, limited to its keys.

The user may touch ``mtp:<tenant>:*`` (jobs, usage, events, quotas, RQ's keys:
framework/rq_keys.py) and the limiter's ``mtp:rl:<tenant>`` keys, and Pub/Sub
channels ``mtp:<tenant>:*``. It may only read its own registry record, the plans and
the usage store id (Redis 7 read selectors ``%R~``), and hear its own record's
changes: enough for the whole data plane (``mtp run``) to run as this user, never
to rewrite its record or plan. Any command on another tenant's key is refused by
Redis itself (NOPERM), and so are the commands that list key or channel names
(SCAN, RANDOMKEY, PUBSUB; KEYS is among ``@dangerous``). Creating again rotates:
``reset`` drops the old password, so a leaked one dies at once. The password is
returned once, to the operator who onboarded the tenant.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from framework.control.purge import LIMITER_PREFIX
from framework.control.store import PLANS, tenant_channel, tenant_key
from framework.usage_redis import STORE_ID

log = logging.getLogger("mtp.control.acl")


@dataclass(frozen=True)
class AclUser:
    """A tenant's Redis credentials (the password is shown once, never logged)."""

    user: str
    password: str

    def url(self, redis_url: str) -> str:
        """The fleet's Redis URL with these credentials in it."""
        scheme, _, rest = redis_url.partition("://")
        host = rest.rpartition("@")[2]
        return f"{scheme}://{self.user}:{self.password}@{host}"


def user_name(tenant: str) -> str:
    return f"t-{tenant}"


def rules(tenant: str, password: str) -> list[str]:
    """The ACL SETUSER arguments for one tenant."""
    return ["reset", "on", f">{password}",
            # The limiter's keys are "<tenant>" and "<tenant>\0...": Redis cuts an ACL
            # rule at a NUL byte, so "any byte that cannot continue a tenant id" stands
            # for it (mtp:rl:acme-eu stays out of acme's reach).
            f"~mtp:{tenant}:*", f"~{LIMITER_PREFIX}{tenant}",
            f"~{LIMITER_PREFIX}{tenant}[^a-z0-9-]*",
            f"&mtp:{tenant}:*", "+@all", "-@dangerous", *fleet_rules(tenant)]


def fleet_rules(tenant: str) -> list[str]:
    """What a tenant's user may read of the fleet, and the listings it may not run."""
    # Read-only: its record, the plans, the usage store id; its record's channel.
    return [f"%R~{tenant_key(tenant)}", f"%R~{PLANS}", f"%R~{STORE_ID}",
            f"&{tenant_channel(tenant)}",
            # Key and channel names of every tenant: not this tenant's to list.
            "-scan", "-randomkey", "-pubsub"]


def upgrade_users(client: Any, tenants: Iterable[str]) -> int:
    """Give the users an older control plane made the :func:`fleet_rules` (passwords
    kept; adding a rule again changes nothing); how many users were given them."""
    from redis.exceptions import ResponseError

    done = 0
    for tenant in tenants:
        try:
            if client.acl_getuser(user_name(tenant)) is None:
                continue  # no user (offboarded, or made without ACLs)
            client.execute_command("ACL", "SETUSER", user_name(tenant), *fleet_rules(tenant))
        except ResponseError as exc:
            log.warning("Redis ACL user of tenant %s not upgraded: %s", tenant, exc)
            return done
        done += 1
    return done


def set_user(client: Any, tenant: str) -> AclUser | None:
    """Create or rotate the tenant's ACL user; its new credentials, or None when this
    Redis refuses ACL commands (a managed Redis without them: logged, not fatal)."""
    from redis.exceptions import ResponseError

    password = secrets.token_urlsafe(32)
    try:
        client.execute_command("ACL", "SETUSER", user_name(tenant), *rules(tenant, password))
    except ResponseError as exc:
        log.warning("no Redis ACL user for tenant %s: %s", tenant, exc)
        return None
    return AclUser(user_name(tenant), password)
