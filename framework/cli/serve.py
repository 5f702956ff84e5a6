"""``mtp framework``: gunicorn (gthread) serving the Flask runtime for one tenant.

Every hook that runs in the gunicorn master is wrapped by :func:`master_hook`: an
I/O error there (a full data disk, a broken job store) is logged once and the
master keeps going, since an exception in a master hook stops gunicorn and with
it the whole platform. prometheus_client's multiprocess files are memory-mapped:
they live in a RAM-backed runtime directory (:func:`metrics_base`), never on the
data disk, where a full disk turns a write to them into SIGBUS.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from framework.cli import check_version_pin, resolve_tenant_dir
from framework.grace import stop_budget
from framework.rq_keys import use_tenant_prefix
from framework.settings import ENV, Settings
from framework.tenant_config import ConfigError, TenantConfig

KEEPALIVE = 75  # longer than the sidecar keeps a pooled connection idle
WORKER_TIMEOUT = 60  # heartbeat of a worker's main loop, not a request time limit
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_ENV = "MTP_METRICS_DIR"
STOP_MARGIN = 2.0  # seconds before the master's SIGKILL by which cut-off jobs are marked

log = logging.getLogger("mtp.framework.serve")


def metrics_base(environ: Mapping[str, str]) -> Path:
    """Where the metrics directory is made: ``MTP_METRICS_DIR``, else a RAM-backed
    runtime directory (``$XDG_RUNTIME_DIR``, ``/dev/shm``), else the temp dir.

    Never the data dir: the files are memory-mapped, and on a full disk a write to
    a mapped page kills the worker with SIGBUS.
    """
    chosen = environ.get(METRICS_DIR_ENV)
    if chosen:
        if not _writable_dir(chosen):
            raise ConfigError(ENV, METRICS_DIR_ENV, f"{chosen} is not a writable directory")
        return Path(chosen)
    # mkdtemp makes a private (0700), unpredictable directory: a shared /dev/shm is fine.
    for candidate in (environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):  # noqa: S108
        if candidate and _writable_dir(candidate):
            return Path(candidate)
    return Path(tempfile.gettempdir())


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def master_hook(name: str, fn: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """``fn(server, worker)`` as a gunicorn hook that never raises: logged once per
    failure spell. (gunicorn checks a hook's arity, so the two arguments are named.)"""
    failing = False

    def hook(server: Any, worker: Any) -> None:
        nonlocal failing
        try:
            fn(server, worker)
        except Exception as exc:  # the master must outlive its hooks
            if not failing:
                log.error("gunicorn hook %s failed (%s: %s); the server keeps going",
                          name, type(exc).__name__, exc)
            failing = True
            return
        if failing:
            log.info("gunicorn hook %s works again", name)
            failing = False

    return hook


def _runtime(worker: Any) -> Any:
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("mtp")


def post_worker_init(worker: Any) -> None:
    """In each worker: SIGTERM first tells the job runner to take no new job (503), and
    SIGUSR1 (which the master passes on to its workers) writes every thread's stack to
    the log before gunicorn reopens its log files."""
    # A hung worker (a deadlock in a handler or below) is then found by its stacks,
    # without a debugger in the image.
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
    runtime = _runtime(worker)
    if runtime is None:
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        runtime.runner.stop_accepting()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def worker_exit(server: Any, worker: Any) -> None:
    """A worker leaves: its running jobs get the rest of the grace period, its queued
    ones stay queued (the next process adopts them), then the runtime closes."""
    runtime = _runtime(worker)
    if runtime is None:
        return
    runner = runtime.runner
    started = runner.stopping_since or time.monotonic()
    finished = runner.drain(started + max(0.0, worker.cfg.graceful_timeout - STOP_MARGIN))
    runtime.close()
    if not finished and os.getpid() == worker.pid:
        # Jobs still running (now marked interrupted) hold non-daemon threads that
        # Python would wait for at exit, until the master's SIGKILL: flush usage and go.
        ops = worker.wsgi.extensions.get("mtp.operations")
        if ops is not None:
            ops.close()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


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
        master_store = None if settings.redis_url else SqliteJobStore(
            settings.data_dir / "jobs.sqlite3")

        def child_exit(server: Any, worker: Any) -> None:
            metrics.worker_exited(worker.pid)
            if master_store is not None:
                # Jobs of the dead worker: cut-off ones are failed now, not at the next
                # periodic sweep; its queued ones wait for a live worker to adopt them.
                master_store.reap()

        options = {
            "bind": [bind_address(settings.upstream)],
            "workers": settings.workers,
            "threads": settings.threads,
            # gthread, with health checks answered off the request threads.
            "worker_class": "framework.worker.FrameworkWorker",
            "keepalive": KEEPALIVE,
            # Running requests and jobs get this long after SIGTERM (docs/runtime.md#stopping).
            "graceful_timeout": stop_budget(settings.grace_seconds).framework,
            "timeout": WORKER_TIMEOUT,
            "proc_name": f"mtp-framework-{self.tenant.tenant_id}",
            "accesslog": None,  # the framework writes its own JSON line per request
            "logger_class": JsonGunicornLogger,
            "loglevel": settings.log_level.lower(),
            "umask": 0o007,  # the unix socket: owner and group (the sidecar) only
            "child_exit": master_hook("child_exit", child_exit),
            # worker_exit runs in the worker, and in the master for a worker that is gone.
            "worker_exit": master_hook("worker_exit", worker_exit),
            "post_worker_init": post_worker_init,
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
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(ENV, "MTP_DATA_DIR", f"{settings.data_dir} is not usable: {exc}"
                          ) from None
    base = metrics_base(settings.environ)
    try:
        # Fresh per start (a restarted container may keep an emptyDir's old files).
        metrics_dir = Path(tempfile.mkdtemp(prefix=f"mtp-{os.getuid()}-{os.getpid()}-",
                                            dir=base))
    except OSError as exc:
        raise ConfigError(ENV, METRICS_DIR_ENV, f"cannot make the metrics directory in "
                          f"{base}: {exc.strerror}") from None
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
    use_tenant_prefix(tenant.tenant_id)  # before a worker imports RQ (framework/rq_keys.py)
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
