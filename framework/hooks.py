"""Around every request: request id, signature and body check before; header, metrics, log after.

Runs on every call, so it reads the WSGI environ and Flask's ``g`` once each
instead of going through the context-local proxies again and again.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from framework import logs, metrics, tracing
from framework.inputs import check_digest, read_body
from framework.problem import request_id
from framework.runtime import Runtime
from framework.signing import BODY_SHA256, REQUEST_ID
from framework.verify import UNSIGNED, identify, raw_target, signed_headers

MAX_LOGGED_PATH = 200


def install_hooks(app: Flask, rt: Runtime) -> None:
    """Attach the before/after/teardown hooks for ``rt`` to ``app``."""
    if tracing.ENABLED:  # first, so the request span covers the hooks below too
        tracing.install(app)

    @app.before_request
    def before() -> None:
        state = g._get_current_object()
        state.start = time.perf_counter()
        environ = request.environ
        state.request_id = rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
        state.service, state.operation, state.error_kind, state.identity = "", "", None, None
        state.body = b""
        logs.REQUEST_ID.set(rid)
        path = environ.get("PATH_INFO")
        if path in UNSIGNED:
            return
        signed = signed_headers(environ)
        state.identity = identify(rt.secret, rt.tenant.tenant_id, environ["REQUEST_METHOD"],
                                  raw_target(environ), signed, str(path))
        # The signature names the body's digest: read and check it here, for every route,
        # so a captured request never runs with another body (HTTP/1.1: a body only with
        # Content-Length or Transfer-Encoding).
        req = request._get_current_object()
        has_body = req.content_length or environ.get("HTTP_TRANSFER_ENCODING")
        state.body = (read_body(req.stream, req.content_length, rt.settings.max_body,
                                signed[BODY_SHA256]) if has_body
                      else check_digest(b"", signed[BODY_SHA256]))

    @app.after_request
    def after(response: Response) -> Response:
        state = g._get_current_object()
        start = getattr(state, "start", None)
        if start is None:  # pragma: no cover - a failure before our first hook ran
            return response
        response.headers[REQUEST_ID] = state.request_id
        elapsed = time.perf_counter() - start
        status = response.status_code
        metrics.observe(rt.tenant.tenant_id, state.service, state.operation, status, elapsed,
                        state.error_kind)
        environ = request.environ
        ident = state.identity
        logs.access(rt.log, state.request_id, {
            "method": environ.get("REQUEST_METHOD"),
            "path": str(environ.get("PATH_INFO", ""))[:MAX_LOGGED_PATH],
            "status": status,
            "ms": round(elapsed * 1000, 3),
            "service": state.service or None,
            "operation": state.operation or None,
            "user": ident.user if ident is not None else None,
        })
        # gthread reuses threads: no id may leak into lines logged between requests.
        # (after_request runs for every answer: every error is handled and rendered.)
        logs.REQUEST_ID.set("")
        return response
