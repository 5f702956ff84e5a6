"""Riding through a Redis outage: retry with capped backoff and jitter, log transitions.

A job worker that loses Redis must neither drop what it has (a finished job's
result) nor crash-loop until Redis is back. :class:`Outage` keeps one line per
transition (down, with the error's class; up, with how long it was down) instead of
one per retry, and :meth:`Outage.until` retries one write until Redis takes it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.exceptions import RedisError

T = TypeVar("T")

FIRST_PAUSE = 0.1
MAX_PAUSE = 2.0  # short enough that work resumes within seconds of Redis' return


def pauses(first: float = FIRST_PAUSE, cap: float = MAX_PAUSE) -> Callable[[], float]:
    """Exponential pauses capped at ``cap``, each with full jitter over its upper half."""
    state = {"next": first}

    def pause() -> float:
        base = state["next"]
        state["next"] = min(base * 2, cap)
        # Jitter: replicas that lost Redis together must not all come back in one burst.
        return base / 2 + random.random() * base / 2  # noqa: S311 - not for security

    return pause


@dataclass
class Outage:
    """Redis' state as one process sees it: logs once per transition."""

    log: logging.Logger
    what: str  # e.g. "job worker": names the process in the log lines
    down_since: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def failed(self, exc: BaseException) -> None:
        """Redis refused or timed out: the first failure after an up period is logged."""
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
        # The class only: a message may carry the URL, with its password.
        self.log.warning("Redis unreachable (%s): %s keeps what it has and retries",
                         type(exc).__name__, self.what)

    def answered(self) -> None:
        """Redis answered: the first success after a failure is logged."""
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            self.log.warning("Redis reachable again after %.1fs: %s goes on",
                             time.monotonic() - since, self.what)

    def until(self, write: Callable[[], T], stop: threading.Event | None = None) -> T:
        """``write()`` retried while Redis is away (until it answers, or ``stop`` is set)."""
        pause = pauses()
        while True:
            try:
                result = write()
            except RedisError as exc:
                self.failed(exc)
                if stop is not None and stop.is_set():
                    raise
                time.sleep(pause())
                continue
            self.answered()
            return result


def durability_warning(client: Any) -> str | None:
    """A warning when Redis keeps no append-only file (None when it does or cannot tell).

    Queued jobs live only in Redis: without AOF a Redis restart loses every one of them
    and their ids answer 404 for good (docs/scale-out.md, "When Redis goes away").
    """
    try:
        persistence = client.info("persistence")
    except RedisError:
        return None  # unreachable or INFO refused: the outage handling speaks for itself
    if str(persistence.get("aof_enabled", "1")) == "1":
        return None
    return ("Redis runs without appendonly: a Redis restart loses every queued job and "
            "event (set `appendonly yes`, `appendfsync everysec` or `always`)")
