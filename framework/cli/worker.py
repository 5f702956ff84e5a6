"""``mtp worker``: RQ workers running the tenant's queued async jobs (needs MTP_REDIS_URL).

RQ was chosen for the shared queue because it is Redis-only (the one server the
platform already needs), well kept, and its model is the one jobs need here:
atomic dequeue, a per-job timeout, heartbeats while a job runs, and hand-over of
a dead worker's jobs to its abandoned-job handling (failure callback, then
``Retry``).

The process forks ``--processes`` RQ workers (default MTP_JOB_WORKERS) and keeps
that many alive; each builds the framework's runtime (service loader, metered
execution seam, breakers, live overlay) once and runs jobs in it, one at a time.
SIGTERM/SIGINT: RQ's warm shutdown (the current job finishes; queued jobs stay
in the queue for the next worker), killed after the framework's share of
MTP_GRACE_SECONDS (framework/grace.py); a job cut off then is handed to RQ's
abandoned-job handling (``interrupted``).

The ``mtp worker`` command is framework/cli/worker_command.py: it sets the tenant's
RQ key prefix (framework/rq_keys.py) before this module imports RQ.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import click
from flask import Flask
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from framework.grace import stop_budget
from framework.redis_wait import Outage
from framework.settings import Settings
from framework.tenant_config import TenantConfig

MONITOR_INTERVAL = 1  # seconds between heartbeats while a job runs
HEARTBEAT_GRACE = 4  # a job whose heartbeat is this late is abandoned
HANG_GRACE = 30  # seconds past RQ's job timeout before a stuck worker process exits
HUNG_EXIT = 70  # EX_SOFTWARE
MAX_JOBS = 10000  # then the process is replaced: whatever a handler leaked goes with it
WORKER_TTL = 30
MAINTENANCE_INTERVAL = 30
RESTART_PAUSE = 1.0
POLL_SECONDS = 0.1


log = logging.getLogger("mtp.framework.worker")


class MtpWorker(SimpleWorker):
    """RQ's in-process worker, with a heartbeat thread while a job runs.

    No fork per job: the runtime (loaded services, pools, the usage meter) stays warm,
    as in a framework worker, which runs sync calls in its long-lived threads too.
    RQ's job timeout (SIGALRM in this main thread) still interrupts a Python handler;
    one stuck past it in C code stops the heartbeat and ends this process, so its job
    is handed to RQ's abandoned-job handling and the pool starts a fresh worker.
    """

    # RQ doubles its pause after each failed dequeue up to 60 s: a worker would then
    # take up the queue up to a minute after Redis is back.
    max_connection_wait_time = 5.0
    stopping = False

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stopping = True  # a stop during an outage must not wait for Redis
        STOP.set()
        super().request_stop(signum, frame)

    def get_heartbeat_ttl(self, job: RqJob, working_time: float = 0.0) -> int:
        # RQ's default grace is 60 s; a dead worker's job should move on within seconds.
        return int(self.job_monitoring_interval) + HEARTBEAT_GRACE

    def execute_job(self, job: RqJob, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, execution, done),
                                name="mtp-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _heartbeat(self, job: RqJob, execution: Any, done: threading.Event) -> None:
        started = time.monotonic()
        limit = (job.timeout or 0) + HANG_GRACE if job.timeout and job.timeout > 0 else None
        while not done.wait(self.job_monitoring_interval):
            if limit is not None and time.monotonic() - started > limit:
                log.error("job %s is stuck %ss past its timeout; this worker process exits",
                          job.id, HANG_GRACE)
                os._exit(HUNG_EXIT)
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:
                OUTAGE.failed(exc)  # one line per outage, not one per beat
            else:
                OUTAGE.answered()


STOP = threading.Event()  # set by SIGTERM/SIGINT while this process waits for Redis

# One per worker process: its heartbeats, dequeues and job writes share one view of Redis.
OUTAGE = Outage(log, "the job worker")


class _QuietRetries(logging.Filter):
    """Drops RQ's line per failed dequeue: :data:`OUTAGE` logs the transitions instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "could not connect to Redis" not in record.getMessage()


def build_job_worker(settings: Settings, tenant: TenantConfig) -> Any:
    """The framework runtime a worker process runs jobs with (no HTTP, no local jobs)."""
    from framework import logs, tracing
    from framework.execute import Executor
    from framework.jobrunner import Reaper
    from framework.jobs_redis import JobWorker, redis_jobs
    from framework.operations import install as install_operations
    from framework.registry import Registry
    from framework.runtime import Runtime

    log = logs.setup(settings.log_level, tenant.tenant_id)
    tracing.setup(settings.environ, "mtp-worker", tenant.tenant_id)
    store, runner = redis_jobs(settings, tenant)
    rt = Runtime(settings=settings, tenant=tenant,
                 registry=Registry(settings.tenant_dir, tenant, dev=settings.dev),
                 executor=Executor(settings.max_result),
                 jobs=store, runner=runner,  # type: ignore[arg-type]
                 reaper=Reaper(store, settings.job_retention), log=log, secret=b"")
    # The same seams as a framework worker: metering, breakers, context.call, overlay.
    ops = install_operations(Flask("mtp-worker"), rt)
    for _spec in rt.registry.available():
        pass  # load every service now: the first job does not pay for the import
    # Event deliveries from the tenant's shared stream, as any replica delivers them.
    from framework.events.install import start_delivery

    events = start_delivery(rt)

    def close() -> None:
        events.close()
        ops.close()

    return JobWorker(rt=rt, store=store, close=close)


def run_worker(settings: Settings, tenant: TenantConfig, burst: bool) -> int:
    """One RQ worker process (a child of ``mtp worker``); it outlives Redis outages."""
    from framework.jobs_redis import install_worker, queue_name

    job_worker = build_job_worker(settings, tenant)
    job_worker.outage = OUTAGE
    install_worker(job_worker)
    logging.getLogger("rq.worker").addFilter(_QuietRetries())
    client = job_worker.store.client
    name = f"{queue_name(tenant.tenant_id)}.{os.uname().nodename}.{os.getpid()}"
    try:
        while True:
            # RQ's loop quits on a Redis error outside its dequeue (registering, its
            # bookkeeping after a job): wait for Redis here, then start a fresh RQ worker,
            # instead of a process exit and a restart loop while Redis is away.
            OUTAGE.until(client.ping, STOP)
            worker = MtpWorker([job_worker.store.queue], connection=client,
                               serializer=JSONSerializer,
                               job_monitoring_interval=MONITOR_INTERVAL, worker_ttl=WORKER_TTL,
                               maintenance_interval=MAINTENANCE_INTERVAL,
                               name=f"{name}.{int(time.time() * 1000) % 10**6}")
            try:
                worker.work(burst=burst, logging_level=settings.log_level,
                            with_scheduler=False, max_jobs=MAX_JOBS)
            except RedisError as exc:  # from RQ's teardown while Redis is away
                OUTAGE.failed(exc)
                continue
            if burst or worker.stopping or _redis_up(client):
                return 0  # a stop, max_jobs or an error that was not Redis': done
    finally:
        job_worker.close()  # usage still in memory goes to the store


def _redis_up(client: Any) -> bool:
    try:
        client.ping()
    except RedisError as exc:
        OUTAGE.failed(exc)
        return False
    return True


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
        """Warm shutdown: SIGTERM (RQ lets the current job finish), SIGKILL at the end of
        the grace period."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + stop_budget(self.settings.grace_seconds).framework
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
