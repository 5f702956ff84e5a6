"""`mtp probe worker`: the job worker's exec probe, against a real redis-server and
`mtp worker`. The worker serves no HTTP; a worker process of this host must have sent
its heartbeat to Redis lately, which a stopped (SIGSTOP) worker no longer does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import base_env, free_port, spawn, stop
from tests.redis.stack import write_tenant

MTP = [sys.executable, "-m", "framework"]
# An idle RQ worker heartbeats every 15 s (mtp worker's TTL 30 - 15): a fresh one is
# never older than that, a stopped one is after this long.
MAX_AGE = 20


def probe(tenant: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MTP, "probe", "worker", *args],
                          env=base_env(MTP_TENANT_DIR=str(tenant), MTP_REDIS_URL=redis_url),
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def tenant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tenant(tmp_path_factory.mktemp("probe-worker"), "")


@pytest.fixture
def worker(tenant: Path, redis_server, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`mtp worker --processes 1`, registered with Redis."""
    env = base_env(MTP_TENANT_DIR=str(tenant), MTP_REDIS_URL=redis_server.url,
                   MTP_DATA_DIR=str(tmp_path / "data"), MTP_LOG_LEVEL="INFO")
    proc = spawn([*MTP, "worker", "--processes", "1"], env, log=tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 30
        while probe(tenant, redis_server.url).returncode != 0:
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker never registered"
            time.sleep(0.3)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
        stop(proc)


def test_no_worker_of_this_host_fails(tenant, redis_server):
    done = probe(tenant, redis_server.url)
    assert done.returncode == 1
    assert done.stderr.strip() == "mtp probe: worker: no worker process of this host is registered"


def test_a_running_worker_passes_and_a_stopped_one_fails(tenant, redis_server, worker):
    done = probe(tenant, redis_server.url, "--max-age", str(MAX_AGE))
    assert (done.returncode, done.stderr) == (0, "")
    os.killpg(worker.pid, signal.SIGSTOP)  # the pool and its worker process: a hang
    try:
        # No heartbeat can come while stopped: 3 s later the last one is older than 2 s
        # (a tighter bound than a deployment's, so the test need not wait 20 s).
        time.sleep(3)
        done = probe(tenant, redis_server.url, "--max-age", "2")
        assert done.returncode == 1
        assert "last heartbeat" in done.stderr and "over 2s" in done.stderr
    finally:
        os.killpg(worker.pid, signal.SIGCONT)


def test_redis_unreachable_passes_with_a_note(tenant):
    # Restarting the worker would not bring Redis back; it waits for it on its own.
    done = probe(tenant, f"redis://127.0.0.1:{free_port()}/0", "--timeout", "1")
    assert done.returncode == 0
    assert "Redis unreachable" in done.stderr


def test_without_redis_url_or_tenant_it_fails(tenant, tmp_path):
    done = probe(tenant, "")
    assert done.returncode == 1 and "MTP_REDIS_URL is not set" in done.stderr
    done = probe(tmp_path / "missing", "redis://127.0.0.1:1/0")
    assert done.returncode == 1 and done.stderr.startswith("mtp probe: ")
