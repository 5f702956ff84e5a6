"""Serving the sidecar app: aiohttp's server, except for requests its HTTP parser refuses.

aiohttp answers such a request with the parser's message, which quotes the bytes it
choked on (a header line, ``Authorization`` included), and logs the same text at
ERROR. The contract says no answer echoes the request's headers and no log holds a
secret, so here those answers are problem+json with a new request id, and the log
line names only the error's class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from framework.problem import CONTENT_TYPE, problem_bytes

log = logging.getLogger("mtp.sidecar")


class QuietRequestHandler(RequestHandler):
    """aiohttp's connection handler with error answers that quote nothing from the request."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        if isinstance(exc, HttpProcessingError):
            # The exception's text quotes the request: its class is all that is logged.
            log.info("request %s refused by the HTTP parser: %s", rid, type(exc).__name__)
            detail = "the request is not valid HTTP"
        else:
            log.error("request %s failed with %d", rid, status, exc_info=exc)
            detail = "the request could not be handled"
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already started")
        resp = web.Response(status=status, body=problem_bytes(status, detail, rid),
                            content_type=CONTENT_TYPE, headers={"X-Request-ID": rid})
        resp.force_close()
        return resp


class QuietServer(web.Server):
    """A :class:`web.Server` whose connections use :class:`QuietRequestHandler`."""

    def __call__(self) -> RequestHandler:
        return QuietRequestHandler(self, loop=self._loop, **self._kwargs)


async def serve(app: web.Application, *, shutdown_timeout: float, host: str = "",
                port: int = 0, path: str = "") -> None:
    """Serve ``app`` on ``path`` (unix socket) or ``host:port`` until cancelled."""
    runner = web.AppRunner(app, handle_signals=True, access_log=None,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    assert runner.server is not None
    # Only __call__ differs, so the server aiohttp built can take on the subclass.
    runner.server.__class__ = QuietServer
    try:
        site: web.BaseSite = (web.UnixSite(runner, path) if path
                              else web.TCPSite(runner, host, port))
        await site.start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(app: web.Application, *, shutdown_timeout: float, host: str = "", port: int = 0,
        path: str = "") -> None:
    """Like ``web.run_app``: serve until SIGINT/SIGTERM, then drain and stop."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(serve(app, shutdown_timeout=shutdown_timeout, host=host,
                                  port=port, path=path))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
        # Whatever is still pending (as web.run_app does): cancelled, not destroyed pending.
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
