"""``mtp worker``: RQ workers running the tenant's queued async jobs (needs MTP_REDIS_URL).

RQ was chosen for the shared queue because it is Redis-only (the one server the
platform already needs), well kept, and its model is the one jobs need here:
a forking worker runs each job in a child ("work horse") that it can kill at the
job's timeout, heartbeats while the job runs, and hands jobs of a worker that
died to its abandoned-job handling (failure callback, then ``Retry``).

The process forks ``--processes`` RQ workers (default MTP_JOB_WORKERS) and keeps
that many alive; each builds the framework's runtime (service loader, metered
execution seam, breakers, live overlay) once, before its work horses fork.
SIGTERM/SIGINT: RQ's warm shutdown (the current job finishes), killed after
DRAIN_SECONDS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click
from flask import Flask
from rq import Worker
from rq.job import Job as RqJob

from framework.cli import check_version_pin, resolve_tenant_dir
from framework.settings import Settings
from framework.tenant_config import ConfigError, TenantConfig

MONITOR_INTERVAL = 1  # seconds between heartbeats while a job runs
HEARTBEAT_GRACE = 4  # a job whose heartbeat is this late is abandoned
WORKER_TTL = 30
MAINTENANCE_INTERVAL = 30
DRAIN_SECONDS = 20.0
RESTART_PAUSE = 1.0
POLL_SECONDS = 0.1


class MtpWorker(Worker):
    """RQ's forking worker with a short heartbeat TTL.

    RQ's default grace is 60 s past the monitoring interval; a replica that dies
    should have its jobs retried or failed within seconds instead.
    """

    def get_heartbeat_ttl(self, job: RqJob, working_time: float = 0.0) -> int:
        interval = float(self.job_monitoring_interval)
        if job.timeout and job.timeout > 0:
            interval = min(job.timeout - working_time, interval)
        return max(1, int(interval)) + HEARTBEAT_GRACE


def build_job_worker(settings: Settings, tenant: TenantConfig) -> Any:
    """The framework runtime a worker process runs jobs with (no HTTP, no local jobs)."""
    from framework import logs
    from framework.execute import Executor
    from framework.jobrunner import Reaper
    from framework.jobs_redis import JobWorker, redis_jobs
    from framework.operations import install as install_operations
    from framework.registry import Registry
    from framework.runtime import Runtime

    log = logs.setup(settings.log_level, tenant.tenant_id)
    store, runner = redis_jobs(settings, tenant)
    rt = Runtime(settings=settings, tenant=tenant,
                 registry=Registry(settings.tenant_dir, tenant, dev=settings.dev),
                 executor=Executor(settings.max_result, settings.threads),
                 jobs=store, runner=runner,  # type: ignore[arg-type]
                 reaper=Reaper(store, settings.job_retention), log=log, secret=b"")
    # The same seams as a framework worker: metering, breakers, context.call, overlay.
    ops = install_operations(Flask("mtp-worker"), rt)
    for _spec in rt.registry.available():
        pass  # load every service now, so each work horse starts with them imported
    return JobWorker(rt=rt, store=store, flush=ops.meter.flush)


def run_worker(settings: Settings, tenant: TenantConfig, burst: bool) -> int:
    """One RQ worker process (a child of ``mtp worker``)."""
    from framework.jobs_redis import install_worker, queue_name

    job_worker = build_job_worker(settings, tenant)
    install_worker(job_worker)
    worker = MtpWorker([job_worker.store.queue], connection=job_worker.store.client,
                       job_monitoring_interval=MONITOR_INTERVAL, worker_ttl=WORKER_TTL,
                       maintenance_interval=MAINTENANCE_INTERVAL,
                       name=f"{queue_name(tenant.tenant_id)}.{os.uname().nodename}.{os.getpid()}")
    worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
    return 0


def _die_with_parent() -> None:
    # Linux: a worker whose parent is SIGKILLed gets SIGTERM instead of living on.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class WorkerPool:
    """Forks and keeps ``size`` RQ worker processes; drains them on a signal."""

    settings: Settings
    tenant: TenantConfig
    size: int
    burst: bool = False
    children: set[int] = field(default_factory=set)
    signals: list[int] = field(default_factory=list)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)  # the loop acts on it

    def spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves through os._exit
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)  # RQ installs its own
                _die_with_parent()
                code = run_worker(self.settings, self.tenant, self.burst)
            except BaseException as exc:  # a child must not return into click
                code = exc.code if isinstance(exc, SystemExit) and isinstance(
                    exc.code, int) else 1
                if code:
                    click.echo(f"mtp worker: worker process failed: {type(exc).__name__}: "
                               f"{exc}", err=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)

    def run(self) -> int:
        """Keep the pool full until a signal (or, in burst mode, until all are done)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        for _ in range(self.size):
            self.spawn()
        while True:
            if self.signals:
                return self.stop()
            pid, status = os.waitpid(-1, os.WNOHANG) if self.children else (0, 0)
            if pid:
                self.children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                if self.burst:
                    if not self.children:
                        return 0
                    continue
                click.echo(f"mtp worker: worker {pid} exited with {code}; starting another",
                           err=True)
                time.sleep(RESTART_PAUSE)  # a worker that cannot start must not spin
                self.spawn()
                continue
            time.sleep(POLL_SECONDS)

    def stop(self) -> int:
        """Warm shutdown: SIGTERM (RQ lets the current job finish), SIGKILL after the drain."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.children and time.monotonic() < deadline:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid:
                self.children.discard(pid)
            else:
                time.sleep(POLL_SECONDS)
        for pid in list(self.children):
            # What is left (a hung job) goes with its work horse: its process group.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        return 0


@click.command("worker")
@click.option("--tenant-dir", type=click.Path(file_okay=False), default=None,
              help="Tenant (or assembled runtime) directory.")
@click.option("--processes", type=click.IntRange(1, 256), default=None,
              help="RQ worker processes (default MTP_JOB_WORKERS).")
@click.option("--burst", is_flag=True, help="Exit once the queue is empty.")
def worker(tenant_dir: str | None, processes: int | None, burst: bool) -> None:
    """Run async jobs from the shared Redis queue."""
    directory = resolve_tenant_dir(tenant_dir)
    settings = Settings.from_env(tenant_dir=directory)
    if not settings.redis_url:
        raise ConfigError("environment", "MTP_REDIS_URL",
                          "must be set: `mtp worker` runs jobs from the shared Redis queue")
    tenant = settings.load_tenant()
    check_version_pin(tenant.framework_version, tenant.source)
    pool = WorkerPool(settings, tenant, processes or settings.job_workers, burst)
    click.echo(f"mtp worker: tenant {tenant.tenant_id}, {pool.size} process(es)", err=True)
    sys.exit(pool.run())
