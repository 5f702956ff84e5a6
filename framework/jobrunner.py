"""Async execution: jobs on a bounded thread pool with a bounded queue, and the reaper.

A worker process takes at most ``workers`` running plus ``queue`` waiting jobs;
one more is refused with 503 + Retry-After before anything is stored. Each job
is claimed atomically before it runs, so a cancel that won first is honoured.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from framework.context import Context
from framework.errors import DeadlineExceeded, Saturated, Unavailable
from framework.execute import Call, Outcome
from framework.jobs import FAILED, SUCCEEDED, Job, JobStore, new_job_id
from framework.problem import problem
from framework.registry import ServiceSpec

log = logging.getLogger("mtp.framework.jobs")

StatusHook = Callable[[str, str, str | None, str], None]  # tenant, service, operation, status


def _no_hook(tenant: str, service: str, operation: str | None, status: str) -> None:
    return None


def error_document(outcome: Outcome, request_id: str) -> dict:
    """A failed call as the problem document a job's ``error`` holds."""
    err = outcome.error
    assert err is not None
    return problem(outcome.status, err.detail, request_id, kind=err.kind, **err.extra)


class JobRunner:
    """Queues jobs in the store and runs them on this process's job threads."""

    def __init__(self, store: JobStore, call: Callable[[], Call], runner: str,
                 workers: int, queue: int, on_status: StatusHook = _no_hook) -> None:
        self.store = store
        self.call = call  # returns the current call seam, so later wrappers apply
        self.runner = runner
        self.capacity = workers + queue
        self.on_status = on_status
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mtp-job")

    def submit(self, spec: ServiceSpec, ctx: Context, owner: str) -> tuple[Job, Future]:
        """Store a queued job and schedule it; Saturated when this process is full."""
        if not self._slots.acquire(blocking=False):
            raise Saturated(f"the job queue is full ({self.capacity} jobs); retry shortly")
        job = Job(id=new_job_id(), tenant=ctx.tenant_id, service=spec.name,
                  operation=ctx.operation, owner=owner, request_id=ctx.request_id,
                  created=time.time(), runner=self.runner)
        try:
            self.store.create(job)
        except Exception as exc:
            self._slots.release()
            log.exception("job store refused a new job")
            raise Unavailable("the job store is unavailable") from exc
        context = contextvars.copy_context()
        try:
            future = self._executor.submit(context.run, self._run, job, spec, ctx)
        except RuntimeError as exc:
            # Shutting down, or no thread could start: the job never runs, so it must not
            # stay queued, and its slot comes back (else 500 and a slot lost per call).
            self._slots.release()
            self.store.cancel(job.id)
            raise Saturated("this worker takes no more jobs; retry shortly") from exc
        self.on_status(job.tenant, job.service, job.operation, job.status)
        return job, future

    def _run(self, job: Job, spec: ServiceSpec, ctx: Context) -> Outcome | None:
        try:
            ctx.deadline = time.monotonic() + spec.timeout
            if not self.store.claim(job.id, self.runner, time.time() + spec.timeout):
                return None  # cancelled while queued, or reaped
            self.on_status(job.tenant, job.service, job.operation, "running")
            outcome = self.call()(spec, ctx)
            if outcome.ok and time.monotonic() > ctx.deadline:
                # Late results are not kept: a job obeys its timeout like a sync call.
                outcome = Outcome(504, error=_late(spec), wall=outcome.wall, cpu=outcome.cpu)
            if outcome.ok:
                status = SUCCEEDED
                done = self.store.finish(job.id, SUCCEEDED, result_json=outcome.body)
            else:
                status = FAILED
                done = self.store.finish(job.id, FAILED,
                                         error=error_document(outcome, job.request_id))
            if done:
                self.on_status(job.tenant, job.service, job.operation, status)
            return outcome
        except Exception:
            log.exception("job %s could not be recorded", job.id)
            return None
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        """Stop taking jobs; queued ones stay queued and are reaped as interrupted."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _late(spec: ServiceSpec) -> DeadlineExceeded:
    return DeadlineExceeded(f"service {spec.name!r} did not finish within {spec.timeout:g}s")


class Reaper:
    """Periodically fails jobs of dead processes and purges old finished jobs."""

    def __init__(self, store: JobStore, retention: float, interval: float = 5.0) -> None:
        self.store, self.retention, self.interval = store, retention, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def sweep(self) -> int:
        """One pass; returns how many jobs were failed."""
        try:
            failed = self.store.reap()
            self.store.purge(time.time() - self.retention)
        except Exception as exc:
            # A store outage (Redis down) fails every pass: the traceback once, then a
            # short line per pass, so the log says it is still down without flooding.
            if self._failing:
                log.warning("job reaper pass failed again: %s", type(exc).__name__)
            else:
                log.exception("job reaper pass failed")
            self._failing = True
            return 0
        if self._failing:
            log.info("job reaper passes succeed again")
            self._failing = False
        if failed:
            log.warning("marked %d job(s) failed: their process stopped or time ran out",
                        failed)
        return failed

    def start(self) -> None:
        """Sweep now, then every ``interval`` seconds on a daemon thread."""
        self.sweep()
        self._thread = threading.Thread(target=self._loop, name="mtp-reaper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sweep()

    def stop(self) -> None:
        self._stop.set()
