"""Authorization policy: a pure decision, shared by the sidecar and the framework.

``decide`` answers whether a principal may call a service operation under the
tenant's ``[authz]`` settings. No IO, no web framework: the sidecar calls it on
every request and the framework reuses it for ``GET /services`` and for
``context.call`` (service composition).

Rules: ``enabled = false`` allows everything. When enabled, a request is allowed
when one rule matches (first match wins, its index is reported); a service that
no rule grants is refused whether it exists or not. A rule matches when its
``service`` is the service or ``"*"``, its ``operations`` hold the operation or
``"*"`` (a call without an operation matches only ``"*"``), and the principal is
one of its users, or has one of its groups or roles — a rule naming none of
them grants every principal of the tenant; ``"*"`` in a list matches anyone.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from framework.tenant_config import AuthzRule, AuthzSettings

ANY = "*"


class Subject(Protocol):
    """What the policy needs to know about a caller."""

    @property
    def user(self) -> str: ...

    @property
    def groups(self) -> Collection[str]: ...

    @property
    def roles(self) -> Collection[str]: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: allowed or not, the index of the rule that matched, and why."""

    allowed: bool
    rule_index: int | None
    reason: str


_DISABLED = Decision(True, None, "authz disabled")
_NO_RULE = Decision(False, None, "no rule grants this service operation")


def _names(rule_values: Collection[str], held: Collection[str]) -> bool:
    return ANY in rule_values or any(v in rule_values for v in held)


def rule_matches(rule: AuthzRule, subject: Subject, service: str, operation: str | None) -> bool:
    """Whether one rule grants ``subject`` the service operation."""
    if rule.service != ANY and rule.service != service:
        return False
    if ANY not in rule.operations and (operation is None or operation not in rule.operations):
        return False
    if not (rule.users or rule.groups or rule.roles):
        return True
    return (_names(rule.users, (subject.user,)) or _names(rule.groups, subject.groups)
            or _names(rule.roles, subject.roles))


def decide(authz: AuthzSettings, subject: Subject, service: str,
           operation: str | None) -> Decision:
    """Allow or refuse ``subject`` calling ``service`` (``operation`` may be None)."""
    if not authz.enabled:
        return _DISABLED
    for index, rule in enumerate(authz.rules):
        if rule_matches(rule, subject, service, operation):
            return Decision(True, index, f"rule {index}")
    return _NO_RULE


_NO_EVENT_RULE = Decision(False, None, "no rule grants publishing this event type")


def decide_event(authz: AuthzSettings, subject: Subject, event_type: str) -> Decision:
    """Allow or refuse ``subject`` publishing an event of ``event_type`` (``events`` globs).

    A rule grants it when one of its ``events`` globs matches the type and the principal
    is one it names (as for services: naming nobody grants every principal).
    """
    if not authz.enabled:
        return _DISABLED
    for index, rule in enumerate(authz.rules):
        if (any(fnmatch.fnmatchcase(event_type, glob) for glob in rule.events)
                and (not (rule.users or rule.groups or rule.roles)
                     or _names(rule.users, (subject.user,)) or _names(rule.groups, subject.groups)
                     or _names(rule.roles, subject.roles))):
            return Decision(True, index, f"rule {index}")
    return _NO_EVENT_RULE
