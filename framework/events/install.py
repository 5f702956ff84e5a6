"""Wiring events into a framework worker: the engine, the routes and ``context.emit``.

``POST /events`` reaches the framework like any non-service path: the sidecar
authenticates, binds the tenant, rate-limits, caps the body and signs the request
with the body's digest. The events rules of ``[authz]`` are applied here, in one
place, because only here is the event parsed (in structured mode the type is in
the body; the sidecar does not parse bodies).
"""

from __future__ import annotations

import atexit
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request

from framework import tracing
from framework.authz import decide_event
from framework.context import Context
from framework.errors import BadRequest, Forbidden, NotFound
from framework.events.binding import BadEvent, Event, new_event, parse_http, trace_context
from framework.events.dispatch import KEEP_SECONDS, Dispatcher
from framework.events.observe import PUBLISHED, EventAudit, type_label
from framework.events.store import DB_NAME, EventStore, Publisher
from framework.execute import Call, Outcome
from framework.operations import json_response, require_admin
from framework.registry import ServiceSpec
from framework.runtime import Runtime
from framework.settings import Settings

if TYPE_CHECKING:
    from framework.events.store_redis import RedisEventStore

EVENTS_DB = DB_NAME
DEAD_ID_RE = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")  # SQLite row id or Redis entry id


class Emit:
    """``context.emit`` of one call; its repr shows nothing of the engine (tenant code
    may print its context)."""

    __slots__ = ("_ctx", "_events")

    def __init__(self, events: Events, ctx: Context) -> None:
        self._events, self._ctx = events, ctx

    def __call__(self, event_type: str, data: Any = None, subject: str | None = None) -> str:
        return self._events.emit(self._ctx, event_type, data, subject)

    def __repr__(self) -> str:
        return "<context.emit>"


@dataclass(repr=False)
class Events:
    """The events parts of one worker."""

    rt: Runtime
    store: EventStore | RedisEventStore
    audit: EventAudit
    dispatcher: Dispatcher

    def publish(self, event: Event, publisher: Publisher) -> bool:
        """Store ``event`` with a delivery per matching route; False for a duplicate."""
        routes = self.rt.tenant.events.matching(event.type, event.subject)
        fresh = self.store.publish(event, publisher, routes)
        tenant = self.rt.tenant.tenant_id
        if fresh:
            PUBLISHED.labels(tenant, type_label(event.type)).inc()
            self.dispatcher.wake.set()
        self.audit.write(request_id=publisher.request_id, user=publisher.user,
                         auth_method=publisher.auth_method,
                         outcome="published" if fresh else "duplicate", event_id=event.id,
                         event_type=event.type, reason=f"{len(routes)} routes" if fresh else "",
                         status=202)
        return fresh

    def emit(self, ctx: Context, event_type: str, data: Any = None,
             subject: str | None = None) -> str:
        """``context.emit``: publish as the caller of the running service; the event id."""
        event = new_event(event_type, data, subject,
                          f"/{ctx.tenant_id}/services/{ctx.service}")
        event.extra = tracing.carrier()  # the running span's trace goes with the event ({} off)
        json.dumps(data)  # TypeError now, in the handler, for data that cannot be stored
        self.publish(event, Publisher(ctx.user, tuple(ctx.groups), tuple(ctx.roles),
                                      ctx.auth_method, ctx.request_id))
        return event.id

    def with_emit(self, inner: Call) -> Call:
        """``inner`` with ``context.emit`` attached (sync calls, jobs, nested calls)."""

        def call(spec: ServiceSpec, ctx: Context) -> Outcome:
            ctx.emit = Emit(self, ctx)  # type: ignore[attr-defined]
            return inner(spec, ctx)

        return call

    def close(self) -> None:
        self.dispatcher.close()


def open_store(settings: Settings, tenant_id: str) -> EventStore | RedisEventStore:
    """Embedded (SQLite in MTP_DATA_DIR), or with MTP_REDIS_URL the tenant's Redis stream."""
    if settings.redis_url:
        from framework.events.store_redis import RedisEventStore
        from framework.jobs_redis import connect

        return RedisEventStore(connect(settings.redis_url, pool_size=8), tenant_id)
    return EventStore(settings.data_dir / EVENTS_DB)


def start_delivery(rt: Runtime, background: bool = True) -> Events:
    """The engine for ``rt`` and, with ``background``, its delivery thread; ``context.emit``
    on every call of ``rt.executor`` (``mtp worker`` uses this without the routes)."""
    settings = rt.settings
    store = open_store(settings, rt.tenant.tenant_id)
    audit = EventAudit(settings.audit_file, rt.tenant.tenant_id)
    events = Events(rt, store, audit,
                    Dispatcher(rt, store, audit, capacity=settings.job_workers,
                               poll=settings.events_poll))
    rt.executor.call = events.with_emit(rt.executor.call)
    if background:
        store.prune(KEEP_SECONDS)
        events.dispatcher.start()
        # gunicorn workers leave through sys.exit: hand running deliveries back.
        atexit.register(events.close)
    return events


def install(app: Flask, rt: Runtime, background: bool = True) -> Events:
    """The engine for ``rt``, its routes and ``context.emit``."""
    events = start_delivery(rt, background)
    _routes(app, events)
    return events


def _routes(app: Flask, events: Events) -> None:

    @app.post("/events")
    def publish() -> Response:
        state = g._get_current_object()
        ident = state.identity
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            event = parse_http(headers, state.body)
        except BadEvent as exc:
            raise BadRequest(f"invalid CloudEvent: {exc.attribute}: {exc.reason}",
                             attribute=exc.attribute) from None
        if not event.extra:  # no trace in the event: this request's span, else its header
            event.extra = tracing.carrier() or trace_context(headers)
        if not decide_event(events.rt.tenant.authz, ident, event.type).allowed:
            raise Forbidden(f"not allowed to publish events of type {event.type!r}")
        events.publish(event, Publisher(ident.user, tuple(ident.groups), tuple(ident.roles),
                                        ident.auth_method, state.request_id))
        return json_response({"id": event.id}, 202)

    @app.get("/events/dead")
    def dead() -> Response:
        require_admin()
        return json_response({"dead": [d.public() for d in events.store.dead()]})

    @app.post("/events/dead/<did>/replay")
    def replay(did: str) -> Response:
        require_admin()
        if not DEAD_ID_RE.fullmatch(did) or not events.store.replay(
                did if "-" in did else int(did)):
            raise NotFound(f"no dead letter {did}")
        events.dispatcher.wake.set()
        return json_response({"id": str(did), "status": "pending"}, 202)
