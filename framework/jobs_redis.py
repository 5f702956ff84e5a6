"""Async jobs shared by every replica: job records in Redis, work through RQ.

With ``MTP_REDIS_URL`` the framework does not run jobs itself. A call is stored
(one hash per job) and enqueued on the tenant's RQ queue in one MULTI/EXEC, so a
job is never recorded without being queued or queued without a record; any
``mtp worker`` runs it with the same service loader, context and execution
seam as the framework (:class:`JobWorker`). Any replica can poll it.

State changes are one Lua script each (:data:`TRANSITION_LUA`): claim
(queued -> running), finish (running -> succeeded/failed), cancel (queued ->
cancelled, removing the RQ job from its queue in the same script, so a worker
either never sees it or finds it cancelled), fail and requeue. Finished jobs
expire after the retention; small sorted sets per status give the counts.

A worker that dies mid-job leaves an RQ execution whose heartbeat stops; RQ's
abandoned-job handling (``StartedJobRegistry.cleanup``, run by every
replica's reaper) calls :func:`on_failure`: the job is failed ``interrupted``,
unless its service declares ``idempotent = true``, in which case it goes back to
``queued`` and RQ's ``Retry`` runs it again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import redis
from redis import BlockingConnectionPool, Redis
from redis.driver_info import DriverInfo
from redis.exceptions import NoPermissionError, RedisError
from rq import Callback, Queue, Retry
from rq.exceptions import AbandonedJobError
from rq.job import Job as RqJob
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException, TimerDeathPenalty

from framework import depstate, logs, metrics
from framework.context import Context
from framework.errors import DeadlineExceeded, FrameworkError, Saturated, Unavailable
from framework.execute import Outcome
from framework.jobrunner import (
    StatusHook,
    Stopping,
    call_of,
    context_of,
    error_document,
    traced,
)
from framework.jobs import (
    CANCELLED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    Job,
    new_job_id,
    redis_index,
    runner_alive,
)
from framework.redis_wait import Outage
from framework.registry import ServiceSpec
from framework.runtime import Runtime
from framework.settings import Settings
from framework.tenant_config import TenantConfig

log = logging.getLogger("mtp.framework.jobs")

RETRIES = 3  # extra runs of an idempotent job whose worker died
TIMEOUT_MARGIN = 5  # RQ kills a work horse this long after the service's timeout
POOL_WAIT = 5.0
# Seconds after Redis is back before a silent job counts as abandoned: a worker's
# heartbeat interval, RQ's grace and the worker's longest retry pause, with margin.
OUTAGE_GRACE = 10
WAIT_POLL = (0.01, 0.1)  # first and longest pause while waiting for a result

# KEYS[1] job hash, optional KEYS[2] RQ queue list and KEYS[3] RQ job hash (cancel).
# ARGV: id, index prefix, allowed old statuses (comma list), new status, now,
#       ttl seconds (0: keep), then field/value pairs ('' deletes the field).
TRANSITION_LUA = """
local old = redis.call('HGET', KEYS[1], 'status')
if not old then return false end
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do
  if s == old then allowed = true end
  -- '~RUNNER': a job marked interrupted while RUNNER still ran it (its heartbeat
  -- stopped during a Redis outage) takes RUNNER's late result after all.
  if string.sub(s, 1, 1) == '~' and old == 'failed'
     and redis.call('HGET', KEYS[1], 'runner') == string.sub(s, 2)
     and string.find(redis.call('HGET', KEYS[1], 'error') or '', '"interrupted"', 1, true)
  then allowed = true end
end
if not allowed then return false end
local id, prefix, new, now, ttl = ARGV[1], ARGV[2], ARGV[4], ARGV[5], tonumber(ARGV[6])
if #KEYS == 3 then
  redis.call('LREM', KEYS[2], 0, id)
  redis.call('HSET', KEYS[3], 'status', 'canceled')
  if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
