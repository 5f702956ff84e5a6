"""The sidecar's own Python per request, without sockets: where its CPU goes.

    .venv/bin/python bench/sidecar_micro.py [requests, default 20000]

In one process on uvloop: a request is parsed once by the parser the sidecar's server
uses, then ``Sidecar.handle`` answers it ``requests`` times (HS256 JWT from the token
cache, tenant binding, authz off, GCRA limits, header strip/inject/sign, audit line to a
file, metrics), with the upstream replaced by a stub that answers at once. Each part
is then timed alone. A last row runs the whole path instead: request bytes into the
server's connection, through the stages and the upstream pool's connection, answer
bytes out, with in-memory transports (no sockets, no system calls but the event
loop's own). CPU time (``time.process_time``), best of 5 runs.

Run from a checkout whose modules were compiled with mypyc (docs/benchmarks.md,
session 5), it times that build; the first row is left out there, because compiled
classes cannot have their upstream replaced by a stub.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import jwt
import uvloop
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sidecar.app
from framework.settings import Settings
from framework.tenant_config import parse_tenant
from sidecar import http1
from sidecar.front import Front, Request
from sidecar.headers import identity_headers, response_headers, upstream_headers
from sidecar.proxy import UpstreamReply
from sidecar.startup import create_app

COMPILED = not sidecar.app.__file__.endswith(".py")
SIDECAR_SECRET = "bench-sidecar-secret-" + "x" * 32
JWT_SECRET = "bench-jwt-secret-" + "y" * 48
REPLY = UpstreamReply(200, [("Content-Type", "application/json"), ("Content-Length", "11")],
                      b'{"ok":true}')


UPSTREAM_ANSWER = (b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Sun, 22 Nov 2026 22:00:00 GMT"
                   b"\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 12\r\n\r\n{\"ok\":true}\n")


class _ClientTransport(asyncio.Transport):
    """Takes the server's answer and wakes whoever waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: asyncio.Future[bytes] | None = None

    def write(self, data: bytes) -> None:  # type: ignore[override]
        assert self.answered is not None
        self.answered.set_result(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


class _UpstreamTransport(asyncio.Transport):
    """Answers every request written to it on the next turn of the loop."""

    def __init__(self, conn: http1.Connection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.conn, self.loop = conn, loop

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.loop.call_soon(self.conn.data_received, UPSTREAM_ANSWER)

    def is_closing(self) -> bool:
        return False


def best(n: int, fn: Callable[[], Awaitable[None]], loop: asyncio.AbstractEventLoop) -> float:
    """µs of CPU per call of ``fn``, best of 5 runs of ``n`` calls."""
    async def many() -> None:
        for _ in range(n):
            await fn()
    times = []
    for _ in range(5):
        t = time.process_time()
        loop.run_until_complete(many())
        times.append((time.process_time() - t) / n * 1e6)
    return min(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    tmp = Path(tempfile.mkdtemp(prefix="mtp-sidecar-micro-"))
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET,
                                  "MTP_JWT_SECRET": JWT_SECRET, "MTP_UPSTREAM": "unix:/x",
                                  "MTP_AUDIT_FILE": str(tmp / "audit.log")})
    tenant = parse_tenant({"tenant": {"id": "bench"}, "auth": {"jwt": {"algorithms": ["HS256"]}},
                           "limits": {"rate": 1e9, "burst": 1_000_000_000}})
    token = jwt.encode({"sub": "alice", "tenant_id": "bench", "exp": int(time.time()) + 3600},
                       JWT_SECRET, "HS256")
    raw = (f"GET /services/hello HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
           f"Accept: */*\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16, auto_decompress=False)
    (message, payload), = parser.feed_data(raw)[0]

    async def stub_send(*_args: object, **_kw: object) -> UpstreamReply:
        return REPLY

    context = create_app(settings, tenant).started()
    sidecar = loop.run_until_complete(context.__aenter__())
    if not COMPILED:
        sidecar.upstream.send = stub_send  # type: ignore[method-assign]
    principal = loop.run_until_complete(sidecar.authenticator.authenticate(message.headers))
    secret = settings.sidecar_secret

    # The whole path: the server's connection, the stages, the pool's connection.
    served = create_app(settings, tenant).started()
    through = loop.run_until_complete(served.__aenter__())
    upstream = http1.Connection(settings.max_result, loop)
    upstream.connection_made(_UpstreamTransport(upstream, loop))
    upstream.idle_since = time.monotonic() + 1e9  # never idle-expired during the run
    through.upstream.pool._idle.append(upstream)
    client = _ClientTransport()
    server_conn = Front(through.handle, loop)()
    server_conn.connection_made(client)

    async def whole_path() -> None:
        client.answered = loop.create_future()
        server_conn.data_received(raw)
        await client.answered

    async def whole() -> None:
        await sidecar.handle(Request(message, payload, server_conn))

    async def request_object() -> None:
        Request(message, payload, server_conn)

    async def authenticate() -> None:
        await sidecar.authenticator.authenticate(message.headers)

    async def limit() -> None:
        _, slot, _ = await sidecar.limiter.admit(tenant.limits, "bench", "alice")
        if slot is not None:
            await sidecar.limiter.release(slot)

    async def headers_out() -> None:
        upstream_headers(message.headers.items(), identity_headers(principal, "rid"),
                         secret=secret, method="GET", path="/services/hello",
                         peer="127.0.0.1", proto="http")

    async def headers_back() -> None:
        response_headers(REPLY.headers)

    async def audit() -> None:
        sidecar.audit.write(request_id="0" * 32, method="GET", outcome="allowed", status=200,
                            tenant="bench", user="alice", auth_method="jwt", service="hello")

    async def metrics() -> None:
        sidecar.metrics.observe("bench", "hello", "", 200, 0.001)
        sidecar.metrics.decision("ratelimit", "bench", "hello", "", "allowed")

    try:
        build = "compiled with mypyc" if COMPILED else "interpreted"
        print(f"{n} calls each, best of 5, CPU µs per call ({build}, uvloop, load average "
              f"{os.getloadavg()[0]:.2f})")
        print("| part | µs |")
        print("|---|---|")
        for name, fn in (("Sidecar.handle, whole (upstream stubbed)", whole),
                         ("Request object (from the parsed message)", request_object),
                         ("authenticate (JWT from the token cache)", authenticate),
                         ("rate limit: admit + release", limit),
                         ("headers to the framework: strip, inject, sign", headers_out),
                         ("headers back to the client", headers_back),
                         ("audit line", audit),
                         ("metrics (request + decision)", metrics),
                         ("whole path: server connection, stages, pool connection "
                          "(in-memory transports)", whole_path)):
            if fn is whole and COMPILED:
                continue
            print(f"| {name} | {best(n, fn, loop):.1f} |")
        assert client.answered is not None and b" 200 OK\r\n" in client.answered.result()
    finally:
        loop.run_until_complete(served.__aexit__(None, None, None))
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


if __name__ == "__main__":
    main()
