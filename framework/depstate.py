"""A dependency's state (up or down), logged once per transition, not once per request.

LDAP, a JWKS endpoint, Redis (limiter and jobs) and the billing webhook each get one
:class:`Dependency` per process (:func:`dependency`). Its client reports every call:
:meth:`Dependency.ok` after a success, :meth:`Dependency.failed` after a failure, and
:meth:`Dependency.refused` for each request the outage cost (refused with 503, or for
the limiter served under local limits). Only the transitions are logged (through the
client's logger, with a ``dependency`` and a ``state`` field): one line
when it goes down (with the first error) and one when it is back (with how long it
was down and how many requests were refused meanwhile), both at WARNING so that a log
filtered to warnings shows both ends. An outage under load is two lines, not one per
request.

Metrics read the same state: the sidecar's collector walks :func:`dependencies`; the
framework (gunicorn workers in prometheus multiprocess mode) adds a listener that keeps
multiprocess counters and gauges (see framework/metrics.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_LOG = logging.getLogger("mtp.dependency")

MAX_ERROR = 300  # characters of the first error kept for the log line

# (dependency name, "up" | "down" | "refused"): called on first use, every state change
# and every refusal.
Listener = Callable[[str, str], None]
_listeners: list[Listener] = []
_known: dict[str, Dependency] = {}
_known_lock = threading.Lock()


@dataclass
class Dependency:
    """The state machine of one dependency in this process (thread-safe)."""

    name: str
    clock: Callable[[], float] = time.monotonic
    log: logging.Logger = DEFAULT_LOG  # the client's: the line names where it came from
    up: bool = True
    refusals: int = 0  # since the process started
    _down_since: float = 0.0
    _refused_now: int = 0  # during the current outage
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ok(self) -> None:
        """A call succeeded: back up if it was down (logged once)."""
        with self._lock:  # uncontended in the common case: up and staying up
            if self.up:
                return
            self.up = True
            down_for, refused = self.clock() - self._down_since, self._refused_now
            self._refused_now = 0
        # At the level of the outage it ends: a log filtered to warnings shows both ends.
        self.log.warning("dependency %s reachable again after %.1f s; %d request(s) refused "
                    "meanwhile", self.name, down_for, refused,
                    extra={"dependency": self.name, "state": "up",
                           "down_seconds": round(down_for, 3), "refused": refused})
        _notify(self.name, "up")

    def failed(self, error: BaseException | str, note: str = "") -> None:
        """A call failed: down if it was up (logged once, with this first error).

        ``note`` says what the outage means (e.g. limits turn local); it goes into the
        message only, the ``error`` field holding the error alone.
        """
        with self._lock:
            if not self.up:
                return
            self.up = False
            self._down_since = self.clock()
            self._refused_now = 0
        text = (error if isinstance(error, str)
                else f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        text = text[:MAX_ERROR]
        self.log.warning("dependency %s is down: %s (%s)" if note else "dependency %s is down: %s",
                    self.name, *((note, text) if note else (text,)),
                    extra={"dependency": self.name, "state": "down", "error": text})
        _notify(self.name, "down")

    def refused(self) -> None:
        """One request the outage cost (counted, never logged on its own)."""
        with self._lock:
            self.refusals += 1
            self._refused_now += 1
        _notify(self.name, "refused")


def dependency(name: str, logger: logging.Logger | None = None, *,
               fresh: bool = False) -> Dependency:
    """This process's state of ``name``: created (up) on first use, logging to ``logger``.

    ``fresh``: a new client's own state, replacing the one before (a client made again
    starts up, as in a new process, and its outages are its own).
    """
    with _known_lock:  # once per client, at its construction
        found = None if fresh else _known.get(name)
        created = found is None
        if found is None:
            found = _known[name] = Dependency(name)
        if logger is not None:
            found.log = logger
    if created:
        _notify(name, "up")  # known from its first use, before any outage
    return found


def dependencies() -> list[Dependency]:
    """Every dependency this process has used, by name."""
    with _known_lock:
        return sorted(_known.values(), key=lambda d: d.name)


def listen(listener: Listener) -> None:
    """Call ``listener(name, event)`` on every transition and refusal from now on."""
    if listener not in _listeners:
        _listeners.append(listener)


def _notify(name: str, event: str) -> None:
    for listener in _listeners:
        listener(name, event)
