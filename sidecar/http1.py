"""A lean HTTP/1.1 keep-alive client for the one upstream the sidecar talks to.

Why not aiohttp's ClientSession: per request it builds request/response objects,
URL, cookie and tracing machinery that cost more CPU than the whole rest of the
sidecar (measured: ~110 of ~180 µs per proxied request). The framework is one
known peer on a unix socket or loopback, so the client can be small: requests are
written in one buffer with a Content-Length; responses are parsed here
(Content-Length, chunked, or until close), capped at MTP_MAX_RESULT; connections
are pooled LIFO and dropped after IDLE seconds, below gunicorn's 75 s keep-alive,
so the pool never reuses a connection the server is about to close.

A request may carry a ``deadline`` besides its read timeout: past the deadline
the caller gets :class:`Overdue` at once, while the connection keeps waiting for
the late answer (the framework's thread is still busy with it) until the read
timeout; ``Overdue.settled`` resolves when that wait is over, and the connection
then goes back to the pool, or is closed when the answer never came.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

MAX_HEAD = 64 << 10
IDLE = 30.0
MAX_IDLE_CONNECTIONS = 256
MAX_CONNECTIONS = 1024  # in flight to the framework at once; more requests wait their turn
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
NO_BODY_STATUSES = frozenset({204, 304})
HEX_DIGITS = b"0123456789abcdefABCDEF"

_FRAMING_LENGTHS = frozenset(map(len, ("content-length", "transfer-encoding", "connection")))
# What bytes.strip() strips: str.strip() would also strip "\x85" and "\xa0" (latin-1).
_SPACE = " \t\n\r\x0b\x0c"

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_TRAILER, _UNTIL_CLOSE, _DONE = range(7)


class UpstreamClosed(ConnectionError):
    """The connection closed before a complete answer."""


class ProtocolViolation(ConnectionError):
    """The upstream's answer is not valid HTTP/1.1."""


class TooLarge(Exception):
    """The answer's body is over the cap."""


class Overdue(Exception):
    """The request's deadline passed; the answer may still come (see ``settled``)."""

    def __init__(self, settled: asyncio.Future[None]) -> None:
        super().__init__("upstream deadline passed")
        self.settled = settled  # done when the late answer arrived or the wait ended


Reply = tuple[int, list[tuple[str, str]], bytes]


