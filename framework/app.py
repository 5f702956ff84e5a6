"""The Flask app factory: builds one Runtime from Settings + TenantConfig and wires it."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from framework import logs, metrics
from framework.controller import register, render_error
from framework.execute import Executor
from framework.jobrunner import JobRunner, Reaper
from framework.jobs import SqliteJobStore, runner_id
from framework.operations import install as install_operations
from framework.problem import request_id
from framework.registry import Registry
from framework.runtime import Runtime
from framework.settings import Settings
from framework.signing import REQUEST_ID
from framework.tenant_config import TenantConfig
from framework.verify import EXEMPT, identify, raw_target

REAP_INTERVAL = 5.0
MAX_LOGGED_PATH = 200


def build_runtime(settings: Settings, tenant: TenantConfig, background: bool = True,
                  secret: bytes = b"") -> Runtime:
    """Everything a worker needs, built once; ``background`` starts the job reaper."""
    log = logs.setup(settings.log_level, tenant.tenant_id)
    store = SqliteJobStore(settings.data_dir / "jobs.sqlite3")
    executor = Executor(settings.max_result, settings.handler_threads or 2 * settings.threads)
    runner = JobRunner(store, lambda: executor.call, runner_id(), settings.job_workers,
                       settings.job_queue, on_status=metrics.job_status)
    reaper = Reaper(store, settings.job_retention, REAP_INTERVAL)
    if background:
        reaper.start()
    return Runtime(
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


def create_app(settings: Settings, tenant: TenantConfig, background: bool = True) -> Flask:
    """The framework's WSGI app for one tenant."""
    secret = settings.require_sidecar_secret()
    rt = build_runtime(settings, tenant, background, secret)
    app = Flask("framework")
    # One byte of headroom: read_body sees that byte and answers 413 itself.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body + 1
    app.extensions["mtp"] = rt
    app.register_error_handler(Exception, render_error)
    install_hooks(app, rt)
    register(app, rt)
    app.extensions["mtp.operations"] = install_operations(app, rt)
    return app


def install_hooks(app: Flask, rt: Runtime) -> None:
    """Request id and signature check before; header, metrics and log line after."""

    @app.before_request
    def before() -> None:
        g.start = time.perf_counter()
        g.request_id = request_id(request.headers.get(REQUEST_ID))
        logs.REQUEST_ID.set(g.request_id)
        g.service, g.operation, g.error_kind = "", "", None
        if request.path not in EXEMPT:
            g.identity = identify(rt.secret, rt.tenant.tenant_id, request.method,
                                  raw_target(request.environ), request.headers)

    @app.after_request
    def after(response: Response) -> Response:
        response.headers[REQUEST_ID] = g.get("request_id", "")
        start = g.get("start")
        if start is None:  # pragma: no cover - a failure before our first hook ran
            return response
        elapsed = time.perf_counter() - start
        tenant = rt.tenant.tenant_id
        metrics.observe(tenant, g.service, g.operation, response.status_code, elapsed,
                        g.error_kind)
        if rt.log.isEnabledFor(20):
            ident = g.get("identity")
            rt.log.info("request", extra={
                "method": request.method,
                "path": request.path[:MAX_LOGGED_PATH],
                "status": response.status_code,
                "ms": round(elapsed * 1000, 3),
                "service": g.service or None,
                "operation": g.operation or None,
                "user": ident.user if ident is not None else None,
            })
        return response

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        logs.REQUEST_ID.set("")  # gthread reuses threads: no id may leak into the next lines
