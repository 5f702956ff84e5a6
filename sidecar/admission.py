"""Admission: at most as many calls in the framework as it has threads to run them.

A sync handler runs on the gunicorn thread that took the request, and one that
hangs keeps its thread until it returns. The sidecar counts the calls it has
sent and not yet seen answered, also those whose client was already answered
504 at the deadline. Past ``MTP_WORKERS`` x ``MTP_THREADS`` a call waits up to
WAIT seconds for a slot (first come, first served; a slot is handed straight to
the next waiter), so a burst of quick calls is served, not refused; when no slot
frees in time, or more than ``4 x limit`` calls already wait, the answer is 503
with Retry-After instead of a place in gunicorn's queue behind hung handlers.
The sidecar's own routes (/healthz, /readyz, /metrics) are not admitted here:
they always get through. One event loop, so plain counters.
"""

from __future__ import annotations

import asyncio
from collections import deque

from framework.settings import Settings
from sidecar.errors import Unavailable

RETRY_AFTER = "1"
WAIT = 0.5  # seconds a call may wait for a free framework thread
QUEUE_FACTOR = 4  # calls that may wait, per slot


class Saturated(Unavailable):
    """503: every framework thread holds a call; retry shortly."""

    detail = "the service is saturated; retry shortly"
    kind = "saturated"

    def __init__(self, limit: int) -> None:
        super().__init__(f"admission full ({limit} calls in flight)",
                         headers={"Retry-After": RETRY_AFTER})


class Admission:
    """Calls in flight to the framework, up to ``limit``; a short, bounded wait past it."""

    def __init__(self, limit: int, wait: float = WAIT, queue: int | None = None) -> None:
        self.limit = limit
        self.wait = wait
        self.queue = QUEUE_FACTOR * limit if queue is None else queue
        self.busy = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @classmethod
    def for_settings(cls, settings: Settings) -> Admission:
        """One slot per framework request thread."""
        return cls(settings.workers * settings.threads)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def enter(self) -> bool:
        """Take a free slot now; False when every slot is taken (or promised to a waiter)."""
        if self.busy >= self.limit or self._waiters:
            return False
        self.busy += 1
        return True

    async def admit(self) -> bool:
        """Take a slot, waiting up to ``wait`` seconds for one; False when none came."""
        if self.enter():
            return True
        if self.wait <= 0 or self.waiting >= self.queue:
            return False
        loop = asyncio.get_running_loop()
        ticket: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(ticket)
        timer = loop.call_later(self.wait, _expire, ticket)
        try:
            return await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled() and ticket.result():
                self.leave()  # handed a slot just as the caller went away: pass it on
            raise
        finally:
            timer.cancel()

    def leave(self) -> None:
        """Give a slot back (the framework answered, or the call was given up)."""
        while self._waiters:
            ticket = self._waiters.popleft()
            if not ticket.done():
                ticket.set_result(True)  # the slot goes to the next waiter, still counted
                return
        self.busy -= 1


def _expire(ticket: asyncio.Future[bool]) -> None:
    if not ticket.done():
        ticket.set_result(False)
