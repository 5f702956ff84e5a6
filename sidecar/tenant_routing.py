"""A pool's sidecar: which tenant a request is for, then that tenant's own stages.

A request names its tenant by any of: the credential (the JWT's ``tenant_id`` claim,
read before verification only to choose the tenant; an API key, found in the pool's
key index), ``Host: <tenant>.<MTP_POOL_DOMAIN>``, a path prefix ``/tenants/<tenant>``
(removed before routing) and ``X-Tenant-ID``. Every method present must name the same
tenant (else 403 ``tenant-mismatch``); none, or a tenant this pool does not serve, is
403 ``unknown-tenant``. The request then goes through that tenant's own
:class:`~sidecar.app.Sidecar` (authenticate with the tenant's own keys, bind, authorize,
limit, sign with the tenant's derived key, proxy), built on its first request. Its
framework process starts when the first call reaches the upstream, so a request that
fails authentication or authorization never starts a process.

Isolation ``shared`` (the tenant's plan in the fleet registry says so): the tenant's
calls go to the pool's one shared process (framework/pool/shared.py), signed with
the shared group's key; a plan change moves the tenant at its next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from redis.exceptions import RedisError

import framework.pool.shared as shared_group
from framework.pool.bundles import Bundle, BundleDir
from framework.pool.keys import derive_key, secret_name, tenant_secret
from framework.pool.procs import PoolFull, ProcessManager, StartFailed, TenantProcess
from framework.pool.redis_users import RedisUsers
from framework.problem import request_id as make_request_id
from framework.rq_keys import ENV as RQ_PREFIX_ENV
from framework.rq_keys import prefix as rq_prefix
from framework.settings import Settings
from framework.tenant_config import TENANT_ID_RE, ConfigError, TenantConfig
from sidecar.admission import Admission
from sidecar.apikeys import ApiKeys
from sidecar.app import Sidecar
from sidecar.audit import AuditLog
from sidecar.authenticate import Authenticator
from sidecar.catalog import CatalogRefused, CatalogWatcher
from sidecar.errors import Forbidden, SidecarError, Unavailable, render
from sidecar.fleet import FleetGate, UnknownTenant
from sidecar.front import Request, Response
from sidecar.metrics import Metrics, ServiceNames
from sidecar.overlay import OverlayWatcher
from sidecar.proxy import Upstream, UpstreamReply
from sidecar.ratelimit import RateLimiter
from sidecar.startup import _identity_modules, jwt_secret
from sidecar.tokens import TokenVerifier

log = logging.getLogger("mtp.pool")

PATH_PREFIX = "/tenants/"
POOL_ROUTES = frozenset(("/healthz", "/readyz"))
# Process starts by /readyz (no credential needed, as in a tenant image): a client that
# names tenant after tenant cannot churn the pool's processes faster than this.
READY_STARTS_PER_SECOND, READY_STARTS_BURST = 2.0, 5
CLAIM = "tenant_id"  # the claim read to choose the tenant (tenants may name another)


class TenantMismatch(Forbidden):
    """403: two identification methods name different tenants."""

    kind = "tenant-mismatch"
    detail = "the request names more than one tenant"


@dataclass(frozen=True)
class Identified:
    """The tenant a request is for, and its path with any ``/tenants/<id>`` removed."""

    tenant_id: str
    path: str
    raw_path: str
    methods: tuple[str, ...]


def _host_tenant(host: str, domain: str) -> str | None:
    if not domain or not host:
        return None
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.lower().rstrip(".")
    suffix = "." + domain.lower().strip(".")
    if not name.endswith(suffix):
        return None
    return name[: -len(suffix)]


def _token_tenant(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.PyJWTError:
        return None  # the tenant's authenticator answers 401 for it
    value = claims.get(CLAIM) if isinstance(claims, dict) else None
    return value if isinstance(value, str) else None


def identify(request: Request, domain: str, bundles: BundleDir) -> Identified:
    """The request's tenant by every method present; 403 when they disagree or name none."""
    named: dict[str, str] = {}
    path, raw = request.path, request.raw_path
    if path.startswith(PATH_PREFIX):
        tenant, _, rest = path[len(PATH_PREFIX):].partition("/")
        prefix = PATH_PREFIX + tenant
        if not raw.startswith(prefix) or raw[len(prefix):len(prefix) + 1] not in ("/", "?", ""):
            # Percent-encoding inside the prefix: the raw and decoded paths disagree.
            raise UnknownTenant("tenant path prefix is encoded")
        named["path"] = tenant
        path = "/" + rest
        raw = raw[len(prefix):] or "/"
        if raw.startswith("?"):
            raw = "/" + raw
    host = _host_tenant(request.headers.get("Host", ""), domain)
    if host is not None:
        named["host"] = host
    headers = request.headers.getall("X-Tenant-ID", ())
    if len(headers) > 1 and len(set(headers)) > 1:
        raise TenantMismatch("two X-Tenant-ID headers")
    if headers:
        named["header"] = headers[0].strip()
    authorization = request.headers.getall("Authorization", ())
    if len(authorization) == 1:
        claimed = _token_tenant(authorization[0])
        if claimed is not None:
            named["jwt"] = claimed
    keys = request.headers.getall("X-API-Key", ())
    if len(keys) == 1:
        # With the tenant named otherwise, only keys already indexed are compared (a
        # key of another tenant: 403); an unindexed one is that tenant's to refuse (401).
        owner = bundles.tenant_of_key(keys[0], refresh=not named)
        if owner is not None:
            named["api_key"] = owner
    tenants = set(named.values())
    if len(tenants) > 1:
        raise TenantMismatch("methods disagree: " + ", ".join(
            f"{m}={t[:64]!r}" for m, t in sorted(named.items())))
    if not tenants:
        raise UnknownTenant("no tenant named")
    tenant = tenants.pop()
    if not TENANT_ID_RE.match(tenant):
        raise UnknownTenant("malformed tenant id")
    return Identified(tenant, path, raw, tuple(sorted(named)))


