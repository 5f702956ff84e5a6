"""Admission: at most as many calls in the framework as it has threads to run them.

A sync handler runs on the gunicorn thread that took the request, and one that
hangs keeps its thread until it returns. The sidecar counts the calls it has
sent and not yet seen answered, also those whose client was already answered
504 at the deadline; past ``MTP_WORKERS`` x ``MTP_THREADS`` a call is 503 with
Retry-After at once, instead of waiting in gunicorn's queue behind hung
handlers. The sidecar's own routes (/healthz, /readyz, /metrics) are not
admitted here: they always get through. One event loop, so a plain counter.
"""

from __future__ import annotations

from framework.settings import Settings
from sidecar.errors import Unavailable

RETRY_AFTER = "1"


class Saturated(Unavailable):
    """503: every framework thread holds a call; retry shortly."""

    detail = "the service is saturated; retry shortly"
    kind = "saturated"

    def __init__(self, limit: int) -> None:
        super().__init__(f"admission full ({limit} calls in flight)",
                         headers={"Retry-After": RETRY_AFTER})


class Admission:
    """Calls in flight to the framework, up to ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    @classmethod
    def for_settings(cls, settings: Settings) -> Admission:
        """One slot per framework request thread."""
        return cls(settings.workers * settings.threads)

    def enter(self) -> bool:
        """Take a slot; False when every framework thread is taken."""
        if self.busy >= self.limit:
            return False
        self.busy += 1
        return True

    def leave(self) -> None:
        """Give a slot back (the framework answered, or gave up on the call)."""
        self.busy -= 1
