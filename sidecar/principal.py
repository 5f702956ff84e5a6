"""Who is calling: the identity every later stage works with.

Values are checked with :mod:`framework.identity`, the rule the framework reads
the signed headers by: a user id that is not usable is refused, a group or role
name that is not usable is dropped (and named in the audit line).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from framework import identity

JWT = "jwt"
API_KEY = "api_key"
LDAP = "ldap"

MAX_SHOWN = 3  # dropped names quoted in an audit line
SHOWN_CHARS = 40


class BadIdentity(ValueError):
    """An identity value that cannot travel safely in a header."""


def _user(value: object) -> str:
    why = identity.problem(value)
    if why is not None:
        raise BadIdentity(f"user id: {why}")
    return value  # type: ignore[return-value]  # problem() is None only for a str


def _names(values: Iterable[object], what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    kept, dropped = identity.names(values)
    if len(identity.join(kept)) > identity.MAX_LIST:
        raise BadIdentity(f"{what}s: more than {identity.MAX_LIST} characters together")
    return kept, tuple(f"{what} {_shown(v)}" for v in dropped)


def _shown(value: object) -> str:
    text = repr(value)  # escapes control characters: the audit line stays one line
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller; ``tenant`` is the credential's tenant, not yet checked.

    ``dropped`` describes the group and role names that were not usable (audit only).
    """

    tenant: str
    user: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    auth_method: str
    dropped: tuple[str, ...] = ()

    @classmethod
    def build(cls, tenant: str, user: object, groups: Iterable[object],
              roles: Iterable[object], auth_method: str) -> Principal:
        """A principal whose fields are safe to put in headers (else :class:`BadIdentity`)."""
        kept_groups, dropped_groups = _names(groups, "group")
        kept_roles, dropped_roles = _names(roles, "role")
        return cls(tenant, _user(user), kept_groups, kept_roles, auth_method,
                   dropped_groups + dropped_roles)

    def with_groups(self, extra: Iterable[object]) -> Principal:
        """The same principal with ``extra`` groups merged in (e.g. from LDAP)."""
        groups, dropped = _names((*self.groups, *extra), "group")
        return Principal(self.tenant, self.user, groups, self.roles, self.auth_method,
                         self.dropped + dropped)

    def audit_note(self) -> str:
        """What the audit line says about dropped names ("" when none were)."""
        if not self.dropped:
            return ""
        shown = ", ".join(self.dropped[:MAX_SHOWN])
        more = len(self.dropped) - MAX_SHOWN
        return (f"dropped unusable identity values: {shown}"
                + (f" and {more} more" if more > 0 else ""))
