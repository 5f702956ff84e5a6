"""Feature flags as a handler sees them: ``context.flags.enabled("name")``."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

from framework.tenant_config import FlagSettings


def rollout_bucket(tenant_id: str, flag: str, user: str) -> int:
    """A stable bucket in [0, 10000) per tenant, flag and user."""
    digest = hashlib.sha256(f"{tenant_id}:{flag}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10000


class FlagSet:
    """The tenant's flags evaluated for one caller."""

    __slots__ = ("_cache", "flags", "groups", "roles", "tenant_id", "user")

    def __init__(self, flags: Mapping[str, FlagSettings], tenant_id: str, user: str,
                 groups: Collection[str] = (), roles: Collection[str] = ()) -> None:
        self.flags, self.tenant_id, self.user = flags, tenant_id, user
        self.groups, self.roles = frozenset(groups), frozenset(roles)
        self._cache: dict[str, bool] = {}

    def enabled(self, name: str) -> bool:
        """Unknown or disabled: False; targeted user/group/role: True; else the rollout."""
        if name not in self._cache:
            self._cache[name] = self._evaluate(name)
        return self._cache[name]

    def _evaluate(self, name: str) -> bool:
        flag = self.flags.get(name)
        if flag is None or not flag.enabled:
            return False
        if (self.user in flag.users or self.groups.intersection(flag.groups)
                or self.roles.intersection(flag.roles)):
            return True
        return rollout_bucket(self.tenant_id, name, self.user) < flag.rollout_percent * 100

    def as_dict(self) -> dict[str, bool]:
        """Every configured flag's value for this caller."""
        return {name: self.enabled(name) for name in self.flags}
