"""Tenant operations in a framework worker: live config, metering, breakers, composition.

:func:`install` wraps the executor's two seams (``Executor.call``: one handler
run in the current thread, for sync calls and jobs; ``Executor.sync``: the
whole sync path) and adds the admin routes:

- ``call`` is metered (every handler run, sync or async, failed too: wall and
  CPU time of its thread, bytes, queue wait) and gets ``context.call``;
- ``sync`` and jobs pass the service's circuit breaker: while it is open the
  module's ``fallback(context)`` answers, else 503 with Retry-After;
- the overlay watcher swaps ``Runtime.tenant`` (flags, authz, service config);
- ``GET /usage``, ``GET /config/versions``, ``POST /config/versions/<id>/rollback``
  for role ``admin``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from flask import Flask, Response, g, request

from framework import tracing
from framework.authz import decide
from framework.breaker import Breakers, CircuitBreaker
from framework.context import Context
from framework.control.tenant_check import PlanPrices
from framework.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    FrameworkError,
    NotFound,
    Unavailable,
)
from framework.execute import Call, Outcome, run_handler
from framework.flags import FlagSet
from framework.inputs import validate
from framework.overlay import ConfigHolder, OverlayWatcher, live_config
from framework.registry import ServiceSpec
from framework.runtime import Runtime
from framework.tenant_config import TenantConfig
from framework.usage import (
    UsageMeter,
    UsageStore,
    anomalies,
    forecasts,
    parse_group_by,
    parse_time,
)
from framework.usage_redis import RedisUsageStore, open_store, start_exporter
from framework.versions import DB_NAME as CONFIG_DB
from framework.versions import RollbackError, VersionStore, rollback
from framework.watchdog import Entry
from framework.webhook import WebhookExporter

log = logging.getLogger("mtp.framework.operations")

MAX_CALL_DEPTH = 8

# Set per request in the request thread (sync handlers run on it); the job runner
# copies the context into its threads, so the values follow the call there.
BYTES_IN: ContextVar[int] = ContextVar("mtp_bytes_in", default=0)
ARRIVED: ContextVar[float] = ContextVar("mtp_arrived", default=0.0)
DEPTH: ContextVar[int] = ContextVar("mtp_call_depth", default=0)
IN_SYNC: ContextVar[bool] = ContextVar("mtp_in_sync", default=False)


class CircuitOpen(Unavailable):
    """503 while a service's breaker is open and it has no fallback."""

    kind = "circuit-open"

    def __init__(self, service: str, retry_after: float) -> None:
        super().__init__(f"service {service!r} is failing; its circuit breaker is open")
        self.retry_after = max(1, math.ceil(retry_after))


class CallDepthExceeded(FrameworkError):
    """508: ``context.call`` went deeper than :data:`MAX_CALL_DEPTH` (a cycle, most likely)."""

    status, kind = 508, "call-depth-exceeded"


