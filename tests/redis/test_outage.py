"""Redis goes away under a running replica and comes back from its append-only file.

Nothing accepted is lost: a job whose handler finished while Redis was away keeps
its result and is written when Redis answers again (never ``interrupted``); jobs
still queued run once Redis is back; sync calls keep working meanwhile and are
all counted in /usage afterwards.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers import wait_for_port
from tests.redis.stack import Replica, auth, wait_job, write_tenant
from tests.servers import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture
def durable_redis(tmp_path):
    """A redis-server that persists every write (AOF, appendfsync always), as in production."""
    server = RedisServer(tmp_path / "redis", persist=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_jobs_finished_during_an_outage_keep_their_results(durable_redis, tmp_path) -> None:
    tenant = write_tenant(tmp_path, "rate = 10000\nburst = 10000")
    replica = Replica("a", tmp_path, tenant, durable_redis.url,
                      extra_env={"MTP_JOB_WORKERS": "3"}).start()
    try:
        jobs = []
        for n in range(9):
            reply = replica.call("POST", "/services/fragile?mode=async", auth("erin"),
                                 {"s": 1.5, "n": n})
            assert reply.status == 202, reply.body
            jobs.append(reply.json()["job_id"])
        wait_job(replica, jobs[0], "erin", until=("running",))
        durable_redis.proc.send_signal(signal.SIGKILL)
        durable_redis.proc.wait(10)
        # While Redis is away: sync calls are served, a new async call is refused.
        synced = 0
        outage_end = time.monotonic() + 4
        while time.monotonic() < outage_end:
            reply = replica.call("POST", "/services/echo", auth("erin"), {"n": synced})
            assert reply.status == 200, reply.body
            synced += 1
            time.sleep(0.2)
        refused = replica.call("POST", "/services/echo?mode=async", auth("erin"), {})
        assert refused.status == 503, refused.body
        durable_redis.start()
        wait_for_port(durable_redis.port, durable_redis.proc)
        for job_id in jobs:
            done = wait_job(replica, job_id, "erin", timeout=60)
            assert done["status"] == "succeeded", done
        assert replica.proc is not None and replica.proc.poll() is None
    finally:
        replica.stop()
    log = replica.log.read_text(errors="replace")
    # One line per transition and part (per job worker process: its jobs and its event
    # deliveries; the sidecar's limiter; ...), each matched by its line when Redis is
    # back: not one per retry (a 4 s outage would then log dozens), and no crash loop.
    down, up = log.count("Redis unreachable"), log.count("Redis reachable again")
    assert down <= 12 and up <= down, log[-3000:]
    assert "could not connect to Redis" not in log
    assert "exited with" not in log


def test_a_worker_started_while_redis_is_away_waits_instead_of_crash_looping(
        durable_redis, tmp_path) -> None:
    """`mtp worker` with Redis down: no exit-and-restart loop, one line, then it works."""
    import subprocess
    import sys

    from tests.helpers import base_env, stop

    tenant = write_tenant(tmp_path, "rate = 10000\nburst = 10000")
    durable_redis.stop()
    log = tmp_path / "worker.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "framework", "worker", "--tenant-dir", str(tenant),
             "--processes", "1"],
            env=base_env(MTP_REDIS_URL=durable_redis.url, MTP_DATA_DIR=str(tmp_path / "w"),
                         MTP_LOG_LEVEL="WARNING", MTP_SIDECAR_SECRET="x" * 32),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    replica = None
    try:
        time.sleep(3)
        assert proc.poll() is None
        durable_redis.start()
        replica = Replica("r", tmp_path, tenant, durable_redis.url).start()
        reply = replica.call("POST", "/services/fragile?mode=async", auth("erin"), {"s": 0})
        assert reply.status == 202, reply.body
        assert wait_job(replica, reply.json()["job_id"], "erin")["status"] == "succeeded"
    finally:
        if replica is not None:
            replica.stop()
        stop(proc)
    text = log.read_text(errors="replace")
    assert "exited with" not in text and "could not connect to Redis" not in text, text
    # One worker process: its job loop and its event deliveries, one line each way.
    assert text.count("Redis unreachable") == text.count("Redis reachable again") <= 2, text


def test_a_redis_without_appendonly_is_named_once_at_start(redis_server, tmp_path) -> None:
    """The shared fixture runs without persistence: `mtp run` says so, once."""
    tenant = write_tenant(tmp_path, "rate = 10000\nburst = 10000")
    replica = Replica("n", tmp_path, tenant, redis_server.url).start()
    replica.stop()
    assert replica.log.read_text().count("Redis runs without appendonly") == 1


def test_a_durable_redis_gets_no_warning(durable_redis, tmp_path) -> None:
    tenant = write_tenant(tmp_path, "rate = 10000\nburst = 10000")
    replica = Replica("d", tmp_path, tenant, durable_redis.url).start()
    replica.stop()
    assert "appendonly" not in replica.log.read_text()
