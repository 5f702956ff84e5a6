"""Tenant processes of a pool: started on demand from the zygote, reaped when idle.

A tenant's process is the Flask app under gunicorn on its own unix socket in the
pool's runtime dir, with its own data dir. It starts on the tenant's first request,
stops after ``idle`` seconds without a request (none in flight), and at most
``max_procs`` run at once: starting one more stops the least recently used idle one
(all busy: 503). Stopping is gunicorn's graceful stop (SIGTERM): calls in flight
finish. A process whose bundle changed is replaced the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from framework.pool.shared import SHARED

if TYPE_CHECKING:
    from framework.pool.wake import Wakeups

log = logging.getLogger("mtp.pool")

START_TIMEOUT = 30.0  # a tenant process answers /healthz within this, else 503
POLL = 0.01
STOP_MARGIN = 5.0  # after the grace period a process still alive is killed
WORKER_RESTART_PAUSE = 1.0  # seconds between starts of a tenant's job worker
# The zygote's environment: nothing secret (a forked child's /proc/self/environ is it).
SAFE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "VIRTUAL_ENV",
            "TMPDIR", "XDG_RUNTIME_DIR", "TZ", "MTP_METRICS_DIR",
            # Coverage measurement of the test suite's subprocesses (a config, no secret).
            "COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")


class StartFailed(Exception):
    """A tenant process did not come up (its bundle, its data dir, the machine)."""


class PoolFull(Exception):
    """MTP_POOL_MAX_PROCS processes run and every one has calls in flight."""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still exists (the zygote's children are reaped by the kernel)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - reused by another user's process
        return False
    return True


class Zygote:
    """The warm parent (framework/pool/zygote.py) and the socket to it."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = {k: v for k, v in environ.items() if k in SAFE_ENV}
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start it and wait until its imports are done (it says ready)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "framework.pool.zygote", str(theirs.fileno())],
            env=self.environ, pass_fds=(theirs.fileno(),))
        theirs.close()
        ours.settimeout(START_TIMEOUT)
        if ours.recv(4096) != b'{"ready": true}':
            raise StartFailed("the pool's warm parent did not start")
        ours.settimeout(None)
        self.sock = ours

    def spawn(self, spec: dict[str, object], secrets: Mapping[str, str]) -> int:
        """Fork a tenant process; its secrets go over a fresh pipe only it reads."""
        assert self.sock is not None
        read, write = os.pipe()
        try:
            data = json.dumps(dict(secrets)).encode()
            os.write(write, data)  # small (a few secrets): fits the pipe buffer
        finally:
            os.close(write)
        try:
            with self._lock:
                socket.send_fds(self.sock, [json.dumps(spec).encode()], [read])
                answer = json.loads(self.sock.recv(4096) or b"{}")
        finally:
            os.close(read)
        if "pid" not in answer:
            raise StartFailed(str(answer.get("error", "the warm parent is gone")))
        return int(answer["pid"])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@dataclass
class TenantProcess:
    """One live tenant process."""

    tenant_id: str
    pid: int
    socket: Path
    stamp: tuple[object, ...]
    last_used: float = field(default_factory=time.monotonic)
    inflight: int = 0
    stopping: bool = False
    worker: int | None = None  # its RQ worker's pid, when its jobs are in Redis
    worker_started: float = field(default_factory=time.monotonic)


# What a spawn needs: (tenant id, bundle path, socket) -> (spec env, secrets)
EnvFor = Callable[[str, Path, Path], tuple[dict[str, str], dict[str, str]]]
# Whether a tenant has async jobs queued or running (its process must not be reaped)
JobsPending = Callable[[str], bool]


