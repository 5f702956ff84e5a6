"""tenant.toml: strict schema, parsing into frozen dataclasses, and the live overlay.

Both processes build their config from here, so the sidecar and the framework
can never disagree on what a key means. Validation is a JSON Schema (the file is
plain data once tomllib has read it) so every refusal names the file, the key
and the reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema

from framework.events.config import (
    EVENTS_SCHEMA,
    EventsConfigError,
    EventSettings,
    build_events,
)

SERVICE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512",
    "EdDSA",
)
MODES = ("sync", "async", "both")


class ConfigError(Exception):
    """A configuration mistake: names the file, the key and the reason."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


def _strs() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}}


def _table(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "required": list(required),
    }


_NUM = {"type": "number", "minimum": 0}
_INT = {"type": "integer", "minimum": 0}

_FLAG = _table({
    "enabled": {"type": "boolean"},
    "rollout_percent": {"type": "number", "minimum": 0, "maximum": 100},
    "users": _strs(),
    "groups": _strs(),
    "roles": _strs(),
})
_FLAGS = {"type": "object", "additionalProperties": _FLAG}

_LIMITS = _table({
    "rate": {"type": "number", "exclusiveMinimum": 0},
    "burst": _INT,
    "delay": {"type": "boolean"},
    "user_rate": _NUM,
    "user_burst": _INT,
    "concurrency": _INT,
    "daily_quota": _INT,
})

_RULE = _table({
    "service": {"type": "string", "minLength": 1},
    "operations": _strs(),
    "groups": _strs(),
    "roles": _strs(),
    "users": _strs(),
    # Event types (globs) the principals may publish (POST /events, framework/events/).
    "events": {"type": "array", "items": {"type": "string", "minLength": 1}},
})
_AUTHZ = _table({"enabled": {"type": "boolean"}, "rules": {"type": "array", "items": _RULE}})

_BREAKER = _table({
    "failures": {"type": "integer", "minimum": 1},
    "cooldown": {"type": "number", "exclusiveMinimum": 0},
})

_SERVICE = _table({
    "enabled": {"type": "boolean"},
    "mode": {"enum": list(MODES)},
    "timeout": {"type": "number", "exclusiveMinimum": 0},
    "config": {"type": "object"},
    "breaker": _BREAKER,
    "idempotent": {"type": "boolean"},
})

TENANT_SCHEMA: dict[str, Any] = _table({
    "events": EVENTS_SCHEMA,
    "tenant": _table({
        "id": {"type": "string", "pattern": TENANT_ID_RE.pattern},
        "name": {"type": "string"},
        "framework_version": {"type": "string", "minLength": 1},
        "plan": {"type": "string"},
    }, required=("id",)),
    "services": {
        "type": "object",
        "propertyNames": {"pattern": SERVICE_NAME_RE.pattern},
        "additionalProperties": _SERVICE,
    },
    "auth": _table({
        "jwt": _table({
            "algorithms": {
                "type": "array", "minItems": 1, "items": {"enum": list(JWT_ALGORITHMS)},
            },
            "secret_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "public_key_file": {"type": "string"},
            "jwks_url": {"type": "string"},
            "jwks_cache_ttl": {"type": "number", "exclusiveMinimum": 0},
            "issuer": {"type": "string"},
            "audience": {"type": "string"},
            "tenant_claim": {"type": "string", "minLength": 1},
            "leeway": _NUM,
        }),
        "api_keys": {
            "type": "object",
            "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
            "additionalProperties": _table({
                "hash": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
                "roles": _strs(),
                "groups": _strs(),
            }, required=("hash",)),
        },
        "ldap": _table({
            "enabled": {"type": "boolean"},
            "url": {"type": "string", "pattern": "^ldaps?://"},
            "bind_dn": {"type": "string"},
            "bind_password_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "user_base": {"type": "string"},
            "user_filter": {"type": "string", "pattern": r"\{username\}"},
            "group_base": {"type": "string"},
            "group_filter": {"type": "string"},
            "group_attr": {"type": "string", "minLength": 1},
            "cache_ttl": _NUM,
            "start_tls": {"type": "boolean"},
            "ca_file": {"type": "string"},
            "timeout": {"type": "number", "exclusiveMinimum": 0},
            "pool_size": {"type": "integer", "minimum": 1, "maximum": 64},
        }),
    }),
    "authz": _AUTHZ,
    "limits": _LIMITS,
    "flags": _FLAGS,
    # Entitlements: [plans.<name>] services = [...]; [tenant] plan picks one.
    "plans": {
        "type": "object",
        "propertyNames": {"pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"},
        "additionalProperties": _table({"services": _strs()}, required=("services",)),
    },
    "billing": _table({
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "per_call": _NUM,
        "per_cpu_second": _NUM,
        "per_gb": _NUM,
        "webhook_url": {"type": "string"},
        "webhook_secret_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
    }),
}, required=("tenant",))

