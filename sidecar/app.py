"""The sidecar application: one handler, :meth:`Sidecar.handle`, runs the stages in order.

authenticate -> bind tenant -> authorize -> rate limit -> strip/inject + sign
-> proxy, then audit. Plain stage functions called from one handler cost less per
request than a stack of middlewares, and read top to bottom. The HTTP server in
front of it is sidecar/front.py; sidecar/startup.py builds it from the config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from framework import logs, tracing
from framework.inputs import parse_prefer
from framework.problem import request_id as make_request_id
from framework.settings import Settings
from framework.tenant_config import TenantConfig
from sidecar.admission import Admission
from sidecar.audit import AuditLog
from sidecar.authenticate import Authenticator
from sidecar.authorize import PREFIX, authorize, refuse_ambiguous_path, service_target
from sidecar.bind_tenant import bind_tenant
from sidecar.catalog import Catalog
from sidecar.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    MethodNotImplemented,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    SidecarError,
    Unavailable,
    render,
)
from sidecar.fleet import FleetGate
from sidecar.front import BodyTooLarge, Request, Response
from sidecar.headers import (
    check_request,
    check_upstream,
    identity_headers,
    response_headers,
    upstream_headers,
)
from sidecar.metrics import Metrics
from sidecar.principal import Principal
from sidecar.proxy import Upstream
from sidecar.ratelimit import RateLimiter
from sidecar.tracing import finish as finish_span
from sidecar.tracing import inject as inject_trace
from sidecar.tracing import start as start_span

log = logging.getLogger("mtp.sidecar")

HEALTH = "/healthz"
READY = "/readyz"
METRICS = "/metrics"
OWN_ROUTES = frozenset((HEALTH, READY, METRICS))  # answered here, not by the framework
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The methods the sidecar knows: those of RFC 9110 (GET, HEAD, POST, PUT, DELETE, CONNECT,
# OPTIONS, TRACE) and PATCH (RFC 5789). Any other one is 501 (RFC 9110 §15.6.2), also
# those llhttp parses (PROPFIND, QUERY, ...): no route of the contract takes them.
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                           "TRACE", "PATCH"))
SERVICE_METHODS = "GET, POST"  # a service call: HEAD never runs a service (DESIGN.md)
# A service's deadline here is its timeout plus this: a framework that answers at the
# deadline (its own 504 included) is heard; one that does not is answered for.
DEADLINE_SLACK = 0.5
READY_TIMEOUT = 2.0  # the framework answers /readyz off its request threads: quickly or hung
METRICS_TIMEOUT = 10.0
METRICS_ROLES = frozenset(("admin", "metrics"))  # a Prometheus scraper's API key: "metrics"


def _noted(reason: str, principal: Principal | None) -> str:
    """The audit reason, plus the identity values that were dropped (DESIGN: audited)."""
    note = principal.audit_note() if principal is not None else ""
    return f"{reason}; {note}" if reason and note else reason or note


@dataclass
class Sidecar:
    """Everything one running sidecar holds; the request handler is :meth:`handle`."""

    settings: Settings
    tenant: TenantConfig
    authenticator: Authenticator
    limiter: RateLimiter
    upstream: Upstream
    audit: AuditLog
    metrics: Metrics = field(default_factory=Metrics)
    catalog: Catalog = field(default_factory=Catalog)
    admission: Admission = field(init=False)  # MTP_WORKERS x MTP_THREADS of the settings
    fleet: FleetGate | None = None  # the fleet's registry decides (sidecar/fleet.py)

    def __post_init__(self) -> None:
        self.admission = Admission.for_settings(self.settings)

    async def handle(self, request: Request) -> Response:
        """Answer one request (never raises: every failure becomes problem+json)."""
        started = time.perf_counter()
        rid = make_request_id(request.headers.get("X-Request-ID"))
        path, method = request.path, request.method
        if method not in KNOWN_METHODS:
            return render(MethodNotImplemented(f"unknown method {method[:20]!r}"), rid)
        if path[:1] != "/":  # "*" (OPTIONS) or "host:port" (CONNECT): nothing to proxy
            return render(NotFound("the request target is not a path"), rid)
        if path in OWN_ROUTES and method not in ("GET", "HEAD"):
            return render(MethodNotAllowed("GET, HEAD"), rid)  # DESIGN: GET routes only
        if path in (HEALTH, READY):
            return await self._health(path, rid)
        if path.startswith(PREFIX) and method not in ("GET", "POST"):
            # Refused before anything is forwarded (a HEAD created jobs).
            return render(MethodNotAllowed(SERVICE_METHODS), rid)
        logs.REQUEST_ID.set(rid)  # on every log line of this request (JSON, like the framework)
        span = start_span(request, rid) if tracing.ENABLED else None
        tenant = self.tenant
        principal: Principal | None = None
        service, operation, rule, slot = "", None, None, None
        outcome, reason = "allowed", ""
        try:
            check_request(method, request.raw_path, request.headers.items())
            principal = await self.authenticator.authenticate(request.headers)
            bind_tenant(principal, tenant.tenant_id)
            if self.fleet is not None:
                self.fleet.admit(tenant.tenant_id)
            if path == METRICS:
                response = await self._metrics(principal, rid)
            else:
                upstream_path = request.raw_path
                refuse_ambiguous_path(path, upstream_path)
                target = service_target(path)
                if target is not None:
                    service, operation = target
                    rule = self._authorize(tenant, principal, service, operation)
                    if self.fleet is not None:
                        self.fleet.entitle(tenant.tenant_id, service)
                    # Forward exactly the path that was authorized (see service_target).
                    query = request.query
                    upstream_path = f"{path}?{query}" if query else path
                if (request.content_length or 0) > self.settings.max_body:
                    raise PayloadTooLarge("declared body over MTP_MAX_BODY")
                limit_headers, slot, delay = await self._limit(tenant, principal, service,
                                                               operation)
                if delay:
                    reason = f"delayed {delay:.3f}s"
                response = await self._forward(request, principal, rid, upstream_path,
                                               service, span)
                response.headers.extend(limit_headers.items())
        except SidecarError as exc:
            outcome, reason = exc.outcome, exc.reason
            response = render(exc, rid)
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception("unexpected error %s (request %s)", error_id, rid)
            outcome, reason = "error", f"unexpected error {error_id}"
            response = render(SidecarError(reason, detail=f"internal error {error_id}"), rid)
        finally:
            if slot is not None:
                await self.limiter.release(slot)
        self.audit.write(
            request_id=rid, method=request.method, outcome=outcome, status=response.status,
            tenant=principal.tenant if principal else "", user=principal.user if principal else "",
            auth_method=principal.auth_method if principal else "", service=service,
            operation=operation, reason=_noted(reason, principal), rule=rule)
        self.metrics.observe(tenant.tenant_id, service, operation or "", response.status,
                             time.perf_counter() - started)
        if span is not None:
            finish_span(span, principal, tenant.tenant_id, service, operation, outcome,
                        response.status)
        logs.REQUEST_ID.set("")
        return response

    def _authorize(self, tenant: TenantConfig, principal: Principal, service: str,
                   operation: str | None) -> int | None:
        try:
            decision = authorize(tenant.authz, principal, service, operation)
        except SidecarError:
            self.metrics.decision(Metrics.AUTHZ, tenant.tenant_id, service,
                                  operation or "", "denied")
            raise
        self.metrics.decision(Metrics.AUTHZ, tenant.tenant_id, service, operation or "",
                              "allowed")
        return decision.rule_index

    async def _limit(self, tenant: TenantConfig, principal: Principal, service: str,
                     operation: str | None) -> tuple[dict[str, str], str | None, float]:
        try:
            limits = tenant.limits if self.fleet is None else \
                self.fleet.limits(tenant.tenant_id, tenant.limits)
            limit_headers, slot, delay = await self.limiter.admit(
                limits, tenant.tenant_id, principal.user)
        except SidecarError as exc:
            self.metrics.decision(Metrics.RATELIMIT, tenant.tenant_id, service,
                                  operation or "", exc.reason.replace(" ", "_"))
            raise
        self.metrics.decision(Metrics.RATELIMIT, tenant.tenant_id, service,
                              operation or "", "delayed" if delay else "allowed")
        return limit_headers, slot, delay

    async def _read_body(self, request: Request) -> bytes | None:
        if not request.body_exists:
            return None
        try:
            return await request.read(self.settings.max_body)
        except BodyTooLarge:
            raise PayloadTooLarge("body over MTP_MAX_BODY") from None
        except TimeoutError:
            raise RequestTimeout("request body too slow") from None
        except (ConnectionError, HttpProcessingError) as exc:
            # The client's doing (it went away mid-body, or sent a broken chunk):
            # not an internal error, and no traceback per dropped connection.
            raise BadRequest(f"body not received: {type(exc).__name__}") from None

    def _timeout(self, request: Request, service: str) -> float:
        """The call's deadline: the service's timeout, or the longer ``Prefer: wait=N``."""
        timeout = self.catalog.timeout(service)
        prefer = request.headers.get("Prefer")
        if prefer:
            # A waiting async call holds a framework thread up to N seconds (counted too).
            timeout = max(timeout, parse_prefer(request.headers.getall("Prefer")).wait or 0)
        return timeout

    async def _forward(self, request: Request, principal: Principal | None, rid: str,
                       path: str, service: str = "", span: Any = None) -> Response:
        body = await self._read_body(request)
        headers = upstream_headers(
            request.headers.items(), identity_headers(principal, rid),
            secret=self.settings.sidecar_secret, method=request.method, path=path,
            peer=request.remote or "", proto=request.scheme, body=body)
        if span is not None:  # the framework continues this span, not the client's
            inject_trace(span, headers)
        check_upstream(request.method, path, headers)
        reply = await self.upstream.call(request.method, path, headers, body, self.admission,
                                         service, self._timeout(request, service),
                                         DEADLINE_SLACK)
        answer = response_headers(reply.headers)
        answer.append(("X-Request-ID", rid))
        if request.method == "HEAD":
            # No body, but the size a GET would have, not "0" for an empty body.
            size = next((v for k, v in reply.headers if k.lower() == "content-length"), "")
            return Response(reply.status, answer, b"",
                            size if size.isascii() and size.isdigit() else "")
        return Response(reply.status, answer, reply.body)

    async def _health(self, path: str, rid: str) -> Response:
        """Liveness, or readiness: the framework is ready (its own /readyz) and config loaded."""
        if path == READY:
            try:
                # The framework's readiness, not its liveness: /readyz also checks the job
                # store, and the pod's readiness probe only ever reaches the sidecar. A
                # framework that does not answer in time (stopped, deadlocked) is not ready.
                reply = await self.upstream.send("GET", READY, self.internal_headers(READY, rid),
                                                 None, timeout=READY_TIMEOUT)
            except SidecarError as exc:
                return render(Unavailable(exc.reason, detail="the framework is not reachable"),
                              rid)
            if reply.status >= 500:
                return render(Unavailable("framework not ready",
                                          detail="the framework is not ready"), rid)
        status = {"status": "ok", "tenant": self.tenant.tenant_id}
        if path == READY:
            # Degraded limits still serve requests: readiness stays 200 and says so.
            check = getattr(self.limiter.backend, "check", None)
            status["limiter"] = await check() if check is not None else "memory"
        return Response(200, [("Content-Type", "application/json"), ("X-Request-ID", rid)],
                        json.dumps(status).encode())

    async def _metrics(self, principal: Principal, rid: str) -> Response:
        """The sidecar's metrics merged with the framework's; role admin or metrics only.

        The framework's text is fetched asynchronously; rendering and merging walk every
        series, so they run in a thread and the loop keeps answering meanwhile.
        """
        if not METRICS_ROLES.intersection(principal.roles):
            raise Forbidden("metrics need role admin or metrics",
                            detail="/metrics needs role admin or metrics")
        framework, note = None, b""
        try:
            reply = await self.upstream.send(
                "GET", METRICS, upstream_headers(
                    (), identity_headers(principal, rid), secret=self.settings.sidecar_secret,
                    method="GET", path=METRICS, peer="", proto="http"), None,
                timeout=METRICS_TIMEOUT)
            if reply.status == 200:
                framework = reply.body
            else:
                note = f"# framework metrics unavailable: HTTP {reply.status}\n".encode()
        except SidecarError as exc:
            note = f"# framework metrics unavailable: {exc.reason}\n".encode()
        text = await asyncio.to_thread(self.metrics.scrape, framework)
        return Response(200, [("Content-Type", METRICS_TYPE), ("X-Request-ID", rid)],
                        text + note)

    def internal_headers(self, path: str, rid: str) -> list[tuple[str, str]]:
        """Signed headers, with no identity, for the sidecar's own GET of ``path``."""
        return upstream_headers((), identity_headers(None, rid),
                                secret=self.settings.sidecar_secret, method="GET", path=path,
                                peer="", proto="http")
