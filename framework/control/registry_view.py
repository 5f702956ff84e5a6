"""The data planes' read side of the registry: a local copy kept current by the store.

A data plane belongs to a fleet when its store holds the registry (the control
plane published its plans there). Requests then consult :class:`RegistryView`
(a dict lookup, no I/O); a background thread keeps the copy current:

- Redis: subscribed to :data:`~framework.control.store.CHANNEL`, so a change is
  applied about a round trip after the control plane wrote it; the version
  counter is also read every :data:`RESYNC` s and a full reload follows any
  change a lost connection may have hidden. A dedicated data plane (one tenant)
  reads only that tenant's own record key and the plans, and listens only on the
  tenant's own channel, all its Redis ACL user may read (framework/control/acl.py);
  it reads both again every :data:`RESYNC` s (a changed plans file announces
  itself to no tenant's channel).
- SQLite (one machine, the same MTP_DATA_DIR): ``PRAGMA data_version`` polled every
  :data:`POLL` s, which changes only when another connection committed.

If the store becomes unreachable the last copy stays in force (a suspended tenant
stays refused); a store that never held a registry means no fleet, and the data
plane behaves exactly as without one.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from framework.control.plans import Plan, plan_from_dict
from framework.control.store import (
    CHANNEL,
    DB_NAME,
    PLANS,
    REFUSED,
    TENANTS,
    VERSION,
    TenantRecord,
    tenant_channel,
    tenant_key,
)

log = logging.getLogger("mtp.fleet")

POLL = 0.05  # SQLite: seconds between data_version checks
RESYNC = 1.0  # Redis: seconds between version checks (a backstop for lost messages)
RETRY = 0.5  # seconds before reconnecting to a store that failed
FIRST_LOOK = 2.0  # seconds open_view waits at most for the first read of the store

UNKNOWN = "unknown-tenant"
SUSPENDED = "tenant-suspended"


class RegistryView:
    """The cached registry: tenant -> (status, plan), and the plans in force."""

    def __init__(self) -> None:
        self.fleet = False  # True once the store holds a registry
        self.tenants: dict[str, tuple[str, str]] = {}
        # tenant -> (placement, the placement it is migrating away from or ""): pools
        self.placements: dict[str, tuple[str, str]] = {}
        self.plans: Mapping[str, Plan] = MappingProxyType({})
        self.plans_version = 0
        self.changed = threading.Event()  # set after every applied change (tests, benches)
        # Set once the first look at the store is over (a registry read, none found, or
        # the store unreachable): open_view waits for it, so a data plane does not serve
        # anyone the registry would refuse in the moment before its first read.
        self.settled = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refusal(self, tenant_id: str) -> str | None:
        """None when the tenant may be served, else the problem kind to refuse it with."""
        if not self.fleet:
            return None
        entry = self.tenants.get(tenant_id)
        if entry is None:
            return UNKNOWN
        return SUSPENDED if entry[0] in REFUSED else None

    def plan_of(self, tenant_id: str) -> Plan | None:
        """The tenant's plan (None without a fleet, or when the plan is not published)."""
        entry = self.tenants.get(tenant_id) if self.fleet else None
        return self.plans.get(entry[1]) if entry else None

    def _apply_plans(self, doc: dict[str, Any] | None) -> None:
        if doc is None:
            return
        self.plans = MappingProxyType({name: plan_from_dict(name, raw)
                                       for name, raw in doc.get("plans", {}).items()})
        self.plans_version = int(doc.get("version", 0))
        self.fleet = True

    def start(self) -> RegistryView:
        self._thread = threading.Thread(target=self._run, name="mtp-fleet-view", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop watching; the thread is a daemon, so a store stuck in a connect never
        holds up a shutdown (it is waited for briefly, not forever)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=0.5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch()
            except Exception as exc:
                log.debug("registry view: store unavailable (%s); retrying", type(exc).__name__)
                self.settled.set()  # as before the view: the last copy, here none
                self._stop.wait(RETRY)

    def _watch(self) -> None:
        """Follow the store's changes until stopped; a view with no store has none."""
        self.settled.set()
        self._stop.wait()


class RedisView(RegistryView):
    """The registry in the fleet's Redis, followed through pub/sub: every record, or only
    ``tenant``'s (a dedicated data plane)."""

    def __init__(self, url: str, tenant: str = "") -> None:
        super().__init__()
        self.url = url
        self.tenant = tenant
        self._seen: tuple[str | None, str | None] | None = None

    def _reload_own(self, client: Any) -> None:
        """Read the tenant's record and the plans; apply them when they changed."""
        pipe = client.pipeline(transaction=True)
        pipe.get(PLANS)
        pipe.get(tenant_key(self.tenant))
        plans, doc = seen = tuple(pipe.execute())
        if seen == self._seen:
            self.settled.set()
            return
        if plans is not None:
            import json

            self._apply_plans(json.loads(plans))
        self.tenants = {self.tenant: _entry(doc)} if doc is not None else {}
        self.placements = {self.tenant: _placement(doc)} if doc is not None else {}
        self._seen = seen
        self.changed.set()
        self.settled.set()

    def _reload(self, client: Any) -> str | None:
        pipe = client.pipeline(transaction=True)
        pipe.get(VERSION)
        pipe.get(PLANS)
        pipe.hgetall(TENANTS)
        version, plans, docs = pipe.execute()
        if plans is not None:
            import json

            self._apply_plans(json.loads(plans))
        self.tenants = {tid: _entry(doc) for tid, doc in docs.items()}
        self.placements = {tid: _placement(doc) for tid, doc in docs.items()}
        self.changed.set()
        self.settled.set()
        return version

    def _watch(self) -> None:
        from redis import Redis

        client = Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                decode_responses=True)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            if self.tenant:
                self._follow_own(client, pubsub)
                return
            pubsub.subscribe(CHANNEL)  # before the reload: no change falls in between
            seen = self._reload(client)
            next_sync = time.monotonic() + RESYNC
            while not self._stop.is_set():
                msg = pubsub.get_message(timeout=0.2)
                if msg is not None and msg.get("type") == "message":
                    self._one(client, msg["data"])
                    seen = None  # a later resync compares against a fresh read
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + RESYNC
                    version = client.get(VERSION)
                    if seen is None:
                        seen = version
                    elif version != seen:
                        seen = self._reload(client)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()
            client.close()

    def _follow_own(self, client: Any, pubsub: Any) -> None:
        """One tenant: its channel says when to read again; every RESYNC s it reads anyway."""
        from redis.exceptions import NoPermissionError

        try:
            pubsub.subscribe(tenant_channel(self.tenant))  # before the read: nothing missed
            self._seen = None  # a new connection (maybe a new, empty store): apply it all
            self._reload_own(client)
        except NoPermissionError:
            # A fleet's ACL user that may not read its record (made by an older control
            # plane): refuse every call rather than serve one the registry may refuse.
            if not (self.fleet and not self.tenants):
                log.error("registry view: this Redis user may not read tenant %s's registry "
                          "record; every call is refused until it may", self.tenant)
            self.fleet, self.tenants, self._seen = True, {}, None
            self.changed.set()
            raise
        next_sync = time.monotonic() + RESYNC
        while not self._stop.is_set():
            msg = pubsub.get_message(timeout=0.2)
            if (msg is not None and msg.get("type") == "message") or \
                    time.monotonic() >= next_sync:
                next_sync = time.monotonic() + RESYNC
                self._reload_own(client)

    def _one(self, client: Any, tenant_id: str) -> None:
        if tenant_id == "*":
            self._reload(client)
            return
        doc = client.hget(TENANTS, tenant_id)
        if doc is None:
            self.tenants.pop(tenant_id, None)
            self.placements.pop(tenant_id, None)
        else:
            self.tenants[tenant_id] = _entry(doc)
            self.placements[tenant_id] = _placement(doc)
        if not self.fleet:
            self._reload(client)
        self.changed.set()