# The overlay may only steer what is safe to change live.
OVERLAY_SCHEMA: dict[str, Any] = _table({
    "events": EVENTS_SCHEMA,
    "flags": _FLAGS,
    "limits": _LIMITS,
    "authz": _AUTHZ,
    "services": {
        "type": "object",
        "propertyNames": {"pattern": SERVICE_NAME_RE.pattern},
        "additionalProperties": _table({"config": {"type": "object"}}),
    },
})


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class BreakerSettings:
    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True)
class ServiceSettings:
    enabled: bool = True
    mode: str | None = None
    timeout: float | None = None
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    breaker: BreakerSettings | None = None
    idempotent: bool = False


@dataclass(frozen=True)
class JwtSettings:
    algorithms: tuple[str, ...] = ("HS256",)
    secret_env: str = "MTP_JWT_SECRET"  # noqa: S105 - a variable name, not a secret
    public_key_file: str = ""
    jwks_url: str = ""
    jwks_cache_ttl: float = 300.0
    issuer: str = ""
    audience: str = ""
    tenant_claim: str = "tenant_id"
    leeway: float = 30.0

    @property
    def uses_hmac(self) -> bool:
        return any(a.startswith("HS") for a in self.algorithms)


@dataclass(frozen=True)
class ApiKeySettings:
    name: str
    digest: str  # hex SHA-256 of the key, without the "sha256:" prefix
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class LdapSettings:
    enabled: bool = False
    url: str = "ldap://127.0.0.1:389"
    bind_dn: str = ""
    bind_password_env: str = "MTP_LDAP_PASSWORD"  # noqa: S105 - a variable name
    user_base: str = ""
    user_filter: str = "(uid={username})"
    group_base: str = ""
    group_filter: str = "(member={user_dn})"
    group_attr: str = "cn"
    cache_ttl: float = 60.0
    start_tls: bool = False
    ca_file: str = ""
    timeout: float = 5.0
    pool_size: int = 4


@dataclass(frozen=True)
class AuthzRule:
    service: str = ""  # "": a rule for events only, it grants no service
    operations: tuple[str, ...] = ("*",)
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    events: tuple[str, ...] = ()  # globs over the event types it lets publish


@dataclass(frozen=True)
class AuthzSettings:
    enabled: bool = False
    rules: tuple[AuthzRule, ...] = ()


@dataclass(frozen=True)
class LimitSettings:
    rate: float = 100.0
    burst: int = 100
    delay: bool = True
    user_rate: float = 0.0  # 0: no per-user limit
    user_burst: int = 0
    concurrency: int = 0
    daily_quota: int = 0
    # Set by a fleet's plan only (not a tenant.toml key): past the daily quota the
    # tenant is slowed to this many requests/s instead of refused; 0: refused (429).
    degraded_rate: float = 0.0


