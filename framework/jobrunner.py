"""Async execution: jobs on a bounded thread pool with a bounded queue, and the reaper.

A worker process takes at most ``workers`` running plus ``queue`` waiting jobs;
one more is refused with 503 + Retry-After before anything is stored. Each job
is claimed atomically before it runs, so a cancel that won first is honoured.

A job is stored with the call it runs with (identity, payload, params), so a
queued job outlives its process: on a graceful stop (:meth:`JobRunner.drain`)
this process takes no new job (503), lets its running jobs finish within the
grace period and leaves its queued ones queued; the next process to sweep
(another worker now, or the framework after a restart) adopts and runs them.
Only a job that was running when its process stopped is ``interrupted``.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from framework import logs, tracing
from framework.context import Context
from framework.diskfull import disk_trouble
from framework.errors import DeadlineExceeded, FrameworkError, Saturated, Unavailable
from framework.execute import Call, Outcome
from framework.flags import FlagSet
from framework.jobs import FAILED, INTERRUPTED, SUCCEEDED, Job, JobStore, new_job_id
from framework.problem import problem
from framework.registry import ServiceSpec
from framework.tenant_config import TenantConfig
from framework.ticker import REAPER, Cancel

log = logging.getLogger("mtp.framework.jobs")

WRITE_RETRY = 1.0  # seconds between tries of a job's store write while the disk is full

StatusHook = Callable[[str, str, str | None, str], None]  # tenant, service, operation, status


def _no_hook(tenant: str, service: str, operation: str | None, status: str) -> None:
    return None


def error_document(outcome: Outcome, request_id: str) -> dict:
    """A failed call as the problem document a job's ``error`` holds."""
    err = outcome.error
    assert err is not None
    return problem(outcome.status, err.detail, request_id, kind=err.kind, **err.extra)


def call_of(ctx: Context) -> dict[str, Any]:
    """What a job stores to be run later, anywhere: the identity and the request."""
    call = {"tenant": ctx.tenant_id, "service": ctx.service, "operation": ctx.operation,
            "user": ctx.user, "groups": list(ctx.groups), "roles": list(ctx.roles),
            "auth_method": ctx.auth_method, "payload": ctx.payload,
            "params": dict(ctx.params), "request_id": ctx.request_id}
    if tracing.ENABLED:  # the job's span links to the request that queued it
        call["trace"] = tracing.carrier()
    return call


def traced(call: Mapping[str, Any], run: Callable[[], Outcome]) -> Outcome:
    """``run()`` in the job's span (a new trace linked to its request's) when tracing is on."""
    if not tracing.ENABLED:
        return run()
    with tracing.linked_span("job " + str(call.get("service", "")), call.get("trace"), {
            "mtp.tenant": str(call.get("tenant", "")), "mtp.service": str(call.get("service", "")),
            "mtp.operation": call.get("operation") or "",
            "mtp.auth_method": str(call.get("auth_method", "")),
            "mtp.request_id": str(call.get("request_id", ""))}) as span:
        outcome = run()
        span.set_attribute("mtp.status", outcome.status)
        tracing.set_error(span, outcome.status)
        return outcome


def context_of(tenant: TenantConfig, spec: ServiceSpec, call: Mapping[str, Any]) -> Context:
    """The handler's context, rebuilt from a stored :func:`call_of`."""
    groups, roles = tuple(call["groups"]), tuple(call["roles"])
    return Context(
        tenant_id=tenant.tenant_id, service=spec.name, operation=call["operation"],
        user=call["user"], groups=groups, roles=roles, auth_method=call["auth_method"],
        payload=call["payload"], params=call["params"], request_id=call["request_id"],
        config=tenant.service(spec.name).config,
        flags=FlagSet(tenant.flags, tenant.tenant_id, call["user"], groups, roles),
        logger=logs.service_logger(tenant.tenant_id, call["request_id"], spec.name,
                                   call["operation"]),
        deadline=time.monotonic() + spec.timeout)


Rebuild = Callable[[Mapping[str, Any]], tuple[ServiceSpec, Context]]


def rebuild_call(rt: Any, call: Mapping[str, Any]) -> tuple[ServiceSpec, Context]:
    """A stored call as (spec, context) with the runtime's live registry and config."""
    spec = rt.registry.resolve(call["service"])
    spec.check_operation(call["operation"])
    return spec, context_of(rt.tenant, spec, call)


class Stopping(Unavailable):
    """503: this process is stopping and takes no new job (another replica or the
    restarted process will)."""

    kind = "stopping"


