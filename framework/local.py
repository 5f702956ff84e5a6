"""Calling a tenant's services in-process, no servers: ``mtp invoke`` and tenant tests.

The same registry, context and execution as a request through gunicorn, with
the identity given by the caller instead of a signed header set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from framework import logs
from framework.authz import decide
from framework.context import Context
from framework.errors import Forbidden, FrameworkError
from framework.events.binding import new_event
from framework.execute import Executor, Outcome, call_with_deadline
from framework.flags import FlagSet
from framework.inputs import validate
from framework.jobrunner import JobRunner, error_document
from framework.jobs import SqliteJobStore, runner_id
from framework.operations import MAX_CALL_DEPTH, CallDepthExceeded
from framework.problem import problem, request_id
from framework.registry import Registry, ServiceSpec
from framework.settings import Settings
from framework.tenant_config import TenantConfig


@dataclass(frozen=True)
class Caller:
    """Who the local call pretends to be."""

    user: str = "dev"
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    auth_method: str = "jwt"


class ServiceError(Exception):
    """A local call ended in an error answer; ``problem`` is what a client would get."""

    def __init__(self, status: int, document: dict[str, Any]) -> None:
        super().__init__(f"{status}: {document.get('detail', '')}")
        self.status, self.problem = status, document


class LocalRunner:
    """One tenant's services, runnable in this process."""

    def __init__(self, settings: Settings, tenant: TenantConfig) -> None:
        self.settings, self.tenant = settings, tenant
        logs.setup(settings.log_level, tenant.tenant_id)
        self.registry = Registry(settings.tenant_dir, tenant, dev=True)
        # context.emit in-process: checked and kept here (``emitted``), not delivered.
        self.emitted: list[dict[str, Any]] = []
        self.executor = Executor(settings.max_result)

    def close(self) -> None:
        """Nothing runs between calls (kept for callers that close a runner)."""
        self.executor.close()

    def spec(self, service: str, operation: str | None) -> ServiceSpec:
        """Resolve and check the operation exactly as the controller does."""
        spec = self.registry.resolve(service)
        spec.check_operation(operation)
        return spec

    def context(self, spec: ServiceSpec, operation: str | None, payload: Any,
                caller: Caller, params: Mapping[str, str] | None = None,
                rid: str | None = None, depth: int = 0) -> Context:
        """A handler context for ``caller``, with ``context.call`` as in a framework worker."""
        rid = rid or request_id(None)
        ctx = Context(
            tenant_id=self.tenant.tenant_id, service=spec.name, operation=operation,
            user=caller.user, groups=caller.groups, roles=caller.roles,
            auth_method=caller.auth_method, payload=payload, params=dict(params or {}),
            request_id=rid, config=self.tenant.service(spec.name).config,
            flags=FlagSet(self.tenant.flags, self.tenant.tenant_id, caller.user,
                          caller.groups, caller.roles),
            logger=logs.service_logger(self.tenant.tenant_id, rid, spec.name, operation),
            deadline=time.monotonic() + spec.timeout,
        )
        ctx.call = partial(self.compose, ctx, depth)  # type: ignore[attr-defined]
        ctx.emit = partial(self.emit, ctx)  # type: ignore[attr-defined]
        return ctx

    def emit(self, ctx: Context, event_type: str, data: Any = None,
             subject: str | None = None) -> str:
        """``context.emit`` in-process: the event is checked and recorded, not delivered."""
        event = new_event(event_type, data, subject, f"/{ctx.tenant_id}/services/{ctx.service}")
        json.dumps(data)  # TypeError for data no engine could store, as in a worker
        self.emitted.append(event.public())
        return event.id

    def compose(self, parent: Context, depth: int, service: str, payload: Any = None,
                operation: str | None = None) -> Any:
        """``context.call``: same caller, request id and authz rules; result or the error."""
        if depth >= MAX_CALL_DEPTH:
            raise CallDepthExceeded(
                f"context.call nested deeper than {MAX_CALL_DEPTH} (a cycle between services?)")
        spec = self.spec(service, operation)
        if not decide(self.tenant.authz, parent, spec.name, operation).allowed:
            raise Forbidden(f"not allowed to call service {spec.name!r}"
                            + (f" operation {operation!r}" if operation else ""))
        validate(spec, payload)
        caller = Caller(parent.user, parent.groups, parent.roles, parent.auth_method)
        child = self.context(spec, operation, payload, caller, rid=parent.request_id,
                             depth=depth + 1)
        child.deadline = min(parent.deadline, child.deadline)
        outcome = self.executor.call(spec, child)
        if outcome.error is not None:
            raise outcome.error
        return json.loads(outcome.body or b"null")

    def run(self, service: str, payload: Any = None, operation: str | None = None,
            caller: Caller = Caller(), run_async: bool = False) -> Outcome:
        """Call once; async runs it as a stored job and waits for it."""
        spec = self.spec(service, operation)
        payload = {} if payload is None else payload
        validate(spec, payload)
        ctx = self.context(spec, operation, payload, caller)
        if not run_async:
            # No sidecar answers at the deadline here: wait for the handler until then.
            return call_with_deadline(self.executor.call, spec, ctx)
        store = SqliteJobStore(self.settings.data_dir / "jobs.sqlite3")
        runner = JobRunner(store, lambda: self.executor.call, runner_id(), 1, 0)
        job, future = runner.submit(spec, ctx, owner=caller.user)
        outcome = future.result()
        runner.shutdown()
        return outcome if outcome is not None else Outcome(500, error=FrameworkError(
            f"job {job.id} did not run"))


def outcome_value(outcome: Outcome, rid: str = "") -> Any:
    """The handler's result, or ServiceError with the problem document."""
    if outcome.error is not None:
        raise ServiceError(outcome.status, error_document(outcome, rid))
    return json.loads(outcome.body or b"null")


def call(tenant_dir: str | Path, service: str, payload: Any = None,
         operation: str | None = None, user: str = "test", groups: tuple[str, ...] = (),
         roles: tuple[str, ...] = ()) -> Any:
    """Call a service of ``tenant_dir`` and return its result (for tenant tests)."""
    env = dict(os.environ)
    settings = Settings.from_env(env, tenant_dir=tenant_dir)
    runner = LocalRunner(settings, settings.load_tenant())
    try:
        outcome = runner.run(service, payload, operation, Caller(user, groups, roles))
    except FrameworkError as exc:
        raise ServiceError(exc.status, problem(exc.status, exc.detail, "", kind=exc.kind,
                                               **exc.extra)) from None
    finally:
        runner.close()
    return outcome_value(outcome)
