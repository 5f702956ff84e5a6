"""Forwarding to the framework: one keep-alive connection pool (sidecar/http1.py).

The pool's idle timeout (30 s) stays below gunicorn's keep-alive (75 s), so the
sidecar always drops an idle connection before gunicorn would. Bodies are read
whole because both directions are capped (MTP_MAX_BODY, MTP_MAX_RESULT) and
small requests are the common case; a declared size over a cap is refused before
reading. Failures map to problem+json: unreachable 502, too slow 504, result
over the cap 500.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from framework.settings import Settings
from sidecar.errors import BadGateway, GatewayTimeout, ResultTooLarge
from sidecar.http1 import Pool, TooLarge


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts towards the framework (read covers long sync services)."""

    connect: float = 5.0
    read: float = 330.0


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """What the framework answered."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Upstream:
    """The framework as seen from the sidecar."""

    def __init__(self, settings: Settings, timeouts: Timeouts | None = None) -> None:
        t = timeouts or Timeouts()
        self.pool = Pool(settings.upstream, connect_timeout=t.connect, read_timeout=t.read,
                         max_body=settings.max_result)

    async def start(self) -> None:
        """Nothing to open ahead: connections are made on first use."""

    async def close(self) -> None:
        await self.pool.close()

    async def send(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None) -> UpstreamReply:
        """Send one request; BadGateway, GatewayTimeout or ResultTooLarge on failure."""
        try:
            status, answer, content = await self.pool.request(method, path, headers, body)
        except TimeoutError:
            raise GatewayTimeout("framework read timeout") from None
        except TooLarge:
            raise ResultTooLarge("result over MTP_MAX_RESULT") from None
        except OSError as exc:
            raise BadGateway(f"framework unreachable: {type(exc).__name__}") from None
        return UpstreamReply(status, answer, content)