def rerouted(request: Request, path: str, raw_path: str) -> Request:
    """The same request with the tenant prefix removed from its path."""
    if path == request.path and raw_path == request.raw_path:
        return request
    copy = object.__new__(Request)
    for name in Request.__slots__:
        setattr(copy, name, getattr(request, name))
    copy.path, copy.raw_path = path, raw_path
    return copy


class TenantUpstream(Upstream):
    """One tenant's framework as its Sidecar sees it: the process starts on first use."""

    def __init__(self, pool: PoolSidecar, bundle: Bundle, settings: Settings,
                 shared: bool = False) -> None:
        self.owner, self.bundle, self.tenant_settings = pool, bundle, settings
        self.shared = shared  # served by the pool's shared process
        self.process: TenantProcess | None = None
        self.pool: Any = None
        self._old: list[Any] = []

    async def ready(self) -> TenantProcess:
        """The tenant's live process (or the shared one), started if needed."""
        if self.shared:
            proc = await self.owner.procs.ensure(shared_group.SHARED, self.owner.bundles.root,
                                                 self.owner.shared_stamp())
        else:
            proc = await self.owner.procs.ensure(self.bundle.tenant_id, self.bundle.path,
                                                 self.bundle.stamp)
        if proc is not self.process:
            if self.pool is not None and not self.shared:
                self._retire(self.pool)
            self.process = proc
            if self.shared:  # one connection pool to the shared process, for every tenant
                self.pool = self.owner.shared_upstream(proc).pool
            else:
                Upstream.__init__(self, dataclasses.replace(self.tenant_settings,
                                                            upstream=str(proc.socket)))
            await self.owner.after_start(self)
        return proc

    def routed(self, headers: Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
        """The headers, naming the tenant for the shared process's calls without a caller."""
        return [*headers, (shared_group.ROUTE, self.bundle.tenant_id)] if self.shared else headers

    def _retire(self, pool: Any) -> None:
        # Its last calls may still be on it: closed once the old process has drained.
        async def later() -> None:
            await asyncio.sleep(self.tenant_settings.grace_seconds + 5)
            await pool.close()
        self.owner.background(later())

    async def send(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None, *, timeout: float | None = None,
                   deadline: float | None = None) -> UpstreamReply:
        current = self.owner.states.get(self.bundle.tenant_id)
        if current is None:
            # Its process was reaped (the state with it) while this request was being
            # checked: the tenant's state now, unless its bundle went away meanwhile.
            try:
                current = self.owner.state(self.bundle.tenant_id)
            except SidecarError:
                raise Unavailable("tenant no longer served here",
                                  detail="the tenant is not served here any more",
                                  headers={"Retry-After": "1"}) from None
        if current.sidecar.upstream is not self:
            if getattr(current.sidecar.upstream, "shared", False) != self.shared:
                # Its plan moved it between shared and process while this request was
                # checked: signed with the key of the isolation it left. Rare: retry.
                raise Unavailable("tenant isolation changed", headers={"Retry-After": "1"},
                                  detail="the tenant is moving; retry shortly")
            # Checked against the previous bundle while a new one came in: the current
            # process answers (same tenant, same derived key), never the replaced one.
            return await current.sidecar.upstream.send(method, path, headers, body,
                                                       timeout=timeout, deadline=deadline)
        try:
            proc = await self.ready()
        except PoolFull as exc:
            raise Unavailable(str(exc), detail="the pool is saturated; retry shortly",
                              headers={"Retry-After": "1"}) from None
        except (StartFailed, ConfigError, OSError) as exc:
            raise Unavailable(f"tenant process: {exc}",
                              detail="the tenant's runtime is not available") from None
        proc.inflight += 1
        try:
            return await super().send(method, path, self.routed(headers), body,
                                      timeout=timeout, deadline=deadline)
        finally:
            proc.inflight -= 1
            proc.last_used = time.monotonic()

    async def close(self) -> None:
        if self.pool is not None and not self.shared:  # the shared pool is the owner's
            await self.pool.close()


class _Direct:
    """The tenant's process itself: no start, no in-flight count (the pool's own calls)."""

    def __init__(self, upstream: TenantUpstream) -> None:
        self.upstream = upstream

    async def send(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None, *, timeout: float | None = None,
                   deadline: float | None = None) -> UpstreamReply:
        return await Upstream.send(self.upstream, method, path, self.upstream.routed(headers),
                                   body, timeout=timeout, deadline=deadline)


@dataclass
class TenantState:
    """What the pool's sidecar holds for one tenant it has served."""

    bundle: Bundle
    sidecar: Sidecar
    closers: list[Any]
    shared: bool = False  # isolation `shared`: served by the pool's shared process


@dataclass
class StartBudget:
    """A token bucket for the process starts that ``GET /readyz`` may cause."""

    rate: float = READY_STARTS_PER_SECOND
    burst: float = READY_STARTS_BURST
    tokens: float = READY_STARTS_BURST
    at: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        """One start allowed now (a token taken), or False."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class PoolSidecar:
    """The request handler of `mtp pool`: identify the tenant, then its own Sidecar."""

    def __init__(self, name: str, settings: Settings, bundles: BundleDir, procs: ProcessManager,
                 *, domain: str, pool_secret: bytes, limiter: RateLimiter,
                 audit: AuditLog, fleet: FleetGate | None = None,
                 redis_users: RedisUsers | None = None) -> None:
        self.name, self.settings, self.bundles, self.procs = name, settings, bundles, procs
        self.domain, self.pool_secret = domain, pool_secret
        self.limiter, self.audit = limiter, audit
        self.fleet = fleet  # the registry's checks, shared by every tenant of the pool
        self.redis_users = redis_users  # tenants' Redis users the pool makes (with Redis)
        self.states: dict[str, TenantState] = {}
        self.ready_starts = StartBudget()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Isolation `shared`: the shared tenants whose webhook secret the shared process
        # needs (tenant -> (name, value)), and per shared process its connections and
        # its admission (one process: one budget of MTP_WORKERS x MTP_THREADS calls).
        self.shared_secrets: dict[str, tuple[str, str]] = {}
        self._shared: dict[int, tuple[Upstream, Admission]] = {}

    def background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def is_shared(self, tenant_id: str) -> bool:
        """Whether the tenant's plan (fleet registry) puts it in isolation `shared`."""
        plan = self.fleet.view.plan_of(tenant_id) if self.fleet is not None else None
        return plan is not None and plan.isolation == "shared"

    def shared_stamp(self) -> tuple[object, ...]:
        """The shared process's stamp: a shared tenant with a secret it was not handed
        at its start changes it, so the process is replaced and the next one has it."""
        return (shared_group.SHARED, *sorted(self.shared_secrets.items()))

    def shared_upstream(self, proc: TenantProcess) -> Upstream:
        """The connections to shared process ``proc`` (made once per process)."""
        found = self._shared.get(proc.pid)
        if found is None:
            settings = dataclasses.replace(self.settings, upstream=str(proc.socket))
            found = self._shared[proc.pid] = (Upstream(settings),
                                              Admission.for_settings(settings))
        return found[0]

    def shared_env(self, sock: Path) -> tuple[dict[str, str], dict[str, str]]:
        """The shared process's environment and secrets: the shared group's key and the
        shared tenants' webhook secrets (``<NAME>__<TENANT>``); no Redis (RQ's key
        prefix is one per process: shared tenants' jobs and usage stay in SQLite)."""
        pool_env = self.settings.environ
        env = {k: v for k, v in self.procs.zygote.environ.items()}
        for name in ("MTP_LOG_LEVEL", "MTP_GRACE_SECONDS", "MTP_MAX_BODY", "MTP_MAX_RESULT",
                     "MTP_JOB_RETENTION", "MTP_JOB_WORKERS", "MTP_JOB_QUEUE",
                     "MTP_POOL_SHARED_APPS", "MTP_POOL_IDLE"):
            if pool_env.get(name):
                env[name] = pool_env[name]
        env.update({
            "MTP_POOL_BUNDLES": str(self.bundles.root),
            "MTP_POOL_TENANTS": str(self.settings.data_dir / "tenants"),
            "MTP_DATA_DIR": str(self.settings.data_dir / "shared"),
            "MTP_UPSTREAM": f"unix:{sock}",
            "MTP_WORKERS": str(self.settings.workers),
            "MTP_THREADS": str(self.settings.threads),
        })
        if self.settings.config_overlay:
            env["MTP_CONFIG_OVERLAY"] = self.settings.config_overlay  # the directory
        secrets = {"MTP_SIDECAR_SECRET": shared_group.shared_key(self.pool_secret).decode()}
        secrets.update(dict(self.shared_secrets.values()))
        return env, secrets

    def tenant_settings(self, bundle: Bundle, shared: bool = False) -> Settings:
        """The pool's settings as one tenant's Sidecar sees them (its key, its secrets)."""
        config = bundle.config
        names = {config.jwt.secret_env, config.ldap.bind_password_env}
        own = {n: tenant_secret(self.settings.environ, n, config.tenant_id)
               for n in names if n}
        return dataclasses.replace(
            self.settings, tenant_dir=bundle.path, config_overlay=self.overlay(config.tenant_id),
            data_dir=self.settings.data_dir / "tenants" / config.tenant_id,
            sidecar_secret=shared_group.shared_key(self.pool_secret) if shared
            else derive_key(self.pool_secret, config.tenant_id),
            environ={k: v for k, v in own.items() if v})

    def overlay(self, tenant_id: str) -> str:
        """The tenant's overlay file: ``<tenant>.toml`` in the MTP_CONFIG_OVERLAY directory."""
        root = self.settings.config_overlay
        return str(Path(root) / f"{tenant_id}.toml") if root else ""

    def process_env(self, tenant_id: str, bundle: Path, sock: Path
                    ) -> tuple[dict[str, str], dict[str, str]]:
        """A tenant process's environment (nothing secret) and its own secrets."""
        if tenant_id == shared_group.SHARED:
            return self.shared_env(sock)
        pool_env = self.settings.environ
        env = {k: v for k, v in self.procs.zygote.environ.items()}
        for name in ("MTP_LOG_LEVEL", "MTP_GRACE_SECONDS", "MTP_MAX_BODY", "MTP_MAX_RESULT",
                     "MTP_JOB_RETENTION", "MTP_JOB_WORKERS", "MTP_JOB_QUEUE"):
            if pool_env.get(name):
                env[name] = pool_env[name]
        env.update({
            # RQ's keys under the tenant's own prefix, as in its other data planes: a job
            # queued here is run and fetched by them after a migration (framework/rq_keys.py).
            RQ_PREFIX_ENV: rq_prefix(tenant_id),
            "MTP_TENANT_DIR": str(bundle),
            "MTP_DATA_DIR": str(self.settings.data_dir / "tenants" / tenant_id),
            "MTP_UPSTREAM": f"unix:{sock}",
            "MTP_WORKERS": str(self.settings.workers),
            "MTP_THREADS": str(self.settings.threads),
        })
        if self.overlay(tenant_id):
            env["MTP_CONFIG_OVERLAY"] = self.overlay(tenant_id)
        state = self.states.get(tenant_id)
        secrets = {"MTP_SIDECAR_SECRET": derive_key(self.pool_secret, tenant_id).decode()}
        # The tenant's own Redis URL (its ACL user): jobs and usage in the fleet's Redis,
        # where they outlive a migration. Never the pool's own URL.
        try:
            redis_url = self.tenant_redis_url(tenant_id)
        except RedisError as exc:  # not on another store than its jobs and usage are in
            raise StartFailed(f"no Redis user for the tenant: {exc}") from None
        if redis_url:
            secrets["MTP_REDIS_URL"] = redis_url
        if state is not None:
            webhook = state.bundle.config.billing.webhook_secret_env
            value = tenant_secret(pool_env, webhook, tenant_id)
            if value:
                secrets[webhook] = value
        return env, secrets

    def usage_store(self, tenant_id: str) -> Any:
        """The usage store the tenant's process writes: Redis with its own URL, else the
        SQLite under its data dir."""
        from framework.usage_redis import open_store

        return open_store(dataclasses.replace(
            self.settings, redis_url=self.tenant_redis_url(tenant_id),
            data_dir=self.settings.data_dir / "tenants" / tenant_id))

    def jobs_pending(self, tenant_id: str) -> bool:
        """Whether the tenant has async jobs queued or running in Redis (then its process
        and job worker stay). Not RQ's keys: RQ is never imported in the pool."""
        url = self.tenant_redis_url(tenant_id)
        if not url:
            return False
        from redis import Redis

        from framework.jobs import QUEUED, RUNNING, redis_index

        with Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
            pipe = client.pipeline(transaction=False)
            for status in (QUEUED, RUNNING):
                pipe.zcard(redis_index(tenant_id) + status)
            return any(pipe.execute())

    def tenant_redis_url(self, tenant_id: str) -> str:
        """The Redis URL the tenant's processes use ("" for none): its ACL user's, given
        by the operator or made by the pool (framework/pool/redis_users.py)."""
        if tenant_id == shared_group.SHARED or self.is_shared(tenant_id):
            return ""  # the shared process has no Redis: its tenants' usage is in SQLite
        given = tenant_secret(self.settings.environ, "MTP_REDIS_URL", tenant_id)
        if given or self.redis_users is None:
            return given
        return self.redis_users.url(tenant_id)

    def _build(self, bundle: Bundle) -> TenantState:
        config: TenantConfig = bundle.config
        shared = self.is_shared(config.tenant_id)
        settings = self.tenant_settings(bundle, shared)
        from framework.jwt_keys import load_public_key

        secret = jwt_secret(config, settings)  # ConfigError: the tenant has no secret here
        public_key = load_public_key(config)
        ids = _identity_modules(config, settings)
        tokens = TokenVerifier(config.jwt, secret=secret, public_key=public_key,
                               keys=ids["keys"])
        upstream = TenantUpstream(self, bundle, settings, shared)
        sidecar = Sidecar(
            settings=settings, tenant=config,
            authenticator=Authenticator(config.tenant_id, tokens, ApiKeys(config.api_keys),
                                        ids["directory"], ids["unavailable"],
                                        ids["unknown_key"]),
            limiter=self.limiter, upstream=upstream, audit=self.audit,
            metrics=Metrics(ServiceNames.from_tenant_dir(bundle.path, config)),
            fleet=self.fleet)
        closers = [upstream.close, tokens.close]
        if settings.config_overlay:
            # The tenant's own overlay, applied now and watched while the state lives.
            watcher = OverlayWatcher(settings.config_overlay, config, sidecar)
            watcher.check()
            watcher.start()
            closers.append(watcher.close)
        if ids["directory"] is not None:
            closers.append(ids["directory"].close)
        return TenantState(bundle, sidecar, closers, shared)

    def state(self, tenant_id: str) -> TenantState:
        """The tenant's state, built on first use and rebuilt when its bundle changed."""
        try:
            bundle = self.bundles.get(tenant_id)
        except ConfigError as exc:
            raise Unavailable(f"bundle refused: {exc}",
                              detail="the tenant's configuration is not usable") from None
        current = self.states.get(tenant_id)
        if bundle is None:
            if current is not None:
                self.forget(tenant_id)
            raise UnknownTenant(f"no bundle for {tenant_id!r} in this pool")
        shared = self.is_shared(tenant_id)
        if (current is not None and current.bundle.stamp == bundle.stamp
                and current.shared == shared):
            return current
        if current is not None:
            self.forget(tenant_id)  # replaced bundle, or moved between shared and process
        self._note_secret(bundle, shared)
        try:
            state = self._build(bundle)
        except ConfigError as exc:
            raise Unavailable(f"tenant config: {exc}",
                              detail="the tenant's configuration is not usable") from None
        self.states[tenant_id] = state
        return state

    def _note_secret(self, bundle: Bundle, shared: bool) -> None:
        """Keep :attr:`shared_secrets` to the shared tenants with a webhook secret."""
        name = bundle.config.billing.webhook_secret_env
        value = tenant_secret(self.settings.environ, name, bundle.tenant_id)
        if shared and value:
            self.shared_secrets[bundle.tenant_id] = (secret_name(name, bundle.tenant_id), value)
        else:
            self.shared_secrets.pop(bundle.tenant_id, None)

    async def wake(self, tenant_id: str) -> None:
        """Start a stopped tenant's process for its event deliveries now due."""
        try:
            state = self.state(tenant_id)
            upstream: Any = state.sidecar.upstream
            await upstream.ready()
            if upstream.shared:  # its app in the shared process is built by a call
                await self.after_start(upstream)
        except (SidecarError, PoolFull, StartFailed, ConfigError, OSError) as exc:
            log.warning("tenant process not woken for its event deliveries: %s", exc,
                        extra={"tenant": tenant_id})
            return
        log.info("tenant process woken for its event deliveries", extra={"tenant": tenant_id})

    def process_stopped(self, proc: TenantProcess) -> None:
        """A tenant's process is stopping (idle, LRU): its state goes too (memory stays
        bounded by the live tenants); the next request builds it again."""
        if proc.tenant_id == shared_group.SHARED:
            found = self._shared.pop(proc.pid, None)
            if found is not None:
                async def later() -> None:  # its last calls finish first
                    await asyncio.sleep(self.settings.grace_seconds + 5)
                    await found[0].close()
                self.background(later())
            for tenant_id, state in list(self.states.items()):
                if state.shared and getattr(state.sidecar.upstream, "process", None) is proc:
                    wake = self.procs.wake
                    at = wake.due(tenant_id) if wake is not None else None
                    if wake is not None and at is not None:  # its app's event deliveries
                        wake.later(tenant_id, at)
                    self.forget(tenant_id)
            return
        state = self.states.get(proc.tenant_id)
        if state is not None and getattr(state.sidecar.upstream, "process", None) is proc:
            self.forget(proc.tenant_id)

    def forget(self, tenant_id: str) -> None:
        """Drop a tenant's state; its process drains and stops."""
        state = self.states.pop(tenant_id, None)
        proc = self.procs.live.get(tenant_id)
        if proc is not None:
            self.procs.stop(proc)
        if state is not None:
            async def close() -> None:
                await asyncio.sleep(self.settings.grace_seconds + 5)
                for closer in state.closers:
                    with contextlib.suppress(Exception):
                        await closer()
            self.background(close())

    async def after_start(self, upstream: TenantUpstream) -> None:
        """A tenant process came up: learn its services' deadlines (its catalog).

        Part of the start (a few milliseconds on the unix socket), not a background
        call: a call in flight would keep the process from being the LRU one to stop.
        """
        state = self.states.get(upstream.bundle.tenant_id)
        if state is None or state.sidecar.upstream is not upstream:
            return
        sidecar = state.sidecar
        if upstream.shared and upstream.process is not None:
            self.shared_upstream(upstream.process)  # made, if the process is new
            sidecar.admission = self._shared[upstream.process.pid][1]
        else:
            sidecar.admission = Admission.for_settings(sidecar.settings)

        def install(catalog: Any) -> None:
            sidecar.catalog = catalog

        watcher = CatalogWatcher(_Direct(upstream), sidecar.settings.sidecar_secret,  # type: ignore[arg-type]
                                 lambda p: sidecar.internal_headers(p, "catalog"),
                                 install, lambda: sidecar.catalog)
        try:
            await watcher.check()
        except (SidecarError, CatalogRefused, ValueError, AttributeError) as exc:
            log.warning("service catalog not loaded: %s", exc,
                        extra={"tenant": upstream.bundle.tenant_id})

    def sweep(self) -> None:
        """Forget tenants whose bundle was removed or replaced (called periodically)."""
        for tenant_id, state in list(self.states.items()):
            try:
                bundle = self.bundles.get(tenant_id)
            except ConfigError:
                bundle = None
            if bundle is None:
                self.shared_secrets.pop(tenant_id, None)
            if bundle is None or bundle.stamp != state.bundle.stamp:
                log.info("bundle changed", extra={"tenant": tenant_id})
                self.forget(tenant_id)

    async def handle(self, request: Request) -> Response:
        """Answer one request (never raises)."""
        path = request.path
        try:
            if path in POOL_ROUTES and not self._names_tenant(request):
                return self._own(path, make_request_id(request.headers.get("X-Request-ID")))
            found = identify(request, self.domain, self.bundles)
            state = self.state(found.tenant_id)
            if found.path == "/readyz" and found.tenant_id not in self.procs.live \
                    and not self.ready_starts.take():
                raise Unavailable("process starts by /readyz over budget",
                                  detail="too many tenant processes started by /readyz; "
                                         "retry shortly", headers={"Retry-After": "1"})
        except SidecarError as exc:
            rid = make_request_id(request.headers.get("X-Request-ID"))
            self.audit.write(request_id=rid, method=request.method, outcome=exc.outcome,
                             status=exc.status, tenant="", user="", auth_method="",
                             service="", operation=None, reason=exc.reason, rule=None)
            return render(exc, rid)
        return await state.sidecar.handle(rerouted(request, found.path, found.raw_path))

    def _names_tenant(self, request: Request) -> bool:
        return ("X-Tenant-ID" in request.headers
                or _host_tenant(request.headers.get("Host", ""), self.domain) is not None)

    def _own(self, path: str, rid: str) -> Response:
        body = {"status": "ok", "pool": self.name, "live": len(self.procs.live)}
        return Response(200, [("Content-Type", "application/json"), ("X-Request-ID", rid)],
                        json.dumps(body).encode())

    async def close(self) -> None:
        await self.procs.close()
        for upstream, _admission in self._shared.values():
            await upstream.close()
        for state in self.states.values():
            for closer in state.closers:
                with contextlib.suppress(Exception):
                    await closer()
        self.states.clear()
        for task in list(self._tasks):
            task.cancel()
