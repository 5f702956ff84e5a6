"""The sidecar app in-process: upstream timeouts and the HTTP/1.1 client's edge cases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from framework.settings import Settings
from framework.tenant_config import ConfigError, parse_tenant
from sidecar.app import Sidecar
from sidecar.front import serve
from sidecar.http1 import Pool, ProtocolViolation, TooLarge, UpstreamClosed, encode_request
from sidecar.proxy import Timeouts
from sidecar.startup import App, create_app
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, token

TENANT = parse_tenant({"tenant": {"id": "acme"}, "auth": {"jwt": {"algorithms": ["HS256"]}}})


def settings_for(sock: Path, **env: str) -> Settings:
    return Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET, "MTP_JWT_SECRET": JWT_SECRET,
                              "MTP_UPSTREAM": f"unix:{sock}", **env})


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_upstream(sock: Path, answer: Answer) -> asyncio.AbstractServer:
    """A unix-socket server that answers every request with ``answer``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                await answer(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_unix_server(serve, path=str(sock))


def fixed(data: bytes, close: bool = False) -> Answer:
    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(data)
        await w.drain()
        if close:
            w.close()
    return answer


def run(coro):
    return asyncio.run(coro)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@contextlib.asynccontextmanager
async def pooled(tmp_path: Path, answer: Answer, *, read_timeout: float = 5.0,
                 max_body: int = 1000) -> AsyncIterator[Pool]:
    """A pool towards a raw upstream answering with ``answer``; both closed on exit."""
    server = await raw_upstream(tmp_path / "u.sock", answer)
    pool = Pool(str(tmp_path / "u.sock"), connect_timeout=1, read_timeout=read_timeout,
                max_body=max_body)
    try:
        yield pool
    finally:
        await pool.close()
        server.close()


def exchange(tmp_path: Path, answer: Answer, method: str = "GET", max_body: int = 1000,
             read_timeout: float = 5.0, times: int = 1):
    async def go():
        async with pooled(tmp_path, answer, read_timeout=read_timeout, max_body=max_body) as pool:
            return [await pool.request(method, "/x", [("A", "b")], b"body" if method == "POST"
                                       else None) for _ in range(times)]
    return run(go())


def test_content_length_and_keep_alive_reuse(tmp_path: Path) -> None:
    replies = exchange(tmp_path, fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok"),
                       times=3)
    assert replies == [(200, [("Content-Length", "2"), ("X-A", "1")], b"ok")] * 3


def test_chunked_with_extensions_and_trailers(tmp_path: Path) -> None:
    body = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
    [(status, _, content)] = exchange(tmp_path, fixed(body))
    assert (status, content) == (200, b"abcde")


def test_informational_answer_is_skipped(tmp_path: Path) -> None:
    body = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    assert exchange(tmp_path, fixed(body), method="POST")[0][0] == 201


def test_body_until_close_and_http10(tmp_path: Path) -> None:
    [(status, _, content)] = exchange(tmp_path, fixed(b"HTTP/1.0 200 OK\r\n\r\nall of it",
                                                      close=True))
    assert (status, content) == (200, b"all of it")


def test_no_body_statuses_and_head(tmp_path: Path) -> None:
    assert exchange(tmp_path, fixed(b"HTTP/1.1 204 No Content\r\n\r\n"))[0][2] == b""
    head = fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n", True)
    assert exchange(tmp_path, head, method="HEAD")[0][2] == b""


@pytest.mark.parametrize("data, error", [
    (b"garbage\r\n\r\n", ProtocolViolation),
    (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", ProtocolViolation),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", ProtocolViolation),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ProtocolViolation),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", ProtocolViolation),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", TooLarge),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n", TooLarge),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 2000, TooLarge),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", UpstreamClosed),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab", ProtocolViolation),
    # Only ASCII space is trimmed: a latin-1 NBSP is not whitespace in HTTP.
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\xa0\r\n\r\nab", ProtocolViolation),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
     ProtocolViolation),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n",
     ProtocolViolation),
])
def test_bad_answers_raise(tmp_path: Path, data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        exchange(tmp_path, fixed(data, close=True))


def test_transfer_encoding_overrides_content_length(tmp_path: Path) -> None:
    # Not ending in chunked: the body runs until close, whatever Content-Length says.
    gzip = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nokMORE"
    assert exchange(tmp_path, fixed(gzip, close=True))[0][2] == b"okMORE"


def test_an_answer_with_both_framings_is_read_chunked_on_a_connection_not_reused(
        tmp_path: Path) -> None:
    writers = set()

    async def answer(_r, w) -> None:
        writers.add(id(w))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\n\r\n")
        await w.drain()

    assert [r[2] for r in exchange(tmp_path, answer, times=2)] == [b"ok", b"ok"]
    assert len(writers) == 2


def test_read_timeout(tmp_path: Path) -> None:
    async def never(_r, _w) -> None:
        await asyncio.sleep(5)

    with pytest.raises(TimeoutError):
        exchange(tmp_path, never, read_timeout=0.2)


def test_read_timeout_counts_from_each_request_on_a_reused_connection(tmp_path: Path) -> None:
    """The connection's one deadline timer follows its requests: an early answer leaves
    the next request its whole timeout, a late one still times out, and a timer that
    fires while the connection sits idle in the pool does nothing."""
    delays = iter([0.0, 0.25, 0.25, 5.0])

    async def answer(_r, w) -> None:
        await asyncio.sleep(next(delays))
        w.write(OK)
        await w.drain()

    async def go():
        async with pooled(tmp_path, answer, read_timeout=0.4) as pool:
            first = await pool.request("GET", "/", [], None)
            await asyncio.sleep(0.2)  # the first deadline passes after the next request began
            second = await pool.request("GET", "/", [], None)
            await asyncio.sleep(0.5)  # a deadline timer fires while the connection is idle
            third = await pool.request("GET", "/", [], None)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await pool.request("GET", "/", [], None)
            return [first[2], second[2], third[2]], time.monotonic() - started, len(pool._all)

    bodies, waited, open_connections = run(go())
    assert bodies == [b"ok"] * 3
    assert 0.35 < waited < 2.0
    assert open_connections == 0  # the timed-out connection is closed, never reused


def test_stale_reused_connection_is_retried_for_idempotent_methods(tmp_path: Path) -> None:
    answers = iter([fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
                    fixed(b"", close=True),
                    fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")])

    async def answer(r, w) -> None:
        await next(answers)(r, w)

    assert [c for _, _, c in exchange(tmp_path, answer, times=2)] == [b"a", b"b"]


def test_a_reused_connection_closed_mid_answer_is_not_retried(tmp_path: Path) -> None:
    answers = iter([fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"),
                    fixed(b"HTTP/1.1 200 OK\r\nContent-Le", close=True),
                    fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")])
    served = []

    async def answer(r, w) -> None:
        served.append(1)
        await next(answers)(r, w)

    with pytest.raises(UpstreamClosed):
        exchange(tmp_path, answer, times=2)
    assert len(served) == 2  # the service ran once for the second request, not twice


def test_encode_request() -> None:
    assert encode_request("GET", "/a", "h", [("X", "1")], None) == (
        b"GET /a HTTP/1.1\r\nHost: h\r\nX: 1\r\n\r\n")
    assert encode_request("POST", "/a", "h", [], None).endswith(b"Content-Length: 0\r\n\r\n")
    assert encode_request("PUT", "/a", "h", [], b"xy").endswith(b"Content-Length: 2\r\n\r\nxy")


@contextlib.asynccontextmanager
async def serving(app: App, sock: Path) -> AsyncIterator[tuple[Sidecar, aiohttp.ClientSession]]:
    """The sidecar served on a unix socket, and a client session to it."""
    async with app.started() as sidecar:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(sidecar.handle, shutdown_timeout=1, path=str(sock),
                                         stop=stop))
        while not sock.exists():
            await asyncio.sleep(0.01)
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))
        try:
            yield sidecar, session
        finally:
            await session.close()
            stop.set()
            await task


def test_slow_framework_is_504_and_unexpected_errors_are_500(tmp_path: Path) -> None:
    async def slow(_r, _w) -> None:
        await asyncio.sleep(3)

    async def go() -> None:
        server = await raw_upstream(tmp_path / "u.sock", slow)
        app = create_app(settings_for(tmp_path / "u.sock"), TENANT,
                         timeouts=Timeouts(connect=1, read=0.3))
        try:
            async with serving(app, tmp_path / "s.sock") as (sidecar, client):
                auth = {"Authorization": f"Bearer {token()}"}
                r = await client.get("http://sidecar/services/hello", headers=auth)
                assert r.status == 504
                doc = json.loads(await r.read())
                assert doc["detail"] == "the framework did not answer in time"

                # A stage that breaks unexpectedly: 500 problem with an error id, no traceback.
                async def broken(*_a, **_k):
                    raise RuntimeError("boom")

                sidecar.limiter.admit = broken  # type: ignore[method-assign]
                r = await client.get("http://sidecar/services/hello", headers=auth)
                body = await r.text()
                assert r.status == 500 and "boom" not in body and "internal error" in body
        finally:
            server.close()

    run(go())


def test_create_app_refuses_missing_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MTP_SIDECAR_SECRET"):
        create_app(Settings.from_env({}), TENANT)
    with pytest.raises(ConfigError, match="MTP_JWT_SECRET"):
        create_app(Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET}), TENANT)


