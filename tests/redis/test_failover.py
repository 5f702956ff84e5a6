"""A replica SIGKILLed (every process of it) after accepting jobs loses none of them:
another replica's worker runs the queued ones, retries the idempotent one that was
running, and fails the non-idempotent one that was running as interrupted."""

from __future__ import annotations

import pytest

from tests.redis.stack import Replica, auth, wait_job, write_tenant

pytestmark = pytest.mark.slow


def test_killed_replica_loses_no_jobs(redis_server, tmp_path) -> None:
    tenant = write_tenant(tmp_path, "rate = 10000\nburst = 10000")
    a = Replica("a", tmp_path, tenant, redis_server.url).start()  # two worker processes
    b = Replica("b", tmp_path, tenant, redis_server.url)
    try:
        def submit(service: str, seconds: float, n: int) -> str:
            reply = a.call("POST", f"/services/{service}?mode=async", auth("erin"),
                           {"s": seconds, "n": n})
            assert reply.status == 202
            return reply.json()["job_id"]

        # Both of A's workers busy: one job that may run twice, one that must not.
        retried = submit("sleepy", 2.0, 0)
        interrupted = submit("fragile", 2.0, 1)
        for job_id in (retried, interrupted):
            wait_job(a, job_id, "erin", until=("running",))
        queued = [submit("sleepy", 0.1, n) for n in range(2, 6)]
        a.kill()
        b.start()
        for job_id in [retried, *queued]:
            done = wait_job(b, job_id, "erin", timeout=40)
            assert done["status"] == "succeeded", done
        assert wait_job(b, retried, "erin")["result"]["n"] == 0
        failed = wait_job(b, interrupted, "erin", timeout=40)
        assert failed["status"] == "failed"
        assert failed["error"]["reason"] == "interrupted"
    finally:
        if a.proc is not None:
            a.stop()
        b.stop()
