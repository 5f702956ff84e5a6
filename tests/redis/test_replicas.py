"""Two complete replicas (`mtp run` each: sidecar, framework, worker) on one redis-server:
they limit as one, share jobs, and keep serving on local limits while Redis is away."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.ratelimit import window
from tests.redis.stack import Replica, auth, token, wait_job, write_tenant

pytestmark = pytest.mark.slow

OPEN_LIMITS = "rate = 10000\nburst = 10000"


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("overlay") / "overlay.toml"


@pytest.fixture(scope="module")
def replicas(redis_server, tmp_path_factory, overlay) -> Iterator[tuple[Replica, Replica]]:
    root = tmp_path_factory.mktemp("replicas")
    tenant = write_tenant(root, OPEN_LIMITS)
    env = {"MTP_CONFIG_OVERLAY": str(overlay)}
    a = Replica("a", root, tenant, redis_server.url, extra_env=env).launch()
    b = Replica("b", root, tenant, redis_server.url, extra_env=env).launch()
    try:
        yield a.ready(), b.ready()
    finally:
        a.stop()
        b.stop()


def set_limits(overlay: Path, limits: str, *replicas: Replica) -> None:
    """Apply ``[limits]`` on every replica (the overlay is shared) and wait for it."""
    overlay.write_text(f"[limits]\n{limits}\n")
    quota, _ = window(float(limits.split("rate = ")[1].split()[0]))
    deadline = time.monotonic() + 5
    for replica in replicas:
        while time.monotonic() < deadline:
            reply = replica.call("GET", "/services", auth("probe"))
            if reply.headers.get("RateLimit-Limit") == str(quota):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"{replica.name} did not apply the overlay")


def hammer(replica: Replica, seconds: float, user: str, counts: Counter) -> None:
    """Requests back to back on one keep-alive connection for ``seconds``."""
    headers = auth(user)
    conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=10)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            conn.request("GET", "/services", headers=headers)
            resp = conn.getresponse()
            resp.read()
            counts[(replica.name, resp.status)] += 1
    finally:
        conn.close()


def test_two_replicas_admit_what_one_limit_admits(replicas, overlay) -> None:
    a, b = replicas
    rate, burst, seconds = 40, 10, 4.0
    set_limits(overlay, f"rate = {rate}\nburst = {burst}\ndelay = false", a, b)
    time.sleep(burst / rate + 0.2)  # the probes' share of the burst comes back
    counts: Counter = Counter()
    threads = [threading.Thread(target=hammer, args=(r, seconds, f"u{i}", counts))
               for i, r in enumerate([a, b, a, b, a, b])]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    admitted = counts[("a", 200)] + counts[("b", 200)]
    refused = counts[("a", 429)] + counts[("b", 429)]
    # GCRA: the burst plus one at once, then one every 1/rate s (nodelay).
    expected = burst + 1 + rate * elapsed
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, expected, counts)
    assert refused > admitted  # the load was well over the limit
    assert counts[("a", 200)] > 0.2 * admitted and counts[("b", 200)] > 0.2 * admitted
    set_limits(overlay, OPEN_LIMITS, a, b)


def test_a_job_accepted_on_a_is_polled_and_finished_on_b(replicas) -> None:
    a, b = replicas
    reply = a.call("POST", "/services/sleepy?mode=async", auth("carol"), {"s": 0.3, "n": 7})
    assert reply.status == 202
    job_id = reply.json()["job_id"]
    assert reply.headers["Location"] == f"/jobs/{job_id}"
    done = wait_job(b, job_id, "carol")
    assert done["status"] == "succeeded" and done["result"] == {"slept": 0.3, "n": 7}
    assert b.call("GET", f"/jobs/{job_id}", auth("mallory")).status == 404
    assert b.call("GET", f"/jobs/{job_id}", auth("root", ("admin",))).status == 200
    # wait=N on the other replica: the answer itself, as a sync call gives it.
    waited = b.call("POST", "/services/echo", {**auth("carol"),
                                               "Prefer": "respond-async, wait=10"}, {"w": 1})
    assert waited.status == 200 and waited.json()["echo"] == {"w": 1}
    assert waited.headers["Preference-Applied"] == "wait=10"


def test_a_queued_job_is_cancelled_from_the_other_replica(replicas) -> None:
    a, b = replicas
    # Four worker processes in all: six long jobs keep every one busy.
    busy = [a.call("POST", "/services/sleepy?mode=async", auth("dave"), {"s": 1.5}).json()
            ["job_id"] for _ in range(6)]
    target = a.call("POST", "/services/echo?mode=async", auth("dave"), {"x": 1}).json()["job_id"]
    cancelled = b.call("DELETE", f"/jobs/{target}", auth("dave"))
    assert cancelled.status == 200 and cancelled.json()["status"] == "cancelled"
    running = wait_job(b, busy[0], "dave", until=("running", "succeeded"))
    if running["status"] == "running":
        conflict = b.call("DELETE", f"/jobs/{busy[0]}", auth("dave"))
        assert conflict.status == 409
        assert conflict.headers["Content-Type"] == "application/problem+json"
    for job_id in busy:
        assert wait_job(a, job_id, "dave")["status"] == "succeeded"
    assert wait_job(a, target, "dave")["status"] == "cancelled"  # no worker ran it


def test_redis_outage_serves_on_local_limits_then_shares_again(replicas, overlay,
                                                               redis_server) -> None:
    a, b = replicas
    set_limits(overlay, "rate = 1\nburst = 4\ndelay = false", a, b)
    time.sleep(2.2)  # the two probes' tokens come back at 1/s

    def burst_of_ten() -> int:
        return sum((a if i % 2 else b).call("GET", "/services", auth(f"x{i}")).status == 200
                   for i in range(10))

    assert burst_of_ten() == 5  # one shared bucket of 5 for both replicas
    redis_server.stop()
    try:
        for replica in (a, b):
            ready = replica.call("GET", "/readyz")
            assert ready.status == 200
        assert burst_of_ten() == 10  # each replica limits alone: 5 + 5
        for replica in (a, b):
            assert replica.call("GET", "/readyz").json()["limiter"] == "degraded"
            metrics = replica.call("GET", "/metrics",
                                   {"Authorization": f"Bearer {token('ops', ('admin',))}"})
            assert b"mtp_limiter_degraded 1.0" in metrics.body
        time.sleep(1.1)
        refused = a.call("POST", "/services/echo?mode=async", auth("x"), {})
        assert refused.status == 503
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert b"Traceback" not in refused.body
    finally:
        redis_server.start()
    deadline = time.monotonic() + 10
    for replica in (a, b):
        while replica.call("GET", "/readyz").json()["limiter"] != "redis":
            assert time.monotonic() < deadline, "the limiter did not recover"
            time.sleep(0.1)
    # Redis came back empty (no persistence): one shared bucket again.
    assert burst_of_ten() == 5
