"""The routes of DESIGN.md and the one function that renders every error."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from framework import logs, metrics
from framework.authz import decide
from framework.catalog import register as register_catalog
from framework.context import Context
from framework.errors import (
    Conflict,
    FrameworkError,
    NotFound,
    Unavailable,
    new_error_id,
)
from framework.execute import Outcome
from framework.flags import FlagSet
from framework.inputs import choose, parse_payload, parse_prefer, validate
from framework.jobs import CANCELLED, FINISHED, Job
from framework.problem import CONTENT_TYPE, problem_bytes
from framework.registry import ServiceSpec
from framework.runtime import Runtime
from framework.tenant_config import AuthzSettings
from framework.verify import Identity

JOB_ID_RE = re.compile(r"[0-9a-f]{32}")
JSON = "application/json"

log = logging.getLogger("mtp.framework.controller")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> Response:
    data = raw if raw is not None else json.dumps(body, separators=(",", ":")).encode()
    return Response(data, status=status, headers=headers, content_type=JSON)


def render_error(exc: BaseException) -> Response:
    """Every error answer: problem+json with the request id, never a traceback."""
    rid = g.get("request_id", "")
    if isinstance(exc, FrameworkError):
        status, kind, detail, extra, headers = (
            exc.status, exc.kind, exc.detail, exc.extra, exc.headers())
    elif isinstance(exc, HTTPException):
        status, kind, detail, extra = exc.code or 500, None, exc.description or "", {}
        headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
    else:
        error_id = new_error_id()
        log.error("unhandled error", exc_info=exc, extra={"error_id": error_id})
        status, kind, detail, extra, headers = (
            500, "internal-error", "internal error", {"error_id": error_id}, {})
    g.error_kind = kind or str(status)
    body = problem_bytes(status, detail, rid, kind=kind, **extra)
    return Response(body, status=status, headers=headers, content_type=CONTENT_TYPE)


def register(app: Flask, rt: Runtime) -> None:
    """Attach the routes to ``app``; every view reads the one Runtime ``rt``."""
    # `Prefer: wait=N` holds a request thread up to a minute: at most half of them may
    # wait, so waiters can never starve /healthz, /readyz and ordinary calls.
    waiters = threading.BoundedSemaphore(max(1, rt.settings.threads // 2))
    catalog = register_catalog(app, rt)

    @app.get("/healthz")
    def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        # The catalog's version: the sidecar fetches the service timeouts again on a change.
        body = {"status": "ready", "tenant": rt.tenant.tenant_id, "jobs": "ok",
                "catalog": catalog.version()}
        if not rt.jobs.usable():
            # The shared (Redis) store being away fails async calls only (503 each); sync
            # calls still run. Staying ready keeps every replica from leaving its Service
            # at once. A local (SQLite) store that fails is this replica's own fault.
            if not rt.settings.redis_url:
                raise Unavailable("the job store is not usable")
            body["jobs"] = "degraded"
        return json_response(body)

    @app.get("/metrics")
    def metrics_view() -> Response:
        data, ctype = metrics.exposition(rt.tenant.tenant_id, rt.jobs.counts)
        return Response(data, content_type=ctype)

    @app.get("/services")
    def list_services() -> Response:
        return json_response({"services": invokable(rt.registry.available(), rt.tenant.authz,
                                                    g.identity)})

    @app.route("/services/<service>", methods=["GET", "POST"], defaults={"operation": None})
    @app.route("/services/<service>/<operation>", methods=["GET", "POST"])
    def call_service(service: str, operation: str | None) -> Response:
        state, req = g._get_current_object(), request._get_current_object()
        if req.method == "HEAD":
            # Flask adds HEAD to every GET route; HEAD never runs a service (DESIGN.md),
            # also when a signed one gets past the sidecar.
            raise MethodNotAllowed(valid_methods=["GET", "POST"])
        spec = rt.registry.resolve(service)
        state.service = spec.name
        spec.check_operation(operation)
        state.operation = operation or ""
        params = req.args.to_dict()
        # The WSGI server joins repeated Prefer headers with commas.
        dispatch = choose(spec, parse_prefer([req.environ.get("HTTP_PREFER", "")]),
                          params.pop("mode", None))
        payload = parse_payload(state.body)  # read and checked against the signature (hooks)
        validate(spec, payload)
        ctx = make_context(rt, spec, operation, state.identity, payload, params,
                           state.request_id)
        if dispatch.run_async:
            return start_job(rt, spec, ctx, state.identity, dispatch.wait, dispatch.applied,
                             waiters)
        return answer(rt.executor.sync(spec, ctx))

    @app.get("/jobs/<job_id>")
    def get_job(job_id: str) -> Response:
        return json_response(visible_job(rt, job_id, g.identity).public())

    @app.delete("/jobs/<job_id>")
    def cancel_job(job_id: str) -> Response:
        job = visible_job(rt, job_id, g.identity)
        if rt.jobs.cancel(job.id):
            metrics.job_status(job.tenant, job.service, job.operation, CANCELLED)
            return json_response(visible_job(rt, job_id, g.identity).public())
        job = visible_job(rt, job_id, g.identity)
        state = "has finished" if job.status in FINISHED else "is running"
        raise Conflict(f"job {job.id} {state}; only a queued job can be cancelled",
                       job_status=job.status)


def make_context(rt: Runtime, spec: ServiceSpec, operation: str | None, ident: Identity,
                 payload: Any, params: dict[str, str], rid: str) -> Context:
    """The handler's context for one call."""
    tenant = rt.tenant
    return Context(
        tenant_id=tenant.tenant_id,
        service=spec.name,
        operation=operation,
        user=ident.user,
        groups=ident.groups,
        roles=ident.roles,
        auth_method=ident.auth_method,
        payload=payload,
        params=params,
        request_id=rid,
        config=tenant.service(spec.name).config,
        flags=FlagSet(tenant.flags, tenant.tenant_id, ident.user, ident.groups, ident.roles),
        logger=logs.service_logger(tenant.tenant_id, rid, spec.name, operation),
        deadline=time.monotonic() + spec.timeout,
    )


