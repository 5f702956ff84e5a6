"""The admin API (DESIGN.md "Fleet: the operator's side") on aiohttp.web.

Every answer carries ``X-Request-ID``; every error is problem+json with the
request id (framework/problem.py), never a traceback. Every call is
authenticated as an operator (framework/control/auth.py) and audited as one line.
Store calls are blocking (redis-py, sqlite3), so they run on one worker thread:
the event loop never waits on a disk or a socket, and SQLite sees one writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from framework.control.acl import set_user, upgrade_users
from framework.control.audit import AdminAudit
from framework.control.auth import Operator, OperatorAuth
from framework.control.backends import Backends
from framework.control.bodies import (
    CREATE_KEYS,
    DEFAULT_LIMIT,
    MAX_BODY,
    MAX_LIMIT,
    PATCH_KEYS,
    check_fields,
    decode_cursor,
    encode_cursor,
    read_body,
    string,
)
from framework.control.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    Unavailable,
)
from framework.control.gateway import FORMATS, gateway_api, nginx
from framework.control.migration import MigrationBusy, Migrator, placement_change
from framework.control.plans import PlanBook
from framework.control.purge import export_path, offboard
from framework.control.store import (
    ACTIVE,
    OFFBOARDING,
    STATUSES,
    Registry,
    TenantRecord,
    iso_now,
    list_records,
)
from framework.control.tenant_data import TenantData
from framework.problem import CONTENT_TYPE, problem
from framework.problem import request_id as make_request_id
from framework.tenant_config import TENANT_ID_RE, BillingSettings

log = logging.getLogger("mtp.control")
T = TypeVar("T")

PLANS_POLL = 1.0
NDJSON = "application/x-ndjson"


@dataclass
class Control:
    """Everything the running control plane holds."""

    registry: Registry
    plans: PlanBook
    auth: OperatorAuth
    audit: AdminAudit
    data: TenantData
    pool_domain: str
    backends: Backends = field(default_factory=Backends)  # MTP_GATEWAY_FILE
    drain: float = 25.0  # seconds a migration's source serves after the switch
    store_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="mtp-control-store"))
    purge_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="mtp-control-purge"))
    published: int = 0  # the plans version last written to the store
    migrator: Migrator | None = None  # started with the app

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call on the store thread; a store that fails is 503."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.store_thread, fn, *args)
        except ApiError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith(("redis", "sqlite3")) or \
                    isinstance(exc, OSError):
                raise Unavailable(f"the fleet store is unavailable ({type(exc).__name__})",
                                  kind="store-unavailable") from None
            raise

    def prices(self, plan: str) -> BillingSettings:
        found = self.plans.current.plans.get(plan)
        return found.prices if found else BillingSettings()

    def publish_plans(self) -> None:
        """Write the plans in force to the store when they changed, or when the store lost
        them (a Redis restarted empty): they mark the fleet for data planes."""
        current = self.plans.get()
        if current.version != self.published or not self.registry.has_plans():
            self.registry.put_plans(current.as_dict())
            self.published = current.version


CONTROL = web.AppKey("control", Control)
REQUEST_ID = "mtp_request_id"
OPERATOR = "mtp_operator"
AUDIT_INFO = "mtp_audit"


def _problem(exc: ApiError, rid: str) -> web.Response:
    body = problem(exc.status, exc.detail, rid, kind=exc.kind, **exc.extra)
    headers = {"X-Request-ID": rid, **exc.headers}
    return web.Response(status=exc.status, body=json.dumps(body).encode(),
                        content_type=CONTENT_TYPE, headers=headers)


_ONE = "/admin/tenants/{tenant_id}"
_ACTIONS = {
    ("POST", "/admin/tenants"): "tenant.create", ("GET", "/admin/tenants"): "tenant.list",
    ("GET", _ONE): "tenant.show", ("PATCH", _ONE): "tenant.update",
    ("DELETE", _ONE): "tenant.delete", ("GET", _ONE + "/export"): "tenant.export",
    ("GET", "/admin/plans"): "plans.show", ("GET", "/admin/gateway"): "gateway.show",
}


@web.middleware
async def errors_and_audit(request: web.Request,
                           handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Request ids, operator auth, problem+json for every failure, one audit line per call."""
    rid = make_request_id(request.headers.get("X-Request-ID"))
    request[REQUEST_ID] = rid
    control = request.app[CONTROL]
    operator: Operator | None = None
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    action = _ACTIONS.get((request.method, route), f"{request.method} {request.path}"[:100])
    request[AUDIT_INFO] = {}
    reason = ""
    try:
        if route == "/healthz":
            response = await handler(request)
        else:
            operator = control.auth.authenticate(request.headers)
            request[OPERATOR] = operator
            response = await handler(request)
    except ApiError as exc:
        reason = exc.detail
        response = _problem(exc, rid)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        err = ApiError(exc.reason, headers=allow)
        err.status = exc.status
        response = _problem(err, rid)
    except Exception:
        error_id = uuid.uuid4().hex
        log.exception("unexpected error %s (request %s)", error_id, rid)
        reason = f"unexpected error {error_id}"
        response = _problem(ApiError(f"internal error {error_id}"), rid)
    response.headers["X-Request-ID"] = rid
    if route != "/healthz":
        info = request[AUDIT_INFO]
        control.audit.write(operator=operator.name if operator else "", action=action,
                            status=response.status, request_id=rid,
                            tenant=info.get("tenant", request.match_info.get("tenant_id", "")),
                            fields=info.get("fields"), reason=reason)
    return response


