"""How cheap can a Python proxy on uvloop be? A probe for the sidecar's CPU target (bench only).

    python bench/raw_proxy_probe.py LISTEN_PORT UNIX_SOCKET_PATH

Not a proxy to use: GET only, no request bodies, no pipelining, no timeouts, no
validation. It answers one question: with one callback per socket event and no
task, request or response objects per request (what leaving aiohttp's server for
a raw ``asyncio.Protocol`` would buy), what is the floor of CPU per proxied request
on this machine? Compare it with ``bench/naive_proxy.py`` and the sidecar in the
same run (``bench/sidecar_wrk.py`` runs it in front of its unix-socket upstreams).
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, owned by one client connection."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        length = 0
        if (at := head.find(b"content-length:")) >= 0:
            eol = head.find(b"\r\n", at)
            length = int(head[at + 15:eol if eol >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        answer, self.buf = self.buf[:total], self.buf[total:]
        self.client.answer(answer)


class Client(asyncio.Protocol):
    """One client connection: each complete GET goes upstream, the answer comes back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        self.loop, self.path = loop, path
        self.transport: asyncio.Transport | None = None
        self.up: Upstream | None = None
        self.buf = b""
        self.waiting: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up = Upstream(self)
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        assert self.up is not None
        await self.loop.create_unix_connection(lambda: self.up, self.path)
        for request in self.waiting:
            self.up.transport.write(request)  # type: ignore[union-attr]
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            request, self.buf = self.buf[:end + 4], self.buf[end + 4:]
            # The one rewrite a proxy must do: the client's headers pass, hop-by-hop aside.
            request = request.replace(b"Connection: close\r\n", b"")
            if self.up is not None and self.up.transport is not None:
                self.up.transport.write(request)
            else:
                self.waiting.append(request)

    def answer(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(lambda: Client(loop, path), "127.0.0.1", port))
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
