"""The admin API's errors; api.py renders each as problem+json (framework/problem.py)."""

from __future__ import annotations


class ApiError(Exception):
    """Base: ``status``, a client-safe ``detail``, an optional problem ``kind`` and headers."""

    status = 500
    kind: str | None = None

    def __init__(self, detail: str, *, kind: str | None = None,
                 headers: dict[str, str] | None = None, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        if kind is not None:
            self.kind = kind
        self.headers = headers or {}
        self.extra = extra


class BadRequest(ApiError):
    status = 400


class Unauthenticated(ApiError):
    status = 401

    def __init__(self, detail: str = "operator credentials are required") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="mtp-control"'})


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class Unprocessable(ApiError):
    status = 422


class Unavailable(ApiError):
    status = 503
