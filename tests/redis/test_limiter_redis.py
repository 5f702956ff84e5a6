"""The Redis limiter backend against a real redis-server: same GCRA as in memory, shared
state across replicas, slots that expire with their replica, quota days, outage fallback."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sidecar.limiter import Limit, MemoryBackend
from sidecar.limiter_redis import PREFIX, QUOTA_TTL, RedisBackend, connect
from tests.servers import RedisServer


def run(coro_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return asyncio.run(coro_fn(*args))


@pytest.fixture(autouse=True)
def clean(redis_server) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()


CASES = [
    [Limit("t", 10.0, 5)],
    [Limit("t", 1.0, 0)],
    [Limit("t", 100.0, 50), Limit("t\x00alice", 3.0, 2)],
    [Limit("t", 2.5, 1), Limit("t\x00bob", 20.0, 0)],
]


@pytest.mark.parametrize("limits", CASES, ids=["rate10-burst5", "burst0", "tenant+user",
                                               "user-binding"])
def test_lua_gcra_decides_exactly_as_memory_on_the_same_timestamps(redis_server,
                                                                    limits) -> None:
    async def go() -> None:
        backend = RedisBackend(connect(redis_server.url), server_clock=False,
                               prefix=f"case{id(limits)}:")
        memory = MemoryBackend()
        rnd = random.Random(len(limits) * 7919 + int(limits[0].rate * 10))
        now = 1_000_000.0
        try:
            for _ in range(400):
                now += rnd.choice([0.0, 0.0, 0.001, 0.02, 0.1, 0.37, 1.5])
                assert await backend.admit(limits, now) == memory.decide(limits, now)
                # Keys expire on Redis's real clock; this replay runs faster than its
                # timestamps, so keep them (a past TAT acts like a fresh key in both).
                for limit in limits:
                    await backend.client.persist(backend.prefix + limit.key)
        finally:
            await backend.close()

    run(go)


def test_two_replicas_share_one_limit_on_the_redis_clock(redis_server) -> None:
    async def go() -> list[bool]:
        a, b = RedisBackend(connect(redis_server.url)), RedisBackend(connect(redis_server.url))
        limits = [Limit("shared", 1.0, 4)]
        try:
            # Their own clocks disagree wildly; Redis's TIME decides for both.
            return [(await (a if i % 2 else b).admit(limits, float(i * 1000))).allowed
                    for i in range(8)]
        finally:
            await a.close()
            await b.close()

    assert run(go) == [True] * 5 + [False] * 3


def test_refusal_reports_retry_after_and_rate_limit_fields(redis_server) -> None:
    async def go() -> tuple[Any, Any]:
        backend = RedisBackend(connect(redis_server.url))
        limits = [Limit("fields", 2.0, 1)]
        try:
            await backend.admit(limits, 0.0)
            second = await backend.admit(limits, 0.0)
            return second, await backend.admit(limits, 0.0)
        finally:
            await backend.close()

    second, refused = run(go)
    assert second.allowed and second.limit == 2 and second.remaining == 0
    assert not refused.allowed and 0 < refused.retry_after <= 0.5 and refused.limit == 2


def test_daily_quota_counts_per_day_and_expires(redis_server) -> None:
    import redis

    async def go() -> list[int]:
        backend = RedisBackend(connect(redis_server.url))
        try:
            return [await backend.incr_quota("acme\x00quota", "2026-01-01"),
                    await backend.incr_quota("acme\x00quota", "2026-01-01"),
                    await backend.incr_quota("acme\x00quota", "2026-01-02")]
        finally:
            await backend.close()

    assert run(go) == [1, 2, 1]
    client = redis.Redis.from_url(redis_server.url)
    ttl = client.ttl(f"{PREFIX}acme\x00quota\x002026-01-01")
    client.close()
    assert 0 < ttl <= QUOTA_TTL


def test_concurrency_slots_are_shared_and_given_back(redis_server) -> None:
    async def go() -> list[bool]:
        a, b = RedisBackend(connect(redis_server.url)), RedisBackend(connect(redis_server.url))
        try:
            got = [await a.acquire_slot("acme\x00inflight", 2),
                   await b.acquire_slot("acme\x00inflight", 2),
                   await a.acquire_slot("acme\x00inflight", 2)]
            await b.release_slot("acme\x00inflight")
            got.append(await a.acquire_slot("acme\x00inflight", 2))
            await b.release_slot("never-taken")  # nothing held: nothing happens
            return got
        finally:
            await a.close()
            await b.close()

    assert run(go) == [True, True, False, True]


def test_slots_of_a_crashed_replica_expire_while_held_ones_are_refreshed(redis_server) -> None:
    async def go() -> list[bool]:
        crashed = RedisBackend(connect(redis_server.url), slot_ttl=0.3)
        alive = RedisBackend(connect(redis_server.url), slot_ttl=0.3)
        other = RedisBackend(connect(redis_server.url), slot_ttl=0.3)
        try:
            assert await crashed.acquire_slot("c", 2)
            assert await alive.acquire_slot("c", 2)
            await crashed.client.aclose()  # gone without releasing, like a killed replica
            crashed._keeper.cancel()
            full_now = await other.acquire_slot("c", 2)
            await asyncio.sleep(0.8)  # past the TTL: the crashed slot is free, the live one kept
            first = await other.acquire_slot("c", 2)
            second = await other.acquire_slot("c", 2)
            return [full_now, first, second]
        finally:
            await alive.close()
            await other.close()

    assert run(go) == [False, True, False]


def test_redis_outage_falls_back_to_local_limits_and_recovers(tmp_path, caplog) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    caplog.set_level(logging.WARNING, logger="mtp.sidecar.limiter")
    limits = [Limit("outage", 1.0, 1)]

    async def go() -> dict[str, Any]:
        backend = RedisBackend(connect(server.url), probe_interval=0.05, recover_after=0.5)
        seen: dict[str, Any] = {}
        try:
            assert await backend.acquire_slot("slot", 5)  # held in Redis across the outage
            seen["before"] = await backend.check()
            server.stop()
            seen["noticed"] = await backend.check()  # readiness notices before any request
            seen["served"] = [(await backend.admit(limits, time.monotonic())).allowed
                              for _ in range(3)]
            seen["state"] = backend.state
            seen["quota"] = await backend.incr_quota("q", "2026-01-01")
            seen["slot"] = await backend.acquire_slot("slot", 5)
            await backend.release_slot("slot")  # the local one
            await backend.release_slot("slot")  # the Redis one: expires there by itself
            seen["lines"] = sum("unreachable" in r.getMessage() for r in caplog.records)
            server.start()
            deadline = time.monotonic() + 10
            while backend.degraded and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            seen["after"] = backend.state
            seen["shared"] = (await backend.admit(limits, 0.0)).allowed
            seen["key"] = await backend.client.exists(PREFIX + "outage")
        finally:
            await backend.close()
        return seen

    try:
        seen = run(go)
    finally:
        server.stop()
    assert seen["before"] == "redis" and seen["noticed"] == "degraded"
    # Local limits (rate 1, burst 1) still decide: two admitted, the third refused.
    assert seen["served"] == [True, True, False]
    assert seen["state"] == "degraded" and seen["lines"] == 1
    assert seen["quota"] == 1 and seen["slot"] is True
    assert seen["after"] == "redis" and seen["shared"] is True and seen["key"] == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_first_call_to_an_unreachable_redis_falls_back(caplog) -> None:
    from tests.helpers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"

    async def go() -> list[Any]:
        quota, slots = (RedisBackend(connect(dead), probe_interval=60) for _ in range(2))
        try:
            got = [await quota.incr_quota("q", "2026-01-01"),
                   await slots.acquire_slot("s", 1), await slots.acquire_slot("s", 1)]
            await slots.release_slot("s")
            got.append(await slots.acquire_slot("s", 1))
            return [*got, quota.state, slots.state]
        finally:
            await quota.close()
            await slots.close()

    assert run(go) == [1, True, False, True, "degraded", "degraded"]


def test_losing_redis_while_holding_slots_is_noticed_by_the_refresh(tmp_path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()

    async def go() -> bool:
        backend = RedisBackend(connect(server.url), slot_ttl=0.3, probe_interval=60)
        try:
            assert await backend.acquire_slot("held", 1)
            server.stop()
            deadline = time.monotonic() + 5
            while not backend.degraded and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            noticed = backend.degraded
            # The refresh goes on while degraded, skipping the slot rather than failing
            # against the absent Redis once per round (its keeper is still alive).
            await asyncio.sleep(0.35)
            return noticed and backend.degraded and not backend._keeper.done()
        finally:
            await backend.close()

    try:
        assert run(go) is True
    finally:
        server.stop()


def test_after_an_outage_the_limiter_switches_back_once(tmp_path, caplog) -> None:
    """Redis killed and restarted under concurrent load: one switch to local limits and
    one back, once Redis has answered for a while, not a flip per stale connection."""
    import signal as signals

    caplog.set_level(logging.WARNING, logger="mtp.sidecar.limiter")
    server = RedisServer(tmp_path / "redis", persist=True)
    server.start()
    limits = [Limit("flap", 100000.0, 100000)]

    async def go() -> list[str]:
        backend = RedisBackend(connect(server.url), probe_interval=0.05, recover_after=0.5)
        states: list[str] = []

        async def load(seconds: float, at_once: int) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await asyncio.gather(*(backend.admit(limits, time.monotonic())
                                       for _ in range(at_once)))
                states.append(backend.state)
                await asyncio.sleep(0.01)

        try:
            # Sixteen at once fill the pool with connections; during the outage one call
            # at a time finds it, so fifteen of them are stale when Redis is back.
            await load(0.3, 16)
            assert server.proc is not None
            server.proc.send_signal(signals.SIGKILL)
            server.proc.wait(5)
            await load(0.5, 1)
            server.start()
            await load(3.0, 16)
        finally:
            await backend.close()
        return states

    try:
        states = run(go)
    finally:
        server.stop()
    switches = [b for a, b in itertools.pairwise(states) if a != b]
    assert switches == ["degraded", "redis"], switches
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages
