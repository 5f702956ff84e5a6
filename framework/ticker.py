"""One thread per kind of periodic chore in a process, however many runtimes it holds.

A tenant process holds one runtime, but a pool's shared process holds one per tenant
(framework/pool/shared.py). With a thread per runtime for each chore (the deadline
watchdog, the usage flush, the job reaper), 600 tenant apps made 2,400 threads that
woke thousands of times a second and starved the request threads of the GIL: calls
ran past their 30 s deadline. A :class:`Ticker` runs every chore of its kind on one
daemon thread, each at its own interval; a chore that is slow delays only its kind.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("mtp.framework.ticker")

Cancel = Callable[[], None]


@dataclass(slots=True)
class _Chore:
    due: float  # time.monotonic()
    interval: float
    run: Callable[[], object]


class Ticker:
    """Runs registered chores periodically on one daemon thread (started on demand)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._chores: dict[int, _Chore] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        ref = weakref.ref(self)
        # Threads do not survive a fork: the child starts afresh (its runtimes register
        # again when they start their chores).
        os.register_at_fork(after_in_child=lambda: (t := ref()) and t._after_fork())

    def __len__(self) -> int:
        return len(self._chores)

    def every(self, interval: float, run: Callable[[], object]) -> Cancel:
        """Call ``run`` every ``interval`` seconds (the first time after one interval)."""
        with self._lock:
            key = next(self._ids)
            self._chores[key] = _Chore(time.monotonic() + interval, interval, run)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"mtp-{self.name}",
                                                daemon=True)
                self._thread.start()
        self._wake.set()  # it may be due before whatever the thread waits for now
        return lambda: self._cancel(key)

    def _cancel(self, key: int) -> None:
        with self._lock:
            self._chores.pop(key, None)

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                due = [c for c in self._chores.values() if c.due <= now]
                for chore in due:
                    chore.due = now + chore.interval
            for chore in due:
                try:
                    chore.run()
                except Exception:  # one failing chore must not end the others
                    log.exception("%s chore failed", self.name)
            with self._lock:
                pause = min((c.due for c in self._chores.values()), default=now + 60.0)
            self._wake.wait(max(0.0, pause - time.monotonic()))
            self._wake.clear()

    def _after_fork(self) -> None:
        self._chores = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None


# The process's tickers, one per kind of chore.
WATCHDOG = Ticker("watchdog")
USAGE_FLUSH = Ticker("usage-flush")
REAPER = Ticker("reaper")
