"""Process and port helpers shared by the end-to-end tests."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_issued: set[int] = set()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now, below the ephemeral range.

    A port from bind(0) is an ephemeral one: between picking it and the server binding
    it, the kernel may hand it to an outgoing connection (the server then cannot bind),
    and a connect() to it while nothing listens can connect to itself (TCP simultaneous
    open), which looks like a listening server. Either explains a CI run where a
    framework that had "started" then refused every connection.
    """
    low = _ephemeral_low()
    # Under pytest-xdist each worker takes its own residue class, so two workers never
    # pick the same port between the pick and the bind.
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        port -= (port - worker) % workers
        if port < 10000 or port in _issued:  # two picks before either bind must differ
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _issued.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0,
                  host: str = "127.0.0.1") -> None:
    """Block until something accepts on host:port (fail fast if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2) as s:
                if s.getsockname() != s.getpeername():  # not a self-connect
                    return
        except OSError:
            pass
        time.sleep(0.03)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_for_unix(path: str | Path, proc: subprocess.Popen | None = None,
                  timeout: float = 15.0) -> None:
    """Block until a unix socket accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(0.2)
                s.connect(str(path))
                return
        except OSError:
            time.sleep(0.03)
    raise TimeoutError(f"nothing listening on {path} after {timeout}s")


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment without MTP_* leaking in, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTP_")}
    env.update(extra)
    return env


def spawn(args: list[str], env: Mapping[str, str], log: Path | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start a child in its own process group; output goes to ``log`` when given."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(args, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Signal a child and wait; kill its whole group if it does not go in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def stacks_of(proc: subprocess.Popen, log: Path, lines: int = 200) -> Callable[[], str]:
    """A diagnosis for a framework that does not answer: SIGUSR1 makes its workers
    write every thread's stack to ``log``; the end of that log is returned."""
    def diagnose() -> str:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGUSR1)  # the gunicorn master passes it on
            time.sleep(1.0)
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        return f"the end of {log}:\n" + "\n".join(tail)
    return diagnose


def require_binary(name: str, hint: str = "run `make servers`") -> str:
    """Path of a server or tool binary (beside this interpreter first, e.g. the venv's).

    Missing is a skip locally and a failure with CI=true.
    """
    beside = Path(sys.executable).parent / name
    path = (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None) or \
        shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if path:
        return path
    unavailable(f"{name} is not installed ({hint})")
    raise AssertionError  # unreachable: unavailable() raises


def unavailable(why: str) -> None:
    """A real part the test needs cannot run here: a failure with CI=true, else a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; with CI=true a missing real part is a failure")
    pytest.skip(f"{why}; with CI=true this is a failure")


def eventually(probe: Callable[[], T], timeout: float = 40.0, pause: float = 0.02) -> T:
    """Poll ``probe`` until it returns something truthy, and return that.

    AssertionError after ``timeout`` seconds (generous: a loaded CI machine is slow,
    and a passing test never waits for it).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"not true within {timeout} s: {probe!r}"
        time.sleep(pause)
