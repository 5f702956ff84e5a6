"""The Redis job store, the RQ-backed runner and the worker's job function, in process,
against a real redis-server (the cross-replica behaviour is in test_replicas.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest
import redis
from rq.exceptions import AbandonedJobError
from rq.job import Job as RqJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from framework.errors import Saturated, Unavailable
from framework.jobs import Job, new_job_id
from framework.jobs_redis import (
    JobWaiter,
    RedisJobRunner,
    RedisJobStore,
    StoredError,
    connect,
    on_failure,
    outcome_of,
    perform,
    redis_jobs,
)
from framework.settings import Settings
from tests.helpers import base_env, free_port
from tests.redis.stack import write_tenant


@pytest.fixture
def client(redis_server):
    conn = connect(redis_server.url)
    conn.flushdb()
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def tenant_dir(tmp_path_factory) -> Path:
    return write_tenant(tmp_path_factory.mktemp("jobs-redis"), "rate = 1000\nburst = 1000")


@pytest.fixture
def settings(redis_server, tenant_dir, tmp_path) -> Settings:
    return Settings.from_env({"MTP_REDIS_URL": redis_server.url, "MTP_DATA_DIR": str(tmp_path),
                              "MTP_JOB_QUEUE": "3", "MTP_WORKERS": "1",
                              "MTP_LOG_LEVEL": "WARNING"}, tenant_dir=tenant_dir)


def new_job(service: str = "echo") -> Job:
    return Job(id=new_job_id(), tenant="acme", service=service, operation=None, owner="alice",
               request_id="req-1", created=time.time())


def test_state_changes_are_conditional(client) -> None:
    store = RedisJobStore(client, "acme", 60)
    job = new_job()
    store.create(job)
    assert store.get(job.id).status == "queued" and store.get(job.id).operation is None
    assert not store.finish(job.id, "succeeded", b"1")  # not running yet
    assert store.claim(job.id, "worker-1", time.time() + 5)
    assert not store.claim(job.id, "worker-2", time.time() + 5)  # claimed once only
    assert not store.cancel(job.id)  # running: too late
    assert store.finish(job.id, "succeeded", result_json=b'{"ok":true}')
    done = store.get(job.id)
    assert done.status == "succeeded" and done.result == {"ok": True}
    assert done.runner == "worker-1" and done.started and done.finished
    assert 0 < client.ttl(store.key(job.id)) <= 60  # finished jobs expire
    assert store.get("0" * 32) is None
    assert store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0,
                              "cancelled": 0}
    assert store.purge(time.time() + 1) == 1 and store.counts()["succeeded"] == 0


def test_fail_and_requeue(client) -> None:
    store = RedisJobStore(client, "acme", 60)
    first, second = new_job(), new_job()
    store.create(first)
    store.create(second)
    store.claim(second.id, "w", time.time() + 5)
    assert store.requeue(second.id)
    requeued = store.get(second.id)
    assert requeued.status == "queued" and requeued.started is None and not requeued.runner
    assert client.ttl(store.key(second.id)) == -1  # unfinished jobs do not expire
    assert store.fail([first.id, second.id], "interrupted", "gone") == 2
    failed = store.get(first.id)
    assert failed.status == "failed" and failed.error["reason"] == "interrupted"
    assert store.fail([first.id], "interrupted", "again") == 0


def test_the_reaper_runs_as_the_tenants_acl_user(client, redis_server) -> None:
    """A tenant's ACL user may not run INFO: the reaper takes its connection's age as the
    least Redis has been up (a fresh one may follow a restart: hold, as after an outage)."""
    from framework.control.acl import set_user

    user = set_user(client, "acme")
    assert user is not None
    acl = connect(user.url(redis_server.url))
    try:
        store = RedisJobStore(acl, "acme", 60)
        assert store.reap() == 0
        assert store._hold_until > time.monotonic()  # not reaped while Redis may be new
        assert store.reap() == 0  # and again: no INFO round trip that fails each pass
    finally:
        acl.close()
        client.acl_deluser("t-acme")


def test_rq_keeps_the_tenants_keys_and_a_late_prefix_is_refused(client, monkeypatch) -> None:
    """RQ fixes its prefix at import: this process's is acme's (tests/conftest.py); setting
    another tenant's after RQ is loaded would leave RQ on keys that are not that tenant's."""
    import os

    from framework.rq_keys import ENV, prefix, use_tenant_prefix

    monkeypatch.setitem(os.environ, ENV, os.environ[ENV])  # restored afterwards
    store = RedisJobStore(client, "acme", 60)
    assert store.queue.key == "mtp:acme:rq:queue:mtp-acme" == f"{prefix('acme')}:queue:mtp-acme"
    use_tenant_prefix("acme")  # the prefix RQ has: fine
    with pytest.raises(RuntimeError, match="imported with key prefix 'mtp:acme:rq'"):
        use_tenant_prefix("beta")


def test_cancel_takes_the_job_off_the_rq_queue_in_the_same_step(client, settings) -> None:
    from framework.registry import Registry
    from framework.tenant_config import load_tenant

    tenant = load_tenant(settings.tenant_dir / "tenant.toml")
    store, runner = redis_jobs(settings, tenant)
    spec = Registry(settings.tenant_dir, tenant).resolve("echo")
    job, _ = runner.submit(spec, ctx_for(spec), owner="alice")
    assert client.lrange(store.queue.key, 0, -1) == [job.id.encode()]
    # The job's arguments are stored as JSON, never pickled (no code runs from Redis data).
    data = zlib.decompress(client.hget(RqJob.key_for(job.id), "data"))
    assert json.loads(data)[2][0] == job.id
    assert store.cancel(job.id)
    assert client.llen(store.queue.key) == 0
    assert RqJob.fetch(job.id, connection=client,
                       serializer=JSONSerializer).get_status() == JobStatus.CANCELED
    assert store.get(job.id).status == "cancelled"
    assert not store.claim(job.id, "w", time.time() + 5)  # a worker that popped it earlier


def test_the_shared_queue_is_bounded(client, settings) -> None:
    from framework.registry import Registry
    from framework.tenant_config import load_tenant

    tenant = load_tenant(settings.tenant_dir / "tenant.toml")
    store, runner = redis_jobs(settings, tenant)
    spec = Registry(settings.tenant_dir, tenant).resolve("echo")
    for _ in range(3):  # MTP_JOB_QUEUE x MTP_WORKERS
        runner.submit(spec, ctx_for(spec), owner="alice")
    with pytest.raises(Saturated) as refused:
        runner.submit(spec, ctx_for(spec), owner="alice")
    assert refused.value.status == 503 and refused.value.headers() == {"Retry-After": "1"}
    assert store.counts()["queued"] == 3  # nothing recorded for the refused call


def test_redis_away_is_503_not_a_crash(settings) -> None:
    from framework.registry import Registry
    from framework.tenant_config import load_tenant

    tenant = load_tenant(settings.tenant_dir / "tenant.toml")
    dead = connect(f"redis://127.0.0.1:{free_port()}/0")
    store = RedisJobStore(dead, "acme", 60)
    assert not store.usable()
    spec = Registry(settings.tenant_dir, tenant).resolve("echo")
    with pytest.raises(Unavailable):
        RedisJobRunner(store, tenant, 5).submit(spec, ctx_for(spec), owner="alice")


def test_enqueue_failure_is_503(client, settings) -> None:
    from framework.registry import Registry
    from framework.tenant_config import load_tenant

    tenant = load_tenant(settings.tenant_dir / "tenant.toml")
    store = RedisJobStore(client, "acme", 60)
    # The length check answers, then Redis is gone before the MULTI/EXEC.
    store.client = connect(f"redis://127.0.0.1:{free_port()}/0")
    spec = Registry(settings.tenant_dir, tenant).resolve("echo")
    with pytest.raises(Unavailable):
        RedisJobRunner(store, tenant, 5).submit(spec, ctx_for(spec), owner="alice")
    assert client.llen(store.queue.key) == 0


def test_waiter_returns_the_answer_once_finished(client) -> None:
    store = RedisJobStore(client, "acme", 60)
    ok, bad = new_job(), new_job()
    for job in (ok, bad):
        store.create(job)
        store.claim(job.id, "w", time.time() + 5)
    with pytest.raises(FutureTimeout):
        JobWaiter(store, ok.id).result(0.05)
    store.finish(ok.id, "succeeded", result_json=b'{"n":1}')
    outcome = JobWaiter(store, ok.id).result(1)
    assert outcome.status == 200 and json.loads(outcome.body) == {"n": 1}
    store.finish(bad.id, "failed", error={"type": "urn:mtp:problem:service-error",
                                          "status": 500, "detail": "boom", "error_id": "e1"})
    failed = JobWaiter(store, bad.id).result(1)
    assert isinstance(failed.error, StoredError)
    assert failed.status == 500 and failed.error.kind == "service-error"
    assert failed.error.extra == {"error_id": "e1"}
    cancelled = new_job()
    store.create(cancelled)
    store.cancel(cancelled.id)
    assert outcome_of(store.get(cancelled.id)) is None


@pytest.mark.parametrize(("exc", "retries", "status", "reason"), [
    (AbandonedJobError(), 0, "failed", "interrupted"),
    (AbandonedJobError(), 2, "queued", None),
    (JobTimeoutException(), 0, "failed", "deadline"),
    (ValueError(), 0, "failed", "worker-error"),
])
def test_failure_callback(client, exc, retries, status, reason) -> None:
    store = RedisJobStore(client, "acme", 60)
    job = new_job()
    store.create(job)
    store.claim(job.id, "w", time.time() + 5)
    rq_job = RqJob.create("framework.jobs_redis.perform", connection=client, id=job.id,
                          meta={"tenant": "acme"}, failure_ttl=60)
    rq_job.retries_left = retries
    on_failure(rq_job, client, type(exc), exc, None)
    after = store.get(job.id)
    assert after.status == status
    assert (after.error or {}).get("reason") == reason


def test_the_job_function_runs_services_with_the_framework_seams(client, settings) -> None:
    from framework.cli.worker import build_job_worker
    from framework.jobs_redis import install_worker

    tenant = settings.load_tenant()
    worker = build_job_worker(settings, tenant)
    store = worker.store
    calls = {}
    for name, service in (("ok", "echo"), ("raises", "broken"), ("gone", "nosuch"),
                          ("cancelled", "echo"), ("late", "late")):
        job = new_job(service)
        store.create(job)
        calls[name] = job.id
    store.cancel(calls["cancelled"])
    call = {"tenant": "acme", "operation": None, "user": "alice", "groups": ["g"],
            "roles": [], "auth_method": "jwt", "payload": {"x": 1}, "params": {},
            "request_id": "req-9"}
    with pytest.raises(RuntimeError):
        perform(calls["ok"], {**call, "service": "echo"})  # only inside `mtp worker`
    install_worker(worker)
    try:
        assert perform(calls["ok"], {**call, "service": "echo"}) == "succeeded"
        assert perform(calls["raises"], {**call, "service": "broken"}) == "failed"
        assert perform(calls["gone"], {**call, "service": "nosuch"}) == "failed"
        assert perform(calls["cancelled"], {**call, "service": "echo"}) is None
        late = {**call, "service": "late", "payload": {"s": 0.4}}
        assert perform(calls["late"], late) == "failed"  # a job obeys its timeout
    finally:
        install_worker(None)  # type: ignore[arg-type]
        worker.rt.close()
    assert store.get(calls["ok"]).result["echo"] == {"x": 1}
    assert store.get(calls["raises"]).error["type"].endswith("service-error")
    assert store.get(calls["gone"]).error["status"] == 404
    assert store.get(calls["cancelled"]).status == "cancelled"
    assert store.get(calls["late"]).error["status"] == 504


def test_worker_refuses_to_start_without_redis(tmp_path, tenant_dir) -> None:
    proc = subprocess.run([sys.executable, "-m", "framework", "worker", "--tenant-dir",
                           str(tenant_dir)], env=base_env(MTP_DATA_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "MTP_REDIS_URL" in proc.stderr and "Traceback" not in proc.stderr


def test_worker_burst_runs_what_is_queued_then_exits(client, settings, redis_server,
                                                     tmp_path) -> None:
    from framework.registry import Registry

    tenant = settings.load_tenant()
    store, runner = redis_jobs(settings, tenant)
    spec = Registry(settings.tenant_dir, tenant).resolve("echo")
    job, _ = runner.submit(spec, ctx_for(spec), owner="alice")
    proc = subprocess.run(
        [sys.executable, "-m", "framework", "worker", "--burst", "--processes", "2"],
        env=base_env(MTP_REDIS_URL=redis_server.url, MTP_TENANT_DIR=str(settings.tenant_dir),
                     MTP_DATA_DIR=str(tmp_path), MTP_LOG_LEVEL="WARNING"),
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert store.get(job.id).status == "succeeded"


def ctx_for(spec):
    from framework.context import Context
    from framework.flags import FlagSet

    return Context(tenant_id="acme", service=spec.name, operation=None, user="alice",
                   groups=(), roles=(), auth_method="jwt", payload={"x": 1}, params={},
                   request_id="req-1", config={}, flags=FlagSet({}, "acme", "alice", (), ()),
                   logger=__import__("logging").getLogger("t"),
                   deadline=time.monotonic() + 5)


def test_connect_is_bounded(redis_server) -> None:
    conn = connect(redis_server.url, pool_size=3)
    assert isinstance(conn, redis.Redis)
    assert conn.connection_pool.max_connections == 3
    conn.close()


def test_a_worker_stuck_past_the_timeout_exits_and_its_job_is_abandoned(
        client, settings, redis_server, tmp_path, monkeypatch) -> None:
    import framework.jobs_redis
    from framework.cli.worker import HEARTBEAT_GRACE, HUNG_EXIT, MONITOR_INTERVAL
    from framework.registry import Registry

    monkeypatch.setattr(framework.jobs_redis, "TIMEOUT_MARGIN", 0)  # RQ timeout = 1 s
    # The module's redis-server is seconds old: no grace as after a restart.
    monkeypatch.setattr(framework.jobs_redis, "OUTAGE_GRACE", 0)
    tenant = settings.load_tenant()
    store, runner = redis_jobs(settings, tenant)
    spec = Registry(settings.tenant_dir, tenant).resolve("stuck")
    job, _ = runner.submit(spec, ctx_for(spec), owner="alice")
    script = ("import sys\nfrom framework.cli import worker as w\nw.HANG_GRACE = 1\n"
              "from framework.settings import Settings\ns = Settings.from_env()\n"
              "sys.exit(w.run_worker(s, s.load_tenant(), True))\n")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=base_env(MTP_REDIS_URL=redis_server.url, MTP_TENANT_DIR=str(settings.tenant_dir),
                     MTP_DATA_DIR=str(tmp_path), MTP_LOG_LEVEL="WARNING"),
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == HUNG_EXIT, proc.stderr
    assert "stuck" in proc.stderr
    assert store.get(job.id).status == "running"
    time.sleep(MONITOR_INTERVAL + HEARTBEAT_GRACE + 0.5)  # its heartbeat runs out
    assert store.reap() == 1  # what every framework worker's reaper does
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["reason"] == "interrupted"


def test_job_routes_answer_503_while_redis_is_away(tenant_dir, tmp_path) -> None:
    """GET/DELETE /jobs and /metrics read the store: Redis down is 503 problem+json, not 500."""
    from framework.app import create_app
    from tests.framework.client import signed_headers
    from tests.framework.tenant import SECRET

    settings = Settings.from_env({
        "MTP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "MTP_DATA_DIR": str(tmp_path),
        "MTP_SIDECAR_SECRET": SECRET, "MTP_LOG_LEVEL": "CRITICAL"}, tenant_dir=tenant_dir)
    app = create_app(settings, settings.load_tenant(), background=False)
    try:
        client = app.test_client()
        path = f"/jobs/{new_job_id()}"
        for method in ("GET", "DELETE"):
            answer = client.open(path, method=method, headers=signed_headers(method, path))
            assert answer.status_code == 503, answer.data
            assert answer.content_type == "application/problem+json"
            assert answer.headers["Retry-After"] == "1"
        metrics = client.get("/metrics", headers=signed_headers("GET", "/metrics"))
        assert metrics.status_code == 503
    finally:
        app.extensions["mtp"].close()


def test_a_job_records_its_principal_and_older_hashes_belong_to_no_principal(
        client, settings) -> None:
    from framework.registry import Registry

    tenant = settings.load_tenant()
    store, runner = redis_jobs(settings, tenant)
    spec = Registry(settings.tenant_dir, tenant).resolve("echo")
    job, _ = runner.submit(spec, ctx_for(spec), owner="alice")
    stored = store.get(job.id)
    assert stored.auth_method == "jwt" and stored.belongs_to("alice", "jwt")
    assert not stored.belongs_to("alice", "api_key")
    # A hash written before the method was recorded: readable, the user id decides.
    client.hdel(store.key(job.id), "auth_method")
    legacy = store.get(job.id)
    assert legacy.auth_method == "" and not legacy.belongs_to("alice", "api_key")
    assert not legacy.belongs_to("bob", "jwt")


def test_a_stopping_framework_refuses_new_jobs_and_leaves_the_queue_alone(
        client, settings) -> None:
    from framework.registry import Registry

    tenant = settings.load_tenant()
    store, runner = redis_jobs(settings, tenant)
    spec = Registry(settings.tenant_dir, tenant).resolve("echo")
    queued, _ = runner.submit(spec, ctx_for(spec), owner="alice")
    assert runner.drain(time.monotonic()) and runner.adopt() == 0
    with pytest.raises(Unavailable) as refused:
        runner.submit(spec, ctx_for(spec), owner="alice")
    assert refused.value.status == 503 and refused.value.kind == "stopping"
    assert store.get(queued.id).status == "queued" and store.queue.count == 1


def test_sigterm_to_mtp_worker_leaves_queued_jobs_in_the_queue(client, settings, redis_server,
                                                                tmp_path) -> None:
    """A graceful stop: the running job finishes, the queued ones stay in the RQ queue and
    the next worker runs them; none is failed."""
    from framework.registry import Registry
    from tests.helpers import spawn, stop

    tenant = settings.load_tenant()
    store, runner = redis_jobs(settings, tenant)
    runner.max_queued = 100
    spec = Registry(settings.tenant_dir, tenant).resolve("sleepy")
    ids = []
    for n in range(5):
        ctx = ctx_for(spec)
        ctx.payload = {"s": 1, "n": n}
        ids.append(runner.submit(spec, ctx, owner="alice")[0].id)
    env = base_env(MTP_REDIS_URL=redis_server.url, MTP_TENANT_DIR=str(settings.tenant_dir),
                   MTP_DATA_DIR=str(tmp_path), MTP_LOG_LEVEL="WARNING")
    worker = spawn([sys.executable, "-m", "framework", "worker", "--processes", "1"], env,
                   log=tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 30
        while store.get(ids[0]).status != "running":
            assert worker.poll() is None and time.monotonic() < deadline, (
                tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        assert stop(worker, timeout=30) == 0
    finally:
        stop(worker)
    states = [store.get(job_id).status for job_id in ids]
    assert states[0] == "succeeded" and set(states[1:]) == {"queued"}, states
    assert store.queue.count == 4
    burst = subprocess.run([sys.executable, "-m", "framework", "worker", "--burst",
                            "--processes", "2"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert burst.returncode == 0, burst.stderr
    assert [store.get(job_id).status for job_id in ids] == ["succeeded"] * 5
