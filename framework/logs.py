"""JSON log lines; every line carries the tenant and the request id.

The tenant is one per process. The request id lives in a context variable set
once per request; handler threads run in a copy of the request's context, so
their lines carry it too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("mtp_request_id", default="")

LOGGER_NAME = "mtp.framework"
_process = {"tenant": ""}

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, tenant, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "tenant": getattr(record, "tenant", None) or _process["tenant"],
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str, tenant_id: str, stream: Any = None) -> logging.Logger:
    """Route the ``mtp`` loggers to ``stream`` (stderr) as JSON at ``level``."""
    _process["tenant"] = tenant_id
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("mtp")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return logging.getLogger(LOGGER_NAME)


def gunicorn_logconfig(level: str) -> dict[str, Any]:
    """logging.config dict that makes gunicorn's own lines JSON too."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
        },
    }


class ServiceLogger(logging.LoggerAdapter):
    """``context.logger``: bound to tenant, request id and service."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def service_logger(tenant: str, request_id: str, service: str,
                   operation: str | None) -> ServiceLogger:
    """The logger a handler gets in its context."""
    return ServiceLogger(logging.getLogger("mtp.service." + service), {
        "tenant": tenant, "request_id": request_id, "service": service, "operation": operation,
    })
