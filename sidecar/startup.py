"""Building the sidecar from its checked config, and opening and closing what it holds.

:func:`create_app` refuses missing secrets and unreadable keys before anything
listens; :meth:`App.started` opens the upstream pool, audit log, identity clients
and overlay watcher, and closes them again. The request handler it builds is in
sidecar/app.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from framework import tracing
from framework.jwt_keys import load_public_key
from framework.settings import Settings
from framework.tenant_config import ConfigError, TenantConfig
from sidecar.apikeys import ApiKeys
from sidecar.app import Sidecar
from sidecar.audit import AuditLog
from sidecar.authenticate import Authenticator
from sidecar.catalog import Catalog, CatalogWatcher
from sidecar.fleet import start_fleet
from sidecar.limiter import LimiterBackend, MemoryBackend
from sidecar.metrics import Metrics, ServiceNames
from sidecar.overlay import OverlayWatcher
from sidecar.proxy import Timeouts, Upstream
from sidecar.ratelimit import RateLimiter
from sidecar.tokens import TokenVerifier


def _identity_modules(tenant: TenantConfig, settings: Settings) -> dict[str, Any]:
    """LDAP and JWKS clients when configured; imported only then."""
    found: dict[str, Any] = {"directory": None, "keys": None, "unavailable": (),
                             "unknown_key": ()}
    if tenant.ldap.enabled:
        from sidecar.ldap_directory import DirectoryUnavailable, LdapDirectory

        found["directory"] = LdapDirectory(tenant.ldap,
                                           settings.secret(tenant.ldap.bind_password_env))
        found["unavailable"] += (DirectoryUnavailable,)
    if tenant.jwt.jwks_url:
        from sidecar.jwks import JwksKeys, JwksUnavailable, UnknownKey

        found["keys"] = JwksKeys(tenant.jwt.jwks_url, tenant.jwt.jwks_cache_ttl)
        found["unavailable"] += (JwksUnavailable,)
        found["unknown_key"] = (UnknownKey,)
    return found


def jwt_secret(tenant: TenantConfig, settings: Settings) -> str:
    """The HS* secret; refuse to run without it when HS* is configured."""
    if not tenant.jwt.uses_hmac:
        return ""
    secret = settings.secret(tenant.jwt.secret_env)
    if not secret:
        raise ConfigError("environment", tenant.jwt.secret_env,
                          "must be set: [auth.jwt] accepts HS* tokens")
    return secret


def limiter_backend(settings: Settings) -> LimiterBackend:
    """Shared limits in Redis when MTP_REDIS_URL is set (imported only then), else in memory."""
    if not settings.redis_url:
        return MemoryBackend()
    from sidecar.limiter_redis import RedisBackend, connect

    return RedisBackend(connect(settings.redis_url))


def degraded_gauge(sidecar: Sidecar) -> None:
    """``mtp_limiter_degraded``: 1 while Redis is away and each replica limits alone."""
    backend = sidecar.limiter.backend
    Gauge("mtp_limiter_degraded", "1 while shared (Redis) limits fell back to local ones",
          registry=sidecar.metrics.registry).set_function(
        lambda: float(getattr(backend, "degraded", False)))


@dataclass(frozen=True)
class App:
    """A sidecar whose configuration was checked; :meth:`started` opens its clients."""

    settings: Settings
    tenant: TenantConfig
    jwt_secret: str
    public_key: Any
    timeouts: Timeouts | None = None
    backend: LimiterBackend | None = None

    @asynccontextmanager
    async def started(self) -> AsyncIterator[Sidecar]:
        """The running sidecar; its connections, files and watchers close on exit."""
        settings, tenant = self.settings, self.tenant
        ids = _identity_modules(tenant, settings)
        tokens = TokenVerifier(tenant.jwt, secret=self.jwt_secret, public_key=self.public_key,
                               keys=ids["keys"])
        sidecar = Sidecar(
            settings=settings, tenant=tenant,
            authenticator=Authenticator(tenant.tenant_id, tokens, ApiKeys(tenant.api_keys),
                                        ids["directory"], ids["unavailable"],
                                        ids["unknown_key"]),
            limiter=RateLimiter(self.backend or limiter_backend(settings)),
            upstream=Upstream(settings, self.timeouts),
            audit=AuditLog(settings.audit_file),
            # Labels name only the services of the tenant dir (read once: the overlay
            # cannot add, remove or disable a service).
            metrics=Metrics(ServiceNames.from_tenant_dir(settings.tenant_dir, tenant)),
            fleet=start_fleet(settings, tenant.tenant_id),
        )
        degraded_gauge(sidecar)
        await sidecar.upstream.start()
        sidecar.audit.start()
        watcher = OverlayWatcher(settings.config_overlay, tenant, sidecar)
        watcher.start()

        def install(catalog: Catalog) -> None:
            sidecar.catalog = catalog

        catalog = CatalogWatcher(sidecar.upstream, settings.sidecar_secret,
                                 lambda path: sidecar.internal_headers(path, "catalog"),
                                 install, lambda: sidecar.catalog)
        catalog.start()
        try:
            yield sidecar
        finally:
            await catalog.close()
            await watcher.close()
            sidecar.fleet.close()
            await sidecar.upstream.close()
            await tokens.close()
            if ids["directory"] is not None:
                await ids["directory"].close()
            await sidecar.limiter.backend.close()
            await sidecar.audit.close()


def create_app(settings: Settings, tenant: TenantConfig, *, timeouts: Timeouts | None = None,
               backend: LimiterBackend | None = None) -> App:
    """The sidecar, checked (config errors raise here, before anything listens)."""
    settings.require_sidecar_secret()
    tracing.setup(settings.environ, "mtp-sidecar", tenant.tenant_id, edge=True)  # OTEL_*
    secret = jwt_secret(tenant, settings)
    public_key = load_public_key(tenant)  # the same loader and checks as `mtp check`
    return App(settings, tenant, secret, public_key, timeouts, backend)