@dataclass
class Operations:
    """The operations parts of one worker."""

    rt: Runtime
    holder: ConfigHolder
    watcher: OverlayWatcher | None
    store: UsageStore | RedisUsageStore
    meter: UsageMeter
    versions: VersionStore
    prices: PlanPrices  # the fleet's plan's prices (else tenant.toml's), read per report
    breakers: Breakers = field(default_factory=Breakers)
    exporter: WebhookExporter | None = None

    def close(self) -> None:
        """Stop the threads and flush the usage still in memory."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.exporter is not None:
            self.exporter.stop()
        self.meter.close()

    # -- metering -------------------------------------------------------------------

    def metered(self, inner: Call) -> Call:
        """``inner`` with usage recorded and ``context.call`` attached."""

        def call(spec: ServiceSpec, ctx: Context) -> Outcome:
            started = time.monotonic()
            arrived = ARRIVED.get() or started
            ctx.call = partial(self.compose, ctx)  # type: ignore[attr-defined]
            outcome = inner(spec, ctx)
            status = outcome.status
            if status == 200 and time.monotonic() > ctx.deadline:
                status = 504  # the caller was answered 504 (sync) or the job failed late
            self.meter.record(spec.name, ctx.operation, ctx.user, status, outcome.wall,
                              outcome.cpu, BYTES_IN.get(), len(outcome.body or b""),
                              max(0.0, started - arrived))
            return outcome

        return call

    # -- circuit breaker ------------------------------------------------------------

    def breaker(self, spec: ServiceSpec) -> CircuitBreaker | None:
        """The service's breaker when tenant.toml configures one."""
        return self.breakers.get(spec.name, self.rt.tenant.service(spec.name).breaker)

    def overdue(self, entry: Entry) -> None:
        """Watchdog: a sync call still running past its deadline is a failure now."""
        settings = self.rt.tenant.service(entry.service).breaker
        breaker = self.breakers.get(entry.service, settings)
        if breaker is not None:
            breaker.record(504)

    def guarded_sync(self, inner: Call) -> Call:
        """The sync path behind the breaker (a miss counts when the watchdog sees it)."""

        def sync(spec: ServiceSpec, ctx: Context) -> Outcome:
            token = IN_SYNC.set(True)
            try:
                outcome = self._guard(spec, ctx, inner, self._sync_fallback)
            finally:
                IN_SYNC.reset(token)
            if isinstance(outcome.error, CircuitOpen):  # refused before any handler ran
                self.meter.record(spec.name, ctx.operation, ctx.user, 503, 0.0, 0.0,
                                  BYTES_IN.get(), 0)
            return outcome

        return sync

    def guarded_call(self, inner: Call) -> Call:
        """Jobs (and nested calls) behind the breaker; sync calls were checked already."""

        def call(spec: ServiceSpec, ctx: Context) -> Outcome:
            if IN_SYNC.get():
                return inner(spec, ctx)
            return self._guard(spec, ctx, inner, self._inline_fallback)

        return call

    def _guard(self, spec: ServiceSpec, ctx: Context, inner: Call,
               fallback: Callable[[ServiceSpec, Context], Outcome]) -> Outcome:
        breaker = self.breaker(spec)
        if breaker is None:
            return inner(spec, ctx)
        admission = breaker.admit()
        if not admission.allowed:
            if spec.fallback is not None:
                return fallback(spec, ctx)
            return Outcome(503, error=CircuitOpen(spec.name, admission.retry_after))
        try:
            outcome = inner(spec, ctx)
        except BaseException:
            breaker.release(admission.trial)
            raise
        if outcome.status == 503:
            breaker.release(admission.trial)  # saturated: the service did not run
        elif outcome.overdue and not admission.trial:
            pass  # the watchdog counted this miss while the handler still ran
        else:
            breaker.record(outcome.status, admission.trial)
        return outcome

    def _sync_fallback(self, spec: ServiceSpec, ctx: Context) -> Outcome:
        return self.metered(self._fallback_runner(spec))(spec, ctx)

    def _inline_fallback(self, spec: ServiceSpec, ctx: Context) -> Outcome:
        # Already inside the metered seam (jobs, nested calls): run it in this thread.
        return self._fallback_runner(spec)(spec, ctx)

    def _fallback_runner(self, spec: ServiceSpec) -> Call:
        max_result = self.rt.executor.max_result
        return lambda s, c: run_handler(s, c, max_result, fn=spec.fallback)

    # -- composition ----------------------------------------------------------------

    def compose(self, parent: Context, service: str, payload: Any = None,
                operation: str | None = None) -> Any:
        """``context.call``: another service of the tenant, as the same caller.

        Same identity and request id, the same authz rules, deadline no later
        than the caller's; returns the result, raises the callee's error.
        """
        depth = DEPTH.get() + 1
        if depth > MAX_CALL_DEPTH:
            raise CallDepthExceeded(
                f"context.call nested deeper than {MAX_CALL_DEPTH} (a cycle between services?)")
        tenant = self.rt.tenant
        spec = self.rt.registry.resolve(service)
        if (operation not in spec.operations) if spec.operations else operation is not None:
            raise NotFound(f"service {spec.name!r} has no operation {operation!r}"
                           if operation else f"service {spec.name!r} needs an operation")
        if not decide(tenant.authz, parent, spec.name, operation).allowed:
            raise Forbidden(f"not allowed to call service {spec.name!r}"
                            + (f" operation {operation!r}" if operation else ""))
        validate(spec, payload)
        child = Context(
            tenant_id=parent.tenant_id, service=spec.name, operation=operation,
            user=parent.user, groups=parent.groups, roles=parent.roles,
            auth_method=parent.auth_method, payload=payload, params={},
            request_id=parent.request_id, config=tenant.service(spec.name).config,
            flags=FlagSet(tenant.flags, tenant.tenant_id, parent.user, parent.groups,
                          parent.roles),
            logger=parent.logger, deadline=min(parent.deadline, time.monotonic() + spec.timeout))
        token = DEPTH.set(depth)
        size = BYTES_IN.set(len(json.dumps(payload, default=str)))
        arrived = ARRIVED.set(time.monotonic())
        in_sync = IN_SYNC.set(False)  # the nested service passes its own breaker
        try:
            if tracing.ENABLED:
                with tracing.child_span("context.call " + spec.name, {
                        "mtp.service": spec.name, "mtp.operation": operation or "",
                        "mtp.caller": parent.service}) as span:
                    outcome = self.rt.executor.call(spec, child)
                    span.set_attribute("mtp.status", outcome.status)
                    tracing.set_error(span, outcome.status)
            else:
                outcome = self.rt.executor.call(spec, child)
        finally:
            IN_SYNC.reset(in_sync)
            ARRIVED.reset(arrived)
            BYTES_IN.reset(size)
            DEPTH.reset(token)
        if outcome.error is not None:
            raise outcome.error
        return json.loads(outcome.body or b"null")

    # -- live config ----------------------------------------------------------------

    def apply(self, old: TenantConfig, new: TenantConfig) -> None:
        """Overlay listener: the next request reads the new config."""
        self.rt.set_tenant(new)


