"""Running handlers: one call -> an :class:`Outcome`; sync calls on a bounded pool.

A sync call runs on a handler thread while the request thread waits until the
deadline. Past it the client gets 504 but the handler thread keeps running
(Python cannot kill a thread) and keeps its slot until it returns: the pool is
bounded, so hung handlers pile up to at most ``size`` threads, after which new
calls get 503 with Retry-After instead of more threads.

Two seams, plain attributes, for layers that wrap execution (usage metering,
circuit breaker): ``Executor.call`` runs one call in the current thread (used by
sync calls and by job threads); ``Executor.sync`` is the whole sync path
including 503/504.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from framework.context import Context
from framework.errors import (
    DeadlineExceeded,
    FrameworkError,
    InvalidResult,
    Saturated,
    ServiceFailed,
    new_error_id,
)
from framework.registry import ServiceSpec

log = logging.getLogger("mtp.framework.execute")


@dataclass
class Outcome:
    """What one call produced: status, the JSON body or the error, and its cost."""

    status: int
    body: bytes | None = None  # the encoded result when status is 200
    error: FrameworkError | None = None
    wall: float = 0.0  # seconds, including any wait for a handler thread
    cpu: float = 0.0  # CPU seconds of the handler thread (time.thread_time)
    finished: bool = True  # False: answered at the deadline, the handler still runs

    @property
    def ok(self) -> bool:
        return self.error is None


Call = Callable[[ServiceSpec, Context], Outcome]


def encode_result(result: Any, max_result: int) -> bytes:
    """The result as compact JSON; InvalidResult when it is not JSON or too big."""
    try:
        body = json.dumps(result, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidResult(f"the service returned a value that is not JSON "
                            f"({type(exc).__name__})") from None
    if len(body) > max_result:
        raise InvalidResult(
            f"the service's result is {len(body)} bytes, over the {max_result}-byte limit")
    return body


def run_handler(spec: ServiceSpec, ctx: Context, max_result: int,
                fn: Callable[[Any], Any] | None = None) -> Outcome:
    """Run ``fn`` (default ``spec.handle``) in this thread and encode what it returns."""
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    try:
        result = (fn or spec.handle)(ctx)
        body = encode_result(result, max_result)
        outcome = Outcome(200, body=body)
    except InvalidResult as exc:
        log.error("service %s: %s", spec.name, exc.detail,
                  extra={"error_id": exc.error_id, "service": spec.name})
        outcome = Outcome(500, error=exc)
    except FrameworkError as exc:
        # e.g. from context.call: the nested call's 403/404/508 is the answer's status.
        outcome = Outcome(exc.status, error=exc)
    except (Exception, SystemExit):
        error_id = new_error_id()
        # The traceback goes to the log under the error id, never to the client.
        log.exception("service %s raised", spec.name,
                      extra={"error_id": error_id, "service": spec.name,
                             "operation": ctx.operation})
        outcome = Outcome(500, error=ServiceFailed("the service raised an error", error_id))
    outcome.wall = time.perf_counter() - wall0
    outcome.cpu = time.thread_time() - cpu0
    return outcome


class _Call:
    """One handed-over call: the waiter blocks on ``done`` until ``outcome`` is set."""

    __slots__ = ("call", "context", "ctx", "done", "outcome", "spec")

    def __init__(self, call: Call, spec: ServiceSpec, ctx: Context) -> None:
        self.call, self.spec, self.ctx = call, spec, ctx
        self.context = contextvars.copy_context()  # the request id follows into log lines
        self.done = threading.Lock()
        self.done.acquire()
        self.outcome: Outcome | None = None


class _Thread:
    """A handler thread and the lock that hands it its next call."""

    __slots__ = ("go", "work")

    def __init__(self) -> None:
        self.go = threading.Lock()
        self.go.acquire()
        self.work: _Call | None = None


class HandlerPool:
    """At most ``size`` handler threads, running or abandoned at their deadline.

    Each thread waits on its own lock, so a hand-over is one release and one
    acquire each way (no queue, no Future). The threads are daemons: a handler
    that never returns does not keep a stopping worker process alive.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[_Thread] = []  # LIFO: the most recently used (warm) thread first
        self._lock = threading.Lock()
        self._started = 0
        self._closed = False

    @property
    def busy(self) -> int:
        """Handler threads running a call (or abandoned in one) right now."""
        return self._started - len(self._idle)

    def _take(self) -> _Thread | None:
        with self._lock:
            if self._closed:
                return None
            if self._idle:
                return self._idle.pop()
            if self._started >= self.size:
                return None
            self._started += 1
            number = self._started
        worker = _Thread()
        try:
            threading.Thread(target=self._loop, args=(worker,), daemon=True,
                             name=f"mtp-handler-{number}").start()
        except RuntimeError:
            # "can't start new thread" (a pids limit): this call is 503, and the slot is
            # given back, or the pool would shrink for good with every such failure.
            log.warning("could not start a handler thread")
            with self._lock:
                self._started -= 1
            return None
        return worker

    def _loop(self, worker: _Thread) -> None:
        while True:
            worker.go.acquire()
            work = worker.work
            if work is None:
                return  # shut down
            try:
                work.outcome = work.context.run(work.call, work.spec, work.ctx)
            except BaseException:  # the seams catch what handlers raise; this is a last guard
                error_id = new_error_id()
                log.exception("handler thread failed", extra={"error_id": error_id})
                work.outcome = Outcome(500, error=ServiceFailed("internal error", error_id))
            worker.work = None
            with self._lock:
                self._idle.append(worker)
            work.done.release()

    def run(self, call: Call, spec: ServiceSpec, ctx: Context) -> Outcome:
        """Run ``call`` on a handler thread; wait until ``ctx.deadline``."""
        start = time.perf_counter()
        worker = self._take()
        if worker is None:
            return Outcome(503, error=Saturated(
                f"all {self.size} handler threads are busy; retry shortly"))
        work = _Call(call, spec, ctx)
        worker.work = work
        worker.go.release()
        # Capped: a lock wait past TIMEOUT_MAX (TIMEOUT = 10**10, "no limit") is OverflowError.
        wait = min(max(ctx.deadline - time.monotonic(), 0.0), threading.TIMEOUT_MAX)
        if not work.done.acquire(timeout=wait):
            log.warning("service %s passed its %.3gs deadline; its thread keeps running",
                        spec.name, spec.timeout, extra={"service": spec.name})
            return Outcome(504, error=DeadlineExceeded(
                f"service {spec.name!r} did not answer within {spec.timeout:g}s"),
                wall=time.perf_counter() - start, finished=False)
        outcome = work.outcome
        assert outcome is not None
        outcome.wall = time.perf_counter() - start
        return outcome

    def shutdown(self) -> None:
        """Stop taking work and let idle threads end; running handlers are not waited for."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.go.release()


class Executor:
    """The execution seams of one worker process."""

    def __init__(self, max_result: int, pool_size: int) -> None:
        self.max_result = max_result
        self.pool = HandlerPool(pool_size)
        self.call: Call = self.run_one
        self.sync: Call = self.run_sync

    def run_one(self, spec: ServiceSpec, ctx: Context) -> Outcome:
        """One call of ``spec.handle`` in the current thread."""
        return run_handler(spec, ctx, self.max_result)

    def run_sync(self, spec: ServiceSpec, ctx: Context) -> Outcome:
        """A sync call: on the bounded pool, answered by the deadline."""
        # Late-bound through self.call so a wrapper installed later is used.
        return self.pool.run(lambda s, c: self.call(s, c), spec, ctx)
