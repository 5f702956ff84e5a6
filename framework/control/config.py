"""The control plane's settings: its MTP_* environment read once, frozen, passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from framework.grace import MIN_GRACE_SECONDS
from framework.settings import ENV, _int, default_data_dir, parse_address
from framework.tenant_config import ConfigError

DEFAULT_LISTEN = "127.0.0.1:8090"
DEFAULT_URL = "http://127.0.0.1:8090"
MIN_SECRET_BYTES = 32  # an operator token opens every tenant: HS256 wants >= 256-bit keys


@dataclass(frozen=True)
class ControlConfig:
    """Everything ``mtp control`` takes from its environment."""

    data_dir: Path
    listen: tuple[str, int]
    plans_file: Path
    redis_url: str = field(default="", repr=False)
    operator_jwt_secret: bytes = field(default=b"", repr=False)
    operator_keys_file: str = ""
    audit_file: str = ""
    pool_domain: str = "tenants.example.com"
    log_level: str = "INFO"
    gateway_file: str = ""  # MTP_GATEWAY_FILE: backend addresses (framework/control/backends.py)
    grace_seconds: int = 25  # MTP_GRACE_SECONDS: a migration's drain after the switch

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ControlConfig:
        """Build and check the config (ConfigError names the variable and the reason)."""
        env = dict(os.environ if environ is None else environ)
        listen = parse_address(env.get("MTP_CONTROL_LISTEN") or DEFAULT_LISTEN,
                               "MTP_CONTROL_LISTEN")
        if isinstance(listen, str):
            raise ConfigError(ENV, "MTP_CONTROL_LISTEN", "expected host:port")
        plans = env.get("MTP_PLANS_FILE", "")
        if not plans:
            raise ConfigError(ENV, "MTP_PLANS_FILE", "must name the operator's plans file")
        secret = env.get("MTP_OPERATOR_JWT_SECRET", "").encode()
        keys = env.get("MTP_OPERATOR_KEYS_FILE", "")
        if secret and len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(ENV, "MTP_OPERATOR_JWT_SECRET",
                              f"must be at least {MIN_SECRET_BYTES} bytes")
        if not secret and not keys:
            # Fail closed: an admin API nobody can call is a mistake, one anybody can is worse.
            raise ConfigError(ENV, "MTP_OPERATOR_JWT_SECRET",
                              "set it or MTP_OPERATOR_KEYS_FILE: operators need credentials")
        level = env.get("MTP_LOG_LEVEL", "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(ENV, "MTP_LOG_LEVEL", f"unknown level {level!r}")
        return cls(
            data_dir=Path(env.get("MTP_DATA_DIR") or default_data_dir(env)),
            listen=listen,
            plans_file=Path(plans),
            redis_url=env.get("MTP_REDIS_URL", ""),
            operator_jwt_secret=secret,
            operator_keys_file=keys,
            audit_file=env.get("MTP_AUDIT_FILE", ""),
            pool_domain=env.get("MTP_POOL_DOMAIN") or "tenants.example.com",
            log_level=level,
            gateway_file=env.get("MTP_GATEWAY_FILE", ""),
            grace_seconds=_int(env, "MTP_GRACE_SECONDS", 25, minimum=MIN_GRACE_SECONDS),
        )