@dataclass(frozen=True)
class FlagSettings:
    enabled: bool = False
    rollout_percent: float = 100.0
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class BillingSettings:
    currency: str = "EUR"
    per_call: float = 0.0
    per_cpu_second: float = 0.0
    per_gb: float = 0.0
    webhook_url: str = ""
    webhook_secret_env: str = "MTP_BILLING_SECRET"  # noqa: S105 - a variable name


@dataclass(frozen=True)
class TenantConfig:
    """The effective tenant configuration (tenant.toml with the overlay merged)."""

    tenant_id: str
    name: str = ""
    framework_version: str = ""
    plan: str = ""
    services: Mapping[str, ServiceSettings] = field(default_factory=lambda: MappingProxyType({}))
    jwt: JwtSettings = JwtSettings()
    api_keys: tuple[ApiKeySettings, ...] = ()
    ldap: LdapSettings = LdapSettings()
    authz: AuthzSettings = AuthzSettings()
    limits: LimitSettings = LimitSettings()
    flags: Mapping[str, FlagSettings] = field(default_factory=lambda: MappingProxyType({}))
    billing: BillingSettings = BillingSettings()
    plans: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    events: EventSettings = field(default_factory=EventSettings)
    source: str = ""
    raw: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    digest: str = ""  # sha256 of the canonical JSON of raw: the config version's hash

    def service(self, name: str) -> ServiceSettings:
        """Settings of one service; defaults when tenant.toml has no table for it."""
        return self.services.get(name) or ServiceSettings()

    def entitled(self, name: str) -> bool:
        """Whether the tenant's plan includes service ``name`` (no plan table: all do)."""
        allowed = self.plans.get(self.plan)
        return allowed is None or "*" in allowed or name in allowed