class SqliteView(RegistryView):
    """The registry in ``<MTP_DATA_DIR>/fleet.db``, polled cheaply."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__()
        self.path = Path(data_dir) / DB_NAME

    def _watch(self) -> None:
        while not self.path.is_file():
            self.settled.set()  # no fleet.db: no registry (yet)
            if self._stop.wait(POLL * 4):
                return
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5,
                               check_same_thread=False, isolation_level=None)
        try:
            seen = -1
            while not self._stop.is_set():
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != seen:
                    seen = version
                    self._reload(conn)
                self._stop.wait(POLL)
        finally:
            conn.close()

    def _reload(self, conn: sqlite3.Connection) -> None:
        import json

        conn.execute("BEGIN")  # one read transaction: tenants and plans of the same commit
        try:
            rows = conn.execute("SELECT id, status, plan, doc FROM tenants").fetchall()
            plans = conn.execute("SELECT value FROM meta WHERE key = 'plans'").fetchone()
        finally:
            conn.execute("COMMIT")
        if plans is not None:
            self._apply_plans(json.loads(plans[0]))
        self.tenants = {tid: (status, plan) for tid, status, plan, _doc in rows}
        self.placements = {tid: _placement(doc) for tid, _s, _p, doc in rows}
        self.changed.set()
        self.settled.set()


def _placement(doc: str) -> tuple[str, str]:
    rec = TenantRecord.from_json(doc)
    migration = rec.migration or {}
    return (rec.placement, str(migration.get("from", "")))


def _entry(doc: str) -> tuple[str, str]:
    rec = TenantRecord.from_json(doc)
    return (rec.status, rec.plan)


def open_view(redis_url: str, data_dir: Path, tenant: str = "") -> RegistryView:
    """The view of this data plane's store, started; ``tenant``: only that tenant's record
    (with Redis: all its ACL user may read)."""
    view: RegistryView = RedisView(redis_url, tenant) if redis_url else SqliteView(data_dir)
    view.start()
    view.settled.wait(FIRST_LOOK)
    return view
