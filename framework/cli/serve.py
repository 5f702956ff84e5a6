"""``mtp framework``: gunicorn (gthread) serving the Flask runtime for one tenant."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import click
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from framework.cli import check_version_pin, resolve_tenant_dir
from framework.grace import stop_budget
from framework.settings import ENV, Settings
from framework.tenant_config import ConfigError, TenantConfig

KEEPALIVE = 75  # longer than the sidecar keeps a pooled connection idle
WORKER_TIMEOUT = 60  # heartbeat of a worker's main loop, not a request time limit
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def bind_address(upstream: tuple[str, int] | str) -> str:
    """settings.upstream in gunicorn's bind syntax."""
    if isinstance(upstream, str):
        return f"unix:{upstream}"
    host, port = upstream
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class JsonGunicornLogger(GunicornLogger):
    """gunicorn's own lines as JSON, and no access log: the framework writes that line.

    (A ``logconfig_dict`` would do the formatting too, but makes gunicorn build
    access-log atoms for every request even when they are dropped.)
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from framework.logs import JsonFormatter

        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


class FrameworkServer(BaseApplication):
    """gunicorn configured from Settings; each worker builds its app after the fork."""

    def __init__(self, settings: Settings, tenant: TenantConfig) -> None:
        self.settings, self.tenant = settings, tenant
        super().__init__()

    def load_config(self) -> None:
        from framework import metrics
        from framework.jobs import SqliteJobStore

        settings = self.settings
        master_store = SqliteJobStore(settings.data_dir / "jobs.sqlite3")

        def child_exit(server: Any, worker: Any) -> None:
            metrics.worker_exited(worker.pid)
            # Jobs of the dead worker are failed now, not at the next periodic sweep.
            master_store.reap()

        def worker_exit(server: Any, worker: Any) -> None:
            app = getattr(worker, "wsgi", None)
            runtime = getattr(app, "extensions", {}).get("mtp")
            if runtime is not None:
                runtime.close()

        options = {
            "bind": [bind_address(settings.upstream)],
            "workers": settings.workers,
            "threads": settings.threads,
            "worker_class": "gthread",
            "keepalive": KEEPALIVE,
            # Running requests and jobs get this long after SIGTERM (docs/runtime.md#stopping).
            "graceful_timeout": stop_budget(settings.grace_seconds).framework,
            "timeout": WORKER_TIMEOUT,
            "proc_name": f"mtp-framework-{self.tenant.tenant_id}",
            "accesslog": None,  # the framework writes its own JSON line per request
            "logger_class": JsonGunicornLogger,
            "loglevel": settings.log_level.lower(),
            "umask": 0o007,  # the unix socket: owner and group (the sidecar) only
            "child_exit": child_exit,
            "worker_exit": worker_exit,
            "preload_app": False,
            # gunicorn's runtime control socket would sit in $HOME, shared by every
            # instance: the framework is managed by signals alone.
            "control_socket_disable": True,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from framework.app import create_app

        return create_app(self.settings, self.tenant)


def prepare(settings: Settings) -> Path:
    """Data dir, job store, socket dir and a fresh metrics dir, before any fork.

    A directory that cannot be used is a config error naming the variable, not a
    traceback from every worker.
    """
    from framework.jobs import SqliteJobStore

    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        SqliteJobStore(settings.data_dir / "jobs.sqlite3").close()
        metrics_dir = Path(tempfile.mkdtemp(prefix="metrics-", dir=settings.data_dir))
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(ENV, "MTP_DATA_DIR", f"{settings.data_dir} is not usable: {exc}"
                          ) from None
    if isinstance(settings.upstream, str):
        try:
            Path(settings.upstream).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(ENV, "MTP_UPSTREAM", f"cannot create the socket's directory: "
                              f"{exc.strerror}") from None
    # prometheus_client reads this at import, in the master and in every worker.
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    return metrics_dir


@click.command("framework")
@click.option("--tenant-dir", type=click.Path(file_okay=False), default=None,
              help="Tenant (or assembled runtime) directory.")
def framework(tenant_dir: str | None) -> None:
    """Run the framework (gunicorn + Flask) alone."""
    directory = resolve_tenant_dir(tenant_dir)
    settings = Settings.from_env(tenant_dir=directory)
    settings.require_sidecar_secret()
    tenant = settings.load_tenant()
    for name in ("MTP_SIDECAR_SECRET", tenant.billing.webhook_secret_env):
        # Settings holds them; tenant modules, imported later, find them in os.environ
        # no more (`mtp run` hands them over a pipe, so /proc/self/environ lacks them too).
        os.environ.pop(name, None)
    check_version_pin(tenant.framework_version, tenant.source)
    metrics_dir = prepare(settings)
    from framework import logs

    logs.setup(settings.log_level, tenant.tenant_id).info(
        "starting framework", extra={"bind": bind_address(settings.upstream),
                                     "workers": settings.workers, "threads": settings.threads})
    master = os.getpid()
    try:
        FrameworkServer(settings, tenant).run()
    finally:
        # A gunicorn worker leaves through SystemExit up this same stack after the
        # fork: only the master may remove the directory every worker writes to.
        if os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
