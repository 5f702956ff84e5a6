"""The sidecar's HTTP/1.1 server: aiohttp's C request parser on a plain asyncio.Protocol.

Why not aiohttp's web server: per request it builds request, response, URL-dispatch
and writer objects whose Python code cost more CPU than the sidecar's own stages
(measured: a bare aiohttp proxy 174-354 µs per request, a raw protocol 22-78 µs).
The sidecar has one handler and answers with complete bodies, so it keeps only the
lean parts: ``aiohttp.http.HttpRequestParser`` (llhttp, strict: it refuses
smuggling shapes such as Content-Length with Transfer-Encoding, bad chunk sizes,
bare CR/LF) and aiohttp's StreamReader for bodies with flow control.

Per connection: requests are answered one at a time and in order (pipelining
works); a connection that sent part of a request head for ``HEAD_TIMEOUT`` or sat
idle for ``KEEPALIVE`` is closed by a once-a-second sweep rather than a timer per
request; reading a body and writing to a client that does not read are bounded
by ``BODY_TIMEOUT``. A request the parser refuses gets a problem+json answer that
quotes nothing of it (its bytes may hold a credential), and the connection closes:
414 for a request line over ``MAX_LINE``, 431 for a header over ``MAX_FIELD`` or more
than ``MAX_HEADERS`` of them, 501 for a method the parser does not know, else 400.

The parser is fed one message at a time (``max_msg_queue_size=1`` pauses llhttp
after each one and keeps the rest): after a request that ends the connection
(``Connection: close``, HTTP/1.0 without keep-alive, HTTP/1.0 with
Transfer-Encoding, an upgrade or CONNECT) nothing more is parsed, so bytes that
follow it in the same packet are ignored rather than turned into a 400 that
would replace the answer (RFC 9112 §9.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpProcessingError, HttpRequestParser, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.streams import EmptyStreamReader, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from framework.problem import CONTENT_TYPE, problem_bytes, request_id

log = logging.getLogger("mtp.sidecar")

HEAD_TIMEOUT = 20.0  # a request head must arrive whole within this (slow-loris)
KEEPALIVE = 75.0  # an idle client connection is closed after this
BODY_TIMEOUT = 60.0  # reading a request body, or writing to a client that stopped reading
MAX_QUEUED = 16  # pipelined requests parsed ahead; reading pauses beyond
# The parser's own bounds. They only have to be at least the framework's (the app
# refuses past gunicorn's smaller limits as problem+json); MAX_LINE differs from
# MAX_FIELD so that a LineTooLong tells the request line (414) from a header (431).
MAX_LINE = 8192
MAX_FIELD = 8190
MAX_HEADERS = 128
TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's message for MAX_HEADERS
READ_LIMIT = 2**16
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY = frozenset({204, 304})
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}


class Response:
    """A complete answer: status, headers (name, value) and body.

    ``head_length`` is the Content-Length a HEAD answer reports (the body a GET
    would have), since a HEAD answer's body is empty; "" reports none (size unknown).
    """

    __slots__ = ("body", "head_length", "headers", "status")

    def __init__(self, status: int = 200, headers: list[tuple[str, str]] | None = None,
                 body: bytes = b"", head_length: str | None = None) -> None:
        self.status = status
        self.headers = headers if headers is not None else []
        self.body = body
        self.head_length = head_length


class BodyTooLarge(Exception):
    """The request body is over the reader's limit."""


class Request:
    """One parsed request as the handler sees it."""

    __slots__ = (
        "_conn",
        "_expect_continue",
        "_payload",
        "headers",
        "method",
        "path",
        "query",
        "raw_path",
        "remote",
        "scheme",
    )

    def __init__(self, message: RawRequestMessage, payload: StreamReader,
                 conn: HttpConnection) -> None:
        url = message.url
        target = message.path
        self.method: str = message.method
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_path: str = target  # the request target in origin form, as sent
        # Percent-decoded, as aiohttp's request.path; "*" and "host:port" targets as sent
        # (yarl would give them the path "/").
        self.path: str = url.path if target[:1] == "/" else target
        self.query: str = url.raw_query_string
        if target[:1] != "/" and url.absolute and url.scheme in ("http", "https"):
            # Absolute form (RFC 9112 §3.2.2): route on its path, and its authority
            # replaces the Host header (the server MUST ignore the received one).
            self.path = url.path
            self.raw_path = url.raw_path + (f"?{self.query}" if self.query else "")
            headers = CIMultiDict(message.headers)
            headers["Host"] = url.host_port_subcomponent or ""
            self.headers = CIMultiDictProxy(headers)
        self.remote: str = conn.peer
        self.scheme = "http"
        self._payload = payload
        self._conn = conn
        self._expect_continue = (message.version >= (1, 1) and "Expect" in message.headers
                                 and message.headers["Expect"].lower() == "100-continue")

    @property
    def content_length(self) -> int | None:
        """The declared body size (None when absent or chunked)."""
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isascii() and value.isdigit() else None

    @property
    def body_exists(self) -> bool:
        """Whether the request has a body to read (declared or chunked)."""
        return not isinstance(self._payload, EmptyStreamReader)

    async def read(self, limit: int) -> bytes:
        """The whole body; BodyTooLarge past ``limit``, TimeoutError if it is too slow."""
        if self._expect_continue and self._conn.transport is not None:
            self._expect_continue = False
            self._conn.transport.write(CONTINUE)
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(BODY_TIMEOUT):
            while chunk := await self._payload.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
        return b"".join(chunks)


