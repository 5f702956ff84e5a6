"""The sidecar's error hierarchy and the ONE function that renders it.

Every refusal is application/problem+json (framework/problem.py) with the request
id. The ``reason`` of an error is for the audit line only; clients get the
generic ``detail`` so that a 401 is no oracle on which check failed.
"""

from __future__ import annotations

import math

from sidecar.front import Response, problem_response


class SidecarError(Exception):
    """Base: ``status`` and a client-safe ``detail``; ``reason`` goes to the audit log."""

    status = 500
    detail = "internal error"
    outcome = "error"
    kind: str | None = None

    def __init__(self, reason: str = "", detail: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(reason or self.detail)
        self.reason = reason or self.detail
        if detail is not None:
            self.detail = detail
        self.headers = headers or {}


class BadRequest(SidecarError):
    status = 400
    detail = "the request could not be read"
    outcome = "bad_request"


class Unauthenticated(SidecarError):
    status = 401
    detail = "valid credentials are required"
    outcome = "unauthenticated"

    def __init__(self, reason: str = "", challenge: str = 'Bearer realm="mtp"') -> None:
        super().__init__(reason, headers={"WWW-Authenticate": challenge})


class Forbidden(SidecarError):
    status = 403
    detail = "not allowed"
    outcome = "denied"


class NotFound(SidecarError):
    status = 404
    detail = "no such resource"
    outcome = "not_found"


class MethodNotAllowed(SidecarError):
    status = 405
    detail = "method not allowed"
    outcome = "bad_request"

    def __init__(self, allow: str) -> None:
        super().__init__("method not allowed", headers={"Allow": allow})


class PayloadTooLarge(SidecarError):
    status = 413
    detail = "request body too large"
    outcome = "too_large"


class RequestTimeout(SidecarError):
    status = 408
    detail = "the request body did not arrive in time"
    outcome = "bad_request"


class UriTooLong(SidecarError):
    status = 414
    detail = "request target too long"
    outcome = "too_large"


class HeadersTooLarge(SidecarError):
    status = 431
    detail = "the request header fields are too large"
    outcome = "too_large"


class MethodNotImplemented(SidecarError):
    status = 501
    detail = "the request method is not implemented"
    outcome = "bad_request"


class RateLimited(SidecarError):
    status = 429
    detail = "rate limit exceeded"
    outcome = "limited"

    def __init__(self, reason: str, retry_after: float, headers: dict[str, str]) -> None:
        # Retry-After is whole seconds, rounded up so a client that obeys it is admitted.
        super().__init__(reason, headers={**headers,
                                          "Retry-After": str(max(1, math.ceil(retry_after)))})


class ResultTooLarge(SidecarError):
    status = 500
    detail = "result too large"
    outcome = "error"


class Unavailable(SidecarError):
    status = 503
    detail = "a dependency is unavailable"
    outcome = "unavailable"


class BadGateway(SidecarError):
    status = 502
    detail = "the framework is unreachable"
    outcome = "upstream_error"


class GatewayTimeout(SidecarError):
    status = 504
    detail = "the framework did not answer in time"
    outcome = "upstream_timeout"


def render(exc: SidecarError, request_id: str) -> Response:
    """The problem+json answer for ``exc``; carries X-Request-ID and the error's headers."""
    return problem_response(exc.status, exc.detail, request_id, kind=exc.kind,
                            headers=exc.headers)
