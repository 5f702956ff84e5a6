"""The framework's one error hierarchy: each class is an HTTP status and a problem type.

Raised anywhere on the request path and turned into ``application/problem+json``
by exactly one handler (:func:`framework.controller.render_error`).
"""

from __future__ import annotations

import uuid


def new_error_id() -> str:
    """A short id that ties a 500 answer to its log line."""
    return uuid.uuid4().hex[:16]


class FrameworkError(Exception):
    """Base: ``status``, problem ``kind``, a ``detail`` safe to show the client."""

    status = 500
    kind: str | None = None
    retry_after: int | None = None

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra  # extra problem members, e.g. error_id or path

    def headers(self) -> dict[str, str]:
        """Headers this error adds to its answer."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(FrameworkError):
    status, kind = 400, "bad-request"


class InvalidInput(BadRequest):
    kind = "invalid-input"


class Unauthenticated(FrameworkError):
    status, kind = 401, "unauthenticated"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Sidecar realm="mtp-framework"'}


class Forbidden(FrameworkError):
    status, kind = 403, "forbidden"


class NotFound(FrameworkError):
    status, kind = 404, "not-found"


class ServiceNotFound(NotFound):
    kind = "service-not-found"


class Conflict(FrameworkError):
    status, kind = 409, "conflict"


class PayloadTooLarge(FrameworkError):
    status, kind = 413, "payload-too-large"


class ServiceFailed(FrameworkError):
    """500 with an ``error_id`` that is also in the log line holding the traceback."""

    status, kind = 500, "service-error"

    def __init__(self, detail: str, error_id: str | None = None, **extra: object) -> None:
        self.error_id = error_id or new_error_id()
        super().__init__(detail, error_id=self.error_id, **extra)


class ServiceLoadFailed(ServiceFailed):
    """The service module raised on import (syntax error, import error, ...)."""

    kind = "service-load-failed"


class ServiceInvalid(ServiceFailed):
    """The module loaded but is not a usable service (no callable handle, bad MODE...)."""

    kind = "service-invalid"


class InvalidResult(ServiceFailed):
    """The handler returned something that is not JSON or is over MTP_MAX_RESULT."""

    kind = "invalid-result"


class Saturated(FrameworkError):
    status, kind, retry_after = 503, "saturated", 1


class Unavailable(FrameworkError):
    status, kind, retry_after = 503, "unavailable", 1


class DeadlineExceeded(FrameworkError):
    status, kind = 504, "deadline-exceeded"