end
redis.call('HSET', KEYS[1], 'status', new)
for i = 7, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('ZREM', prefix .. old, id)
redis.call('ZADD', prefix .. new, now, id)
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
return old
"""


def connect(url: str, pool_size: int = 32) -> Redis:
    """A bounded, thread-safe client (RQ wants bytes, not decoded strings)."""
    return Redis(connection_pool=BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=POOL_WAIT, socket_connect_timeout=2.0,
        health_check_interval=30,
        # Given, so each new connection (every process opens its own) does not look the
        # version up in the package metadata again (~9 ms each).
        driver_info=DriverInfo(lib_version=redis.__version__)))


def queue_name(tenant: str) -> str:
    return f"mtp-{tenant}"


# Redis for jobs, as this process sees it: one log line per outage, not one per call.
REDIS_STATE = depstate.dependency("redis_jobs", log)


def _refused(exc: RedisError, detail: str = "the job store (Redis) is unavailable"
             ) -> Unavailable:
    """The 503 of a call Redis failed; the outage is logged once, the call counted."""
    # The exception's class only: a message may carry the URL (with a password).
    REDIS_STATE.failed(type(exc).__name__)
    REDIS_STATE.refused()
    return Unavailable(detail)


class StoredError(FrameworkError):
    """A failed job's problem document, raised again for a ``wait=N`` answer."""

    def __init__(self, doc: dict[str, Any]) -> None:
        extra = {k: v for k, v in doc.items()
                 if k not in ("type", "title", "status", "detail", "request_id")}
        super().__init__(str(doc.get("detail", "")), **extra)
        self.status = int(doc.get("status", 500))
        self.kind = str(doc.get("type", "")).rpartition(":")[2] or None