Handler = Callable[[Request], Awaitable[Response]]


class _Refused:
    """Stands in the queue for a request the parser refused."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


class HttpConnection(BaseProtocol):
    """One client connection."""

    def __init__(self, front: Front) -> None:
        super().__init__(front.loop)
        self.front = front
        self.peer = ""
        # max_msg_queue_size=1: one message per feed (see the module docstring).
        self._request_parser = HttpRequestParser(
            self, front.loop, READ_LIMIT, max_line_size=MAX_LINE, max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS, auto_decompress=False,  # bodies pass through as sent
            max_msg_queue_size=1)
        # BaseProtocol pauses this parser when a body's buffer fills (its pause_reading).
        self._parser = self._request_parser
        self._queue: deque[tuple[RawRequestMessage | _Refused, StreamReader]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._current: StreamReader | None = None
        self._closing = False
        self._refused = False  # the parser gave up: nothing more is read
        self._last: StreamReader | None = None  # the body of a request ending the connection
        self.idle_since = front.loop.time()
        self.head_since = 0.0

    @property
    def busy(self) -> bool:
        """Whether a request is being answered or waits to be."""
        return self._task is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.front.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._closing = True
        self.front.connections.discard(self)
        if self._current is not None and not self._current.is_eof():
            self._current.set_exception(ConnectionResetError("client went away"))
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._refused or (self._last is not None and self._last.is_eof()):
            return  # after the last request (and its body) nothing more is parsed
        parser = self._request_parser
        queued = 0
        try:
            messages, _upgraded, _tail = parser.feed_data(data)
            while messages:
                self._queue.extend(messages)
                queued += len(messages)
                if ends_connection(messages[-1][0]):
                    self._last = messages[-1][1]  # its body is still read, then nothing
                    break
                if self._reading_paused:  # a body's buffer is full: resumed by aiohttp
                    break
                messages, _upgraded, _tail = parser.feed_data(b"")
        except HttpProcessingError as exc:
            # No more parsing on this connection: answer what came before, then this.
            self._refused = True
            self._queue.append((_Refused(refusal_status(exc)), EmptyStreamReader()))
            self._pause_transport_reading()
            self._start()
            return
        if queued:
            self.head_since = 0.0
            if len(self._queue) >= MAX_QUEUED:
                self._pause_reading_for_buffer()
            self._start()
        elif self._task is None and not self.head_since:
            self.head_since = self.front.loop.time()

    def _start(self) -> None:
        if self._task is None:
            self._task = self.front.loop.create_task(self._serve())
            self.front.answering.add(self._task)

    async def _serve(self) -> None:
        """Answer queued requests in order until none is left."""
        try:
            while self._queue:
                message, payload = self._queue.popleft()
                if self._buffer_paused and len(self._queue) < MAX_QUEUED // 2:
                    self._resume_reading_for_buffer()
                if isinstance(message, _Refused):
                    rid = request_id(None)
                    log.info("request %s refused by the HTTP parser (%s)", rid, message.status)
                    self._write(problem_response(message.status, REFUSALS[message.status],
                                                 rid), head=False, close=True)
                    return
                if not await self._answer(message, payload):
                    return
        finally:
            self.front.answering.discard(self._task)
            self._task = None
            self.idle_since = self.front.loop.time()
            if self.front.stopping and self.transport is not None and not self._queue:
                self.transport.close()

    async def _answer(self, message: RawRequestMessage, payload: StreamReader) -> bool:
        """Answer one request; False when the connection is to be closed."""
        self._current = payload
        try:
            response = await self.front.handler(Request(message, payload, self))
        except Exception:
            rid = request_id(None)
            log.exception("request %s failed", rid)
            response = problem_response(500, "the request could not be handled", rid)
        finally:
            self._current = None
        # A body left unread (refused before reading) cannot be skipped safely: close.
        close = (ends_connection(message) or self.front.stopping or self._closing
                 or not payload.is_eof())
        self._write(response, head=message.method == "HEAD", close=close,
                    keep_alive_10=message.version < (1, 1) and not close)
        if close:
            return False
        if self._paused:  # the client is not reading what it asked for
            try:
                async with asyncio.timeout(BODY_TIMEOUT):
                    await self._drain_helper()
            except (TimeoutError, ConnectionError):
                self._closing = True
                if self.transport is not None:
                    self.transport.abort()  # close() would still flush what it holds
                return False
        return True

    def _write(self, response: Response, *, head: bool, close: bool,
               keep_alive_10: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        status = response.status
        lines = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n",
                 "Date: ", self.front.date(), "\r\n"]
        for name, value in response.headers:
            lines.append(f"{name}: {value}\r\n")
        body = response.body
        if status not in NO_BODY and status >= 200:
            if not head or response.head_length is None:
                lines.append(f"Content-Length: {len(body)}\r\n")
            elif response.head_length:  # "": the size is not known, and none is claimed
                lines.append(f"Content-Length: {response.head_length}\r\n")
        if close:
            lines.append("Connection: close\r\n\r\n")
        elif keep_alive_10:
            lines.append("Connection: keep-alive\r\n\r\n")
        else:
            lines.append("\r\n")
        data = "".join(lines).encode("latin-1", "replace")
        if head or status in NO_BODY or not body:
            transport.write(data)
        elif len(body) < 16384:
            transport.write(data + body)
        else:
            transport.writelines((data, body))  # no copy of a large body
        if close:
            transport.close()

    def close(self) -> None:
        """Close the connection (what the transport holds is still sent)."""
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def expire(self, now: float) -> None:
        """Close the connection if it sat idle or a request head is too slow."""
        if self._task is not None:
            return
        if (self.head_since and now - self.head_since > HEAD_TIMEOUT) or (
                now - self.idle_since > KEEPALIVE):
            self.close()


def ends_connection(message: RawRequestMessage) -> bool:
    """Whether the connection closes after answering ``message``.

    Connection: close or HTTP/1.0 without keep-alive; HTTP/1.0 with Transfer-Encoding
    (RFC 9112 §6.1: its framing is faulty, close after the answer); after an Upgrade or
    CONNECT request the parser reads no more HTTP.
    """
    return (message.should_close or message.upgrade or message.method == "CONNECT"
            or (message.version < (1, 1) and "Transfer-Encoding" in message.headers))


REFUSALS = {
    400: "the request is not valid HTTP",
    414: "the request line is too long",
    431: "the request header fields are too large",
    501: "the request method is not implemented",
}


def refusal_status(exc: HttpProcessingError) -> int:
    """The status answering a request the parser refused (414, 431, 501 or 400)."""
    if isinstance(exc, LineTooLong):
        return 414 if exc.args[1] == MAX_LINE else 431
    if isinstance(exc, BadHttpMethod):
        return 501
    if exc.message == TOO_MANY_HEADERS:
        return 431
    return 400


def problem_response(status: int, detail: str, rid: str, *, kind: str | None = None,
                     headers: dict[str, str] | None = None) -> Response:
    """A problem+json answer carrying the request id."""
    items = [("Content-Type", CONTENT_TYPE), ("X-Request-ID", rid)]
    if headers:
        items.extend(headers.items())
    return Response(status, items, problem_bytes(status, detail, rid, kind=kind))


class Front:
    """The listening side: the protocol factory, the connections and their sweep."""

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop) -> None:
        self.handler = handler
        self.loop = loop
        self.connections: set[HttpConnection] = set()
        # The connections' running answer tasks, open or not: a client that went away
        # leaves its request running, and what the handler uses closes once drain() returns.
        self.answering: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._date = ""
        self._date_second = 0

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    def date(self) -> str:
        """The Date header's value, formatted once a second."""
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self._date = formatdate(second, usegmt=True)
        return self._date

    async def sweep(self) -> None:
        """Close idle and too-slow connections, once a second, until cancelled."""
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.expire(now)

    async def drain(self, timeout: float) -> None:
        """Stop: close idle connections now, let busy ones finish within ``timeout``.

        Handlers still running after it are cancelled, so none outlives the server.
        """
        self.stopping = True
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        deadline = self.loop.time() + timeout
        while self.answering and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        late = list(self.answering)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=1.0)


async def serve(handler: Handler, *, shutdown_timeout: float, host: str = "", port: int = 0,
                path: str = "", stop: asyncio.Event | None = None) -> None:
    """Serve ``handler`` on ``path`` (unix socket) or ``host:port`` until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    front = Front(handler, loop)
    server = await (loop.create_unix_server(front, path, backlog=1024) if path
                    else loop.create_server(front, host, port, backlog=1024,
                                            reuse_address=True))
    sweeper = loop.create_task(front.sweep())
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        server.close()
        sweeper.cancel()
        await front.drain(shutdown_timeout)
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT only set ``stop`` (the serve loop drains and returns)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
