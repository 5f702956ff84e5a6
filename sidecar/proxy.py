"""Forwarding to the framework over one pooled, keep-alive ClientSession.

The pool's idle timeout (30 s) stays below gunicorn's keep-alive (75 s), so the
sidecar always closes an idle connection before gunicorn would: a reused
connection is never one the server is closing. Bodies are read whole because
both directions are capped (MTP_MAX_BODY, MTP_MAX_RESULT) and small requests are
the common case; a declared Content-Length over a cap is refused before reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from framework.settings import Settings
from sidecar.errors import BadGateway, GatewayTimeout, ResultTooLarge

POOL_IDLE_SECONDS = 30.0
POOL_SIZE = 256
CHUNK = 1 << 16


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts towards the framework."""

    connect: float = 5.0
    read: float = 330.0


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """What the framework answered."""

    status: int
    headers: CIMultiDict[str]
    body: bytes


def connector(upstream: tuple[str, int] | str) -> aiohttp.BaseConnector:
    """A pooled keep-alive connector to MTP_UPSTREAM (unix socket or host:port)."""
    if isinstance(upstream, str):
        return aiohttp.UnixConnector(path=upstream, limit=POOL_SIZE,
                                     keepalive_timeout=POOL_IDLE_SECONDS)
    return aiohttp.TCPConnector(limit=POOL_SIZE, keepalive_timeout=POOL_IDLE_SECONDS,
                                use_dns_cache=True, ttl_dns_cache=None)


class Upstream:
    """The framework as seen from the sidecar."""

    def __init__(self, settings: Settings, timeouts: Timeouts | None = None) -> None:
        self.base = settings.upstream_url
        self.max_result = settings.max_result
        self._upstream = settings.upstream
        self._timeouts = timeouts or Timeouts()
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the pooled session (in the app's cleanup_ctx)."""
        t = self._timeouts
        self.session = aiohttp.ClientSession(
            connector=connector(self._upstream),
            timeout=aiohttp.ClientTimeout(total=None, connect=t.connect, sock_read=t.read),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(self, method: str, path: str, headers: Mapping[str, str] | CIMultiDict[str],
                   body: bytes | None) -> UpstreamReply:
        """Send one request; BadGateway, GatewayTimeout or ResultTooLarge on failure."""
        assert self.session is not None
        url = URL(self.base + path, encoded=True)
        try:
            async with self.session.request(method, url, headers=headers, data=body,
                                            allow_redirects=False) as resp:
                return UpstreamReply(resp.status, CIMultiDict(resp.headers),
                                     await self._read(resp))
        except aiohttp.ConnectionTimeoutError:
            raise BadGateway("framework connect timeout") from None
        except TimeoutError:
            raise GatewayTimeout("framework read timeout") from None
        except aiohttp.ClientError as exc:
            raise BadGateway(f"framework unreachable: {type(exc).__name__}") from None

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        length = resp.content_length
        if length is not None:
            if length > self.max_result:
                raise ResultTooLarge(f"result of {length} bytes over MTP_MAX_RESULT")
            return await resp.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > self.max_result:
                raise ResultTooLarge("streamed result over MTP_MAX_RESULT")
            chunks.append(chunk)
        return b"".join(chunks)