def _non_finite(value: Any, path: str) -> str | None:
    """The key of the first inf/nan in a document (TOML has them; no key of ours wants one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items: Any = (value.items() if isinstance(value, Mapping)
                  else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _validate(data: Mapping[str, Any], schema: dict[str, Any], file: str) -> None:
    bad = _non_finite(data, "")
    if bad is not None:
        raise ConfigError(file, bad, "must be a finite number (inf and nan are refused)")
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(data),
        key=lambda e: list(map(str, e.absolute_path)),
    )
    if not errors:
        return
    err = errors[0]
    key = ".".join(str(p) for p in err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        key = ".".join(filter(None, [key, extra[0] if extra else ""]))
        raise ConfigError(file, key, "unknown key")
    if "propertyNames" in err.absolute_schema_path:
        raise ConfigError(file, f"{key}.{err.instance}", f"invalid name: {err.message}")
    if err.validator == "required":
        missing = next(iter(set(err.validator_value) - set(err.instance)), "")
        raise ConfigError(file, ".".join(filter(None, [key, missing])), "required key missing")
    raise ConfigError(file, key, err.message)


def _build(data: Mapping[str, Any], file: str) -> TenantConfig:
    tenant = data["tenant"]
    services = {}
    for name, svc in data.get("services", {}).items():
        breaker = svc.get("breaker")
        services[name] = ServiceSettings(
            enabled=svc.get("enabled", True),
            mode=svc.get("mode"),
            timeout=svc.get("timeout"),
            config=_frozen(svc.get("config", {})),
            breaker=BreakerSettings(**breaker) if breaker is not None else None,
            idempotent=svc.get("idempotent", False),
        )
    auth = data.get("auth", {})
    jwt_raw = dict(auth.get("jwt", {}))
    if "algorithms" in jwt_raw:
        jwt_raw["algorithms"] = tuple(jwt_raw["algorithms"])
    jwt = JwtSettings(**jwt_raw)
    if jwt.public_key_file and jwt.jwks_url:
        raise ConfigError(file, "auth.jwt.jwks_url", "set public_key_file or jwks_url, not both")
    asym = [a for a in jwt.algorithms if not a.startswith("HS")]
    if asym and jwt.uses_hmac:
        # An HS secret next to a public key invites key confusion: refuse the mix.
        raise ConfigError(file, "auth.jwt.algorithms", "do not mix HS* with asymmetric algorithms")
    if asym and not (jwt.public_key_file or jwt.jwks_url):
        raise ConfigError(file, "auth.jwt.public_key_file",
                          f"{asym[0]} needs public_key_file or jwks_url")
    api_keys = tuple(
        ApiKeySettings(
            name=name,
            digest=key["hash"].removeprefix("sha256:"),
            roles=tuple(key.get("roles", ())),
            groups=tuple(key.get("groups", ())),
        )
        for name, key in auth.get("api_keys", {}).items()
    )
    ldap = LdapSettings(**auth.get("ldap", {}))
    plans = {name: tuple(plan["services"]) for name, plan in data.get("plans", {}).items()}
    if plans and tenant.get("plan", "") not in plans:
        raise ConfigError(file, "tenant.plan", f"must name one of [plans]: {', '.join(plans)}")
    if ldap.enabled and not ldap.user_base:
        raise ConfigError(file, "auth.ldap.user_base", "required when LDAP is enabled")
    return TenantConfig(
        tenant_id=tenant["id"],
        name=tenant.get("name", ""),
        framework_version=tenant.get("framework_version", ""),
        plan=tenant.get("plan", ""),
        services=MappingProxyType(services),
        jwt=jwt,
        api_keys=api_keys,
        ldap=ldap,
        authz=_authz(data.get("authz", {}), file),
        events=_events(data.get("events", {}), file),
        limits=LimitSettings(**data.get("limits", {})),
        flags=MappingProxyType({
            name: FlagSettings(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in flag.items()})
            for name, flag in data.get("flags", {}).items()
        }),
        billing=BillingSettings(**data.get("billing", {})),
        plans=MappingProxyType(plans),
        source=file,
        raw=_frozen(data),
        digest=config_digest(data),
    )


def _authz(raw: Mapping[str, Any], file: str = "tenant.toml") -> AuthzSettings:
    for index, rule in enumerate(raw.get("rules", ())):
        if "service" not in rule and "events" not in rule:
            raise ConfigError(file, f"authz.rules.{index}.service",
                              "required key missing (or events)")
    rules = tuple(
        AuthzRule(**{k: tuple(v) if isinstance(v, list) else v for k, v in rule.items()})
        for rule in raw.get("rules", ())
    )
    return AuthzSettings(enabled=raw.get("enabled", False), rules=rules)


def _events(raw: Mapping[str, Any], file: str) -> EventSettings:
    try:
        return build_events(raw)
    except EventsConfigError as exc:
        raise ConfigError(file, exc.key, exc.reason) from None


def config_digest(data: Mapping[str, Any]) -> str:
    """Stable hash of a config document (key order does not matter)."""
    canonical = json.dumps(_thawed(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _thawed(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thawed(v) for v in value]
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"invalid TOML: {exc}") from None
    except UnicodeDecodeError:  # tomllib decodes the whole file before parsing it
        raise ConfigError(str(path), "", "not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None


def parse_tenant(data: Mapping[str, Any], file: str = "tenant.toml") -> TenantConfig:
    """Validate a tenant.toml document and build its config."""
    _validate(data, TENANT_SCHEMA, file)
    return _build(data, file)


def load_tenant(path: str | Path) -> TenantConfig:
    """Read, validate and build tenant.toml at ``path``."""
    path = Path(path)
    return parse_tenant(_read_toml(path), str(path))


def load_overlay(path: str | Path) -> dict[str, Any]:
    """Read and validate an overlay file; the result is merged with :func:`apply_overlay`."""
    path = Path(path)
    data = _read_toml(path)
    _validate(data, OVERLAY_SCHEMA, str(path))
    return data


def apply_overlay(base: TenantConfig, overlay: Mapping[str, Any], source: str) -> TenantConfig:
    """Merge an overlay over a tenant.toml document: tables merge, arrays are replaced."""
    merged = _merge(_thawed(base.raw), overlay)
    # Re-validate the result: an overlay value can be valid alone and wrong in context.
    return parse_tenant(merged, source)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
