"""Sync calls in flight, and the one thread per worker that notices those past their deadline.

A sync handler runs on the gunicorn thread that took the request and cannot be
stopped (Python threads cannot be killed). The sidecar answers the client 504 at
the deadline; here, the call is counted as a deadline miss (circuit breaker,
log) as soon as the deadline passes, not only when, or if, the handler returns.
The process's one watchdog thread (framework/ticker.py) scans the deadlines (start +
timeout) of the calls in flight every ``interval`` seconds: no timer or thread per
call (nor per tenant app in a shared process), and a call costs two dict operations
under an uncontended lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

from framework.ticker import WATCHDOG, Cancel

log = logging.getLogger("mtp.framework.watchdog")

INTERVAL = 0.25  # seconds between scans: how late past its deadline a miss is counted


@dataclass(eq=False, slots=True)
class Entry:
    """One sync call in flight."""

    service: str
    operation: str | None
    deadline: float  # time.monotonic()
    request_id: str = ""
    overdue: bool = False  # counted by the watchdog already


Overdue = Callable[[Entry], None]


class InFlight:
    """The sync calls of one worker process that have not returned yet."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.on_overdue: Overdue = lambda entry: None  # seam: the breaker layer counts misses
        self._calls: dict[int, Entry] = {}
        self._ids = count()
        self._lock = threading.Lock()
        self._scanning: Cancel | None = None  # its chore on the process's watchdog thread

    def __len__(self) -> int:
        return len(self._calls)

    def enter(self, service: str, operation: str | None, deadline: float,
              request_id: str = "") -> int:
        """Register a call; the returned key goes to :meth:`leave`."""
        if self._scanning is None:
            self._start()
        key = next(self._ids)
        entry = Entry(service, operation, deadline, request_id)
        with self._lock:
            self._calls[key] = entry
        return key

    def leave(self, key: int) -> bool:
        """The call returned; True when the watchdog had already counted it overdue."""
        with self._lock:
            entry = self._calls.pop(key)
        return entry.overdue

    def overdue(self) -> int:
        """Calls still running past their deadline right now."""
        now = time.monotonic()
        return sum(1 for e in list(self._calls.values()) if e.deadline < now)

    def scan(self) -> list[Entry]:
        """Mark and report the calls that passed their deadline since the last scan."""
        now = time.monotonic()
        found = []
        with self._lock:
            for entry in self._calls.values():
                if not entry.overdue and entry.deadline < now:
                    entry.overdue = True  # under the lock: leave() sees it, counted once
                    found.append(entry)
        for entry in found:
            log.warning("service %s is still running %.1fs past its deadline",
                        entry.service, now - entry.deadline,
                        extra={"service": entry.service, "operation": entry.operation,
                               "request_id": entry.request_id})
            try:
                self.on_overdue(entry)
            except Exception:  # a failing listener must not end the watching
                log.exception("deadline-miss listener failed")
        return found

    def _start(self) -> None:
        with self._lock:
            if self._scanning is None:
                self._scanning = WATCHDOG.every(self.interval, self.scan)

    def stop(self) -> None:
        """End the scanning (an app closed in a shared process; tests)."""
        with self._lock:
            scanning, self._scanning = self._scanning, _stopped
        if scanning is not None:
            scanning()


def _stopped() -> None:
    """The scan of a stopped watchdog: nothing to cancel, and no new one starts."""