class ProcessManager:
    """Which tenant processes run; start, reap, stop."""

    def __init__(self, zygote: Zygote, runtime_dir: Path, env_for: EnvFor, *, idle: float,
                 max_procs: int, grace: float,
                 on_stop: Callable[[TenantProcess], None] | None = None,
                 wake: Wakeups | None = None,
                 jobs_pending: JobsPending | None = None) -> None:
        self.zygote, self.runtime_dir, self.env_for = zygote, runtime_dir, env_for
        self.jobs_pending = jobs_pending or (lambda _tenant: False)
        self.idle, self.max_procs, self.grace = idle, max_procs, grace
        self.wake = wake  # event deliveries of stopped tenants (None: no events kept)
        self.on_stop = on_stop or (lambda _p: None)
        self.live: dict[str, TenantProcess] = {}
        self.starts = 0  # processes started so far (tests, metrics)
        self._locks: dict[str, asyncio.Lock] = {}
        self._seq = itertools.count(1)
        self._stopping: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def ensure(self, tenant_id: str, bundle: Path, stamp: tuple[object, ...]
                     ) -> TenantProcess:
        """The tenant's live process, started (or replaced, if its bundle changed)."""
        lock = self._locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            proc = self.live.get(tenant_id)
            if proc is not None and proc.stamp == stamp and pid_alive(proc.pid):
                proc.last_used = time.monotonic()
                if (proc.worker is not None and not pid_alive(proc.worker)
                        and time.monotonic() - proc.worker_started > WORKER_RESTART_PAUSE):
                    # A job stuck past its timeout ends its worker: a fresh one takes
                    # up the queue, the framework process stays. Not more often than
                    # the pause: a worker that cannot start must not fork per request.
                    log.warning("tenant job worker gone; starting another",
                                extra={"tenant": tenant_id, "pid": proc.worker})
                    proc.worker_started = time.monotonic()
                    proc.worker = await self._start_worker(tenant_id, bundle, proc.socket)
                return proc
            if proc is not None:
                self.stop(proc)  # replaced bundle, or a process that died
            proc = await self._start(tenant_id, bundle, stamp)
            self.live[tenant_id] = proc
            return proc

    async def _start(self, tenant_id: str, bundle: Path, stamp: tuple[object, ...]
                     ) -> TenantProcess:
        self.make_room()
        sock = self.runtime_dir / f"{tenant_id}-{next(self._seq)}.sock"
        env, secrets = self.env_for(tenant_id, bundle, sock)
        spec: dict[str, object] = {"tenant_dir": str(bundle), "env": env}
        if tenant_id == SHARED:  # the shared group's process (framework/pool/shared.py)
            spec["shared"] = True
        pid = await asyncio.to_thread(self.zygote.spawn, spec, secrets)
        self.starts += 1
        proc = TenantProcess(tenant_id, pid, sock, stamp)
        deadline = time.monotonic() + START_TIMEOUT
        while not await _answers(sock):
            if not pid_alive(pid) or time.monotonic() > deadline:
                self._kill(pid)
                raise StartFailed(f"tenant {tenant_id}: its process did not start")
            await asyncio.sleep(POLL)
        proc.worker = await self._start_worker(tenant_id, bundle, sock)
        log.info("tenant process started", extra={"tenant": tenant_id, "pid": pid})
        return proc

    async def _start_worker(self, tenant_id: str, bundle: Path, sock: Path) -> int | None:
        """The tenant's RQ worker, when its jobs are in Redis (a framework process there
        only queues them): started and stopped with its framework process."""
        env, secrets = self.env_for(tenant_id, bundle, sock)
        if not secrets.get("MTP_REDIS_URL"):
            return None  # jobs in its SQLite: its framework process runs them itself
        spec = {"tenant_dir": str(bundle), "env": env, "role": "worker"}
        return await asyncio.to_thread(self.zygote.spawn, spec, secrets)

    def make_room(self) -> None:
        """Stop the least recently used idle process when MTP_POOL_MAX_PROCS run."""
        running = [p for p in self.live.values() if not p.stopping]
        if len(running) < self.max_procs:
            return
        idle = sorted((p for p in running if p.inflight == 0), key=lambda p: p.last_used)
        if not idle:
            raise PoolFull(f"{len(running)} tenant processes busy (MTP_POOL_MAX_PROCS)")
        if self.wake is not None:
            at = self.wake.due(idle[0].tenant_id)
            if at is not None:  # made room for another: its deliveries wait their turn
                self.wake.later(idle[0].tenant_id, max(at, time.time() + self.idle))
        self.stop(idle[0])

    def stop(self, proc: TenantProcess) -> None:
        """Stop ``proc`` gracefully (in the background): calls in flight finish."""
        if self.live.get(proc.tenant_id) is proc:
            del self.live[proc.tenant_id]
        if proc.stopping:
            return
        proc.stopping = True
        self.on_stop(proc)
        task = asyncio.get_running_loop().create_task(self._stop(proc))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, proc: TenantProcess) -> None:
        # Its last calls finish first (the sidecar counts them), then gunicorn drains;
        # its worker's current job finishes (RQ's warm shutdown), queued ones stay queued.
        while proc.inflight:
            await asyncio.sleep(0.05)
        pids = [pid for pid in (proc.pid, proc.worker) if pid is not None]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace + STOP_MARGIN
        while any(map(pid_alive, pids)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for pid in pids:
            self._kill(pid)
        with contextlib.suppress(OSError):
            proc.socket.unlink()
        log.info("tenant process stopped", extra={"tenant": proc.tenant_id, "pid": proc.pid})

    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def reap_idle(self) -> list[str]:
        """Stop the processes idle for ``idle`` seconds; their tenant ids."""
        gone = [p for p in self.idle_ones() if not self._deliveries_soon(p.tenant_id)]
        for proc in gone:
            self.stop(proc)
        return [p.tenant_id for p in gone]

    def idle_ones(self) -> list[TenantProcess]:
        """The processes without a request for ``idle`` seconds and none in flight."""
        now = time.monotonic()
        return [p for p in self.live.values()
                if p.inflight == 0 and now - p.last_used >= self.idle]

    async def _keep_job_runners(self) -> None:
        """An idle tenant whose jobs are queued or running keeps its process (they are
        run there): it counts as used now. Asked off the event loop (a Redis call)."""
        for proc in self.idle_ones():
            if proc.worker is None:
                continue
            try:
                pending = await asyncio.to_thread(self.jobs_pending, proc.tenant_id)
            except Exception as exc:  # Redis away: keep it, its jobs may be there
                log.warning("jobs of tenant %s not counted (%s); its process stays",
                            proc.tenant_id, type(exc).__name__)
                pending = True
            if pending:
                proc.last_used = time.monotonic()

    def _deliveries_soon(self, tenant_id: str) -> bool:
        """Event deliveries due within the idle time keep the process (its engine runs
        them); later ones are a wake-up at their time, and the process may go."""
        at = self.wake.due(tenant_id) if self.wake is not None else None
        if at is None:
            return False
        if at <= time.time() + self.idle:
            return True
        self.wake.later(tenant_id, at)  # type: ignore[union-attr]
        return False

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.idle / 4)))
            await self._keep_job_runners()
            self.reap_idle()

    async def close(self) -> None:
        """Stop every process and wait for them (the pool is stopping)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for proc in list(self.live.values()):
            self.stop(proc)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)


async def _answers(sock: Path) -> bool:
    """Whether a framework answers GET /healthz on ``sock``."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(sock)), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: framework\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 2.0)
        return line.startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
