"""The limiter: GCRA as nginx limit_req, checked against a reference model, plus quota/slots."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.tenant_config import LimitSettings
from sidecar.errors import RateLimited
from sidecar.limiter import SWEEP_MIN, Limit, MemoryBackend, gcra
from sidecar.ratelimit import (
    QUOTA_WARNING,
    RateLimiter,
    binding,
    policy_field,
    seconds_to_midnight,
    window,
)


class NginxModel:
    """nginx limit_req as its source reads: ``excess`` in requests, ``last`` admitted time."""

    def __init__(self, rate: Fraction, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.excess: Fraction | None = None
        self.last = Fraction(0)

    def request(self, now: Fraction) -> tuple[bool, Fraction]:
        if self.excess is None:  # a new node: excess 0, admitted
            self.excess, self.last = Fraction(0), now
            return True, Fraction(0)
        excess = max(Fraction(0), self.excess - self.rate * (now - self.last) + 1)
        if excess > self.burst:
            return False, Fraction(0)
        self.excess, self.last = excess, now
        return True, excess / self.rate  # nginx delays by excess / rate


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rate=st.integers(1, 50), burst=st.integers(0, 10),
       gaps=st.lists(st.integers(0, 400), min_size=1, max_size=60))
def test_gcra_matches_nginx_reference(rate: int, burst: int, gaps: list[int]) -> None:
    model = NginxModel(Fraction(rate), burst)
    interval = Fraction(1, rate)
    tat = Fraction(-10**9)
    now = Fraction(0)
    for gap in gaps:
        now += Fraction(gap, 1000)
        expected, expected_delay = model.request(now)
        ok, new_tat, delay = gcra(tat, now, interval, burst * interval)
        assert ok == expected
        if ok:
            tat = new_tat
            assert delay == expected_delay


def test_burst_zero_refuses_within_one_interval() -> None:
    b = MemoryBackend()
    lim = [Limit("t", 10, 0)]
    assert b.decide(lim, 100.0).allowed
    refused = b.decide(lim, 100.05)
    assert not refused.allowed and refused.retry_after == pytest.approx(0.05)
    assert b.decide(lim, 100.1).allowed


def test_burst_is_delayed_to_the_rate_then_refused() -> None:
    b = MemoryBackend()
    lim = [Limit("t", 10, 3)]
    delays = [b.decide(lim, 5.0).delay for _ in range(4)]
    assert delays == pytest.approx([0.0, 0.1, 0.2, 0.3])
    v = b.decide(lim, 5.0)
    assert not v.allowed and v.limit == 4 and v.remaining == 0
    assert v.retry_after == pytest.approx(0.1)


def test_all_or_nothing_over_tenant_and_user() -> None:
    b = MemoryBackend()
    tenant, user = Limit("t", 100, 0), Limit("t\x00u", 1, 0)
    assert b.decide([tenant, user], 1.0).allowed
    tat_before = dict(b.tat)
    assert not b.decide([tenant, Limit("t\x00u", 1, 0)], 1.5).allowed  # user refuses
    assert b.tat == tat_before  # ...and the tenant's state did not move
    assert b.decide([tenant, Limit("t\x00v", 1, 0)], 1.5).allowed  # another user is fine


def test_remaining_and_reset_headers() -> None:
    b = MemoryBackend()
    v = b.decide([Limit("t", 2, 4)], 0.0)
    assert (v.allowed, v.limit, v.remaining) == (True, 5, 4)
    assert v.reset == pytest.approx(0.5)


def test_memory_stays_bounded_with_many_keys() -> None:
    b = MemoryBackend()
    for i in range(SWEEP_MIN * 8):
        b.decide([Limit(f"k{i}", 100, 0)], i * 0.1)  # each key's TAT passes quickly
    assert len(b.tat) <= SWEEP_MIN + 1


def run(coro):
    return asyncio.run(coro)


def test_quota_warns_past_80_percent_and_refuses_past_100() -> None:
    rl = RateLimiter(MemoryBackend(), clock=iter(range(10**6)).__next__)
    limits = LimitSettings(rate=1000, burst=0, daily_quota=5)
    seen = [run(rl.admit(limits, "t", "u"))[0] for _ in range(5)]
    assert [QUOTA_WARNING in h for h in seen] == [False, False, False, False, True]
    with pytest.raises(RateLimited) as exc:
        run(rl.admit(limits, "t", "u"))
    assert exc.value.reason == "daily quota exhausted"
    assert int(exc.value.headers["Retry-After"]) >= 1


def test_quota_resets_on_a_new_day() -> None:
    b = MemoryBackend()
    assert run(b.incr_quota("q", "2026-01-01")) == 1
    assert run(b.incr_quota("q", "2026-01-01")) == 2
    assert run(b.incr_quota("q", "2026-01-02")) == 1


def test_seconds_to_midnight() -> None:
    assert seconds_to_midnight(datetime(2026, 1, 1, 23, 59, 30, tzinfo=UTC)) == 30


def test_concurrency_slots_and_delay() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    rl = RateLimiter(MemoryBackend(), clock=lambda: 50.0, sleep=sleep)
    limits = LimitSettings(rate=10, burst=5, concurrency=2)

    async def scenario() -> None:
        _, a, _ = await rl.admit(limits, "t", "u")
        _, b, delay = await rl.admit(limits, "t", "u")
        assert delay == pytest.approx(0.1)
        with pytest.raises(RateLimited, match="concurrency") as refused:
            await rl.admit(limits, "t", "u")
        got = refused.value.headers
        assert (got["RateLimit-Limit"], got["RateLimit-Remaining"], got["RateLimit-Reset"],
                got["Retry-After"]) == ("2", "0", "1", "1")
        assert got["RateLimit"] == '"concurrency";r=0;t=1'
        assert got["RateLimit-Policy"] == ('"tenant";q=10;w=1, '
                                           '"concurrency";q=2;qu="concurrent-requests"')
        await rl.release(a)
        _, c, _ = await rl.admit(limits, "t", "u")
        for slot in (b, c, None):
            await rl.release(slot)
        await rl.backend.close()

    run(scenario())
    assert slept == pytest.approx([0.1, 0.2, 0.3])


def test_nodelay_serves_the_burst_at_once_and_user_limits_apply() -> None:
    rl = RateLimiter(MemoryBackend(), clock=lambda: 7.0)
    limits = LimitSettings(rate=10, burst=5, delay=False, user_rate=1, user_burst=1)
    delays = [run(rl.admit(limits, "t", "u"))[2] for _ in range(2)]
    assert delays == [0.0, 0.0]
    with pytest.raises(RateLimited) as exc:
        run(rl.admit(limits, "t", "u"))
    # The user's rate is binding: 1 request per 1 s window (not burst + 1).
    assert exc.value.headers["RateLimit-Limit"] == "1"
    assert exc.value.headers["RateLimit"] == '"user";r=0;t=2'  # its TAT: 2 s ahead
    assert exc.value.headers["Retry-After"] == "1"


@pytest.mark.parametrize("rate, quota, seconds", [
    (100, 100, 1), (10000, 10000, 1), (0.5, 1, 2), (2.5, 5, 2), (0.3, 3, 10),
    (1 / 7, 1, 7), (1 / 61, 1, 61), (0.001, 1, 1000),
    (1.2345, 1, 1),  # no whole quota within a minute: rounded down, never more than the rate
])
def test_a_gcra_rate_as_a_quota_per_window(rate: float, quota: int, seconds: int) -> None:
    assert window(rate) == (quota, seconds)
    assert quota / seconds <= rate * (1 + 1e-9)


def test_limit_is_the_rates_window_quota_and_remaining_never_exceeds_it() -> None:
    rl = RateLimiter(MemoryBackend(), clock=lambda: 3.0)
    limits = LimitSettings(rate=2, burst=5, user_rate=0.5, user_burst=9, daily_quota=1000)
    got = run(rl.admit(limits, "t", "u"))[0]
    # Tenant: burst 5 left 5 more now, clamped to the quota of 2 per second; the user's
    # burst (9, quota 1 per 2 s) leaves 9: the tenant binds.
    assert (got["RateLimit-Limit"], got["RateLimit-Remaining"]) == ("2", "2")
    assert got["RateLimit"] == '"tenant";r=2;t=1'
    assert got["RateLimit-Policy"] == '"tenant";q=2;w=1, "user";q=1;w=2, "daily";q=1000;w=86400'


def test_equal_bursts_show_the_slower_rate() -> None:
    checks = [Limit("t", 10, 3), Limit("t\x00u", 2, 3)]
    verdict = MemoryBackend().decide(checks, 0.0)
    assert verdict.limit == 4 and binding(checks, verdict) == 1
    assert binding([Limit("t", 10, 3)], verdict._replace(limit=99)) == 0  # never unknown


def test_policy_field_for_the_tenant_alone() -> None:
    assert policy_field(LimitSettings(rate=100, burst=100)) == '"tenant";q=100;w=1'