class Connection(asyncio.Protocol):
    """One upstream connection; at most one request at a time."""

    def __init__(self, max_body: int, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        # Kept: asyncio.get_running_loop() makes a getpid() system call every time.
        self.loop = loop
        self.max_body = max_body
        self.closed = False
        self.reusable = True
        self.used = 0
        self.received = 0  # bytes of the current answer so far
        self.idle_since = 0.0
        self._buf = bytearray()
        self._waiter: asyncio.Future[Reply] | None = None
        self._state = _DONE
        self._head_only = False
        # The read deadline of the request in flight (and its earlier, soft, call
        # deadline, 0.0 when none or passed). One timer per connection checks them and
        # re-arms itself only while a request is running: a timer per request
        # (call_later + cancel) cost more than the rest of the pool's bookkeeping.
        self._deadline = 0.0
        self._soft = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._late: asyncio.Future[None] | None = None  # set once the soft deadline passed

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._state == _DONE:
            # Bytes nobody asked for: the connection is out of step, drop it.
            self.reusable = False
            self.close()
            return
        self.received += len(data)
        self._buf += data
        try:
            self._parse()
        except (ProtocolViolation, TooLarge) as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._state == _UNTIL_CLOSE:
            self._finish(bytes(self._buf))
        elif self._state != _DONE:
            self._fail(UpstreamClosed("upstream closed the connection"))
        self._settle()  # e.g. closed by Pool.close while a late answer was awaited

    # requests
    def send(self, request: bytes, head_only: bool, timeout: float,
             deadline: float | None = None) -> asyncio.Future[Reply]:
        """Write one request; the future resolves to (status, headers, body).

        With no complete answer within ``timeout`` seconds it fails with TimeoutError
        and the connection is closed. With a ``deadline`` (seconds, shorter) it fails
        with :class:`Overdue` then, and the connection waits on for the answer.
        """
        assert self.transport is not None
        self._waiter = self.loop.create_future()
        now = self.loop.time()
        self._deadline = now + timeout
        self._soft = now + deadline if deadline is not None and deadline < timeout else 0.0
        self._late = None
        due = self._soft or self._deadline
        if self._timer is None or self._timer.when() > due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(due, self._check_deadline)
        self._state = _HEAD
        self._head_only = head_only
        self._buf.clear()
        self.received = 0
        self.used += 1
        self.transport.write(request)
        return self._waiter

    def _check_deadline(self) -> None:
        self._timer = None
        if self._state == _DONE:
            return  # idle: the next request arms the timer again
        now = self.loop.time()
        if now >= self._deadline:
            self._fail(TimeoutError("upstream read timeout"))
            return
        if self._soft and now >= self._soft:
            self._soft = 0.0
            self._late = self.loop.create_future()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(Overdue(self._late))
        # An earlier request's timer, or the soft deadline passed: wait for the next one.
        self._timer = self.loop.call_at(self._soft or self._deadline, self._check_deadline)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Give up on the running request (timeout, cancellation)."""
        self._state = _DONE
        self.reusable = False
        self.close()

    # parsing
    def _fail(self, exc: Exception) -> None:
        self._state = _DONE
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()
        self._settle()

    def _finish(self, body: bytes) -> None:
        self._state = _DONE
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((self._status, self._headers, body))
        self._settle()

    def _settle(self) -> None:
        """A request that went past its deadline is over now: tell whoever waits for it."""
        late, self._late = self._late, None
        if late is not None and not late.done():
            late.set_result(None)

    def _parse(self) -> None:
        buf = self._buf
        if self._state == _HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolViolation("response head too large")
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            self._start(head)
            if self._state == _HEAD:  # an informational 1xx answer: the real one follows
                self._parse()
                return
        if self._state == _LENGTH:
            if len(buf) >= self._length:
                body = bytes(buf[:self._length])
                del buf[:self._length]
                if buf:
                    self.reusable = False
                self._finish(body)
        elif self._state == _UNTIL_CLOSE:
            if len(buf) > self.max_body:
                raise TooLarge
        elif self._state in (_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_TRAILER):
            self._chunks()

    def _start(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
            raise ProtocolViolation("bad status line")
        status = int(code)
        headers: list[tuple[str, str]] = []
        length = -1
        codings: list[str] = []
        keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip(_SPACE):
                raise ProtocolViolation("bad header line")
            value = value.strip(_SPACE)
            headers.append((name, value))
            if len(name) not in _FRAMING_LENGTHS:
                continue  # cannot be one of the three names below
            low = name.lower()
            if low == "content-length":
                # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
                if (not (value.isascii() and value.isdigit())
                        or (length >= 0 and int(value) != length)):
                    raise ProtocolViolation("bad Content-Length")
                length = int(value)
            elif low == "transfer-encoding":
                # Several fields make one list; only the final coding decides (RFC 9112 6.3).
                codings += [c.strip(_SPACE).lower() for c in value.split(",") if c.strip(_SPACE)]
            elif low == "connection":
                tokens = value.lower()
                if "close" in tokens:
                    keep_alive = False
                elif "keep-alive" in tokens:
                    keep_alive = True
        if 100 <= status < 200:
            return  # stay in _HEAD
        self._status, self._headers = status, headers
        chunked = bool(codings) and codings[-1] == "chunked"
        if codings:
            if length >= 0:
                self.reusable = False  # both framings: answer it, then trust the line no more
            # Transfer-Encoding overrides Content-Length; not ending in chunked, the body
            # runs until the connection closes.
            length = -1
        if not keep_alive:
            self.reusable = False
        if self._head_only or status in NO_BODY_STATUSES:
            self._finish(b"")
        elif chunked:
            self._body: list[bytes] = []
            self._size = 0
            self._state = _CHUNK_SIZE
        elif length >= 0:
            if length > self.max_body:
                raise TooLarge
            self._length = length
            self._state = _LENGTH
        else:
            self.reusable = False
            self._state = _UNTIL_CLOSE

    def _chunks(self) -> None:
        buf = self._buf
        while True:
            if self._state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ProtocolViolation("bad chunk size line")
                    return
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[:end + 2]
                # Hex digits only: int(x, 16) also takes "0x", "+", "-" and "_".
                if not size_text or size_text.strip(HEX_DIGITS):
                    raise ProtocolViolation("bad chunk size")
                self._length = int(size_text, 16)
                self._size += self._length
                if self._size > self.max_body:
                    raise TooLarge
                self._state = _CHUNK_TRAILER if self._length == 0 else _CHUNK_DATA
            elif self._state == _CHUNK_DATA:
                if len(buf) < self._length + 2:
                    return
                if buf[self._length:self._length + 2] != b"\r\n":
                    raise ProtocolViolation("chunk not terminated")
                self._body.append(bytes(buf[:self._length]))
                del buf[:self._length + 2]
                self._state = _CHUNK_SIZE
            else:  # trailer section, ends with an empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[:end + 2]
                if not line:
                    if buf:
                        self.reusable = False
                    self._finish(b"".join(self._body))
                    return


def encode_request(method: str, path: str, host: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None) -> bytes:
    """The request as bytes: head and body in one buffer, one write."""
    parts = [f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers:
        parts.append(f"{name}: {value}\r\n")
    if body:
        parts.append(f"Content-Length: {len(body)}\r\n\r\n")
    elif method in ("POST", "PUT", "PATCH"):
        parts.append("Content-Length: 0\r\n\r\n")
    else:
        parts.append("\r\n")
    data = "".join(parts).encode("utf-8", "surrogateescape")
    return data + body if body else data


class Pool:
    """Keep-alive connections to one upstream (``unix path`` or ``(host, port)``)."""

    def __init__(self, upstream: tuple[str, int] | str, *, connect_timeout: float,
                 read_timeout: float, max_body: int) -> None:
        self.upstream = upstream
        self.host = "framework" if isinstance(upstream, str) else f"{upstream[0]}:{upstream[1]}"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_body = max_body
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()

        def factory() -> Connection:
            return Connection(self.max_body, loop)

        if isinstance(self.upstream, str):
            coro = loop.create_unix_connection(factory, self.upstream)
        else:
            coro = loop.create_connection(factory, *self.upstream)
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await coro
        self._all.add(conn)
        return conn

    def _idle_connection(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE:
                return conn
            conn.close()
            self._all.discard(conn)
        return None

    def _release(self, conn: Connection) -> None:
        if conn.closed or not conn.reusable or len(self._idle) >= MAX_IDLE_CONNECTIONS:
            conn.close()
            self._all.discard(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def request(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                      body: bytes | None, *, timeout: float | None = None,
                      deadline: float | None = None) -> Reply:
        """One exchange. Raises TimeoutError, ConnectionError/OSError, TooLarge or Overdue.

        ``timeout`` replaces the pool's read timeout for this request; past
        ``deadline`` seconds it is :class:`Overdue`, and the connection (and its
        place under MAX_CONNECTIONS) stays taken until ``Overdue.settled``.
        """
        data = encode_request(method, path, self.host, headers, body)
        head_only = method == "HEAD"
        timeout = timeout or self.read_timeout
        await self._slots.acquire()
        lingering = False
        try:
            conn = self._idle_connection() or await self._connect()
            retry = conn.used > 0 and method in IDEMPOTENT
            try:
                return await self._exchange(conn, data, head_only, timeout, deadline)
            except UpstreamClosed:
                # A reused connection the server closed just as we wrote, before a byte
                # of answer: an idempotent request is sent once more. Once an answer has
                # begun the request was being served, and GET runs services too.
                if not retry or conn.received:
                    raise
                return await self._exchange(await self._connect(), data, head_only, timeout,
                                            deadline)
        except Overdue as exc:
            lingering = True
            exc.settled.add_done_callback(lambda _: self._slots.release())
            raise
        finally:
            if not lingering:
                self._slots.release()

    async def _exchange(self, conn: Connection, data: bytes, head_only: bool, timeout: float,
                        deadline: float | None) -> Reply:
        try:
            reply = await conn.send(data, head_only, timeout, deadline)
        except Overdue as exc:
            # The framework still works on it: the connection is busy until it answers.
            exc.settled.add_done_callback(lambda _: self._release(conn))
            raise
        except BaseException:
            conn.abort()
            self._release(conn)
            raise
        self._release(conn)
        return reply

    async def close(self) -> None:
        """Close every connection."""
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)