class RedisJobStore:
    """The :class:`~framework.jobs.JobStore` protocol on Redis, for one tenant."""

    def __init__(self, client: Redis, tenant: str, retention: int) -> None:
        self.client = client
        self.tenant = tenant
        self.retention = retention
        self.prefix = f"mtp:{tenant}:"
        self.index = redis_index(tenant)
        # JSON, not RQ's default pickle: a job's arguments are plain JSON, and unpickling
        # what Redis holds would let anyone who can write to Redis run code in workers.
        self.queue = Queue(queue_name(tenant), connection=client, serializer=JSONSerializer)
        self._transition = client.register_script(TRANSITION_LUA)
        self._outage_seen = False
        self._hold_until = 0.0
        self._info_refused = False  # a tenant's ACL user may not run INFO

    def key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def usable(self) -> bool:
        try:
            return bool(self.client.ping())
        except RedisError:
            return False

    def create(self, job: Job, pipeline: Any = None) -> None:
        pipe = pipeline if pipeline is not None else self.client.pipeline()
        fields = {k: v for k, v in _fields(job).items() if v != ""}
        pipe.hset(self.key(job.id), mapping=fields)
        pipe.zadd(self.index + job.status, {job.id: job.created})
        if pipeline is None:
            pipe.execute()

    def get(self, job_id: str) -> Job | None:
        try:
            raw = self.client.hgetall(self.key(job_id))
        except RedisError as exc:  # GET /jobs, DELETE /jobs, wait=N: 503, not 500
            raise _refused(exc) from exc
        REDIS_STATE.ok()
        if not raw:
            return None
        return _job(job_id, {k.decode(): v.decode() for k, v in raw.items()})

    def _move(self, job_id: str, old: Iterable[str], new: str, ttl: int = 0,
              keys: Iterable[str] = (), **fields: Any) -> bool:
        args: list[Any] = [job_id, self.index, ",".join(old), new, repr(time.time()), ttl]
        for name, value in fields.items():
            args += [name, "" if value is None else value]
        return self._transition(keys=[self.key(job_id), *keys], args=args) is not None

    def claim(self, job_id: str, runner: str, deadline: float) -> bool:
        return self._move(job_id, [QUEUED], RUNNING, started=repr(time.time()), runner=runner,
                          deadline=repr(deadline))

    def finish(self, job_id: str, status: str, result_json: bytes | None = None,
               error: dict[str, Any] | None = None, runner: str = "") -> bool:
        """running -> ``status``; with ``runner``, also over an ``interrupted`` mark that
        was set while that runner, cut off from Redis, was still running the job."""
        old = [RUNNING, f"~{runner}"] if runner else [RUNNING]
        return self._move(job_id, old, status, self.retention,
                          result=result_json.decode() if result_json is not None else None,
                          error=_dump(error), finished=repr(time.time()))

    def cancel(self, job_id: str) -> bool:
        try:
            return self._move(job_id, [QUEUED], CANCELLED, self.retention,
                              keys=[self.queue.key, RqJob.key_for(job_id)],
                              finished=repr(time.time()))
        except RedisError as exc:
            raise _refused(exc) from exc

    def fail(self, job_ids: Iterable[str], reason: str, detail: str,
             status_code: int = 500) -> int:
        """Mark unfinished jobs failed with ``reason`` (interrupted, deadline...)."""
        error = _dump({"status": status_code, "reason": reason, "detail": detail})
        now = repr(time.time())
        return sum(self._move(job_id, [QUEUED, RUNNING], FAILED, self.retention, error=error,
                              finished=now) for job_id in job_ids)

    def requeue(self, job_id: str) -> bool:
        """running -> queued: an idempotent job's worker died; RQ runs it again."""
        return self._move(job_id, [RUNNING], QUEUED, started=None, runner=None, deadline=None)

    def reap(self, alive: Any = runner_alive) -> int:
        """RQ's abandoned-job handling for executions whose heartbeat stopped."""
        registry = StartedJobRegistry(queue=self.queue, death_penalty_class=TimerDeathPenalty)
        try:
            expired = registry.get_expired_job_ids()
            uptime = self._uptime()
        except RedisError:
            self._outage_seen = True
            raise
        if self._outage_seen or uptime < OUTAGE_GRACE:
            # Redis was away: no worker could beat, so every running job looks abandoned.
            # Workers that lived through it beat again within seconds; only a job whose
            # worker stays silent past the grace is handed to the abandoned-job handling.
            self._outage_seen = False
            self._hold_until = time.monotonic() + OUTAGE_GRACE - min(uptime, OUTAGE_GRACE)
        if time.monotonic() < self._hold_until:
            return 0
        if expired:
            registry.cleanup()
        return len(expired)

    def _uptime(self) -> int:
        """Seconds Redis has been up; for a tenant's ACL user, which may not run INFO, the
        age of the connection asked (a lower bound: a restarted Redis has only new ones)."""
        if not self._info_refused:
            try:
                return int(self.client.info("server").get("uptime_in_seconds", OUTAGE_GRACE))
            except NoPermissionError:
                self._info_refused = True
        return int(self.client.client_info().get("age", OUTAGE_GRACE))

    def purge(self, older_than: float) -> int:
        # The job hashes expire by themselves; only the count indexes need trimming.
        pipe = self.client.pipeline()
        for status in FINISHED:
            pipe.zremrangebyscore(self.index + status, "-inf", older_than)
        return sum(pipe.execute())

    def counts(self) -> dict[str, int]:
        pipe = self.client.pipeline()
        for status in STATUSES:
            pipe.zcard(self.index + status)
        try:
            return dict(zip(STATUSES, pipe.execute(), strict=True))
        except RedisError as exc:  # GET /metrics: 503 while Redis is away
            raise _refused(exc) from exc


