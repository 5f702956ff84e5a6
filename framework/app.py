"""The Flask app factory: builds one Runtime from Settings + TenantConfig and wires it."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from flask import Flask

from framework import logs, metrics, tracing
from framework.controller import register, render_error
from framework.events.install import install as install_events
from framework.execute import Executor
from framework.hooks import install_hooks
from framework.jobrunner import JobRunner, Reaper, rebuild_call
from framework.jobs import JobStore, SqliteJobStore, runner_id
from framework.openapi_view import install as install_openapi
from framework.operations import install as install_operations
from framework.registry import Registry
from framework.runtime import Runtime
from framework.settings import Settings
from framework.tenant_config import TenantConfig

if TYPE_CHECKING:
    from framework.jobs_redis import RedisJobRunner

REAP_INTERVAL = 5.0


def build_runtime(settings: Settings, tenant: TenantConfig, background: bool = True,
                  secret: bytes = b"") -> Runtime:
    """Everything a worker needs, built once; ``background`` starts the job reaper."""
    log = logs.setup(settings.log_level, tenant.tenant_id)
    executor = Executor(settings.max_result)
    store: JobStore
    runner: JobRunner | RedisJobRunner
    if settings.redis_url:
        # Shared jobs: recorded in Redis, run by `mtp worker` processes (RQ).
        from framework.jobs_redis import redis_jobs

        store, runner = redis_jobs(settings, tenant)
    else:
        store = SqliteJobStore(settings.data_dir / "jobs.sqlite3")
        runner = JobRunner(store, lambda: executor.call, runner_id(), settings.job_workers,
                           settings.job_queue, on_status=metrics.job_status)
    reaper = Reaper(store, settings.job_retention, REAP_INTERVAL, adopt=runner.adopt)
    rt = Runtime(
        settings=settings,
        tenant=tenant,
        registry=Registry(settings.tenant_dir, tenant, dev=settings.dev),
        executor=executor,
        jobs=store,
        runner=runner,
        reaper=reaper,
        log=log,
        secret=secret,
    )
    if isinstance(runner, JobRunner):
        # Queued jobs of a process that stopped are run here, with the live config.
        runner.rebuild = partial(rebuild_call, rt)
    if background:
        reaper.start()
    return rt


class FrameworkFlask(Flask):
    """Flask without the per-call coroutine check: every view and hook here is sync."""

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        # Flask inspects each view and hook on every request to find async ones
        # (several inspect calls per request); none of ours is async.
        return func


def create_app(settings: Settings, tenant: TenantConfig, background: bool = True) -> Flask:
    """The framework's WSGI app for one tenant."""
    secret = settings.require_sidecar_secret()
    # Per worker, after the fork: the exporter's thread belongs to this process.
    tracing.setup(settings.environ, "mtp-framework", tenant.tenant_id)
    rt = build_runtime(settings, tenant, background, secret)
    app = FrameworkFlask("framework")
    # No MAX_CONTENT_LENGTH: inputs.read_body enforces MTP_MAX_BODY itself, for
    # declared and chunked bodies alike (werkzeug's limit truncated chunked ones).
    app.extensions["mtp"] = rt
    app.register_error_handler(Exception, render_error)
    install_hooks(app, rt)
    register(app, rt)
    install_openapi(app, rt)
    app.extensions["mtp.operations"] = install_operations(app, rt)
    app.extensions["mtp.events"] = install_events(app, rt, background)
    return app
