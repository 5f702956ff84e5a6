"""Rate limits, concurrency caps and daily quotas: pure GCRA plus a backend interface.

GCRA, exactly as nginx ``limit_req`` behaves: with ``rate`` r and ``burst`` b,
``interval`` = 1/r and ``tolerance`` = b/r. Each key stores one float, its TAT
(theoretical arrival time). A request at ``now``::

    start = max(now, TAT)                 # when it would be served at the rate
    admitted  iff  start - now <= tolerance
    then TAT = start + interval, and the request is delayed by start - now
    (``delay = true``) or served at once (``delay = false``, nginx ``nodelay``)

With b = 0 a request within 1/r s of the last admitted one is refused; a refused
request changes nothing. A key whose TAT is in the past is the same as a fresh
key, so the in-memory backend evicts such keys: memory is bounded by the keys
active within their last ``burst/rate`` seconds, and every decision is O(1)
(sweeps are amortised: one pass each time the table doubles).

Backends implement :class:`LimiterBackend` (all methods async, so a Redis backend
can run the same decisions in Lua scripts, one round trip each):

- ``admit(limits, now)`` checks several limits (tenant, user) all-or-nothing, as
  nginx does with several ``limit_req`` zones: either every TAT advances or none.
- ``incr_quota(key, day)`` counts one request against ``key`` on ``day``
  (``YYYY-MM-DD`` UTC) and returns the new count; counts of other days are gone.
- ``acquire_slot(key, limit)`` / ``release_slot(key)``: in-flight counting.
- ``close()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

SWEEP_MIN = 1024


# NamedTuples rather than frozen dataclasses: built on every request, and a frozen
# dataclass's __init__ (object.__setattr__ per field) costs three times as much.
class Limit(NamedTuple):
    """One GCRA limit on one key."""

    key: str
    rate: float
    burst: int

    @property
    def capacity(self) -> int:
        """How many requests may arrive at once: the request itself plus the burst."""
        return self.burst + 1


class Verdict(NamedTuple):
    """A decision over all limits; ``delay`` applies when admitted, ``retry_after`` when not."""

    allowed: bool
    delay: float
    retry_after: float
    limit: int
    remaining: int
    reset: float


def gcra(tat: float, now: float, interval: float, tolerance: float) -> tuple[bool, float, float]:
    """One GCRA step: (admitted, new TAT, delay). Pure; works with any real number type."""
    start = now if tat < now else tat
    delay = start - now
    if delay > tolerance:
        return False, tat, delay
    return True, start + interval, delay


def remaining_after(delay: float, limit: Limit) -> int:
    """Requests still admissible right now once one was admitted with ``delay``."""
    return max(0, math.floor(limit.burst - delay * limit.rate + 1e-9))


class LimiterBackend(Protocol):
    """Where limiter state lives (in memory here; Redis when MTP_REDIS_URL is set)."""

    async def admit(self, limits: Sequence[Limit], now: float) -> Verdict: ...

    async def incr_quota(self, key: str, day: str) -> int: ...

    async def acquire_slot(self, key: str, limit: int) -> bool: ...

    async def release_slot(self, key: str) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """In-process state: one float per active key, evicted once it is in the past."""

    def __init__(self) -> None:
        self.tat: dict[str, float] = {}
        self._sweep_at = SWEEP_MIN
        self._slots: dict[str, int] = {}
        self._quota: dict[str, tuple[str, int]] = {}

    def decide(self, limits: Sequence[Limit], now: float) -> Verdict:
        """The synchronous core of :meth:`admit` (no awaits: atomic within the event loop)."""
        if len(self.tat) > self._sweep_at:
            self.sweep(now)
        tat = self.tat
        new: list[float] = []
        delay = 0.0
        binding = limits[0]
        remaining = None
        refused_after = -1.0
        for limit in limits:
            interval = 1.0 / limit.rate
            ok, next_tat, wait = gcra(tat.get(limit.key, now), now, interval,
                                      limit.burst * interval)
            if not ok:
                # Admissible again once start - now <= tolerance.
                after = wait - limit.burst * interval
                if after > refused_after:
                    refused_after, binding = after, limit
                continue
            new.append(next_tat)
            left = remaining_after(wait, limit)
            if remaining is None or left < remaining:
                remaining, binding = left, limit
            delay = max(delay, wait)
        if refused_after >= 0.0:
            return Verdict(False, 0.0, refused_after, binding.capacity, 0,
                           tat.get(binding.key, now) - now)
        for limit, next_tat in zip(limits, new, strict=True):
            tat[limit.key] = next_tat
        return Verdict(True, delay, 0.0, binding.capacity, remaining or 0,
                       tat[binding.key] - now)

    def sweep(self, now: float) -> None:
        """Forget keys whose TAT has passed (they behave exactly like new keys)."""
        self.tat = {k: v for k, v in self.tat.items() if v > now}
        self._sweep_at = max(SWEEP_MIN, 2 * len(self.tat))

    async def admit(self, limits: Sequence[Limit], now: float) -> Verdict:
        return self.decide(limits, now)

    async def incr_quota(self, key: str, day: str) -> int:
        seen_day, count = self._quota.get(key, (day, 0))
        count = count + 1 if seen_day == day else 1
        self._quota[key] = (day, count)
        return count

    async def acquire_slot(self, key: str, limit: int) -> bool:
        used = self._slots.get(key, 0)
        if used >= limit:
            return False
        self._slots[key] = used + 1
        return True

    async def release_slot(self, key: str) -> None:
        used = self._slots.get(key, 0) - 1
        if used > 0:
            self._slots[key] = used
        else:
            self._slots.pop(key, None)

    async def close(self) -> None:
        self.tat.clear()
        self._slots.clear()
        self._quota.clear()