def install(app: Flask, rt: Runtime) -> Operations:
    """Wire operations into a built runtime and its app."""
    settings = rt.settings
    versions = VersionStore(settings.data_dir / CONFIG_DB)
    holder, watcher = live_config(rt.tenant, settings.config_overlay, versions)
    store = open_store(settings)  # shared by every replica when MTP_REDIS_URL is set
    ops = Operations(rt=rt, holder=holder, watcher=watcher, store=store,
                     meter=UsageMeter(store, rt.tenant.tenant_id,  # type: ignore[arg-type]
                                      flush_interval=settings.usage_flush),
                     versions=versions,
                     prices=PlanPrices(settings.redis_url, settings.data_dir))
    rt.set_tenant(holder.current)
    if watcher is not None:
        watcher.on_change(ops.apply)
    # Each exported hour is priced at the fleet's plan (else tenant.toml's); the
    # webhook's URL and secret stay the tenant's own.
    billing = rt.tenant.billing
    ops.exporter = start_exporter(store, rt.tenant.tenant_id, billing,
                                  settings.secret(billing.webhook_secret_env),
                                  pricing=lambda: ops.prices(ops.rt.tenant))
    # gunicorn workers leave through sys.exit: flush usage, hand the export lease over.
    atexit.register(ops.close)
    executor = rt.executor
    executor.call = ops.metered(ops.guarded_call(executor.call))
    executor.sync = ops.guarded_sync(executor.sync)
    executor.inflight.on_overdue = ops.overdue
    _routes(app, ops)
    return ops


def require_admin() -> None:
    """403 unless the signed caller has role admin (the ops and events routes)."""
    ident = g.get("identity")
    if ident is None or not ident.is_admin:
        raise Forbidden("this route needs role admin")


def json_response(body: Any, status: int = 200) -> Response:
    """Compact JSON with ``status``."""
    return Response(json.dumps(body, separators=(",", ":")), status=status,
                    content_type="application/json")


def _routes(app: Flask, ops: Operations) -> None:

    @app.before_request
    def measure() -> None:
        ARRIVED.set(time.monotonic())
        BYTES_IN.set(request.content_length or 0)

    @app.get("/usage")
    def usage() -> Response:
        require_admin()
        try:
            start = parse_time(request.args["from"], "from") if request.args.get("from") else None
            end = parse_time(request.args["to"], "to") if request.args.get("to") else None
            group_by = parse_group_by(request.args.get("group_by"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        ops.meter.flush()  # this worker's latest calls; others flush within a second
        tenant = ops.rt.tenant
        prices = ops.prices(tenant)  # a fleet's plan; 503 when it cannot be known
        rows = ops.store.query(tenant.tenant_id, prices, start, end, group_by)
        series = ops.store.hourly(tenant.tenant_id, prices, start, end)
        return json_response({"currency": prices.currency, "rows": rows,
                      "anomalies": [a.as_dict() for a in anomalies(series)],
                      "forecast": forecasts(series)})

    @app.get("/config/versions")
    def config_versions() -> Response:
        require_admin()
        diff = request.args.get("diff") in ("1", "true")
        return json_response({"versions": [v.as_dict(with_diff=diff) for v in ops.versions.list()]})

    @app.post("/config/versions/<int:version_id>/rollback")
    def config_rollback(version_id: int) -> Response:
        require_admin()
        if ops.versions.get(version_id) is None:
            raise NotFound(f"no config version {version_id}")
        try:
            version = rollback(ops.versions, version_id, ops.rt.settings.config_overlay)
        except RollbackError as exc:
            raise Conflict(str(exc)) from None
        return json_response({"rolled_back_to": version.as_dict()})
