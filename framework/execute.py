"""Running handlers: one call -> an :class:`Outcome`; sync calls on the request thread.

A sync handler runs on the gunicorn thread that took the request, with no
hand-over. The sidecar owns the deadline: it answers the client 504 when the
framework has not answered by then, and admits at most as many calls as the
framework has threads (503 past that), so hung handlers cannot pile up. Here a
call that returns after its deadline is answered (and recorded) as 504, and the
watchdog (framework/watchdog.py) counts calls still running past it.

Two seams, plain attributes, for layers that wrap execution (usage metering,
circuit breaker): ``Executor.call`` runs one call in the current thread (used by
sync calls and by job threads); ``Executor.sync`` is the whole sync path.
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
    ServiceFailed,
    new_error_id,
)
from framework.registry import ServiceSpec
from framework.watchdog import InFlight

log = logging.getLogger("mtp.framework.execute")


@dataclass
class Outcome:
    """What one call produced: status, the JSON body or the error, and its cost."""

    status: int
    body: bytes | None = None  # the encoded result when status is 200
    error: FrameworkError | None = None
    wall: float = 0.0  # seconds the handler ran
    cpu: float = 0.0  # CPU seconds of the handler thread (time.thread_time)
    overdue: bool = False  # the watchdog counted it as a deadline miss while it still ran

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


def late(spec: ServiceSpec, outcome: Outcome, overdue: bool = False) -> Outcome:
    """A call that returned after its deadline: 504, as the client was answered."""
    return Outcome(504, error=DeadlineExceeded(
        f"service {spec.name!r} did not answer within {spec.timeout:g}s"),
        wall=outcome.wall, cpu=outcome.cpu, overdue=overdue)


class Executor:
    """The execution seams of one worker process."""

    def __init__(self, max_result: int) -> None:
        self.max_result = max_result
        self.inflight = InFlight()
        self.call: Call = self.run_one
        self.sync: Call = self.run_sync

    def run_one(self, spec: ServiceSpec, ctx: Context) -> Outcome:
        """One call of ``spec.handle`` in the current thread."""
        return run_handler(spec, ctx, self.max_result)

    def run_sync(self, spec: ServiceSpec, ctx: Context) -> Outcome:
        """A sync call, on this (the request's) thread; 504 once past the deadline."""
        key = self.inflight.enter(spec.name, ctx.operation, ctx.deadline, ctx.request_id)
        try:
            outcome = self.call(spec, ctx)  # late-bound: a wrapper installed later is used
        finally:
            overdue = self.inflight.leave(key)
        if overdue or time.monotonic() > ctx.deadline:
            log.warning("service %s answered after its %.3gs deadline", spec.name, spec.timeout,
                        extra={"service": spec.name})
            return late(spec, outcome, overdue)
        return outcome

    def close(self) -> None:
        """Stop the watchdog thread."""
        self.inflight.stop()


def call_with_deadline(call: Call, spec: ServiceSpec, ctx: Context) -> Outcome:
    """``call`` on a daemon thread, waited for until ``ctx.deadline`` (504 after it).

    For in-process calls (``mtp invoke``, tenant tests): there is no sidecar to
    answer at the deadline. The thread of a handler that never returns is a
    daemon, so it does not keep the process alive.
    """
    box: list[Outcome] = []
    context = contextvars.copy_context()  # the request id follows into log lines

    def run() -> None:
        try:
            box.append(context.run(call, spec, ctx))
        except BaseException:  # the seams catch what handlers raise; this is a last guard
            error_id = new_error_id()
            log.exception("handler thread failed", extra={"error_id": error_id})
            box.append(Outcome(500, error=ServiceFailed("internal error", error_id)))

    thread = threading.Thread(target=run, name=f"mtp-invoke-{spec.name}", daemon=True)
    start = time.perf_counter()
    thread.start()
    # Capped: a wait past TIMEOUT_MAX (TIMEOUT = 10**10, "no limit") is OverflowError.
    thread.join(min(max(ctx.deadline - time.monotonic(), 0.0), threading.TIMEOUT_MAX))
    if not box:
        return late(spec, Outcome(504, wall=time.perf_counter() - start))
    if time.monotonic() > ctx.deadline:
        return late(spec, box[0])
    return box[0]