class JobWaiter:
    """The ``future`` of a queued job: polls the store for ``Prefer: wait=N``."""

    def __init__(self, store: RedisJobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id

    def result(self, timeout: float) -> Outcome | None:
        """The finished call's outcome; FutureTimeout when it is not done in time."""
        deadline = time.monotonic() + timeout
        pause = WAIT_POLL[0]
        while True:
            job = self.store.get(self.job_id)
            if job is not None and job.status in FINISHED:
                return outcome_of(job)
            left = deadline - time.monotonic()
            if left <= 0:
                raise FutureTimeout
            time.sleep(min(pause, left))
            pause = min(pause * 2, WAIT_POLL[1])


def outcome_of(job: Job) -> Outcome | None:
    """A finished job as the sync answer it stands for (None when cancelled)."""
    if job.status == SUCCEEDED:
        return Outcome(200, body=json.dumps(job.result, separators=(",", ":")).encode())
    if job.status == FAILED:
        return Outcome(int((job.error or {}).get("status", 500)),
                       error=StoredError(job.error or {}))
    return None


class RedisJobRunner:
    """Enqueues async calls on the tenant's RQ queue (bounded) instead of local threads."""

    def __init__(self, store: RedisJobStore, tenant: TenantConfig, max_queued: int,
                 on_status: StatusHook | None = None) -> None:
        self.store, self.tenant, self.max_queued = store, tenant, max_queued
        self.on_status = on_status
        self.stopping_since: float | None = None
        # (jobs that workers start and finish are counted from the store at scrape time)

    def submit(self, spec: ServiceSpec, ctx: Context, owner: str) -> tuple[Job, JobWaiter]:
        """Record and enqueue a job; 503 when the shared queue is full or Redis is away."""
        if self.stopping_since is not None:
            raise Stopping("this process is stopping and takes no new job; retry shortly")
        store = self.store
        try:
            waiting = store.queue.count
        except RedisError as exc:
            raise _refused(exc, "the job queue (Redis) is unavailable") from exc
        if waiting >= self.max_queued:
            raise Saturated(f"the job queue is full ({self.max_queued} jobs); retry shortly")
        job = Job(id=new_job_id(), tenant=ctx.tenant_id, service=spec.name,
                  operation=ctx.operation, owner=owner, request_id=ctx.request_id,
                  created=time.time(), auth_method=ctx.auth_method)
        idempotent = self.tenant.service(spec.name).idempotent
        try:
            with store.client.pipeline() as pipe:
                # One MULTI/EXEC (RQ opens it, so its commands come first).
                store.queue.enqueue_call(
                    "framework.jobs_redis.perform", args=(job.id, call_of(ctx)),
                    job_id=job.id, timeout=math.ceil(spec.timeout) + TIMEOUT_MARGIN,
                    result_ttl=0, failure_ttl=store.retention,
                    retry=Retry(max=RETRIES) if idempotent else None,
                    on_failure=Callback(on_failure), meta={"tenant": job.tenant},
                    pipeline=pipe)
                store.create(job, pipe)
                pipe.execute()
        except RedisError as exc:
            log.debug("could not enqueue job %s (%s)", job.id, type(exc).__name__)
            raise _refused(exc, "the job queue (Redis) is unavailable") from exc
        REDIS_STATE.ok()
        if self.on_status is not None:
            self.on_status(job.tenant, job.service, job.operation, job.status)
        return job, JobWaiter(store, job.id)

    def stop_accepting(self) -> None:
        """The stop signal came: new async calls are 503 (another replica takes them)."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()

    def drain(self, until: float) -> bool:
        """Nothing runs here: queued jobs stay in Redis for any worker."""
        self.stop_accepting()
        return True

    def adopt(self) -> int:
        """RQ hands a dead worker's jobs over by itself."""
        return 0

    def shutdown(self) -> None:
        """Nothing runs here: queued jobs stay in Redis for any worker."""


@dataclass
class JobWorker:
    """What an ``mtp worker`` process runs a job with: the framework's own runtime."""

    rt: Runtime  # registry, executor seams (metered, breaker) and the live tenant config
    store: RedisJobStore
    close: Callable[[], Any] = lambda: None  # at exit: the usage meter's last flush
    outage: Outage = field(default_factory=lambda: Outage(log, "the job worker"))

    def context(self, spec: ServiceSpec, call: dict[str, Any]) -> Context:
        """The handler's context, rebuilt from the identity stored with the job."""
        return context_of(self.rt.tenant, spec, call)

    def run(self, job_id: str, call: dict[str, Any], runner: str) -> str | None:
        """Claim and run one job; returns its final status (None: not ours to run)."""
        logs.REQUEST_ID.set(call["request_id"])
        store, until = self.store, self.outage.until
        # Every write below waits out a Redis outage: a job that was dequeued is claimed,
        # and one whose handler finished keeps its result until Redis takes it.
        try:
            spec = self.rt.registry.resolve(call["service"])
        except FrameworkError as exc:
            # The service went away (or broke) between accepting the job and running it.
            doc = error_document(Outcome(exc.status, error=exc), call["request_id"])
            until(lambda: store.claim(job_id, runner, time.time()))
            until(lambda: store.finish(job_id, FAILED, error=doc, runner=runner))
            return FAILED
        if not until(lambda: store.claim(job_id, runner, time.time() + spec.timeout)):
            return None  # cancelled while queued, or already handled
        ctx = self.context(spec, call)
        outcome = traced(call, lambda: self.rt.executor.call(spec, ctx))
        if outcome.ok and time.monotonic() > ctx.deadline:
            outcome = Outcome(504, error=DeadlineExceeded(
                f"service {spec.name!r} did not finish within {spec.timeout:g}s"))
        if outcome.ok:
            body = outcome.body
            until(lambda: store.finish(job_id, SUCCEEDED, result_json=body, runner=runner))
            return SUCCEEDED
        doc = error_document(outcome, call["request_id"])
        until(lambda: store.finish(job_id, FAILED, error=doc, runner=runner))
        return FAILED


_WORKER: JobWorker | None = None


def install_worker(worker: JobWorker) -> None:
    """Make ``worker`` the one :func:`perform` uses in this process (set by ``mtp worker``)."""
    global _WORKER
    _WORKER = worker


def perform(job_id: str, call: dict[str, Any]) -> str | None:
    """The RQ job function: runs in an ``mtp worker`` work horse."""
    if _WORKER is None:
        raise RuntimeError("perform runs only inside `mtp worker`")
    from rq import get_current_job

    current = get_current_job()
    runner = (current.worker_name if current is not None else None) or "rq"
    return _WORKER.run(job_id, call, runner)


def on_failure(job: RqJob, connection: Redis, exc_type: type, exc: BaseException,
               tb: Any) -> None:
    """RQ failure callback: abandoned (its worker died), timed out, or crashed."""
    tenant = (job.meta or {}).get("tenant", "")
    store = RedisJobStore(connection, tenant, _retention(job))
    if isinstance(exc, AbandonedJobError):
        if job.retries_left:
            store.requeue(job.id)
            log.warning("job %s: its worker stopped; the service is idempotent, retrying",
                        job.id)
            return
        store.fail([job.id], INTERRUPTED, "the process running this job stopped")
    elif isinstance(exc, JobTimeoutException):
        store.fail([job.id], "deadline", "the job did not finish within its timeout", 504)
    else:
        store.fail([job.id], "worker-error", "the worker could not run this job")


def _retention(job: RqJob) -> int:
    ttl = job.failure_ttl
    return int(ttl) if ttl and ttl > 0 else 7 * 86400


def redis_jobs(settings: Settings, tenant: TenantConfig) -> tuple[RedisJobStore, RedisJobRunner]:
    """The store and runner a framework worker uses when MTP_REDIS_URL is set."""
    client = connect(settings.redis_url, pool_size=2 * settings.threads + 4)
    store = RedisJobStore(client, tenant.tenant_id, settings.job_retention)
    return store, RedisJobRunner(store, tenant, settings.job_queue * settings.workers,
                                 on_status=metrics.job_status)


def _fields(job: Job) -> dict[str, str]:
    return {
        "tenant": job.tenant, "service": job.service, "operation": job.operation or "",
        "owner": job.owner, "request_id": job.request_id, "status": job.status,
        "created": repr(job.created), "runner": job.runner, "auth_method": job.auth_method,
    }


def _job(job_id: str, raw: dict[str, str]) -> Job:
    def num(name: str) -> float | None:
        value = raw.get(name)
        return float(value) if value else None

    return Job(id=job_id, tenant=raw.get("tenant", ""), service=raw.get("service", ""),
               operation=raw.get("operation") or None, owner=raw.get("owner", ""),
               request_id=raw.get("request_id", ""), status=raw.get("status", QUEUED),
               result=_load(raw.get("result")), error=_load(raw.get("error")),
               created=num("created") or 0.0, started=num("started"),
               finished=num("finished"), runner=raw.get("runner", ""), deadline=num("deadline"),
               # a hash from before the method was recorded has none: ''
               auth_method=raw.get("auth_method", ""))


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)
