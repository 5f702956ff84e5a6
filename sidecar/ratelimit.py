"""Stage 4: rate limits, daily quota and concurrency for one request.

Order: GCRA (tenant, and user when ``user_rate`` is set, all-or-nothing), then
the daily quota, then the delay inside the burst (degrade rather than deny),
then a concurrency slot, held until the answer is sent. Answers carry
``RateLimit-Limit``/``-Remaining``/``-Reset`` of the binding limit; a refusal is
429 with ``Retry-After`` in whole seconds. Past 80% of the daily quota the
answer carries ``X-Quota-Warning``; past 100% it is 429 until midnight UTC.
Health and readiness never come here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from framework.tenant_config import LimitSettings
from sidecar.errors import RateLimited
from sidecar.limiter import Limit, LimiterBackend, Verdict

QUOTA_WARNING = "X-Quota-Warning"
WARN_FRACTION = 0.8


def ratelimit_headers(verdict: Verdict) -> dict[str, str]:
    """The RateLimit-* headers of a decision (whole seconds, rounded up)."""
    return {
        "RateLimit-Limit": str(verdict.limit),
        "RateLimit-Remaining": str(verdict.remaining),
        "RateLimit-Reset": str(max(0, math.ceil(verdict.reset))),
    }


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
        headers = ratelimit_headers(verdict)
        if not verdict.allowed:
            raise RateLimited("rate limit", verdict.retry_after, headers)
        if limits.daily_quota:
            self._quota(await self._count(tenant), limits.daily_quota, headers)
        delay = verdict.delay if limits.delay else 0.0
        if delay > 0:
            await self._sleep(delay)
        slot = None
        if limits.concurrency:
            slot = f"{tenant}\x00inflight"
            if not await self.backend.acquire_slot(slot, limits.concurrency):
                # The headers describe the limit that refused (the rate's said "remaining").
                raise RateLimited("concurrency limit", 1.0, {
                    **headers, "RateLimit-Limit": str(limits.concurrency),
                    "RateLimit-Remaining": "0", "RateLimit-Reset": "1"})
        return headers, slot, delay

    async def _count(self, tenant: str) -> int:
        day = self._wall().strftime("%Y-%m-%d")
        return await self.backend.incr_quota(f"{tenant}\x00quota", day)

    def _quota(self, used: int, quota: int, headers: dict[str, str]) -> None:
        if used > quota:
            # The quota is now the binding limit: RateLimit-* describe it, not the rate
            # (whose Reset of ~1 s would contradict a Retry-After of hours).
            until = seconds_to_midnight(self._wall())
            raise RateLimited("daily quota exhausted", until, {
                **headers, "RateLimit-Limit": str(quota), "RateLimit-Remaining": "0",
                "RateLimit-Reset": str(max(1, math.ceil(until)))})
        if used > WARN_FRACTION * quota:
            headers[QUOTA_WARNING] = (f"{math.floor(100 * used / quota)}% of the daily quota "
                                      f"of {quota} requests used")

    async def release(self, slot: str | None) -> None:
        """Give back a concurrency slot taken by :meth:`admit`."""
        if slot is not None:
            await self.backend.release_slot(slot)
