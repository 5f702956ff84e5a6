"""The services' timeouts, as the framework tells them: the deadlines the sidecar enforces.

The framework's ``GET /internal/catalog`` (framework/catalog.py) lists every
service's timeout, signed with the shared secret; its ``/readyz`` names the
catalog's version. :class:`CatalogWatcher` asks the framework's ``/readyz``
every FIRST_POLL_SECONDS until it has a catalog, then every POLL_SECONDS (each
ask is an access-log line in the framework), and fetches the catalog when the
version is new: once the framework is ready, and again after a config change or
a restart. Until then,
and for a service the catalog does not name, the deadline is the default
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from framework.catalog import PATH, SIGNATURE, body_signature
from framework.registry import DEFAULT_TIMEOUT
from sidecar.errors import SidecarError
from sidecar.proxy import Upstream, UpstreamReply

log = logging.getLogger("mtp.sidecar")

FIRST_POLL_SECONDS = 1.0
POLL_SECONDS = 5.0
ASK_TIMEOUT = 2.0  # the framework answers /readyz and the catalog off its request threads

Headers = Callable[[str], list[tuple[str, str]]]  # path -> signed headers for a GET


class CatalogRefused(ValueError):
    """The answer is not a catalog the framework signed."""


@dataclass
class Catalog:
    """Service -> timeout, and the default for any other service."""

    default: float = DEFAULT_TIMEOUT
    services: dict[str, float] = field(default_factory=dict)
    version: str = ""

    def timeout(self, service: str) -> float:
        """The deadline of a call of ``service`` (seconds)."""
        return self.services.get(service, self.default)


def parse(secret: bytes, reply: UpstreamReply) -> Catalog:
    """The catalog in the framework's answer; CatalogRefused unless signed and well formed."""
    given = next((v for k, v in reply.headers if k.lower() == SIGNATURE.lower()), "")
    if reply.status != 200 or not hmac.compare_digest(
            given.encode(), body_signature(secret, reply.body).encode()):
        raise CatalogRefused(f"unsigned or refused catalog (status {reply.status})")
    try:
        doc: Any = json.loads(reply.body)
        services = {str(k): _seconds(v) for k, v in doc["services"].items()}
        return Catalog(_seconds(doc["default"]), services, str(doc["version"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CatalogRefused(f"malformed catalog: {type(exc).__name__}") from None


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value < math.inf):
        raise ValueError("not a timeout")
    return float(value)


class CatalogWatcher:
    """Keeps ``holder.catalog`` in step with the framework's."""

    def __init__(self, upstream: Upstream, secret: bytes, headers: Headers,
                 install: Callable[[Catalog], None], current: Callable[[], Catalog],
                 poll: float = POLL_SECONDS, first_poll: float = FIRST_POLL_SECONDS) -> None:
        self.upstream, self.secret, self.headers = upstream, secret, headers
        self.install, self.current = install, current
        self.poll, self.first_poll = poll, first_poll
        self._task: asyncio.Task[None] | None = None

    async def _get(self, path: str) -> UpstreamReply:
        return await self.upstream.send("GET", path, self.headers(path), None,
                                        timeout=ASK_TIMEOUT)

    async def check(self) -> bool:
        """Fetch the catalog when the framework's /readyz names a new version."""
        ready = await self._get("/readyz")
        if ready.status != 200:
            return False
        version = json.loads(ready.body).get("catalog", "")
        if not version or version == self.current().version:
            return False
        catalog = parse(self.secret, await self._get(PATH))
        self.install(catalog)
        log.info("service catalog %s loaded: %d service(s)", catalog.version,
                 len(catalog.services))
        return True

    async def _loop(self) -> None:
        failing = False
        while True:
            try:
                await self.check()
                failing = False
            except (SidecarError, CatalogRefused, ValueError, AttributeError) as exc:
                if not failing:  # once per outage, not every poll
                    log.warning("service catalog not loaded: %s", exc)
                failing = True
            await asyncio.sleep(self.poll if self.current().version else self.first_poll)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

