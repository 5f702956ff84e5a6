"""Per-service circuit breakers: degrade one failing service instead of the tenant.

closed --``failures`` consecutive failures--> open --``cooldown`` s--> half-open:
exactly one trial call goes through; its success closes the breaker, its failure
opens it again. A failure is an answer of 500 or 504. Plain Python, no global
state: the app holds one :class:`Breakers` per process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from framework.tenant_config import BreakerSettings

FAILURE_STATUSES = frozenset({500, 504})
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


def is_failure(status: int) -> bool:
    """Whether an answer counts against the service."""
    return status in FAILURE_STATUSES


@dataclass(frozen=True)
class Admission:
    """The breaker's answer before a call."""

    allowed: bool
    trial: bool = False  # the one half-open probe: report its outcome with trial=True
    retry_after: float = 0.0  # when refused: seconds until a trial may go through


class CircuitBreaker:
    """One service's breaker; thread-safe."""

    def __init__(self, settings: BreakerSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_started = 0.0
        self._trial_out = False

    @property
    def state(self) -> str:
        """closed, open or half-open (open turns half-open once the cooldown passed)."""
        with self._lock:
            self._tick()
            return self._state

    def admit(self) -> Admission:
        """Let a call through, or refuse it while open / while the trial is out."""
        with self._lock:
            self._tick()
            if self._state == CLOSED:
                return Admission(True)
            if self._state == HALF_OPEN and not self._trial_out:
                self._trial_out = True
                self._trial_started = self._clock()
                return Admission(True, trial=True)
            return Admission(False, retry_after=self._retry_after())

    def record(self, status: int, trial: bool = False) -> None:
        """Report the outcome of an admitted call."""
        failed = is_failure(status)
        with self._lock:
            if trial:
                self._trial_out = False
                if failed:
                    self._open()
                else:
                    self._state, self._failures = CLOSED, 0
                return
            if self._state != CLOSED:
                return  # a call admitted before the breaker opened says nothing new
            if not failed:
                self._failures = 0
                return
            self._failures += 1
            if self._failures >= self.settings.failures:
                self._open()

    def release(self, trial: bool) -> None:
        """An admitted call ended without an outcome of the service (e.g. never started)."""
        if trial:
            with self._lock:
                self._trial_out = False

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._failures = 0

    def _tick(self) -> None:
        now = self._clock()
        if self._state == OPEN and now - self._opened_at >= self.settings.cooldown:
            self._state, self._trial_out = HALF_OPEN, False
        elif (self._state == HALF_OPEN and self._trial_out
              and now - self._trial_started >= self.settings.cooldown):
            # A trial that never reported (its thread still stuck past the deadline)
            # must not keep the service shut forever: allow another probe.
            self._trial_out = False

    def _retry_after(self) -> float:
        now = self._clock()
        if self._state == OPEN:
            return max(0.0, self.settings.cooldown - (now - self._opened_at))
        return max(0.0, self.settings.cooldown - (now - self._trial_started))


class Breakers:
    """The breakers of one process, one per service that configures ``breaker``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._by_service: dict[str, CircuitBreaker] = {}

    def get(self, service: str, settings: BreakerSettings | None) -> CircuitBreaker | None:
        """The service's breaker (None without settings); new settings start a new one."""
        if settings is None:
            return None
        breaker = self._by_service.get(service)
        if breaker is not None and breaker.settings == settings:
            return breaker
        with self._lock:
            breaker = self._by_service.get(service)
            if breaker is None or breaker.settings != settings:
                breaker = CircuitBreaker(settings, self._clock)
                self._by_service[service] = breaker
            return breaker

    def states(self) -> dict[str, str]:
        """Service -> state, for metrics and health pages."""
        return {name: b.state for name, b in sorted(self._by_service.items())}
