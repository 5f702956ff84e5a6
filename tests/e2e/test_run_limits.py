"""`mtp run` end to end: rate limit accuracy, concurrency cap, daily quota (issue 3, point 4)."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.helpers import stop
from tests.sidecar.run_stack import RunStack, start_default, tenant_toml
from tests.sidecar.support import Reply, token

pytestmark = pytest.mark.slow

RATE, BURST = 50, 20


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[RunStack]:
    toml = tenant_toml(f"rate = {RATE}\nburst = {BURST}\ndelay = false")
    stack = start_default(tmp_path_factory.mktemp("run-limits"), toml)
    try:
        yield stack
    finally:
        stop(stack.proc)


def overlay(run: RunStack, limits: str, burst: int) -> Reply:
    """Apply an overlay and wait until the sidecar answers under it.

    ``burst`` is unique per overlay and is also its rate, which shows in RateLimit-Limit
    (the rate's quota per 1 s window), so the first answer carrying it is the first
    request served under the new limits.
    """
    run.overlay.write_text(f"[limits]\nrate = {burst}\nburst = {burst}\n{limits}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = run.call("POST", "/services/whoami", auth(), b"{}")
        if r.headers.get("RateLimit-Limit") == str(burst):
            return r
        time.sleep(0.05)
    raise AssertionError("overlay not applied")


def auth(user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub=user)}", "Content-Type": "application/json"}


def test_concurrency_cap(run: RunStack) -> None:
    overlay(run, "concurrency = 2", burst=9001)
    try:
        statuses: list[int] = []

        def one() -> None:
            statuses.append(run.call("POST", "/services/slow", auth(), b'{"s": 1.0}').status)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert sorted(statuses) == [200, 200, 429, 429]
        # The slots are given back: the next calls pass again.
        assert run.call("POST", "/services/slow", auth(), b'{"s": 0}').status == 200
    finally:
        run.overlay.unlink()


def test_daily_quota_warns_then_refuses(run: RunStack) -> None:
    first = overlay(run, "daily_quota = 5", burst=9002)  # counted: used = 1
    try:
        answers = [first] + [run.call("POST", "/services/whoami", auth(), b"{}")
                             for _ in range(5)]
        assert [a.status for a in answers] == [200, 200, 200, 200, 200, 429]
        warned = ["X-Quota-Warning" in a.headers for a in answers[:5]]
        assert warned == [False, False, False, False, True]
        refused = answers[5]
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["Content-Type"] == "application/problem+json"
    finally:
        run.overlay.unlink()


def test_rate_limit_admits_rate_times_time_plus_burst(run: RunStack) -> None:
    """The one slow test: 10 s of load against rate 50, burst 20, nodelay."""
    deadline = time.monotonic() + 10  # the overlays of the tests above are gone
    while run.call("POST", "/services/whoami", auth(), b"{}").headers.get(
            "RateLimit-Limit") != str(RATE):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)  # let the bucket drain so the burst is whole again
    counts: Counter[int] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + 10.0
    first: list[float] = []
    last: list[float] = []
    headers = auth("hammer")

    def hammer() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", run.port, timeout=30)
        while (now := time.monotonic()) < stop_at:
            conn.request("POST", "/services/whoami", b"{}", headers)
            resp = conn.getresponse()
            resp.read()
            with lock:
                if not first:
                    first.append(now)
                last[:] = [now]
                counts[resp.status] += 1
        conn.close()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(counts) <= {200, 429}, counts
    elapsed = last[0] - first[0]
    expected = RATE * elapsed + BURST + 1
    assert counts[429] > counts[200]  # the load was well above the rate
    assert abs(counts[200] - expected) <= 0.02 * expected, (counts, elapsed, expected)
