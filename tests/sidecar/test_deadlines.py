"""Deadlines and admission end to end: a real `mtp sidecar` in front of a real `mtp framework`.

The framework runs 1 worker x 3 threads, so the sidecar admits 3 calls at once.
Services: ``sleepy`` (timeout 1 s) sleeps and leaves a file when it starts and
when it ends; ``stuck`` (timeout 0.5 s, breaker after 2 failures) waits until
the test releases it, as a handler that never returns; ``fast`` (timeout 2 s).
No timing assertions beyond "answered before a generous bound".
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import base_env, free_port, spawn, stop, wait_for_port, wait_for_unix
from tests.sidecar.run_stack import pids_in_group
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, Reply, call, token

PROBLEM = "application/problem+json"
LOADED = re.compile(r"service catalog \w+ loaded")

TENANT_TOML = """
[tenant]
id = "acme"
framework_version = "0.1.0"

[auth.jwt]
algorithms = ["HS256"]

[services.stuck]
timeout = 0.5
breaker = { failures = 2, cooldown = 60 }

[limits]
rate = 10000
burst = 10000
"""

SLEEPY = '''"""Sleeps payload["s"] seconds; marks its start and end in payload["dir"]."""
import os
import time

TIMEOUT = 1


def handle(context):
    p = context.payload
    open(os.path.join(p["dir"], p["id"] + ".started"), "w").close()
    time.sleep(p["s"])
    open(os.path.join(p["dir"], p["id"] + ".ended"), "w").close()
    return {"slept": p["s"]}
'''

STUCK = '''"""Never returns until payload["release"] exists (a hung handler)."""
import os
import time


def handle(context):
    while not os.path.exists(context.payload["release"]):
        time.sleep(0.05)
    return {"released": True}
'''

FAST = '''"""Answers at once."""
TIMEOUT = 2


def handle(context):
    return {"ok": True}
'''


@dataclass
class Platform:
    port: int
    dir: Path
    framework: object
    sidecar: object
    marks: Path

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        sent = {"Authorization": f"Bearer {token()}", **(headers or {})}
        if body is not None:
            sent["Content-Type"] = "application/json"
        return call(self.port, method, path, sent, body)

    def sleepy(self, seconds: float, name: str | None = None) -> Reply:
        body = f'{{"s": {seconds}, "dir": "{self.marks}", "id": "{name or uuid.uuid4().hex}"}}'
        return self.call("POST", "/services/sleepy", body.encode())

    def stuck(self, release: Path) -> Reply:
        return self.call("POST", "/services/stuck", f'{{"release": "{release}"}}'.encode())


def problem(reply: Reply, status: int) -> dict:
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"] == PROBLEM
    doc = reply.json()
    assert doc["status"] == status and doc["request_id"] and b"Traceback" not in reply.body
    return doc


def threads_of(pgid: int) -> int:
    """Threads of every process of the framework (master and workers)."""
    total = 0
    for pid in pids_in_group(pgid):
        try:
            total += len(list(Path(f"/proc/{pid}/task").iterdir()))
        except OSError:
            continue
    return total


def until(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    d = tmp_path_factory.mktemp("deadlines")
    tenant = d / "tenant"
    (tenant / "services").mkdir(parents=True)
    (tenant / "tenant.toml").write_text(TENANT_TOML)
    for name, source in (("sleepy", SLEEPY), ("stuck", STUCK), ("fast", FAST)):
        (tenant / "services" / f"{name}.py").write_text(source)
    marks = d / "marks"
    marks.mkdir()
    sock = d / "fw.sock"
    port = free_port()
    env = base_env(MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
                   MTP_TENANT_DIR=str(tenant), MTP_UPSTREAM=f"unix:{sock}",
                   MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(d / "data"),
                   MTP_WORKERS="1", MTP_THREADS="3", MTP_LOG_LEVEL="INFO")
    framework = spawn([sys.executable, "-m", "framework", "framework"], env,
                      log=d / "framework.log")
    sidecar = None
    try:
        wait_for_unix(sock, framework)
        sidecar = spawn([sys.executable, "-m", "framework", "sidecar"], env,
                        log=d / "sidecar.log")
        wait_for_port(port, sidecar)
        # The sidecar knows the services' timeouts once it loaded the framework's catalog.
        until(lambda: LOADED.search((d / "sidecar.log").read_text(errors="replace")),
              what="catalog loaded")
        yield Platform(port, d, framework, sidecar, marks)
    finally:
        os.killpg(framework.pid, signal.SIGCONT)  # a test that failed mid-stop
        (d / "release").touch()
        if sidecar is not None:
            stop(sidecar)
        stop(framework)


def test_504_at_the_deadline_while_the_handler_still_runs(platform: Platform) -> None:
    started = time.monotonic()
    reply = platform.sleepy(6, "late")
    waited = time.monotonic() - started
    doc = problem(reply, 504)
    assert "sleepy" in doc["detail"] and "1s" in doc["detail"]
    assert doc["type"].endswith("deadline-exceeded")
    assert reply.headers["X-Request-ID"] == doc["request_id"]
    # Answered at the deadline, not when the handler returned: it is still running.
    assert waited < 5.5
    assert (platform.marks / "late.started").exists()
    assert not (platform.marks / "late.ended").exists()
    until(lambda: (platform.marks / "late.ended").exists(), what="the handler's end")


def test_a_full_framework_is_503_readyz_answers_and_calls_are_admitted_again(
        platform: Platform) -> None:
    until(lambda: platform.call("POST", "/services/fast", b"{}").status == 200,
          what="free threads")
    # Three sleepers take the framework's three threads; each client gets 504 at 1 s.
    with ThreadPoolExecutor(3) as pool:
        sleepers = list(pool.map(lambda i: platform.sleepy(6, f"full{i}"), range(3)))
    assert [r.status for r in sleepers] == [504] * 3
    threads = threads_of(platform.framework.pid)
    # The handlers still run and still hold their threads: the sidecar admits no more.
    with ThreadPoolExecutor(8) as pool:  # each waits its short while for a slot, in vain
        refused = list(pool.map(lambda i: platform.sleepy(0, f"refused{i}"), range(8)))
    for reply in refused:
        doc = problem(reply, 503)
        assert reply.headers["Retry-After"] == "1" and doc["type"].endswith("saturated")
    # A call that would wait for its job (`Prefer: wait=N`) holds a thread too: counted.
    waiting = platform.call("POST", "/services/sleepy", b"{}",
                            headers={"Prefer": "respond-async, wait=3"})
    assert problem(waiting, 503)["type"].endswith("saturated")
    # No call past the limit reached the framework: no handler thread beyond its three.
    assert not any((platform.marks / f"refused{i}.started").exists() for i in range(8))
    assert len(list(platform.marks.glob("full*.started"))) == 3
    assert threads_of(platform.framework.pid) == threads
    # Health and readiness still answer under a full pool.
    ready = call(platform.port, "GET", "/readyz")
    assert ready.status == 200, ready.body
    assert call(platform.port, "GET", "/healthz").status == 200
    # As the sleepers return, calls are admitted again.
    until(lambda: platform.call("POST", "/services/fast", b"{}").status == 200,
          what="admission after the late answers")
    assert any((platform.marks / f"full{i}.ended").exists() for i in range(3))


def test_the_breaker_opens_on_deadline_misses_of_handlers_that_never_return(
        platform: Platform) -> None:
    release = platform.dir / "release-stuck"
    with ThreadPoolExecutor(2) as pool:
        misses = list(pool.map(lambda _: platform.stuck(release), range(2)))
    assert [r.status for r in misses] == [504, 504]
    # Neither handler returned, yet both misses count: the breaker is open. The third
    # call is refused by it (the framework's answer, on its one free thread).
    opened = until(lambda: (r := platform.stuck(release)).status == 503
                   and r.json()["type"].endswith("circuit-open") and r, what="breaker open")
    problem(opened, 503)
    assert opened.headers["Retry-After"]
    release.touch()
    until(lambda: platform.call("POST", "/services/fast", b"{}").status == 200,
          what="threads back")


def test_a_stopped_framework_is_504_at_the_deadline_and_not_ready(platform: Platform) -> None:
    until(lambda: platform.call("POST", "/services/fast", b"{}").status == 200,
          what="free threads")
    assert call(platform.port, "GET", "/readyz").status == 200
    os.killpg(platform.framework.pid, signal.SIGSTOP)  # master and worker: hung
    try:
        started = time.monotonic()
        reply = platform.call("POST", "/services/fast", b"{}")
        assert time.monotonic() - started < 10  # fast's deadline is 2 s, not the 330 s cap
        assert "fast" in problem(reply, 504)["detail"]
        ready = call(platform.port, "GET", "/readyz")
        problem(ready, 503)
        assert call(platform.port, "GET", "/healthz").status == 200  # the sidecar lives
    finally:
        os.killpg(platform.framework.pid, signal.SIGCONT)
    until(lambda: call(platform.port, "GET", "/readyz").status == 200, what="ready again")
    until(lambda: platform.call("POST", "/services/fast", b"{}").status == 200,
          what="served again")


def test_a_burst_of_quick_calls_past_the_thread_count_is_served(platform: Platform) -> None:
    until(lambda: platform.call("POST", "/services/fast", b"{}").status == 200,
          what="free threads")
    # Four times as many callers as framework threads: each waits its turn briefly.
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: platform.call("POST", "/services/fast", b"{}"),
                                range(48)))
    assert [r.status for r in replies] == [200] * 48


def test_a_new_catalog_version_reaches_the_sidecar(platform: Platform) -> None:
    log = platform.dir / "sidecar.log"
    loaded = len(LOADED.findall(log.read_text(errors="replace")))
    # A service added while both run (as in development): a new catalog version.
    later = SLEEPY.replace("TIMEOUT = 1", "TIMEOUT = 0.5")
    (platform.dir / "tenant" / "services" / "later.py").write_text(later)
    until(lambda: len(LOADED.findall(log.read_text(errors="replace"))) > loaded,
          what="the new catalog loaded")
    body = f'{{"s": 6, "dir": "{platform.marks}", "id": "later"}}'.encode()
    reply = platform.call("POST", "/services/later", body)
    # Its own 0.5 s deadline, not the default 30 s: answered while the handler still runs.
    assert "0.5s" in problem(reply, 504)["detail"]
    assert not (platform.marks / "later.ended").exists()
