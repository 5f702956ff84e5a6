"""Process settings: the MTP_* environment read once, in one place.

Each process builds one :class:`Settings` at start (``Settings.from_env``) and
passes it down; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from framework.grace import MIN_GRACE_SECONDS
from framework.tenant_config import ConfigError, TenantConfig, load_tenant

ENV = "environment"
MIN_SECRET_BYTES = 16
# `mtp run` hands a tenant-code process its secrets over this inherited pipe, so
# they are in neither its os.environ nor its /proc/self/environ.
SECRETS_FD_ENV = "MTP_SECRETS_FD"


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/mtp`` (or ``~/.cache/mtp``) when MTP_DATA_DIR is unset."""
    home = environ.get("HOME") or str(Path.home())
    cache = environ.get("XDG_CACHE_HOME") or str(Path(home) / ".cache")
    return Path(cache) / "mtp"


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(ENV, name, f"must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(ENV, name, f"must be at least {minimum}")
    return value


def parse_address(value: str, name: str) -> tuple[str, int] | str:
    """``unix:/path`` -> path; ``host:port`` -> (host, port)."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path:
            raise ConfigError(ENV, name, "unix: needs a socket path")
        return path
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(ENV, name, f"expected host:port or unix:/path, got {value!r}")
    return (host.strip("[]") or "0.0.0.0", int(port))


def read_handed_secrets(raw: str) -> dict[str, str]:
    """The JSON object of secrets on the pipe fd ``raw``: read to its end once, fd closed."""
    try:
        with os.fdopen(int(raw), "rb") as pipe:
            data = json.loads(pipe.read())
    except (ValueError, OSError) as exc:
        raise ConfigError(ENV, SECRETS_FD_ENV, f"no secrets to read on fd {raw!r}: {exc}"
                          ) from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(ENV, SECRETS_FD_ENV, "expected a JSON object of strings")
    return data


@dataclass(frozen=True)
class Settings:
    """Everything a process takes from its environment."""

    tenant_dir: Path
    data_dir: Path
    listen: tuple[str, int] | str
    upstream: tuple[str, int] | str
    sidecar_secret: bytes = field(repr=False)
    redis_url: str = field(default="", repr=False)
    workers: int = 2
    threads: int = 8
    log_level: str = "INFO"
    audit_file: str = ""
    max_body: int = 1 << 20
    max_result: int = 10 << 20
    config_overlay: str = ""
    dev: bool = False
    job_retention: int = 7 * 86400  # seconds finished jobs are kept
    job_workers: int = 4  # async job threads per worker
    job_queue: int = 64  # async jobs waiting per worker before 503
    grace_seconds: int = 25  # SIGTERM to exit; every layer's drain derives from it
    health_interval: int = 5  # `mtp run` asks each child's /healthz this often
    health_misses: int = 3  # missed answers in a row that make a child hung
    # Not from the environment: a pool's shared process, which holds an app per tenant,
    # sets its own (framework/pool/shared.py).
    usage_flush: float = 1.0  # seconds between writes of a usage meter's totals
    events_poll: float = 0.05  # idle poll of the event engine (another worker's events)
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, tenant_dir: str | Path | None = None
    ) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``).

        Secrets handed over MTP_SECRETS_FD join the private copy (never os.environ).
        """
        env = dict(os.environ if environ is None else environ)
        handed = env.pop(SECRETS_FD_ENV, "")
        if handed:
            if environ is None:
                os.environ.pop(SECRETS_FD_ENV, None)  # the fd is read once, then closed
            env.update(read_handed_secrets(handed))
        tdir = Path(tenant_dir or env.get("MTP_TENANT_DIR") or ".").resolve()
        data_dir = Path(env.get("MTP_DATA_DIR") or default_data_dir(env))
        upstream_raw = env.get("MTP_UPSTREAM") or f"unix:{data_dir / 'framework.sock'}"
        level = env.get("MTP_LOG_LEVEL", "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(ENV, "MTP_LOG_LEVEL", f"unknown level {level!r}")
        return cls(
            tenant_dir=tdir,
            data_dir=data_dir,
            listen=parse_address(env.get("MTP_LISTEN") or "0.0.0.0:8080", "MTP_LISTEN"),
            upstream=parse_address(upstream_raw, "MTP_UPSTREAM"),
            sidecar_secret=env.get("MTP_SIDECAR_SECRET", "").encode(),
            redis_url=env.get("MTP_REDIS_URL", ""),
            workers=_int(env, "MTP_WORKERS", 2, minimum=1),
            threads=_int(env, "MTP_THREADS", 8, minimum=1),
            log_level=level,
            audit_file=env.get("MTP_AUDIT_FILE", ""),
            max_body=_int(env, "MTP_MAX_BODY", 1 << 20, minimum=1),
            max_result=_int(env, "MTP_MAX_RESULT", 10 << 20, minimum=1),
            config_overlay=env.get("MTP_CONFIG_OVERLAY", ""),
            dev=env.get("MTP_DEV", "") in ("1", "true", "yes"),
            job_retention=_int(env, "MTP_JOB_RETENTION", 7 * 86400, minimum=0),
            job_workers=_int(env, "MTP_JOB_WORKERS", 4, minimum=1),
            job_queue=_int(env, "MTP_JOB_QUEUE", 64, minimum=0),
            grace_seconds=_int(env, "MTP_GRACE_SECONDS", 25, minimum=MIN_GRACE_SECONDS),
            health_interval=_int(env, "MTP_HEALTH_INTERVAL", 5, minimum=1),
            health_misses=_int(env, "MTP_HEALTH_MISSES", 3, minimum=1),
            environ=env,
        )

    def require_sidecar_secret(self) -> bytes:
        """The shared HMAC secret; refuse to start without a usable one."""
        if len(self.sidecar_secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                ENV, "MTP_SIDECAR_SECRET",
                f"must be set to at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)",
            )
        return self.sidecar_secret

    def secret(self, name: str) -> str:
        """A secret named by config (``secret_env`` and friends): the variable's value or ''."""
        return self.environ.get(name, "")

    def load_tenant(self) -> TenantConfig:
        """tenant.toml of the tenant dir, validated."""
        return load_tenant(self.tenant_dir / "tenant.toml")

    @property
    def upstream_url(self) -> str:
        """The framework's address as the sidecar's aiohttp connector wants it."""
        if isinstance(self.upstream, str):
            return "http://framework"
        host, port = self.upstream
        return f"http://{host}:{port}"
