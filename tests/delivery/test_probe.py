"""`mtp probe`, the command every container probe runs, against a real framework.

The old framework probe only connected to the unix socket, which the listen backlog of
a stopped (SIGSTOP) or deadlocked process still accepts: such a process passed forever.
`mtp probe` asks `GET /healthz` and needs the answer within its timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from framework.cli.probe import describe, local_address
from tests.framework.tenant import SECRET, make_tenant
from tests.helpers import base_env, free_port, spawn, stop, wait_for_unix

MTP = [sys.executable, "-m", "framework"]


@dataclass
class Framework:
    sock: Path
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def framework() -> Iterator[Framework]:
    """`mtp framework` (gunicorn) on a unix socket, as in the Kubernetes pod."""
    # A short directory: a unix socket path has at most 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="mtp-probe-", dir="/tmp"))
    sock = tmp / "framework.sock"
    log = tmp / "framework.log"
    env = base_env(MTP_SIDECAR_SECRET=SECRET, MTP_DATA_DIR=str(tmp / "data"),
                   MTP_UPSTREAM=f"unix:{sock}", MTP_WORKERS="1", MTP_THREADS="2")
    proc = spawn([*MTP, "framework", "--tenant-dir", str(make_tenant(tmp / "tenant"))], env,
                 log=log)
    try:
        wait_for_unix(sock, proc)
        yield Framework(sock, proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)  # a test that failed while it was stopped
        stop(proc)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def probe(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # The subprocess timeout only keeps a broken probe from hanging the suite.
    return subprocess.run([*MTP, "probe", *args], env=base_env(**env), capture_output=True,
                          text=True, timeout=60, check=False)


def test_exit_0_while_the_framework_answers(framework):
    done = probe("--url", f"unix:{framework.sock}")
    assert (done.returncode, done.stderr) == (0, "")
    # Default target: the framework at MTP_UPSTREAM, as the container's env has it.
    assert probe(MTP_UPSTREAM=f"unix:{framework.sock}").returncode == 0


def test_a_stopped_framework_fails_within_the_timeout(framework):
    os.killpg(framework.proc.pid, signal.SIGSTOP)  # master and workers: a hang
    try:
        # The old probe's check still passes: the listen backlog accepts the connection.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(framework.sock))
        done = probe("--url", f"unix:{framework.sock}", "--timeout", "1")
        assert done.returncode == 1
        assert done.stderr.strip().endswith("GET /healthz: no answer within 1s"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    finally:
        os.killpg(framework.proc.pid, signal.SIGCONT)
    assert probe("--url", f"unix:{framework.sock}", "--timeout", "10").returncode == 0


def test_fails_when_nothing_listens(tmp_path):
    done = probe("--url", f"unix:{tmp_path / 'none.sock'}")
    assert done.returncode == 1 and "cannot connect" in done.stderr
    done = probe("--url", f"127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "cannot connect" in done.stderr


def test_an_answer_other_than_200_fails(framework):
    done = probe("--url", f"unix:{framework.sock}", "--path", "/no-such-route")
    assert done.returncode == 1
    assert done.stderr.strip().endswith("GET /no-such-route: status 401")  # unsigned


def serve_once(reply: bytes, reset: bool = False) -> tuple[int, threading.Thread]:
    """A TCP socket that answers one connection with ``reply`` and closes it (``reset``: RST)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(reply)
                if reset:  # linger 0: close() sends RST, the reader sees ECONNRESET
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize(("reply", "reset", "reason"), [
    (b"", False, "connection closed without an answer"),
    (b"", True, "connection failed (Connection reset by peer)"),
    (b"hello there\r\n", False, "the answer is not HTTP"),
    (b"x" * 3000, False, "the answer is not HTTP"),
    (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", False, "status 503"),
])
def test_a_broken_or_unhealthy_answer_fails(reply, reset, reason):
    port, thread = serve_once(reply, reset)
    done = probe("--url", f"127.0.0.1:{port}")
    thread.join(10)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(reason), done.stderr


@pytest.fixture
def http_ok() -> Iterator[Callable[[], list[str]]]:
    """A loopback HTTP server answering 200; yields a function returning the paths asked."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.port = server.server_address[1]  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield lambda: (server.port, asked)  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def test_the_sidecar_target_asks_loopback_at_mtp_listen(http_ok):
    port, asked = http_ok()
    done = probe("sidecar", "--path", "/readyz", MTP_LISTEN=f"0.0.0.0:{port}")
    assert (done.returncode, done.stderr) == (0, "")
    assert asked == ["/readyz"]


def test_bad_arguments_fail_with_one_line():
    done = probe("--url", "nowhere")
    assert done.returncode == 1 and "--url" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = probe("--path", "healthz")
    assert done.returncode == 2 and "--path" in done.stderr


def test_wildcard_listen_addresses_are_probed_on_loopback():
    assert local_address(("0.0.0.0", 8080)) == ("127.0.0.1", 8080)
    assert local_address(("::", 8080)) == ("::1", 8080)
    assert local_address(("10.1.2.3", 8080)) == ("10.1.2.3", 8080)
    assert local_address("/run/mtp/framework.sock") == "/run/mtp/framework.sock"
    assert describe(("::1", 8080)) == "[::1]:8080"
    assert describe("/run/mtp/framework.sock") == "unix:/run/mtp/framework.sock"
