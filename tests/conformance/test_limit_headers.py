"""429 answers carry Retry-After and RateLimit-* that agree on the binding limit."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime

import pytest

from framework.tenant_config import LimitSettings
from sidecar.errors import RateLimited
from sidecar.limiter import MemoryBackend
from sidecar.ratelimit import RateLimiter


def test_an_exhausted_daily_quota_describes_the_quota_until_midnight():
    six_pm = datetime(2026, 3, 1, 18, 0, 0, tzinfo=UTC)  # 6 h = 21600 s before midnight UTC
    limiter = RateLimiter(MemoryBackend(), clock=itertools.count().__next__,
                          wall=lambda: six_pm)
    limits = LimitSettings(rate=1000, burst=0, daily_quota=3)
    for _ in range(3):
        asyncio.run(limiter.admit(limits, "acme", "alice"))
    with pytest.raises(RateLimited) as refused:
        asyncio.run(limiter.admit(limits, "acme", "alice"))
    headers = refused.value.headers
    assert headers["Retry-After"] == "21600"
    assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"],
            headers["RateLimit-Reset"]) == ("3", "0", "21600")
    # The current draft's fields say the same: the daily policy binds, reset at midnight.
    assert headers["RateLimit"] == '"daily";r=0;t=21600'
    assert headers["RateLimit-Policy"] == '"tenant";q=1000;w=1, "daily";q=3;w=86400'
