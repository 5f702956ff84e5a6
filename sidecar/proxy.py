"""Forwarding to the framework: one keep-alive connection pool (sidecar/http1.py).

The pool's idle timeout (30 s) stays below gunicorn's keep-alive (75 s), so the
sidecar always drops an idle connection before gunicorn would. Bodies are read
whole because both directions are capped (MTP_MAX_BODY, MTP_MAX_RESULT) and
small requests are the common case; a declared size over a cap is refused before
reading. Failures map to problem+json: unreachable 502, too slow 504, result
over the cap 500.

A call (:meth:`Upstream.call`) is admitted first (sidecar/admission.py) and has
the service's deadline: past it the client gets 504 while the call keeps its
admission slot and its connection until the framework's late answer arrives, or
until the read timeout (``Timeouts.read``, the long cap) closes the connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from framework.settings import Settings
from sidecar.admission import Admission, Saturated
from sidecar.errors import BadGateway, GatewayTimeout, ResultTooLarge
from sidecar.http1 import Overdue, Pool, TooLarge


class DeadlinePassed(GatewayTimeout):
    """504: the service did not answer within its timeout."""

    kind = "deadline-exceeded"

    def __init__(self, service: str, timeout: float) -> None:
        name = f"service {service!r}" if service else "the framework"
        super().__init__(f"deadline {timeout:g}s passed",
                         detail=f"{name} did not answer within {timeout:g}s")


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts towards the framework.

    ``read`` is the long cap: a call past its service deadline is answered 504
    but its connection waits this long for the late answer before it is closed.
    """

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

    async def call(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None, admission: Admission, service: str,
                   timeout: float, slack: float) -> UpstreamReply:
        """A call the framework runs on one of its threads: admitted, with a deadline.

        Saturated (503) when no slot frees in time; DeadlinePassed (504) ``timeout`` +
        ``slack`` seconds after sending, the slot staying taken until the framework
        answers late (or the connection is given up).
        """
        if not admission.enter() and not await admission.admit():
            raise Saturated(admission.limit)
        try:
            reply = await self.send(method, path, headers, body, deadline=timeout + slack)
        except Overdue as late:
            late.settled.add_done_callback(lambda _: admission.leave())
            raise DeadlinePassed(service, timeout) from None
        except BaseException:
            admission.leave()
            raise
        admission.leave()
        return reply

    async def send(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None, *, timeout: float | None = None,
                   deadline: float | None = None) -> UpstreamReply:
        """Send one request; BadGateway, GatewayTimeout or ResultTooLarge on failure.

        ``timeout`` replaces the read timeout; ``deadline`` raises
        :class:`~sidecar.http1.Overdue` (see Pool.request).
        """
        try:
            status, answer, content = await self.pool.request(
                method, path, headers, body, timeout=timeout, deadline=deadline)
        except TimeoutError:
            raise GatewayTimeout("framework read timeout") from None
        except TooLarge:
            raise ResultTooLarge("result over MTP_MAX_RESULT") from None
        except OSError as exc:
            raise BadGateway(f"framework unreachable: {type(exc).__name__}") from None
        return UpstreamReply(status, answer, content)
