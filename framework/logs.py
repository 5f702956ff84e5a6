"""JSON log lines; every line carries the tenant and the request id.

The tenant is one per process, except in a pool's shared process
(framework/pool/shared.py), which serves several: there the tenant of a line is
the context variable :data:`TENANT` its dispatcher sets per request, else the
tenant whose app started the thread (:func:`claim_threads`). The request id
lives in a context variable set once per request; handler threads run in a copy
of the request's context, so their lines carry it too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from typing import Any

from framework import tracing

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("mtp_request_id", default="")
# A shared process's tenant of the request (empty in a one-tenant process).
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("mtp_tenant", default="")

LOGGER_NAME = "mtp.framework"
_process: dict[str, Any] = {"tenant": "", "handler": None, "shared": False}
_thread_tenants: dict[int, str] = {}  # shared process: thread ident -> tenant that started it


def share(name: str) -> None:
    """This process serves several tenants: :func:`setup` no longer sets the tenant."""
    _process["shared"] = True
    _process["tenant"] = name


def claim_threads(before: set[int], tenant_id: str) -> None:
    """Threads started since ``before`` (idents) log as ``tenant_id`` (shared process)."""
    for thread in threading.enumerate():
        if thread.ident is not None and thread.ident not in before:
            _thread_tenants[thread.ident] = tenant_id
    live = {t.ident for t in threading.enumerate()}
    for ident in [i for i in _thread_tenants if i not in live]:
        del _thread_tenants[ident]


def current_tenant() -> str:
    """The tenant a line written now belongs to."""
    return (TENANT.get() or _thread_tenants.get(threading.get_ident(), "")
            or _process["tenant"])

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}


def _timestamp(created: float) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int(created * 1000) % 1000:03d}Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, tenant, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "tenant": getattr(record, "tenant", None) or current_tenant(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str, tenant_id: str, stream: Any = None,
          libraries: str | None = None) -> logging.Logger:
    """Route the ``mtp`` loggers to ``stream`` (stderr) as JSON at ``level``.

    With ``libraries`` (a level), every other logger (aiohttp, asyncio, ldap3...) goes
    through the root logger to the same handler, so no line of the process is not JSON.
    """
    if not _process["shared"]:
        _process["tenant"] = tenant_id
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("mtp")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if libraries is not None:
        everything = logging.getLogger()
        everything.handlers[:] = [handler]
        everything.setLevel(libraries)
    _process["handler"] = handler
    return logging.getLogger(LOGGER_NAME)


def access(logger: logging.Logger, request_id: str, fields: dict[str, Any]) -> None:
    """The request line: the same JSON as any other line, without a LogRecord.

    It is written once per request, so it skips the logging machinery (record,
    filters, formatter lookup) that costs more than the line itself.
    """
    handler = _process["handler"]
    if handler is None or not logger.isEnabledFor(logging.INFO):
        return
    now = time.time()
    line = {"ts": _timestamp(now), "level": "INFO", "logger": logger.name, "msg": "request",
            "tenant": current_tenant(), "request_id": request_id, **fields}
    text = json.dumps(line, default=str) + "\n"
    with handler.lock:
        handler.stream.write(text)
        handler.stream.flush()


class ServiceLogger(logging.LoggerAdapter):
    """``context.logger``: bound to tenant, request id and service."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        if tracing.ENABLED:  # the span current when the line is written: request or job
            extra["trace_id"] = tracing.current_trace_id()
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


_service_loggers: dict[str, logging.Logger] = {}


def service_logger(tenant: str, request_id: str, service: str,
                   operation: str | None) -> ServiceLogger:
    """The logger a handler gets in its context."""
    base = _service_loggers.get(service)
    if base is None:  # logging.getLogger takes a global lock: look each name up once
        base = _service_loggers[service] = logging.getLogger("mtp.service." + service)
    return ServiceLogger(base, {
        "tenant": tenant, "request_id": request_id, "service": service, "operation": operation,
    })
