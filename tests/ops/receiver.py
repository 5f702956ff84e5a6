"""A real aiohttp webhook receiver on loopback, run in a thread, for the billing tests.

It verifies each delivery the way a receiver outside the project would: with the
Standard Webhooks library's own ``Webhook.verify`` (signature and timestamp window).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from framework.webhook import IDEMPOTENCY_HEADER
from tests.helpers import free_port


@dataclass
class Receiver:
    """Answers ``fail_first`` requests with 500 (or ``fail_status``), then 200.

    ``accepted`` holds each accepted delivery once per idempotency key, as a
    receiver that de-duplicates would; ``deliveries`` counts every 2xx per key.
    """

    secret: bytes | str  # bytes: the HMAC key itself; str: a whsec_ secret
    fail_first: int = 0
    fail_status: int = 500
    requests: int = 0
    bad_signatures: int = 0
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: Counter[str] = field(default_factory=Counter)
    # Every request as received (body, headers), to replay one in a test.
    received: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/billing"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if self.requests <= self.fail_first:
            if self.fail_status in (301, 302, 303, 307):
                return web.Response(status=self.fail_status, headers={"Location": "/elsewhere"})
            return web.Response(status=self.fail_status, text="try later")
        headers = dict(request.headers)
        self.received.append((body, headers))
        try:
            Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=401)
        key = request.headers[IDEMPOTENCY_HEADER]
        self.deliveries[key] += 1
        self.accepted.setdefault(key, json.loads(body))
        return web.json_response({"ok": True})

    def start(self) -> Receiver:
        self.port = free_port()
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/billing", self.handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "receiver did not start"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
