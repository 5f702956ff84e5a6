"""Fixtures: a tenant on disk and `mtp framework` (real gunicorn, 2 workers) serving it."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.framework.client import Client
from tests.framework.tenant import SECRET, make_tenant
from tests.helpers import base_env, free_port, spawn, stacks_of, stop, wait_for_port

MTP = [sys.executable, "-m", "framework"]


@dataclass
class Server:
    client: Client
    root: Path  # tenant dir
    data: Path  # MTP_DATA_DIR
    log: Path
    proc: object

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def server_env(data: Path, port: int, **extra: str) -> dict[str, str]:
    """The framework's environment; ``extra`` adds to or overrides the defaults."""
    env = base_env(
        MTP_SIDECAR_SECRET=SECRET, MTP_DATA_DIR=str(data), MTP_UPSTREAM=f"127.0.0.1:{port}",
        MTP_WORKERS="2", MTP_THREADS="4", MTP_MAX_RESULT="100000", MTP_MAX_BODY="4096")
    env.update(extra)
    return env


def start_server(tmp: Path, **extra: str) -> Server:
    root = make_tenant(tmp / "tenant")
    data = tmp / "data"
    port = free_port()
    log = tmp / "framework.log"
    proc = spawn([*MTP, "framework", "--tenant-dir", str(root)], server_env(data, port, **extra),
                 log=log)
    client = Client(port, diagnose=stacks_of(proc, log))
    try:
        wait_for_port(port, proc)
        # An HTTP answer proves it is this framework that listens, not a stray socket.
        assert client.get("/healthz").status == 200
    except Exception:
        print(log.read_text(errors="replace"))
        stop(proc)
        raise
    return Server(client, root, data, log, proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One framework for the module: 2 workers x 4 threads, small job pools."""
    tmp = tmp_path_factory.mktemp("fw")
    srv = start_server(tmp, MTP_JOB_WORKERS="1", MTP_JOB_QUEUE="1")
    yield srv
    stop(srv.proc)
    shutil.rmtree(tmp, ignore_errors=True)
