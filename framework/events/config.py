"""``[events]`` of tenant.toml: the routes that send a tenant's events to its services.

Imported by framework/tenant_config.py (the schema is part of TENANT_SCHEMA and of the
overlay's), so it imports nothing of the framework.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

MAX_RETRIES = 50
MAX_BACKOFF = 300.0  # seconds between two attempts at most

_ROUTE = {
    "type": "object",
    "properties": {
        "types": {"type": "array", "minItems": 1,
                  "items": {"type": "string", "minLength": 1, "maxLength": 256}},
        "subject": {"type": "string", "minLength": 1, "maxLength": 256},
        # A service of this tenant: the same names as [services.<name>], so a route can
        # never name another tenant's service (there is no syntax for one).
        "service": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"},
        "operation": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"},
        "retries": {"type": "integer", "minimum": 0, "maximum": MAX_RETRIES},
        "backoff": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_BACKOFF},
        "sink": {"type": "string", "pattern": "^https?://[^\\s]+/events$"},
        "sink_token_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
    },
    "additionalProperties": False,
    "required": ["types"],
}
EVENTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"routes": {"type": "array", "items": _ROUTE}},
    "additionalProperties": False,
}


class EventsConfigError(ValueError):
    """A route that the schema lets through but is wrong in itself."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


@dataclass(frozen=True)
class EventRoute:
    """One ``[[events.routes]]`` entry."""

    types: tuple[str, ...]
    subject: str = ""
    service: str = ""
    operation: str = ""
    retries: int = 3
    backoff: float = 1.0  # first retry after this many seconds, doubling each time
    sink: str = ""
    sink_token_env: str = ""

    def matches(self, event_type: str, subject: str | None) -> bool:
        """Whether an event of this type and subject takes this route."""
        if not any(fnmatch.fnmatchcase(event_type, glob) for glob in self.types):
            return False
        return not self.subject or (subject is not None
                                    and fnmatch.fnmatchcase(subject, self.subject))

    def key(self) -> str:
        """A stable name for the route (ordering per subject is per route)."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def snapshot(self) -> str:
        """The route as JSON, stored with each delivery (routes may change live)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_snapshot(cls, text: str) -> EventRoute:
        raw = json.loads(text)
        raw["types"] = tuple(raw["types"])
        return cls(**raw)

    def delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1, 2, ...): exponential, capped."""
        return float(min(MAX_BACKOFF, self.backoff * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class EventSettings:
    """The tenant's event routes."""

    routes: tuple[EventRoute, ...] = ()

    def matching(self, event_type: str, subject: str | None) -> list[EventRoute]:
        """The routes an event takes, in file order."""
        return [r for r in self.routes if r.matches(event_type, subject)]


def build_events(raw: Mapping[str, Any]) -> EventSettings:
    """EventSettings from a validated ``[events]`` table; EventsConfigError if inconsistent."""
    routes = []
    for index, route in enumerate(raw.get("routes", ())):
        where = f"events.routes.{index}"
        if bool(route.get("service")) == bool(route.get("sink")):
            raise EventsConfigError(f"{where}.service", "name a service or a sink, one of them")
        if route.get("sink") and not route.get("sink_token_env"):
            raise EventsConfigError(f"{where}.sink_token_env", "required with sink")
        if route.get("operation") and not route.get("service"):
            raise EventsConfigError(f"{where}.operation", "only with service")
        routes.append(EventRoute(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in route.items()}))
    return EventSettings(tuple(routes))
