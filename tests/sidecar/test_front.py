"""The sidecar's HTTP/1.1 server (sidecar/front.py) with raw bytes on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar import front
from sidecar.front import BodyTooLarge, Request, Response, serve
from tests.helpers import free_port, wait_for_port

SECRET = "sekrit-token-value"
seen: list[str] = []  # what the echo handler noticed beyond its answer


async def echo(request: Request) -> Response:
    """Answers with what it saw; reads the body when there is one."""
    body = b""
    if request.path == "/sink":  # a big body: its size and digest
        body = await request.read(64 << 20)
        return Response(200, [], f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())
    if request.body_exists:
        try:
            body = await request.read(100)
        except BodyTooLarge:
            return Response(413, [("Content-Type", "text/plain")], b"too large")
        except TimeoutError:
            return Response(408)
        except ConnectionError:
            seen.append("client went away")
            raise
    if request.path == "/boom":
        raise RuntimeError(SECRET)
    if request.path == "/slow":
        await asyncio.sleep(0.3)
        seen.append("slow answered")
    if request.path == "/empty":
        return Response(204)
    if request.path == "/odd":
        return Response(599)
    if request.path == "/big":
        return Response(200, [], b"x" * (8 << 20))
    doc = {"method": request.method, "path": request.path, "raw": request.raw_path,
           "query": request.query, "remote": request.remote, "body": body.decode(),
           "length": request.content_length, "host": request.headers.get("Host")}
    head_length = {"/h": "1234", "/unknown": ""}.get(request.path)
    return Response(200, [("Content-Type", "application/json")], json.dumps(doc).encode(),
                    head_length=head_length if request.method == "HEAD" else None)



@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Task]]:
    sock = str(tmp_path / "f.sock")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(echo, shutdown_timeout=2, path=sock, stop=stop))
    while not Path(sock).exists():
        await asyncio.sleep(0.01)
    try:
        yield sock, stop, task
    finally:
        stop.set()
        await task


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return int(lines[0].split()[1]), headers, body


def exchange(tmp_path: Path, *data: bytes, answers: int = 1, head: bool = False,
             pause: float = 0.0, wait: float = 5.0,
             ) -> tuple[list[tuple[int, dict[str, str], bytes]], bytes]:
    """Send ``data`` (each part after ``pause``), read ``answers`` answers and what follows.

    What follows is ``<open>`` when the connection is still open after ``wait`` seconds.
    """
    async def go():
        async with served(tmp_path) as (sock, _stop, _task):
            reader, writer = await asyncio.open_unix_connection(sock)
            for part in data:
                writer.write(part)
                await asyncio.sleep(pause)
            out = []
            for _ in range(answers):
                if head:
                    text = (await reader.readuntil(b"\r\n\r\n")).decode()
                    out.append((int(text.split()[1]), {}, text.encode()))
                else:
                    out.append(await read_answer(reader))
            try:
                rest = await asyncio.wait_for(reader.read(), wait)
            except TimeoutError:
                rest = b"<open>"
            writer.close()
            return out, rest
    return asyncio.run(go())


def test_pipelined_requests_are_answered_in_order_on_one_connection(tmp_path: Path) -> None:
    many = b"".join(f"GET /n{i}?q={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(40))
    last = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers, rest = exchange(tmp_path, many + last, answers=41)
    paths = [json.loads(body)["path"] for _, _, body in answers]
    assert paths == [f"/n{i}" for i in range(40)] + ["/last"]
    assert json.loads(answers[3][2])["query"] == "q=3"
    assert answers[-1][1]["connection"] == "close" and rest == b""
    assert "date" in answers[0][1] and "server" not in answers[0][1]


def test_bodies_bigger_than_the_read_buffer_arrive_whole(tmp_path: Path) -> None:
    # 16 MiB pause the body reader's buffer many times; aiohttp's BaseProtocol then
    # pauses the request parser and resumes it through data_received(b"").
    data = bytes(range(256)) * (1 << 16)
    sized = f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
    chunked = (f"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               f"{len(data):x}\r\n")
    answers, _ = exchange(tmp_path, sized.encode() + data,
                          chunked.encode() + data + b"\r\n0\r\n\r\n", answers=2, wait=0)
    want = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
    assert [(status, body) for status, _, body in answers] == [(200, want), (200, want)]


def test_percent_decoded_path_and_raw_target(tmp_path: Path) -> None:
    [(status, _, body)], _ = exchange(
        tmp_path, b"GET /a%20b?x=%2F HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    doc = json.loads(body)
    assert status == 200 and doc["path"] == "/a b" and doc["raw"] == "/a%20b?x=%2F"
    assert doc["remote"] == ""  # a unix-socket peer has no address


@pytest.mark.parametrize("bad, want", [
    (b"GET / HTTP/1.1\r\nBad Name: " + SECRET.encode() + b"\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + SECRET.encode() + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, SECRET.encode())
                                      for i in range(front.MAX_HEADERS + 1)) + b"\r\n", 431),
    (b"GET /" + b"a" * front.MAX_LINE + SECRET.encode() + b" HTTP/1.1\r\n\r\n", 414),
    (b"NOT-HTTP " + SECRET.encode() + b"\r\n\r\n", 501),  # a method llhttp does not know
    (b"BREW /pot HTTP/1.1\r\nX: " + SECRET.encode() + b"\r\n\r\n", 501),
])
def test_unparsable_requests_get_a_problem_that_quotes_nothing(
        tmp_path: Path, bad: bytes, want: int, caplog: pytest.LogCaptureFixture) -> None:
    good = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
    with caplog.at_level(logging.INFO, logger="mtp.sidecar"):
        answers, rest = exchange(tmp_path, good, bad, answers=2, pause=0.1)
    assert answers[0][0] == 200  # the request before the broken one was answered
    status, headers, body = answers[1]
    doc = json.loads(body)
    assert status == want and headers["content-type"] == "application/problem+json"
    assert doc["status"] == want
    assert headers["x-request-id"] == doc["request_id"] and headers["connection"] == "close"
    assert SECRET not in body.decode() and SECRET not in caplog.text
    assert rest == b""


def test_head_reports_the_get_length_and_204_has_none(tmp_path: Path) -> None:
    answers, _ = exchange(tmp_path, b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n",
                          b"HEAD /unknown HTTP/1.1\r\nHost: x\r\n\r\n",
                          b"HEAD /own HTTP/1.1\r\nHost: x\r\n\r\n",
                          b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n", answers=4, head=True,
                          wait=0)
    assert answers[0][0] == 200 and b"Content-Length: 1234\r\n" in answers[0][2]
    assert answers[1][0] == 200 and b"Content-Length" not in answers[1][2]
    # An answer of the sidecar's own (no head_length): the size of the body it built.
    assert re.search(rb"\r\nContent-Length: [1-9][0-9]*\r\n", answers[2][2])
    assert answers[3][0] == 204 and b"Content-Length" not in answers[3][2]


@pytest.mark.parametrize("request_bytes", [
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n",
])
def test_after_upgrade_or_connect_the_connection_closes(tmp_path: Path,
                                                         request_bytes: bytes) -> None:
    [(status, headers, _)], rest = exchange(tmp_path, request_bytes)
    assert status == 200 and headers["connection"] == "close" and rest == b""


def test_unknown_status_still_has_a_status_line(tmp_path: Path) -> None:
    [(status, _, _)], _ = exchange(
        tmp_path, b"GET /odd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 599


def test_http10_closes_unless_it_asks_for_keep_alive(tmp_path: Path) -> None:
    [(_, headers, _)], rest = exchange(tmp_path, b"GET /a HTTP/1.0\r\n\r\n")
    assert headers["connection"] == "close" and rest == b""
    [(_, headers, _)], rest = exchange(tmp_path,
                                       b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                                       wait=0.5)
    assert headers["connection"] == "keep-alive" and rest == b"<open>"


@pytest.mark.parametrize("after", [
    b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n",
    b"garbage that is no request at all " + SECRET.encode(),
])
def test_data_after_connection_close_is_ignored_not_a_400(tmp_path: Path, after: bytes) -> None:
    # One packet: a complete request that closes, then anything. llhttp refuses the
    # bytes after it ("Data after Connection: close"), which replaced the answer by 400.
    first = b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    [(status, headers, body)], rest = exchange(tmp_path, first + after)
    assert status == 200 and json.loads(body)["path"] == "/first"
    assert headers["connection"] == "close" and rest == b""


def test_a_closing_request_still_gets_a_body_that_comes_later(tmp_path: Path) -> None:
    # Parsing stops after the request that ends the connection, not before its body.
    [(status, headers, body)], rest = exchange(
        tmp_path, b"POST /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 6\r\n\r\n",
        b"abc", b"def" + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n", pause=0.1)
    assert status == 200 and json.loads(body)["body"] == "abcdef"
    assert headers["connection"] == "close" and rest == b""


def test_two_http10_requests_in_one_packet_answer_the_first_then_close(
        tmp_path: Path) -> None:
    [(status, headers, body)], rest = exchange(
        tmp_path, b"GET /one HTTP/1.0\r\n\r\nGET /two HTTP/1.0\r\n\r\n")
    assert status == 200 and json.loads(body)["path"] == "/one"
    assert headers["connection"] == "close" and rest == b""


def test_http10_with_transfer_encoding_is_answered_then_closed(tmp_path: Path) -> None:
    # RFC 9112 §6.1: faulty framing, even when the client asks for keep-alive.
    [(status, headers, body)], rest = exchange(
        tmp_path, b"POST /te HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked"
                  b"\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.0\r\n\r\n", wait=2)
    assert status == 200 and json.loads(body)["body"] == "abc"
    assert headers["connection"] == "close" and rest == b""


def test_absolute_form_routes_on_its_path_and_host_comes_from_it(tmp_path: Path) -> None:
    [(status, _, body)], _ = exchange(
        tmp_path, b"GET http://svc.example:81/services/a%20b?q=1 HTTP/1.1\r\nHost: other\r\n"
                  b"Connection: close\r\n\r\n")
    doc = json.loads(body)
    assert status == 200 and doc["path"] == "/services/a b"
    assert doc["raw"] == "/services/a%20b?q=1" and doc["query"] == "q=1"
    assert doc["host"] == "svc.example:81"


def test_expect_100_continue_then_the_body(tmp_path: Path) -> None:
    async def go() -> tuple[bytes, dict]:
        async with served(tmp_path) as (sock, _stop, _task):
            reader, writer = await asyncio.open_unix_connection(sock)
            writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            interim = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"hello")
            _, _, body = await read_answer(reader)
            writer.close()
            return interim, json.loads(body)
    interim, doc = asyncio.run(go())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert doc["body"] == "hello" and doc["length"] == 5


def test_chunked_body_is_decoded(tmp_path: Path) -> None:
    [(status, _, body)], _ = exchange(
        tmp_path, b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"2;ext=1\r\nde\r\n0\r\n\r\n", pause=0.05, wait=0)
    doc = json.loads(body)
    assert status == 200 and doc["body"] == "abcde" and doc["length"] is None


def test_a_body_over_the_limit_is_refused(tmp_path: Path) -> None:
    # Still arriving: the rest cannot be told from a next request, so the connection closes.
    [(status, headers, _)], rest = exchange(
        tmp_path, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 200)
    assert status == 413 and headers["connection"] == "close" and rest == b""
    # Arrived whole: the parser has read past it, the connection stays usable.
    answers, _ = exchange(
        tmp_path, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n" + b"a" * 200,
        b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", answers=2, pause=0.1, wait=0)
    assert [a[0] for a in answers] == [413, 200]


def test_a_slow_body_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "BODY_TIMEOUT", 0.2)
    [(status, headers, _)], rest = exchange(
        tmp_path, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert status == 408 and headers["connection"] == "close" and rest == b""


def test_a_client_gone_mid_body_is_seen_by_the_handler(tmp_path: Path) -> None:
    seen.clear()

    async def go() -> None:
        async with served(tmp_path) as (sock, _stop, _task):
            _, writer = await asyncio.open_unix_connection(sock)
            writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            await asyncio.sleep(0.1)
            writer.close()
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.02)
    asyncio.run(go())
    assert seen == ["client went away"]


def test_a_raising_handler_is_a_500_problem_without_its_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="mtp.sidecar"):
        [(status, headers, body)], _ = exchange(
            tmp_path, b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    doc = json.loads(body)
    assert status == 500 and doc["status"] == 500 and SECRET not in body.decode()
    assert headers["x-request-id"] == doc["request_id"]
    assert doc["request_id"] in caplog.text  # the traceback is in the log, by that id


@pytest.mark.parametrize("name, data", [
    ("HEAD_TIMEOUT", b"GET / HTTP/1.1\r\nHost: x\r\n"),  # a head that never ends
    ("KEEPALIVE", b""),  # nothing at all
])
def test_slow_heads_and_idle_connections_are_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes) -> None:
    monkeypatch.setattr(front, name, 0.1)

    async def go() -> bytes:
        async with served(tmp_path) as (sock, _stop, _task):
            reader, writer = await asyncio.open_unix_connection(sock)
            writer.write(data)
            rest = await asyncio.wait_for(reader.read(), 5)  # the sweep runs once a second
            writer.close()
            return rest
    assert asyncio.run(go()) == b""


def test_a_client_that_does_not_read_its_answer_is_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "BODY_TIMEOUT", 0.3)

    async def go() -> int:
        async with served(tmp_path) as (sock, _stop, _task):
            reader, writer = await asyncio.open_unix_connection(sock)
            writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(1.0)  # not reading: the 8 MB answer stalls, then times out
            got = 0
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                got += len(chunk)
            writer.close()
            return got
    assert asyncio.run(go()) < 8 << 20


def test_stop_lets_the_request_in_flight_finish_and_closes_idle_connections(
        tmp_path: Path) -> None:
    async def go() -> tuple[int, str, bytes]:
        async with served(tmp_path) as (sock, stop, task):
            idle_reader, _idle = await asyncio.open_unix_connection(sock)
            reader, writer = await asyncio.open_unix_connection(sock)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.1)
            stop.set()
            status, headers, _ = await read_answer(reader)
            idle_rest = await asyncio.wait_for(idle_reader.read(), 5)
            await asyncio.wait_for(task, 5)
            return status, headers["connection"], idle_rest
    assert asyncio.run(go()) == (200, "close", b"")


def test_stop_waits_for_a_request_whose_client_went_away(tmp_path: Path) -> None:
    """The handler still runs after its client left; serve() returns only once it is done,
    since what it uses (audit log, upstream pool) is closed right after."""
    async def go() -> bool:
        seen.clear()
        async with served(tmp_path) as (sock, stop, task):
            _reader, writer = await asyncio.open_unix_connection(sock)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.1)
            writer.close()
            await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 5)
            return "slow answered" in seen
    assert asyncio.run(go())


def test_a_handler_still_running_past_the_shutdown_timeout_is_cancelled(
        tmp_path: Path) -> None:
    cancelled = []

    async def stuck(_request: Request) -> Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return Response(200)

    async def go() -> float:
        sock = str(tmp_path / "s.sock")
        stop = asyncio.Event()
        task = asyncio.create_task(serve(stuck, shutdown_timeout=0.2, path=sock, stop=stop))
        while not Path(sock).exists():
            await asyncio.sleep(0.01)
        _reader, writer = await asyncio.open_unix_connection(sock)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        stop.set()
        await asyncio.wait_for(task, 5)
        writer.close()
        return asyncio.get_running_loop().time() - started
    assert asyncio.run(go()) < 2
    assert cancelled == [True]


def test_tcp_listener_reports_the_peer_address(tmp_path: Path) -> None:
    async def go() -> dict:
        stop = asyncio.Event()
        port = free_port()
        task = asyncio.create_task(serve(echo, shutdown_timeout=1, host="127.0.0.1", port=port,
                                         stop=stop))
        await asyncio.to_thread(wait_for_port, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, _, body = await read_answer(reader)
        writer.close()
        stop.set()
        await task
        return json.loads(body)
    assert asyncio.run(go())["remote"] == "127.0.0.1"
