"""The audit trail: one JSON line per decision, to stdout or MTP_AUDIT_FILE.

Fields: time (UTC, ISO 8601), request_id, tenant, user, auth_method, method,
service, operation, outcome, reason, rule, status. Never a credential: the line
is built only from these fields, none of which holds a token, key or password
(reasons are written by the sidecar, not copied from requests; the one exception
is a group or role name that was dropped as unusable, quoted with ``repr`` and cut
to 40 characters, so an operator can see which name granted nothing). Lines are
buffered and flushed at least every FLUSH_SECONDS and at shutdown, so auditing
costs no system call per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from json.encoder import encode_basestring_ascii as _q
from typing import IO

FLUSH_SECONDS = 0.2


class AuditLog:
    """Writes audit lines to a stream it may own."""

    def __init__(self, path: str = "") -> None:
        self._own = bool(path)
        self._out: IO[str] = open(path, "a", buffering=1 << 16) if path else sys.stdout  # noqa: SIM115
        self._flusher: asyncio.Task[None] | None = None
        self._second = -1
        self._prefix = ""

    def timestamp(self, now: float) -> str:
        """ISO 8601 UTC with milliseconds; the seconds part is formatted once per second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def write(self, *, request_id: str, method: str, outcome: str, status: int,
              tenant: str = "", user: str = "", auth_method: str = "", service: str = "",
              operation: str | None = None, reason: str = "", rule: int | None = None) -> None:
        """Append one decision."""
        # Formatted by hand (json's own string escaper, ASCII only): a tenth of what
        # encoding a dict costs, on every request.
        self._out.write(
            f'{{"time":"{self.timestamp(time.time())}","request_id":{_q(request_id)},'
            f'"tenant":{_q(tenant)},"user":{_q(user)},"auth_method":{_q(auth_method)},'
            f'"method":{_q(method)},"service":{_q(service)},'
            f'"operation":{"null" if operation is None else _q(operation)},'
            f'"outcome":{_q(outcome)},"reason":{_q(reason)},'
            f'"rule":{"null" if rule is None else int(rule)},"status":{int(status)}}}\n')

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.flush()

    def start(self) -> None:
        """Begin periodic flushing (inside the running loop)."""
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self.flush()
        if self._own:
            self._out.close()
