"""``mtp probe``: ask a process's ``/healthz`` and wait for the answer, for container probes.

Connecting is not enough: a stopped or deadlocked process's listen backlog still
accepts connections, so a probe that only connects passes forever. This one sends
``GET /healthz`` and needs the status line of an answer within the timeout.
Exit 0 on 200, 1 otherwise, with one short line on stderr.

``mtp worker`` serves no HTTP: ``mtp probe worker`` asks Redis instead whether a worker
process of this host has sent its heartbeat lately.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import UTC, datetime

import click

from framework.rq_keys import use_tenant_prefix
from framework.settings import Settings, parse_address
from framework.tenant_config import ConfigError

FAILED = 1
# An idle RQ worker heartbeats every worker_ttl - 15 s (15 s with mtp worker's 30), a busy
# one every second: twice the TTL is late beyond doubt.
WORKER_MAX_AGE = 60.0
MAX_STATUS_LINE = 1024  # an HTTP status line is short; more without CRLF is not HTTP


class ProbeFailed(Exception):
    """The target did not answer 200 in time; the message says why, in a few words."""


def describe(address: tuple[str, int] | str) -> str:
    """``unix:/path`` or ``host:port``, as the operator wrote it."""
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_address(address: tuple[str, int] | str) -> tuple[str, int] | str:
    """A wildcard listen address becomes loopback: probe the process, not the network."""
    if isinstance(address, str):
        return address
    host, port = address
    if host in ("", "0.0.0.0"):
        return ("127.0.0.1", port)
    if host == "::":
        return ("::1", port)
    return address


def _connect(address: tuple[str, int] | str, timeout: float) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection(address, timeout=timeout)


def status_of(address: tuple[str, int] | str, path: str, timeout: float) -> int:
    """The HTTP status of ``GET path``; the whole exchange ends within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProbeFailed(f"no answer within {timeout:g}s")
        return left

    try:
        sock = _connect(address, timeout)
    except OSError as exc:  # refused, no such socket, or a full backlog until the timeout
        raise ProbeFailed(f"cannot connect ({exc.strerror or type(exc).__name__})") from None
    with sock:
        try:
            sock.settimeout(remaining())
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
                         "Connection: close\r\n\r\n".encode("ascii"))
            head = b""
            while b"\r\n" not in head:
                sock.settimeout(remaining())
                chunk = sock.recv(256)
                if not chunk:
                    raise ProbeFailed("connection closed without an answer")
                head += chunk
                if len(head) > MAX_STATUS_LINE:
                    raise ProbeFailed("the answer is not HTTP")
        except TimeoutError:
            raise ProbeFailed(f"no answer within {timeout:g}s") from None
        except OSError as exc:
            raise ProbeFailed(f"connection failed ({exc.strerror or type(exc).__name__})") from None
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ProbeFailed("the answer is not HTTP")
    return int(parts[1])


def worker_heartbeat_age(settings: Settings, timeout: float) -> float | None:
    """Seconds since the freshest heartbeat of this host's worker processes; None: no Redis.

    Redis unreachable is not the worker's fault (it rides through the outage), so it is
    reported as None and the probe passes: restarting the worker would not help.
    """
    if not settings.redis_url:
        raise ProbeFailed("MTP_REDIS_URL is not set")
    tenant_id = settings.load_tenant().tenant_id
    use_tenant_prefix(tenant_id)  # the worker's RQ keys: set before RQ is imported
    from redis import Redis
    from redis.exceptions import RedisError
    from rq import Queue, Worker

    from framework.jobs_redis import queue_name

    qname = queue_name(tenant_id)
    # The names `mtp worker` gives its processes: <queue>.<host>.<pid>
    prefix = f"{qname}.{os.uname().nodename}."
    client = Redis.from_url(settings.redis_url, socket_timeout=timeout,
                            socket_connect_timeout=timeout)
    try:
        workers = Worker.all(connection=client, queue=Queue(qname, connection=client))
    except RedisError:
        return None
    finally:
        client.close()
    now = datetime.now(UTC)
    ages = [(now - w.last_heartbeat).total_seconds() for w in workers
            if w.name.startswith(prefix) and w.last_heartbeat is not None]
    if not ages:
        raise ProbeFailed("no worker process of this host is registered")
    return max(0.0, min(ages))


def target_address(target: str, url: str | None, settings: Settings) -> tuple[str, int] | str:
    """--url, else the framework's MTP_UPSTREAM or the sidecar's MTP_LISTEN."""
    if url:
        return local_address(parse_address(url, "--url"))
    if target == "sidecar":
        return local_address(settings.listen)
    return settings.upstream


@click.command()
@click.argument("target", type=click.Choice(["framework", "sidecar", "worker"]),
                default="framework")
@click.option("--url", default=None,
              help="unix:/path or host:port (default: MTP_UPSTREAM for the framework, "
                   "MTP_LISTEN for the sidecar).")
@click.option("--path", default="/healthz", show_default=True,
              help="The route to ask (the sidecar's /readyz for readiness).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds for the whole exchange: connect, ask, read the status line.")
@click.option("--max-age", type=click.FloatRange(min=1), default=WORKER_MAX_AGE,
              show_default=True, help="worker: the oldest heartbeat that still passes, seconds.")
def probe(target: str, url: str | None, path: str, timeout: float, max_age: float) -> None:
    """Ask TARGET's health route and wait for the answer: exit 0 on 200, 1 otherwise.

    For Kubernetes exec probes: unlike a bare connect, it fails for a process that is
    stopped or deadlocked but whose socket still accepts connections. TARGET worker
    passes when a worker process of this host heartbeated within --max-age seconds
    (or Redis cannot be reached: the worker waits for it, a restart would not help).
    """
    if not path.startswith("/") or any(c in path for c in " \r\n"):
        raise click.BadParameter("must be a path such as /healthz", param_hint="--path")
    try:
        settings = Settings.from_env()
        if target == "worker":
            probe_worker(settings, timeout, max_age)
            return
        address = target_address(target, url, settings)
    except ConfigError as exc:
        click.echo(f"mtp probe: {exc}", err=True)
        sys.exit(FAILED)
    where = describe(address)
    try:
        status = status_of(address, path, timeout)
    except ProbeFailed as exc:
        click.echo(f"mtp probe: {target} at {where}: GET {path}: {exc}", err=True)
        sys.exit(FAILED)
    if status != 200:
        click.echo(f"mtp probe: {target} at {where}: GET {path}: status {status}", err=True)
        sys.exit(FAILED)


def probe_worker(settings: Settings, timeout: float, max_age: float) -> None:
    """Exit 1 unless a worker process of this host heartbeated within ``max_age``."""
    try:
        age = worker_heartbeat_age(settings, timeout)
    except ProbeFailed as exc:
        click.echo(f"mtp probe: worker: {exc}", err=True)
        sys.exit(FAILED)
    if age is None:
        click.echo("mtp probe: worker: Redis unreachable; passing (the worker waits for it)",
                   err=True)
    elif age > max_age:
        click.echo(f"mtp probe: worker: last heartbeat {age:.0f}s ago (over {max_age:g}s)",
                   err=True)
        sys.exit(FAILED)
