"""Circuit breaker: consecutive 500/504 open it, a cooldown half-opens it, one trial decides."""

from __future__ import annotations

import json
import threading
import time

import pytest

from framework.breaker import CLOSED, HALF_OPEN, OPEN, Breakers, CircuitBreaker, is_failure
from framework.tenant_config import BreakerSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(BreakerSettings(failures=3, cooldown=10), clock)


def fail(breaker: CircuitBreaker, n: int, status: int = 500) -> None:
    for _ in range(n):
        assert breaker.admit().allowed
        breaker.record(status)


def test_only_500_and_504_are_failures() -> None:
    assert is_failure(500) and is_failure(504)
    assert not any(is_failure(s) for s in (200, 202, 400, 403, 404, 429, 502, 503))


def test_consecutive_failures_open_and_success_resets(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.record(200)  # resets the count
    fail(breaker, 2, status=504)
    breaker.record(400)  # the client's mistake is not the service failing
    fail(breaker, 2)
    assert breaker.state == CLOSED
    fail(breaker, 1)
    assert breaker.state == OPEN
    refused = breaker.admit()
    assert not refused.allowed and refused.retry_after == pytest.approx(10)


def test_half_open_lets_exactly_one_trial_and_success_closes(
        breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 4
    assert breaker.admit().retry_after == pytest.approx(6)
    clock.now += 6
    assert breaker.state == HALF_OPEN
    trial = breaker.admit()
    assert trial.allowed and trial.trial
    others = [breaker.admit() for _ in range(5)]
    assert not any(a.allowed for a in others)
    breaker.record(200, trial=True)
    assert breaker.state == CLOSED
    assert breaker.admit() == trial.__class__(True)


def test_failed_trial_reopens_for_a_full_cooldown(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 10
    trial = breaker.admit()
    breaker.record(504, trial=trial.trial)
    assert breaker.state == OPEN
    clock.now += 9.5
    assert not breaker.admit().allowed
    clock.now += 0.5
    assert breaker.admit().trial


def test_late_outcomes_of_calls_admitted_before_opening_are_ignored(
        breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    breaker.record(200)  # a slow call admitted while closed ends now
    assert breaker.state == OPEN
    clock.now += 10
    breaker.record(500)  # and another one, while half-open
    assert breaker.state == HALF_OPEN


def test_a_trial_that_never_reports_expires(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 10
    assert breaker.admit().trial
    assert not breaker.admit().allowed
    clock.now += 10
    assert breaker.admit().trial


def test_release_gives_the_trial_back(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 10
    trial = breaker.admit()
    breaker.release(trial.trial)  # e.g. the pool was full: the service never ran
    assert breaker.state == HALF_OPEN
    assert breaker.admit().trial
    breaker.release(False)  # a normal call's release changes nothing
    assert not breaker.admit().allowed


def test_concurrent_half_open_admits_one(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 10
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def race() -> None:
        barrier.wait()
        results.append(breaker.admit().allowed)

    threads = [threading.Thread(target=race) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


def test_registry_is_per_service_and_follows_settings(clock: Clock) -> None:
    breakers = Breakers(clock)
    settings = BreakerSettings(failures=1, cooldown=5)
    assert breakers.get("plain", None) is None
    orders = breakers.get("orders", settings)
    assert breakers.get("orders", settings) is orders
    hello = breakers.get("hello", settings)
    assert orders is not None and hello is not None
    orders.admit()
    orders.record(500)
    assert breakers.states() == {"hello": CLOSED, "orders": OPEN}  # others unaffected
    changed = breakers.get("orders", BreakerSettings(failures=2, cooldown=5))
    assert changed is not orders and changed is not None and changed.state == CLOSED


def test_a_handler_still_running_past_its_deadline_opens_the_breaker(tmp_path) -> None:
    """In one worker: the watchdog counts the hung call at once, not when it returns."""
    from concurrent.futures import ThreadPoolExecutor

    from framework import signing
    from framework.app import create_app
    from framework.settings import Settings
    from tests.ops.tenant import SIDECAR_SECRET, TENANT, make_tenant

    root = make_tenant(tmp_path / "tenant")
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET,
                                  "MTP_DATA_DIR": str(tmp_path / "data"),
                                  "MTP_TENANT_DIR": str(root)})
    app = create_app(settings, settings.load_tenant(), background=False)
    ops, rt = app.extensions["mtp.operations"], app.extensions["mtp"]

    def post(seconds: float):
        sent = {signing.REQUEST_ID: "wd", signing.TENANT: TENANT, signing.USER: "alice",
                signing.GROUPS: "", signing.ROLES: "", signing.AUTH_METHOD: "jwt"}
        body = json.dumps({"seconds": seconds}).encode()  # the signed bytes
        sent.update(signing.sign(SIDECAR_SECRET.encode(), "POST", "/services/slow", sent,
                                 body=body))
        return app.test_client().post("/services/slow", data=body, headers=sent,
                                      content_type="application/json")

    try:
        with ThreadPoolExecutor(1) as pool:
            hung = pool.submit(post, 3)  # [services.slow]: timeout 0.3, breaker failures = 1
            deadline = time.monotonic() + 10
            while ops.breakers.states().get("slow") != OPEN:
                assert time.monotonic() < deadline, "the hung call was never counted"
                time.sleep(0.02)
            assert not hung.done() and len(rt.executor.inflight) == 1
            refused = post(0)
            assert refused.status_code == 503 and refused.headers["Retry-After"]
            assert refused.get_json()["type"].endswith("circuit-open")
            late = hung.result(10)
        assert late.status_code == 504 and late.get_json()["type"].endswith("deadline-exceeded")
        assert ops.breakers.states()["slow"] == OPEN  # counted once, still open
        assert len(rt.executor.inflight) == 0
        ops.meter.flush()  # the late call is in usage as an error (504)
        tenant = rt.tenant
        rows = ops.store.query(tenant.tenant_id, tenant.billing, None, None, ["service"])
        slow = next(r for r in rows if r["service"] == "slow")
        # Both are 5xx: the late 504 and the 503 of the breaker (refused, never ran).
        assert slow["calls"] == 2 and slow["errors"] == 2
    finally:
        ops.close()
        rt.close()