def answer(outcome: Outcome, headers: dict[str, str] | None = None) -> Response:
    """A finished call as the sync answer: the result, or its error."""
    if outcome.error is not None:
        raise outcome.error
    return json_response(None, 200, headers, raw=outcome.body)


def start_job(rt: Runtime, spec: ServiceSpec, ctx: Context, ident: Identity,
              wait: int | None, applied: str | None,
              waiters: threading.BoundedSemaphore | None = None) -> Response:
    """202 with the job's location; or, with ``wait=N`` and done in time, the sync answer.

    With every ``waiters`` slot taken the wait is not honoured (RFC 7240 lets a server
    ignore a preference): 202 at once, ``Preference-Applied: respond-async`` only.
    """
    waiting = bool(wait) and (waiters is None or waiters.acquire(blocking=False))
    try:
        job, future = rt.runner.submit(spec, ctx, owner=ident.user)
        if waiting:
            try:
                outcome = future.result(timeout=wait)
            except (FutureTimeout, CancelledError):  # cancelled: this worker is stopping
                outcome = None
            if outcome is not None:
                return answer(outcome, {"Preference-Applied": f"wait={wait}"})
    finally:
        if waiting and waiters is not None:
            waiters.release()
    if wait and not waiting:
        applied = "respond-async"
    headers = {"Location": f"/jobs/{job.id}"}
    if applied:
        headers["Preference-Applied"] = applied
    return json_response({"job_id": job.id, "status": "queued"}, 202, headers)


def invokable(specs: list[ServiceSpec], authz: AuthzSettings,
              ident: Identity) -> list[dict[str, Any]]:
    """``GET /services``: the services (and operations) ``ident`` may invoke, as the sidecar
    decides each call, so the list never offers what would be answered 403."""
    listed = []
    for spec in specs:
        entry = spec.listing()
        if spec.operations:
            entry["operations"] = [op for op in spec.operations
                                   if decide(authz, ident, spec.name, op).allowed]
            if not entry["operations"]:
                continue
        elif not decide(authz, ident, spec.name, None).allowed:
            continue
        listed.append(entry)
    return listed


def visible_job(rt: Runtime, job_id: str, ident: Identity) -> Job:
    """The job if this caller may see it (its principal, i.e. the same user id *and* auth
    method, or role admin); else 404, so nobody learns that another's job exists."""
    job = rt.jobs.get(job_id) if JOB_ID_RE.fullmatch(job_id) else None
    if job is None or job.tenant != ident.tenant or not (
            job.belongs_to(ident.user, ident.auth_method) or ident.is_admin):
        raise NotFound("no such job")
    return job
