"""Retrying a write through a Redis outage: backoff bounds, one log line per transition."""

from __future__ import annotations

import logging
import threading

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from framework.redis_wait import MAX_PAUSE, Outage, pauses


def test_pauses_grow_to_the_cap_with_jitter() -> None:
    pause = pauses(first=0.1, cap=0.8)
    got = [pause() for _ in range(8)]
    bounds = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8]
    assert all(b / 2 <= g <= b for g, b in zip(got, bounds, strict=True)), got
    assert MAX_PAUSE <= 5


def test_a_write_is_retried_until_redis_takes_it(caplog, monkeypatch) -> None:
    monkeypatch.setattr("framework.redis_wait.time.sleep", lambda _s: None)
    caplog.set_level(logging.WARNING)
    outage = Outage(logging.getLogger("t"), "the test")
    calls = []

    def write() -> str:
        calls.append(1)
        if len(calls) < 5:
            raise RedisConnectionError("refused redis://:secret@host")
        return "written"

    assert outage.until(write) == "written"
    assert len(calls) == 5
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "unreachable (ConnectionError)" in lines[0]
    assert "reachable again" in lines[1] and "secret" not in " ".join(lines)
    outage.answered()  # already up: nothing more is logged
    assert len(caplog.records) == 2


def test_a_stop_ends_the_wait_with_the_error(monkeypatch) -> None:
    monkeypatch.setattr("framework.redis_wait.time.sleep", lambda _s: None)
    stop = threading.Event()
    stop.set()
    outage = Outage(logging.getLogger("t"), "the test")

    def down() -> None:
        raise RedisConnectionError("down")

    with pytest.raises(RedisConnectionError):
        outage.until(down, stop)
    assert outage.down_since is not None
