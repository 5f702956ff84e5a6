"""The operator's plans (MTP_PLANS_FILE): checked like tenant.toml, reloaded live, versioned.

A plan names an isolation, entitlement globs over service names, limits and prices.
A file that fails its check names the file, the key and the reason; at start that
stops ``mtp control``, on a live reload the plans in force stay (and the error is
logged), so a bad ConfigMap edit never leaves tenants without a plan.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from framework.tenant_config import (
    BillingSettings,
    ConfigError,
    _read_toml,
    _validate,
    config_digest,
)

log = logging.getLogger("mtp.control.plans")

ISOLATIONS = ("shared", "process", "dedicated")
PLAN_NAME = "^[a-z0-9][a-z0-9_-]{0,63}$"
LIMIT_KEYS = ("rate", "burst", "user_rate", "user_burst", "concurrency", "daily_quota",
              "daily_cpu_seconds", "degraded_rate")

_NUM = {"type": "number", "minimum": 0}
_INT = {"type": "integer", "minimum": 0}
PLANS_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["plans"],
    "properties": {"plans": {
        "type": "object", "minProperties": 1,
        "propertyNames": {"pattern": PLAN_NAME},
        "additionalProperties": {
            "type": "object", "additionalProperties": False,
            "required": ["isolation", "services"],
            "properties": {
                "isolation": {"enum": list(ISOLATIONS)},
                "services": {"type": "array", "items": {"type": "string", "minLength": 1}},
                "limits": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "rate": {"type": "number", "exclusiveMinimum": 0},
                        "burst": _INT, "user_rate": _NUM, "user_burst": _INT,
                        "concurrency": _INT, "daily_quota": _INT,
                        "daily_cpu_seconds": _NUM, "degraded_rate": _NUM,
                    },
                },
                "prices": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                        "per_call": _NUM, "per_cpu_second": _NUM, "per_gb": _NUM,
                    },
                },
            },
        },
    }},
}


@dataclass(frozen=True)
class Plan:
    """One plan of the operator."""

    name: str
    isolation: str
    services: tuple[str, ...]
    limits: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    prices: BillingSettings = field(default_factory=BillingSettings)

    def entitled(self, service: str) -> bool:
        """True when a glob of the plan matches the service name."""
        return any(fnmatch.fnmatchcase(service, glob) for glob in self.services)

    @property
    def default_placement(self) -> str:
        """Where a tenant of this plan runs when its record names no placement."""
        return "dedicated" if self.isolation == "dedicated" else f"pool:{self.isolation}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``GET /admin/plans`` (and of the copy data planes read)."""
        prices = asdict(self.prices)
        return {"isolation": self.isolation, "services": list(self.services),
                "limits": dict(self.limits),
                "prices": {k: prices[k] for k in ("currency", "per_call", "per_cpu_second",
                                                   "per_gb")}}


@dataclass(frozen=True)
class PlanSet:
    """The plans in force and their version."""

    plans: Mapping[str, Plan]
    digest: str
    version: int = 1
    loaded: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "hash": self.digest,
                "plans": {name: plan.as_dict() for name, plan in sorted(self.plans.items())}}


def parse_plans(data: Mapping[str, Any], file: str) -> dict[str, Plan]:
    """Validate a plans document (ConfigError names file, key, reason) and build the plans."""
    _validate(data, PLANS_SCHEMA, file)
    out = {}
    for name, raw in data["plans"].items():
        out[name] = plan_from_dict(name, raw)
    return out


def plan_from_dict(name: str, raw: Mapping[str, Any]) -> Plan:
    """A plan from its (already valid) document, the file's or ``as_dict``'s shape."""
    prices = dict(raw.get("prices", {}))
    return Plan(name=name, isolation=raw["isolation"], services=tuple(raw["services"]),
                limits=MappingProxyType(dict(raw.get("limits", {}))),
                prices=BillingSettings(**prices))


def join_inline_tables(text: str) -> str:
    """Newlines inside ``{ ... }`` turned into spaces (TOML 1.1 allows them there).

    DESIGN.md's plans example spreads ``limits = { ... }`` over two lines, which
    TOML 1.1 allows and Python's TOML 1.0 reader refuses; strings are left alone.
    """
    out, depth, quote, i = [], 0, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                out.append(text[i:i + 2])
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        elif c == "\n" and depth:
            c = " "
        out.append(c)
        i += 1
    return "".join(out)


def _read_plans(path: Path) -> dict[str, Any]:
    try:
        return _read_toml(path)
    except ConfigError as exc:
        if not exc.reason.startswith("invalid TOML"):
            raise
        try:
            return tomllib.loads(join_inline_tables(path.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
            raise exc from None


def load_plans(path: str | Path) -> PlanSet:
    """Read and check the plans file."""
    data = _read_plans(Path(path))
    plans = parse_plans(data, str(path))
    return PlanSet(MappingProxyType(plans), config_digest(data), 1, time.time())


class PlanBook:
    """The plans file, reloaded when it changes (checked at most every ``interval`` s)."""

    def __init__(self, path: str | Path, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self.current = load_plans(self.path)
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self.error = ""  # the last reload's refusal, '' when the file in force is the file

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def get(self) -> PlanSet:
        """The plans in force, reloading first when the file changed."""
        now = time.monotonic()
        if now - self._checked >= self.interval:
            self._checked = now
            self.reload()
        return self.current

    def continue_from(self, version: int, digest: str) -> None:
        """Number on from the plans last published (versions survive restarts): the same
        file keeps its version, another one is the next."""
        mine = self.current
        number = version if digest == mine.digest else version + 1
        self.current = PlanSet(mine.plans, mine.digest, max(number, 1), mine.loaded)

    def reload(self) -> bool:
        """Load the file again if it changed; True when new plans came in force."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            fresh = load_plans(self.path)
        except ConfigError as exc:
            self.error = str(exc)
            log.error("plans not reloaded, the previous ones stay in force: %s", exc)
            return False
        self.error = ""
        if fresh.digest == self.current.digest:
            return False
        self.current = PlanSet(fresh.plans, fresh.digest, self.current.version + 1, fresh.loaded)
        log.info("plans version %d in force (%s)", self.current.version, self.current.digest[:12])
        return True
