"""Migration without interruption: a placement change, driven by the control plane.

``PATCH /admin/tenants/{id} {"placement": P}`` records the new placement and a
migration on the record::

    "migration": {"from": "pool:alpha", "to": "pool:beta", "state": "warming",
                  "since": "...Z", "attempts": 0, "last_error": ""}

- ``warming``: the gateway's table still routes the tenant to ``from``; the source
  keeps serving it; :class:`Migrator` asks the target ``GET /readyz`` (a pool with
  ``X-Tenant-ID``: that starts the tenant's process there). A target that does not
  answer 200 is asked again with a backoff (``attempts``, ``last_error`` show why).
- ``switched``: the target answered ready; the table routes to ``to`` (the gateway's
  sync reloads it) while the source still serves what reaches it.
- after the drain (MTP_GRACE_SECONDS from the switch) the migration is cleared: the
  source stops serving the tenant (a pool answers 403 ``unknown-tenant``).

A PATCH back to ``from`` while warming cancels (nothing was switched); to a third
placement it redirects the migration; while ``switched`` (draining) a new placement
is 409 ``migration-in-progress`` until the drain ends. Every write is a
compare-and-set on the record's placement and migration, so a PATCH and the
background task never undo each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from framework.control.backends import Backends, backend_name
from framework.control.store import TenantRecord, iso_now

if TYPE_CHECKING:
    from framework.control.api import Control

log = logging.getLogger("mtp.control.migration")

WARMING, SWITCHED = "warming", "switched"
TICK = 0.2  # seconds between looks at the migrations in progress
RESCAN = 10.0  # seconds between full scans (a migration another control plane recorded)
PROBE_TIMEOUT = 15.0  # a target's /readyz may start a process
BACKOFF_MAX = 30.0


class MigrationBusy(Exception):
    """A new placement while the previous switch is still draining."""


def new_migration(source: str, target: str, now: str) -> dict[str, Any]:
    return {"from": source, "to": target, "state": WARMING, "since": now,
            "attempts": 0, "last_error": ""}


def placement_change(old: TenantRecord, placement: str, now: str) -> dict[str, Any]:
    """The record fields a PATCH of ``placement`` sets ({} when nothing changes)."""
    current = old.migration
    if placement == old.placement:
        return {}  # already the placement (or the migration's target)
    if current is None:
        return {"placement": placement,
                "migration": new_migration(old.placement, placement, now)}
    if current.get("state") != WARMING:
        raise MigrationBusy(f"the switch to {current.get('to')} is draining")
    if placement == current.get("from"):
        return {"placement": placement, "migration": None}  # cancelled: never switched
    return {"placement": placement,
            "migration": new_migration(str(current.get("from")), placement, now)}


def routed_placement(rec: TenantRecord) -> str:
    """Where the gateway sends the tenant now: the source until the target is ready."""
    m = rec.migration
    if m is not None and m.get("state") == WARMING:
        return str(m.get("from", rec.placement))
    return rec.placement


def backoff(attempts: int) -> float:
    """Seconds before asking a target that was not ready again."""
    return min(BACKOFF_MAX, 0.5 * 2 ** max(0, attempts - 1))


def elapsed(since: str, now: float | None = None) -> float:
    """Seconds since an ISO 8601 time of the record."""
    try:
        then = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return float("inf")  # a record we cannot read the time of: do not wait forever
    return (time.time() if now is None else now) - then


def same_move(rec: TenantRecord, placement: str,
              migration: dict[str, Any] | None) -> bool:
    """The compare of every migration write: nobody changed the move meanwhile."""
    return rec.placement == placement and rec.migration == migration


async def probe(address: str, tenant_id: str, pool: bool,
                timeout: float = PROBE_TIMEOUT) -> str:
    """'' when the target is ready to serve the tenant, else why not."""
    from aiohttp import ClientError, ClientSession, ClientTimeout

    headers = {"X-Tenant-ID": tenant_id} if pool else {}
    try:
        async with ClientSession(timeout=ClientTimeout(total=timeout)) as session, \
                session.get(f"http://{address}/readyz", headers=headers) as reply:
            if reply.status == 200:
                return ""
            body = (await reply.text())[:200]
            return f"{address} answered {reply.status}: {body}"
    except (ClientError, OSError, TimeoutError) as exc:
        return f"{address}: {type(exc).__name__}: {exc}"[:300]


class Migrator:
    """The background task of ``mtp control`` that moves tenants through the states."""

    def __init__(self, control: Control, backends: Backends, drain: float) -> None:
        self.control, self.backends, self.drain = control, backends, drain
        self.pending: set[str] = set()
        self.next_try: dict[str, float] = {}
        self.wake = asyncio.Event()

    def started(self, tenant_id: str) -> None:
        """A PATCH recorded a migration: look at it now."""
        self.pending.add(tenant_id)
        self.next_try.pop(tenant_id, None)
        self.wake.set()

    async def rescan(self) -> None:
        registry = self.control.registry

        def migrating() -> list[str]:
            found, after = [], ""
            while chunk := registry.page(after, 500):
                found += [r.id for r in chunk if r.migration is not None]
                after = chunk[-1].id
            return found

        self.pending.update(await self.control.run(migrating))

    async def run(self) -> None:
        last_scan = float("-inf")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), TICK)
            self.wake.clear()
            try:
                if time.monotonic() - last_scan >= RESCAN:
                    await self.rescan()
                    last_scan = time.monotonic()
                for tenant_id in sorted(self.pending):
                    await self.step(tenant_id)
            except Exception as exc:  # the store away: try again next tick
                log.warning("migrations: %s", exc)
                await asyncio.sleep(1.0)

    async def step(self, tenant_id: str) -> None:
        """One look at one tenant's migration."""
        control = self.control
        rec = await control.run(control.registry.get, tenant_id)
        if rec is None or rec.migration is None:
            self.pending.discard(tenant_id)
            self.next_try.pop(tenant_id, None)
            return
        move = rec.migration
        if move.get("state") == WARMING:
            if time.monotonic() < self.next_try.get(tenant_id, 0.0):
                return
            await self._warm(rec, move)
        elif elapsed(str(move.get("since", ""))) >= self.drain:
            done = await self._write(rec, None)
            if done is not None:
                self._audit("tenant.migration.done", rec, move)
                log.info("tenant %s moved to %s", rec.id, rec.placement)

    async def _warm(self, rec: TenantRecord, move: dict[str, Any]) -> None:
        target = str(move.get("to", rec.placement))
        name = backend_name(target, rec.id)
        error = await probe(self.backends.address(name), rec.id, target.startswith("pool:"))
        if not error:
            if await self._write(rec, {**move, "state": SWITCHED, "since": iso_now()}):
                self.next_try.pop(rec.id, None)
                self._audit("tenant.migration.switched", rec, move)
                log.info("tenant %s: %s is ready, switched from %s", rec.id, target,
                         move.get("from"))
            return
        attempts = int(move.get("attempts", 0)) + 1
        self.next_try[rec.id] = time.monotonic() + backoff(attempts)
        log.warning("tenant %s: target %s not ready (attempt %d): %s", rec.id, target,
                    attempts, error)
        await self._write(rec, {**move, "attempts": attempts, "last_error": error})

    async def _write(self, rec: TenantRecord,
                     migration: dict[str, Any] | None) -> TenantRecord | None:
        control = self.control
        return await control.run(
            control.registry.update, rec.id, {"migration": migration},
            lambda now: same_move(now, rec.placement, rec.migration))

    def _audit(self, action: str, rec: TenantRecord, move: dict[str, Any]) -> None:
        self.control.audit.write(
            operator="mtp-control", action=action, status=200, request_id=uuid.uuid4().hex,
            tenant=rec.id, fields={"from": move.get("from"), "to": move.get("to")})
