"""Running a pool: the warm parent, the process manager and the pool's sidecar.

Pool settings come from the environment once (:class:`PoolSettings`); everything
else is the ordinary :class:`~framework.settings.Settings`, whose
``MTP_SIDECAR_SECRET`` is the pool secret each tenant's signing key is derived from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from framework.grace import stop_budget
from framework.pool.bundles import BundleDir, Placement
from framework.pool.procs import ProcessManager, Zygote
from framework.pool.redis_users import RedisUsers
from framework.pool.wake import Wakeups
from framework.settings import ENV, Settings, _int
from framework.tenant_config import TENANT_ID_RE, ConfigError

log = logging.getLogger("mtp.pool")

SWEEP_SECONDS = 1.0  # bundles replaced or removed are noticed within this
WAKE_SECONDS = 1.0  # a stopped tenant's event delivery starts at most this late


@dataclass(frozen=True)
class PoolSettings:
    """The MTP_POOL_* variables."""

    name: str
    bundles: Path
    domain: str = ""
    idle: int = 300
    max_procs: int = 100
    run_dir: Path | None = None  # the tenant processes' sockets (MTP_POOL_RUN_DIR)
    shared_apps: int = 64  # tenant apps the shared process keeps built (MTP_POOL_SHARED_APPS)

    @classmethod
    def from_env(cls, name: str, bundles: Path, environ: Mapping[str, str]) -> PoolSettings:
        if not TENANT_ID_RE.match(name):
            raise ConfigError(ENV, "--name", f"{name!r} must match {TENANT_ID_RE.pattern}")
        if not bundles.is_dir():
            raise ConfigError(ENV, "--bundles", f"{bundles} is not a directory")
        return cls(name=name, bundles=bundles.resolve(),
                   domain=environ.get("MTP_POOL_DOMAIN", "").strip().strip(".").lower(),
                   idle=_int(environ, "MTP_POOL_IDLE", 300, minimum=1),
                   max_procs=_int(environ, "MTP_POOL_MAX_PROCS", 100, minimum=1),
                   # Checked here: a bad value must stop the pool, not 503 shared tenants.
                   shared_apps=_int(environ, "MTP_POOL_SHARED_APPS", 64, minimum=1),
                   run_dir=Path(environ["MTP_POOL_RUN_DIR"]) if environ.get(
                       "MTP_POOL_RUN_DIR") else None)


def pool_process_settings(settings: Settings) -> Settings:
    """A tenant process in a pool: one gunicorn worker, four threads, unless set."""
    env = settings.environ
    return dataclasses.replace(
        settings, workers=settings.workers if env.get("MTP_WORKERS") else 1,
        threads=settings.threads if env.get("MTP_THREADS") else 4)


async def serve_pool(pool: PoolSettings, settings: Settings, *,
                     placement: Placement | None = None,
                     stop: asyncio.Event | None = None) -> None:
    """Serve the pool until ``stop`` is set (SIGTERM/SIGINT without one)."""
    from framework.control.registry_view import open_view
    from framework.pool.placement import RegistryPlacement
    from sidecar.audit import AuditLog
    from sidecar.fleet import CpuWatch, FleetGate
    from sidecar.front import install_stop_signals, serve
    from sidecar.ratelimit import RateLimiter
    from sidecar.startup import limiter_backend
    from sidecar.tenant_routing import PoolSidecar

    secret = settings.require_sidecar_secret()
    settings = pool_process_settings(settings)
    # Unix socket paths are short (108 bytes): a private directory under /tmp or the
    # runtime dir, not the data dir.
    runtime = pool.run_dir or Path(tempfile.mkdtemp(prefix=f"mtp-pool-{pool.name[:20]}-"))
    zygote = Zygote(settings.environ)
    await asyncio.to_thread(zygote.start)
    budget = stop_budget(settings.grace_seconds)
    wake = Wakeups(settings.data_dir / "tenants")
    procs = ProcessManager(zygote, runtime, lambda t, b, s: handler.process_env(t, b, s),
                           idle=pool.idle, max_procs=pool.max_procs,
                           grace=float(budget.framework),
                           on_stop=lambda proc: handler.process_stopped(proc), wake=wake,
                           jobs_pending=lambda tenant: handler.jobs_pending(tenant))
    audit = AuditLog(settings.audit_file)
    # The fleet's registry, when the store holds one (else every bundle, no checks).
    view = open_view(settings.redis_url, settings.data_dir)
    # A plan's daily_cpu_seconds: the CPU of the tenants served lately, each read from
    # the usage store its own process writes.
    cpu = CpuWatch(view, lambda tenant: handler.usage_store(tenant)).start()
    # Tenants' processes connect to Redis as their own ACL users (never the pool's).
    redis_users = (RedisUsers(settings.redis_url, secret, pool.name)
                   if settings.redis_url else None)
    handler = PoolSidecar(pool.name, settings,
                          BundleDir(pool.bundles, placement or RegistryPlacement(pool.name, view)),
                          procs, domain=pool.domain, pool_secret=secret,
                          limiter=RateLimiter(limiter_backend(settings)), audit=audit,
                          fleet=FleetGate(view, cpu), redis_users=redis_users)
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), stop)
    procs.start()
    audit.start()

    async def sweep() -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            handler.sweep()

    async def wake_due() -> None:
        # Tenants stopped with event deliveries to make (found at start, or when their
        # process was reaped): started again when the earliest is due.
        found = await asyncio.to_thread(wake.scan)
        if found:
            log.info("%d tenant(s) have event deliveries to make", found)
        while True:
            for tenant_id in wake.pop_due():
                if tenant_id not in procs.live:
                    handler.background(handler.wake(tenant_id))
            await asyncio.sleep(WAKE_SECONDS)

    sweeper = asyncio.get_running_loop().create_task(sweep())
    waker = asyncio.get_running_loop().create_task(wake_due())
    where = settings.listen
    target = {"path": where} if isinstance(where, str) else {"host": where[0],
                                                              "port": where[1]}
    log.info("mtp pool %s: bundles %s on %s", pool.name, pool.bundles, where)
    try:
        await serve(handler.handle, shutdown_timeout=budget.sidecar, stop=stop,
                    **target)  # type: ignore[arg-type]
    finally:
        for task in (sweeper, waker):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await handler.close()
        cpu.close()
        if redis_users is not None:
            redis_users.close()
        view.close()
        await handler.limiter.backend.close()
        await audit.close()
        await asyncio.to_thread(zygote.close)
        shutil.rmtree(runtime, ignore_errors=True)
