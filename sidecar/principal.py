"""Who is calling: the identity every later stage works with."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

JWT = "jwt"
API_KEY = "api_key"
LDAP = "ldap"


class BadIdentity(ValueError):
    """An identity value that cannot travel safely in a header."""


def _check(value: str, what: str, *, in_list: bool) -> str:
    # Identity travels in headers to the framework and is signed as text: printable
    # ASCII only, and no commas inside list members (lists are comma-joined).
    if not value or not value.isascii() or not value.isprintable():
        raise BadIdentity(f"{what} must be non-empty printable ASCII")
    if in_list and "," in value:
        raise BadIdentity(f"{what} must not contain a comma")
    return value


def names(values: Iterable[str], what: str) -> tuple[str, ...]:
    """Validated, de-duplicated group or role names in their first order."""
    return tuple(dict.fromkeys(_check(v, what, in_list=True) for v in values))


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller; ``tenant`` is the credential's tenant, not yet checked."""

    tenant: str
    user: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    auth_method: str

    @classmethod
    def build(cls, tenant: str, user: str, groups: Iterable[str], roles: Iterable[str],
              auth_method: str) -> Principal:
        """A principal whose fields are safe to put in headers (else :class:`BadIdentity`)."""
        return cls(tenant, _check(user, "user", in_list=False), names(groups, "group"),
                   names(roles, "role"), auth_method)

    def with_groups(self, extra: Iterable[str]) -> Principal:
        """The same principal with ``extra`` groups merged in (e.g. from LDAP)."""
        return Principal(self.tenant, self.user, names((*self.groups, *extra), "group"),
                         self.roles, self.auth_method)
