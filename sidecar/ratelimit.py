"""Stage 4: rate limits, daily quota and concurrency for one request.

Order: GCRA (tenant, and user when ``user_rate`` is set, all-or-nothing), then
the daily quota, then the delay inside the burst (degrade rather than deny),
then a concurrency slot, held until the answer is sent. A refusal is 429 with
``Retry-After`` in whole seconds. Past 80% of the daily quota the answer carries
``X-Quota-Warning``; past 100% it is 429 until midnight UTC, unless a fleet plan
sets ``degraded_rate``: then the tenant is slowed to that rate and answers carry
``X-Quota-Degraded: true``. Health and
readiness never come here.

Answers describe the binding limit twice: ``RateLimit-Limit``/``-Remaining``/``-Reset``
(the older draft's three fields) and the current IETF draft's structured fields
(draft-ietf-httpapi-ratelimit-headers), ``RateLimit-Policy`` (every policy in
force) and ``RateLimit`` (the binding one). A GCRA rate r with burst b maps to
a quota ``q`` per window ``w`` seconds: the shortest whole window in which the
rate admits a whole number of requests (100/s: q=100, w=1; 0.5/s: q=1, w=2;
2.5/s: q=5, w=2), see :func:`window`. The burst has no field of its own: it is
what lets ``Remaining`` requests through at once; ``Remaining`` is how many more
may come now without a 429, never more than ``q``. ``Reset`` is when the GCRA
state has drained (every request of the burst available again).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from framework.tenant_config import LimitSettings
from sidecar.errors import RateLimited
from sidecar.limiter import Limit, LimiterBackend, Verdict

QUOTA_WARNING = "X-Quota-Warning"
QUOTA_DEGRADED = "X-Quota-Degraded"
WARN_FRACTION = 0.8
MAX_WINDOW = 60  # seconds: the longest window looked at for a whole quota
DAY = 86400
TENANT, USER, DAILY, CONCURRENCY = "tenant", "user", "daily", "concurrency"


@lru_cache(maxsize=256)
def window(rate: float) -> tuple[int, int]:
    """(q, w): the rate as q requests per w seconds, both whole.

    The shortest window up to MAX_WINDOW in which the rate admits a whole number
    of requests; for other rates ⌊rate·w⌋ requests in w = ⌈1/rate⌉ s (at least 1),
    which never claims more than the rate admits.
    """
    for w in range(1, MAX_WINDOW + 1):
        q = rate * w
        if q >= 1 and abs(q - round(q)) < 1e-9 * q:
            return round(q), w
    w = max(1, math.ceil(1 / rate))
    return max(1, math.floor(rate * w)), w


@lru_cache(maxsize=64)
def policy_field(limits: LimitSettings) -> str:
    """RateLimit-Policy: every policy in force, as a structured-field list."""
    items = ['"{}";q={};w={}'.format(TENANT, *window(limits.rate))]
    if limits.user_rate > 0:
        items.append('"{}";q={};w={}'.format(USER, *window(limits.user_rate)))
    if limits.daily_quota:
        items.append(f'"{DAILY}";q={limits.daily_quota};w={DAY}')
    if limits.concurrency:
        items.append(f'"{CONCURRENCY}";q={limits.concurrency};qu="concurrent-requests"')
    return ", ".join(items)


def limit_fields(limits: LimitSettings, name: str, quota: int, remaining: int,
                 reset: int) -> dict[str, str]:
    """The five RateLimit fields for the binding policy ``name``."""
    return {
        "RateLimit-Limit": str(quota),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(reset),
        "RateLimit-Policy": policy_field(limits),
        "RateLimit": f'"{name}";r={remaining};t={reset}',
    }


def binding(checks: Sequence[Limit], verdict: Verdict) -> int:
    """Which of ``checks`` the verdict describes (backends report its capacity).

    Two with the same burst: the slower rate, whose smaller quota is the safe one to show.
    """
    same = [i for i, limit in enumerate(checks) if limit.capacity == verdict.limit]
    return min(same or range(len(checks)), key=lambda i: checks[i].rate)


def ratelimit_headers(limits: LimitSettings, checks: Sequence[Limit],
                      verdict: Verdict) -> dict[str, str]:
    """The RateLimit fields of a GCRA decision (whole seconds, rounded up)."""
    index = binding(checks, verdict)
    quota, _ = window(checks[index].rate)
    return limit_fields(limits, TENANT if index == 0 else USER, quota,
                        min(verdict.remaining, quota), max(0, math.ceil(verdict.reset)))


def seconds_to_midnight(now: datetime) -> float:
    """Seconds until the next UTC day starts (when a daily quota resets)."""
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


class RateLimiter:
    """Applies ``[limits]`` through a :class:`LimiterBackend`."""

    def __init__(self, backend: LimiterBackend, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.backend = backend
        self._clock = clock
        self._wall = wall
        self._sleep = sleep

    async def admit(self, limits: LimitSettings, tenant: str,
                    user: str) -> tuple[dict[str, str], str | None, float]:
        """Admit one request: (answer headers, concurrency key to release or None, delay)."""
        checks = [Limit(tenant, limits.rate, limits.burst)]
        if limits.user_rate > 0:
            checks.append(Limit(f"{tenant}\x00{user}", limits.user_rate, limits.user_burst))
        verdict = await self.backend.admit(checks, self._clock())
        headers = ratelimit_headers(limits, checks, verdict)
        if not verdict.allowed:
            raise RateLimited("rate limit", verdict.retry_after, headers)
        if limits.daily_quota:
            used = await self._count(tenant)
            if used > limits.daily_quota and limits.degraded_rate > 0:
                await self._degraded(tenant, limits, headers)
            else:
                self._quota(used, limits, headers)
        delay = verdict.delay if limits.delay else 0.0
        if delay > 0:
            await self._sleep(delay)
        slot = None
        if limits.concurrency:
            slot = f"{tenant}\x00inflight"
            if not await self.backend.acquire_slot(slot, limits.concurrency):
                # The headers describe the limit that refused (the rate's said "remaining").
                raise RateLimited("concurrency limit", 1.0, {
                    **headers, **limit_fields(limits, CONCURRENCY, limits.concurrency, 0, 1)})
        return headers, slot, delay

    async def _count(self, tenant: str) -> int:
        day = self._wall().strftime("%Y-%m-%d")
        return await self.backend.incr_quota(f"{tenant}\x00quota", day)

    async def _degraded(self, tenant: str, limits: LimitSettings,
                        headers: dict[str, str]) -> None:
        """Past the daily quota with a fleet plan's ``degraded_rate``: slowed, not refused."""
        verdict = await self.backend.admit(
            [Limit(f"{tenant}\x00degraded", limits.degraded_rate, 1)], self._clock())
        if not verdict.allowed:
            raise RateLimited("degraded rate (daily quota used up)", verdict.retry_after,
                              {**headers, QUOTA_DEGRADED: "true"})
        headers[QUOTA_DEGRADED] = "true"

    def _quota(self, used: int, limits: LimitSettings, headers: dict[str, str]) -> None:
        quota = limits.daily_quota
        if used > quota:
            # The quota is now the binding limit: RateLimit-* describe it, not the rate
            # (whose Reset of ~1 s would contradict a Retry-After of hours).
            until = seconds_to_midnight(self._wall())
            raise RateLimited("daily quota exhausted", until, {
                **headers, **limit_fields(limits, DAILY, quota, 0, max(1, math.ceil(until)))})
        if used > WARN_FRACTION * quota:
            headers[QUOTA_WARNING] = (f"{math.floor(100 * used / quota)}% of the daily quota "
                                      f"of {quota} requests used")

    async def release(self, slot: str | None) -> None:
        """Give back a concurrency slot taken by :meth:`admit`."""
        if slot is not None:
            await self.backend.release_slot(slot)
