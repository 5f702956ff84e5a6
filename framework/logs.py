"""JSON log lines; every line carries the tenant and the request id.

The tenant is one per process. The request id lives in a context variable set
once per request; handler threads run in a copy of the request's context, so
their lines carry it too.

The per-request access line is buffered, as nginx's ``access_log ... flush=``
does: written at most ACCESS_FLUSH_SECONDS later, when ACCESS_BUFFER_BYTES have
gathered, at exit, and before any other line (so the order of lines is kept). One
write per request would cost a system call and, on a container's stdout pipe, a
wake-up of the log collector for every call. A SIGKILLed worker loses at most
that fraction of a second of access lines; other lines are written at once.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import os
import sys
import threading
import time
from typing import Any

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("mtp_request_id", default="")

LOGGER_NAME = "mtp.framework"
ACCESS_FLUSH_SECONDS = 0.2
ACCESS_BUFFER_BYTES = 64 * 1024
_process: dict[str, Any] = {"tenant": "", "handler": None}

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
            "tenant": getattr(record, "tenant", None) or _process["tenant"],
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _AccessBuffer:
    """Access lines waiting for one write; flushed by a daemon thread started on first use."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)
        atexit.register(self.flush)

    def _reset(self) -> None:
        # In a forked child (a gunicorn worker): no thread yet, no parent's lines.
        self.lock = threading.Lock()
        self.lines: list[str] = []
        self.size = 0
        self.thread: threading.Thread | None = None

    def add(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)
            self.size += len(line)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mtp-access-log",
                                               daemon=True)
                self.thread.start()
            if self.size < ACCESS_BUFFER_BYTES:
                return
        self.flush()

    def flush(self) -> None:
        with self.lock:
            if not self.lines:
                return
            text, self.lines, self.size = "".join(self.lines), [], 0
        handler = _process["handler"]
        if handler is None:  # pragma: no cover - lines are only added once set up
            return
        with handler.lock:
            try:
                handler.stream.write(text)
                handler.stream.flush()
            except (OSError, ValueError):  # a closed stream at exit: nothing to do
                pass

    def _run(self) -> None:
        while True:
            time.sleep(ACCESS_FLUSH_SECONDS)
            self.flush()


_access = _AccessBuffer()


class _Handler(logging.StreamHandler):
    """stderr, after the access lines still buffered (lines stay in order)."""

    def emit(self, record: logging.LogRecord) -> None:
        _access.flush()
        super().emit(record)


def flush() -> None:
    """Write the access lines still buffered."""
    _access.flush()


def setup(level: str, tenant_id: str, stream: Any = None) -> logging.Logger:
    """Route the ``mtp`` loggers to ``stream`` (stderr) as JSON at ``level``."""
    _process["tenant"] = tenant_id
    _access.flush()  # lines buffered for the previous stream go there
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("mtp")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    _process["handler"] = handler
    return logging.getLogger(LOGGER_NAME)


def access(logger: logging.Logger, request_id: str, fields: dict[str, Any]) -> None:
    """The request line: the same JSON as any other line, without a LogRecord.

    It is written once per request, so it skips the logging machinery (record,
    filters, formatter lookup) that costs more than the line itself, and it is
    buffered (see the module's docstring).
    """
    if _process["handler"] is None or not logger.isEnabledFor(logging.INFO):
        return
    now = time.time()
    line = {"ts": _timestamp(now), "level": "INFO", "logger": logger.name, "msg": "request",
            "tenant": _process["tenant"], "request_id": request_id, **fields}
    _access.add(json.dumps(line, default=str) + "\n")


class ServiceLogger(logging.LoggerAdapter):
    """``context.logger``: bound to tenant, request id and service."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
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