def _tenant_id(request: web.Request) -> str:
    tid = request.match_info["tenant_id"]
    if not TENANT_ID_RE.match(tid):
        raise NotFound(f"no tenant {tid[:64]!r}", kind="unknown-tenant")
    return tid


async def _record(control: Control, tid: str) -> TenantRecord:
    rec = await control.run(control.registry.get, tid)
    if rec is None:
        raise NotFound(f"no tenant {tid!r}", kind="unknown-tenant")
    return rec


async def create_tenant(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    body = await read_body(request, CREATE_KEYS)
    for key in ("id", "name", "plan"):
        if key not in body:
            raise BadRequest(f"{key} is required")
    tid = string(body, "id")
    if not TENANT_ID_RE.match(tid):
        raise BadRequest(f"id must match {TENANT_ID_RE.pattern}")
    plans = control.plans.get()
    fields = check_fields(body, plans)
    placement = fields.get("placement") or plans.plans[fields["plan"]].default_placement
    now = iso_now()
    record = TenantRecord(id=tid, name=fields["name"], plan=fields["plan"], status=ACTIVE,
                          placement=placement, created=now, updated=now)
    request[AUDIT_INFO].update(tenant=tid, fields={**fields, "placement": placement})
    if not await control.run(control.registry.create, record):
        raise Conflict(f"tenant id {tid!r} is taken", kind="tenant-exists")
    doc = record.as_dict()
    if control.data.redis is not None:
        # The tenant's data plane connects as its own ACL user (shown this once only).
        user = await control.run(set_user, control.data.redis, tid)
        doc["redis"] = {"user": user.user, "password": user.password} if user else None
    return web.json_response(doc, status=201, headers={"Location": f"/admin/tenants/{tid}"})


async def list_tenants(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    query = request.query
    unknown = sorted(set(query) - {"plan", "status", "placement", "limit", "cursor"})
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}")
    status = query.get("status", "")
    if status and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    raw_limit = query.get("limit", str(DEFAULT_LIMIT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    after = decode_cursor(query.get("cursor", ""))
    records, last = await control.run(
        lambda: list_records(control.registry, after=after, limit=int(raw_limit),
                             plan=query.get("plan", ""), status=status,
                             placement=query.get("placement", "")))
    next_cursor = encode_cursor(last) if last else None
    return web.json_response({"tenants": [r.as_dict() for r in records],
                              "next_cursor": next_cursor})


async def show_tenant(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    rec = await _record(control, _tenant_id(request))
    usage = await control.run(control.data.usage_today, rec.id, control.prices(rec.plan))
    return web.json_response({**rec.as_dict(), "usage": usage})


async def update_tenant(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    tid = _tenant_id(request)
    body = await read_body(request, PATCH_KEYS)
    if not body:
        raise BadRequest(f"nothing to change; fields: {', '.join(sorted(PATCH_KEYS))}")
    fields = check_fields(body, control.plans.get())
    request[AUDIT_INFO].update(tenant=tid, fields=fields)
    for _ in range(5):
        old = await _record(control, tid)
        if old.status == OFFBOARDING:
            raise Conflict(f"tenant {tid!r} is being offboarded", kind="tenant-offboarding")
        changes: dict[str, Any] = {k: v for k, v in fields.items() if k != "placement"}
        if "placement" in fields:
            # A new placement is a migration (framework/control/migration.py).
            try:
                changes.update(placement_change(old, fields["placement"], iso_now()))
            except MigrationBusy as exc:
                raise Conflict(f"tenant {tid!r}: {exc}; try again shortly",
                               kind="migration-in-progress",
                               headers={"Retry-After": str(max(1, int(control.drain)))}
                               ) from None
        rec = await control.run(
            control.registry.update, tid, changes,
            lambda now, old=old: now.placement == old.placement
            and now.migration == old.migration)
        if rec is not None:
            if rec.migration is not None and control.migrator is not None:
                control.migrator.started(tid)
            return web.json_response(rec.as_dict())
    raise Conflict(f"tenant {tid!r} is changing; try again", kind="tenant-busy",
                   headers={"Retry-After": "1"})


async def delete_tenant(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    tid = _tenant_id(request)
    old = await _record(control, tid)
    request[AUDIT_INFO].update(tenant=tid, fields={"status": OFFBOARDING})
    rec: TenantRecord | None = old
    if old.status != OFFBOARDING:
        # Refused everywhere first (the registry change reaches data planes at once),
        # then exported and purged off the request path. Again on an offboarding
        # tenant: purged again (whatever a straggler wrote since), same export.
        rec = await control.run(control.registry.update, tid, {"status": OFFBOARDING})
        if rec is None:
            raise NotFound(f"no tenant {tid!r}", kind="unknown-tenant")
    prices = control.prices(rec.plan)
    future = asyncio.get_running_loop().run_in_executor(
        control.purge_thread, offboard, control.data, tid, prices)
    future.add_done_callback(lambda f: f.exception() and log.error(
        "offboarding %s failed: %s", tid, f.exception()))
    return web.json_response(rec.as_dict(), status=202)


async def export_tenant(request: web.Request) -> web.StreamResponse:
    control = request.app[CONTROL]
    tid = _tenant_id(request)
    rec = await _record(control, tid)
    kept = export_path(control.data.data_dir, tid)
    if rec.status == OFFBOARDING:
        if not kept.is_file():
            raise Conflict(f"tenant {tid!r} is being exported; try again shortly",
                           kind="export-pending", headers={"Retry-After": "1"})
        return web.Response(body=kept.read_bytes(), content_type=NDJSON)
    lines = await control.run(lambda: list(control.data.export(tid, control.prices(rec.plan))))
    text = "".join(json.dumps(x, default=str, separators=(",", ":")) + "\n" for x in lines)
    return web.Response(text=text, content_type=NDJSON)


async def show_plans(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    doc = control.plans.get().as_dict()
    if control.plans.error:
        doc["reload_error"] = control.plans.error
    return web.json_response(doc)


async def show_gateway(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    fmt = request.query.get("format", "nginx")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}")

    def everything() -> list[TenantRecord]:
        out, after = [], ""
        while chunk := control.registry.page(after, 500):
            out.extend(chunk)
            after = chunk[-1].id
        return out

    records = await control.run(everything)
    if fmt == "nginx":
        text, kind = nginx(records, control.pool_domain, control.backends), "text/plain"
    else:
        text, kind = gateway_api(records, control.pool_domain), "application/yaml"
    # The operator's sync polls with If-None-Match and reloads the gateway on a change.
    etag = '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    return web.Response(text=text, content_type=kind, headers=headers)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _plans_publisher(app: web.Application) -> AsyncIterator[None]:
    """Keep the store's copy of the plans in step with the file (live reload)."""
    control = app[CONTROL]
    # Records made before each had its own key get it, before the plans (which tell data
    # planes "this is a fleet") are published: a data plane never misses its own record.
    if await control.run(control.registry.backfill):
        log.info("registry: records copied into their per-tenant keys")
    if control.data.redis is not None:
        # Made here, once per database: a tenant's ACL user may only read it.
        await control.run(lambda: control.data.usage_store().store_id)
        # Users made by an older control plane may not read their record yet, and their
        # data planes refuse every call until they may (framework/control/registry_view.py).
        await control.run(lambda: upgrade_users(control.data.redis, (
            r.id for r in list_records(control.registry, limit=10**9)[0])))
    published = await control.run(control.registry.get_plans)
    if published:
        control.plans.continue_from(int(published.get("version", 0)),
                                    str(published.get("hash", "")))
    await control.run(control.publish_plans)

    async def loop() -> None:
        while True:
            await asyncio.sleep(PLANS_POLL)
            with contextlib.suppress(Exception):
                await control.run(control.publish_plans)

    task = asyncio.create_task(loop())
    control.migrator = Migrator(control, control.backends, control.drain)
    migrations = asyncio.create_task(control.migrator.run())
    yield
    for running in (task, migrations):
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    control.purge_thread.shutdown(wait=True)  # an offboarding in progress finishes
    control.store_thread.shutdown(wait=True)
    control.registry.close()
    control.audit.close()


def make_app(control: Control) -> web.Application:
    """The admin API application."""
    app = web.Application(middlewares=[errors_and_audit], client_max_size=MAX_BODY)
    app[CONTROL] = control
    r = app.router
    r.add_get("/healthz", healthz, allow_head=False)
    r.add_post("/admin/tenants", create_tenant)
    r.add_get("/admin/tenants", list_tenants, allow_head=False)
    r.add_get(_ONE, show_tenant, allow_head=False)
    r.add_patch(_ONE, update_tenant)
    r.add_delete(_ONE, delete_tenant)
    r.add_get(_ONE + "/export", export_tenant, allow_head=False)
    r.add_get("/admin/plans", show_plans, allow_head=False)
    r.add_get("/admin/gateway", show_gateway, allow_head=False)
    app.cleanup_ctx.append(_plans_publisher)
    return app