def test_connections_to_the_framework_are_capped(tmp_path: Path, monkeypatch) -> None:
    from sidecar import http1

    monkeypatch.setattr(http1, "MAX_CONNECTIONS", 1)
    busy = {"now": 0, "max": 0}

    async def answer(_r, w) -> None:
        busy["now"] += 1
        busy["max"] = max(busy["max"], busy["now"])
        await asyncio.sleep(0.05)
        busy["now"] -= 1
        w.write(OK)
        await w.drain()

    async def go():
        async with pooled(tmp_path, answer) as pool:
            return await asyncio.gather(*(pool.request("GET", "/", [], None) for _ in range(3)))

    assert [r[0] for r in run(go())] == [200, 200, 200]
    assert busy["max"] == 1


def test_readyz_asks_the_frameworks_readiness_not_its_liveness(tmp_path: Path) -> None:
    async def framework(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        # A framework that is alive but not ready (its job store is unusable).
        status = b"503 Service Unavailable" if head.startswith(b"GET /readyz ") else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async def go() -> tuple[int, int]:
        server = await asyncio.start_unix_server(framework, path=str(tmp_path / "u.sock"))
        app = create_app(settings_for(tmp_path / "u.sock"), TENANT)
        try:
            async with serving(app, tmp_path / "s.sock") as (_sidecar, client):
                return ((await client.get("http://sidecar/readyz")).status,
                        (await client.get("http://sidecar/healthz")).status)
        finally:
            server.close()

    assert run(go()) == (503, 200)


def through_sidecar(tmp_path: Path, upstream_answer: bytes, request: str) -> tuple[bytes, bytes]:
    """Send ``request`` (raw, a bearer token added) to an in-process sidecar; its head, body."""
    async def go() -> tuple[bytes, bytes]:
        server = await raw_upstream(tmp_path / "u.sock", fixed(upstream_answer))
        app = create_app(settings_for(tmp_path / "u.sock"), TENANT)
        try:
            async with serving(app, tmp_path / "s.sock") as _:
                reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
                line, _, rest = request.partition("\r\n")
                writer.write(f"{line}\r\nAuthorization: Bearer {token()}\r\n{rest}".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                size = re.search(rb"\r\ncontent-length: (\d+)", head.lower())
                body = await reader.readexactly(int(size.group(1))) if size else b""
                writer.close()
                return head, body
        finally:
            server.close()

    return run(go())


def test_a_body_that_does_not_arrive_in_time_is_408(tmp_path: Path, monkeypatch) -> None:
    from sidecar import front

    monkeypatch.setattr(front, "BODY_TIMEOUT", 0.2)
    head, body = through_sidecar(tmp_path, b"HTTP/1.1 200 OK\r\n\r\n",
                                 "POST /services/hello HTTP/1.1\r\nHost: x\r\n"
                                 "Content-Length: 10\r\n\r\nabc")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["detail"] == "the request body did not arrive in time"


def test_head_without_a_known_size_claims_none(tmp_path: Path) -> None:
    head, _ = through_sidecar(
        tmp_path,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n",
        "HEAD /jobs/0123 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = head.lower()
    assert head.startswith(b"http/1.1 200") and b"content-type: text/plain" in head
    assert b"content-length" not in head and b"transfer-encoding" not in head
