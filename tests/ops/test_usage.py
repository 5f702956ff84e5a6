"""Usage metering: calls are counted into hourly buckets, shared by processes, priced."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from framework.tenant_config import BillingSettings
from framework.usage import (
    HOUR,
    HourTotal,
    UsageMeter,
    UsageStore,
    anomalies,
    cost,
    forecast,
    forecasts,
    hour_of,
    iso_hour,
    parse_group_by,
    parse_time,
)

PRICES = BillingSettings(currency="EUR", per_call=0.0001, per_cpu_second=0.02, per_gb=0.05)
T0 = 1_700_000_000 - 1_700_000_000 % HOUR  # an hour start


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> UsageStore:
    return UsageStore(tmp_path / "usage.db")


def test_calls_are_aggregated_per_hour_service_operation_user(store: UsageStore) -> None:
    clock = Clock(T0 + 10)
    meter = UsageMeter(store, "acme", clock=clock)
    meter.record("orders", "create", "alice", 200, 0.5, 0.25, 100, 900)
    meter.record("orders", "create", "alice", 500, 0.5, 0.25, 100, 100)
    meter.record("orders", "get", "bob", 200, 1.0, 0.5, 0, 0, queue_seconds=0.1)
    clock.now = T0 + HOUR + 5
    meter.record("hello", None, "alice", 504, 2.0, 0.0, 10, 20)
    assert meter.flush() == 3
    assert meter.flush() == 0  # nothing pending twice

    rows = store.query("acme", PRICES)
    assert [(r["service"], r["operation"], r["calls"], r["errors"]) for r in rows] == [
        ("hello", None, 1, 1), ("orders", "create", 2, 1), ("orders", "get", 1, 0)]
    create = rows[1]
    assert create["bytes_in"] == 200 and create["bytes_out"] == 1000
    assert create["wall_seconds"] == 1.0 and create["cpu_seconds"] == 0.5
    assert create["cost"] == pytest.approx(2 * 0.0001 + 0.5 * 0.02 + 1200 / 1e9 * 0.05)

    by_hour = store.query("acme", PRICES, group_by=("hour",))
    assert [(r["hour"], r["calls"], r["service"]) for r in by_hour] == [
        (iso_hour(T0), 3, None), (iso_hour(T0 + HOUR), 1, None)]
    by_user = store.query("acme", PRICES, group_by=("user",))
    assert {r["user"]: r["calls"] for r in by_user} == {"alice": 3, "bob": 1}
    assert store.query("other", PRICES) == []


def test_time_range_and_totals(store: UsageStore) -> None:
    clock = Clock(T0)
    meter = UsageMeter(store, "acme", clock=clock)
    for h in range(3):
        clock.now = T0 + h * HOUR + 1
        meter.record("s", None, "u", 200, 0.0, 1.0, 0, 0)
    meter.flush()
    # from is rounded down to its hour, to is exclusive
    rows = store.query("acme", PRICES, start=T0 + HOUR + 30, end=T0 + 2 * HOUR, group_by=())
    assert len(rows) == 1 and rows[0]["calls"] == 1 and rows[0]["service"] is None
    assert store.query("acme", PRICES, start=T0 + 10 * HOUR, group_by=()) == []
    series = store.hourly("acme", PRICES)
    assert [h.calls for h in series] == [1, 1, 1]
    assert series[0].cost == pytest.approx(0.0001 + 0.02)


def test_hourly_fills_missing_hours_with_zero(store: UsageStore) -> None:
    clock = Clock(T0)
    meter = UsageMeter(store, "acme", clock=clock)
    meter.record("s", None, "u", 200, 0.0, 0.0, 0, 0)
    clock.now = T0 + 3 * HOUR
    meter.record("s", None, "u", 200, 0.0, 0.0, 0, 0)
    meter.flush()
    assert [h.calls for h in store.hourly("acme", PRICES)] == [1, 0, 0, 1]
    assert [h.calls for h in store.hourly("acme", PRICES, start=T0 - 9 * HOUR)] == [1, 0, 0, 1]
    assert [h.calls for h in store.hourly("acme", PRICES, start=T0 + HOUR)] == [1]
    assert store.hourly("nobody", PRICES) == []


def test_flush_thread_and_close_write_everything(store: UsageStore) -> None:
    meter = UsageMeter(store, "acme", flush_interval=0.02)
    threads = [threading.Thread(target=lambda: [
        meter.record("s", "op", "u", 200, 0.001, 0.001, 1, 1) for _ in range(500)])
        for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meter.close()
    assert store.query("acme", PRICES)[0]["calls"] == 2000


def _worker(path: str, n: int) -> None:
    meter = UsageMeter(UsageStore(path), "acme", flush_interval=0.01)
    for _ in range(n):
        meter.record("s", None, "u", 200, 0.0, 0.0, 1, 0)
    meter.close()


def test_several_processes_share_one_database(tmp_path: Path) -> None:
    path = str(tmp_path / "usage.db")
    UsageStore(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(path, 3000)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    row = UsageStore(path).query("acme", PRICES)[0]
    assert row["calls"] == 9000 and row["bytes_in"] == 9000


def test_a_failed_flush_keeps_the_counts(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.db", timeout=0.05)
    meter = UsageMeter(store, "acme")
    meter.record("s", None, "u", 200, 0.0, 0.0, 0, 0)
    locker = sqlite3.connect(str(tmp_path / "usage.db"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the database too long
    try:
        assert meter.flush() == 0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    meter.record("s", None, "u", 200, 0.0, 0.0, 0, 0)
    assert meter.flush() == 1
    assert store.query("acme", PRICES)[0]["calls"] == 2


def test_a_bad_batch_is_rolled_back_whole(store: UsageStore) -> None:
    good = ("acme", T0, "s", "", "u", 1, 0, 0.0, 0.0, 0, 0, 0.0)
    with pytest.raises(sqlite3.Error):
        store.add([good, ("acme", T0)])
    assert store.query("acme", PRICES) == []
    store.add([good])
    assert store.query("acme", PRICES)[0]["calls"] == 1


def test_after_fork_the_child_starts_fresh(store: UsageStore) -> None:
    meter = UsageMeter(store, "acme", flush_interval=0.01)
    meter.record("s", None, "u", 200, 0.0, 0.0, 0, 0)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_records, args=(meter,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    meter.close()
    # the parent's pending call is counted once (by the parent), plus the child's one
    assert store.query("acme", PRICES)[0]["calls"] == 2


def _child_records(meter: UsageMeter) -> None:
    assert meter._pending == {}  # the parent's copy was dropped
    meter.record("s", None, "u", 200, 0.0, 0.0, 0, 0)
    meter.close()


def test_parse_helpers() -> None:
    assert parse_time("2026-11-22T15:00:00Z") == parse_time("2026-11-22T16:00:00+01:00")
    assert parse_time("2026-11-22") == parse_time("2026-11-22T00:00:00")
    with pytest.raises(ValueError, match="from: not an ISO 8601"):
        parse_time("yesterday", "from")
    assert parse_group_by(None) == ("service", "operation")
    assert parse_group_by("user, hour,user") == ("user", "hour")
    with pytest.raises(ValueError, match="unknown field 'tenant'"):
        parse_group_by("service,tenant")
    with pytest.raises(ValueError, match="unknown field"):
        parse_group_by(",")
    assert hour_of(T0 + HOUR - 1) == T0
    assert cost(PRICES, 0, 0, 10**9) == pytest.approx(0.05)


def _series(calls: list[int]) -> list[HourTotal]:
    return [HourTotal(T0 + i * HOUR, c, c * 0.001) for i, c in enumerate(calls)]


def test_anomalies_flag_spikes_and_drops_not_noise() -> None:
    steady = [100, 104, 97, 101, 99, 103, 98, 102] * 3
    assert anomalies(_series(steady)) == []
    spiked = anomalies(_series([*steady, 400, 100]))
    assert {(a.hour, a.metric) for a in spiked} == {(T0 + 24 * HOUR, "calls"),
                                                    (T0 + 24 * HOUR, "cost")}
    found = spiked[0].as_dict()
    assert found["hour"] == iso_hour(T0 + 24 * HOUR) and found["value"] == 400
    assert found["expected"] == pytest.approx(100.5) and found["score"] > 3.5
    dropped = anomalies(_series([*steady, 0]))
    assert dropped and dropped[0].score < 0
    # a flat zero history does not flag a single call
    assert anomalies(_series([0] * 10 + [1])) == []
    assert anomalies(_series([5, 500])) == []  # too little history to judge
    assert anomalies(_series([*steady, 400, 100]), last=1) == []  # only the newest hour


def test_forecast_is_trailing_mean_times_horizon() -> None:
    series = _series([10, 20, 30])
    assert forecast(series, 24) == {"calls": 480.0, "cost": pytest.approx(0.48)}
    assert forecast(series, 24, window=1) == {"calls": 720.0, "cost": pytest.approx(0.72)}
    assert forecast([], 24) == {"calls": 0.0, "cost": 0.0}
    both = forecasts(series)
    assert both["next_month"]["calls"] == 30 * both["next_day"]["calls"]