class JobRunner:
    """Queues jobs in the store and runs them on this process's job threads."""

    def __init__(self, store: JobStore, call: Callable[[], Call], runner: str,
                 workers: int, queue: int, on_status: StatusHook = _no_hook,
                 rebuild: Rebuild | None = None) -> None:
        self.store = store
        self.call = call  # returns the current call seam, so later wrappers apply
        self.runner = runner
        self.capacity = workers + queue
        self.on_status = on_status
        self.rebuild = rebuild  # stored call -> (spec, context), to adopt orphaned jobs
        self.stopping_since: float | None = None  # time.monotonic() of the stop signal
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mtp-job")
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._idle = threading.Condition(self._lock)
        self._give_up = threading.Event()  # set at the end of a stop: writes are not retried
        self._refusing = False  # the store refuses new jobs: logged once per spell

    def submit(self, spec: ServiceSpec, ctx: Context, owner: str) -> tuple[Job, Future]:
        """Store a queued job and schedule it; Saturated when this process is full."""
        if self.stopping_since is not None:
            raise Stopping("this process is stopping and takes no new job; retry shortly")
        if not self._slots.acquire(blocking=False):
            raise Saturated(f"the job queue is full ({self.capacity} jobs); retry shortly")
        job = Job(id=new_job_id(), tenant=ctx.tenant_id, service=spec.name,
                  operation=ctx.operation, owner=owner, request_id=ctx.request_id,
                  created=time.time(), runner=self.runner, auth_method=ctx.auth_method,
                  call=call_of(ctx))
        try:
            self.store.create(job)
        except Exception as exc:
            self._slots.release()
            if not self._refusing:  # a full disk refuses every call: one line, not one each
                log.error("the job store refuses new jobs (%s: %s); async calls are 503",
                          type(exc).__name__, exc, exc_info=not disk_trouble(exc))
            self._refusing = True
            raise Unavailable("the job store is unavailable") from exc
        if self._refusing:
            self._refusing = False
            log.warning("the job store takes new jobs again")
        try:
            future = self._schedule(job, spec, ctx)
        except RuntimeError as exc:
            # Shutting down, or no thread could start: the job never runs, so it must not
            # stay queued, and its slot comes back (else 500 and a slot lost per call).
            self._slots.release()
            self.store.cancel(job.id)
            raise Saturated("this worker takes no more jobs; retry shortly") from exc
        self.on_status(job.tenant, job.service, job.operation, job.status)
        return job, future

    def _schedule(self, job: Job, spec: ServiceSpec | None, ctx: Context | None) -> Future:
        context = contextvars.copy_context()
        return self._executor.submit(context.run, self._run, job, spec, ctx)

    def adopt(self) -> int:
        """Take queued jobs whose process is gone, as far as this process has room."""
        if self.rebuild is None or self.stopping_since is not None:
            return 0
        orphans = getattr(self.store, "orphans", None)
        if orphans is None:
            return 0  # a shared (Redis) queue hands its jobs over by itself
        taken = 0
        for job in orphans(self.capacity):
            if not self._slots.acquire(blocking=False):
                break
            if not self.store.adopt(job.id, job.runner, self.runner):  # type: ignore[attr-defined]
                self._slots.release()  # another process was quicker
                continue
            job.runner = self.runner
            try:
                self._schedule(job, None, None)
            except RuntimeError:
                self._slots.release()  # shutting down: it stays queued for the next one
                break
            taken += 1
        if taken:
            log.info("adopted %d queued job(s) of a process that stopped", taken)
        return taken

    def _prepare(self, job: Job) -> tuple[ServiceSpec, Context] | None:
        """An adopted job's spec and context; a service that is gone fails the job."""
        assert self.rebuild is not None and job.call is not None
        try:
            return self.rebuild(job.call)
        except FrameworkError as exc:
            # The service went away (or broke) between accepting the job and running it.
            if self.store.claim(job.id, self.runner, time.time()):
                self.store.finish(job.id, FAILED, error=error_document(
                    Outcome(exc.status, error=exc), job.request_id))
                self.on_status(job.tenant, job.service, job.operation, FAILED)
            return None

    def _run(self, job: Job, spec: ServiceSpec | None, ctx: Context | None
             ) -> Outcome | None:
        try:
            if self.stopping_since is not None:
                return None  # not started: stays queued for the next process
            if spec is None or ctx is None:
                prepared = self._prepare(job)
                if prepared is None:
                    return None
                spec, ctx = prepared
                logs.REQUEST_ID.set(job.request_id)
            ctx.deadline = time.monotonic() + spec.timeout
            if not self._write(job, "start", lambda: self._claim(job, spec)):
                return None  # cancelled while queued, reaped, or this process is stopping
            self.on_status(job.tenant, job.service, job.operation, "running")
            outcome = traced(job.call or call_of(ctx), lambda: self.call()(spec, ctx))
            if outcome.ok and time.monotonic() > ctx.deadline:
                # Late results are not kept: a job obeys its timeout like a sync call.
                outcome = Outcome(504, error=_late(spec), wall=outcome.wall, cpu=outcome.cpu)
            if outcome.ok:
                status = SUCCEEDED
                body = outcome.body
                done = self._write(job, "record its result", lambda: self.store.finish(
                    job.id, SUCCEEDED, result_json=body))
            else:
                status = FAILED
                doc = error_document(outcome, job.request_id)
                done = self._write(job, "record its error", lambda: self.store.finish(
                    job.id, FAILED, error=doc))
            if done:
                self.on_status(job.tenant, job.service, job.operation, status)
            return outcome
        except Exception as exc:
            if disk_trouble(exc):
                log.error("job %s could not be recorded: %s", job.id, exc)
            else:
                log.exception("job %s could not be recorded", job.id)
            return None
        finally:
            with self._lock:
                self._running.discard(job.id)
                self._idle.notify_all()
            self._slots.release()

    def _claim(self, job: Job, spec: ServiceSpec) -> bool:
        with self._lock:  # drain() sees every job that starts before it looks
            if self.stopping_since is not None:
                return False  # not started: stays queued for the next process
            if not self.store.claim(job.id, self.runner, time.time() + spec.timeout):
                return False
            self._running.add(job.id)
            return True

    def _write(self, job: Job, what: str, write: Callable[[], bool]) -> bool:
        """A job's store write; while the data disk is full it is retried (the result
        waits in memory) until it works or this process stops."""
        failing = False
        while True:
            try:
                done = write()
            except Exception as exc:
                if not disk_trouble(exc) or self._give_up.is_set():
                    raise  # the stop's end: a cut-off job, drain or the next start fails it
                if not failing:
                    log.error("job %s: cannot %s, the data disk is full (%s); retrying",
                              job.id, what, exc)
                failing = True
                self._give_up.wait(WRITE_RETRY)
                continue
            if failing:
                log.warning("job %s: could %s again", job.id, what)
            return done

    def stop_accepting(self) -> None:
        """The stop signal came: new async calls are 503 from now on."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()

    def drain(self, until: float) -> bool:
        """Graceful stop: no new job, queued ones stay queued (for the next process),
        running ones may finish until ``until`` (time.monotonic()).

        Jobs still running then were cut off: they are failed ``interrupted`` now
        (the process is about to go). True when nothing was cut off.
        """
        self.stop_accepting()
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            while self._running and time.monotonic() < until:
                self._idle.wait(min(1.0, max(0.0, until - time.monotonic())))
            cut = sorted(self._running)
        self._give_up.set()
        if not cut:
            return True
        try:
            n = self.store.fail(cut, INTERRUPTED,
                                "the process running this job stopped before it finished")
        except Exception as exc:  # the store is gone too: the next start reaps them
            log.error("could not mark %d cut-off job(s) interrupted: %s", len(cut), exc)
            return False
        log.warning("stopped with %d job(s) still running: marked interrupted", n)
        return False

    def shutdown(self) -> None:
        """Stop the job threads; queued jobs stay queued for the next process to adopt."""
        self._give_up.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _late(spec: ServiceSpec) -> DeadlineExceeded:
    return DeadlineExceeded(f"service {spec.name!r} did not finish within {spec.timeout:g}s")


class Reaper:
    """Periodically fails cut-off jobs of dead processes, adopts their queued ones
    (``adopt``), and purges old finished jobs."""

    def __init__(self, store: JobStore, retention: float, interval: float = 5.0,
                 adopt: Callable[[], int] | None = None) -> None:
        self.store, self.retention, self.interval = store, retention, interval
        self.adopt = adopt
        self._sweeping: Cancel | None = None  # its chore on the process's reaper thread
        self._failing = False

    def sweep(self) -> int:
        """One pass; returns how many jobs were failed."""
        try:
            failed = self.store.reap()
            if self.adopt is not None:
                self.adopt()
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
        """Sweep now, then every ``interval`` seconds on the process's reaper thread."""
        self.sweep()
        self._sweeping = REAPER.every(self.interval, self.sweep)

    def stop(self) -> None:
        if self._sweeping is not None:
            self._sweeping()
            self._sweeping = None
