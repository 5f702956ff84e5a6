"""The sidecar's span: one per request, continued by the framework.

Called only while :data:`framework.tracing.ENABLED` is true. The client's
``traceparent``/``tracestate`` make the span's parent (a malformed one starts a
new trace); towards the framework they are replaced by the sidecar's span. Trace
context is data: it is never read for identity, is not among the signed headers,
and nothing here touches the identity headers or the signature.
"""

from __future__ import annotations

from typing import Any

from framework import tracing
from sidecar.front import Request
from sidecar.headers import normal
from sidecar.principal import Principal

TRACE_HEADERS = frozenset((tracing.TRACEPARENT, tracing.TRACESTATE))


def start(request: Request, request_id: str) -> Any:
    """The request's span, child of the client's trace context when it sent a valid one."""
    return tracing.start_span(
        "sidecar " + request.method, tracing.extract(request.headers, tracing.HEADERS),
        attributes={"http.request.method": request.method,
                    "url.path": tracing.text(request.path[:tracing.MAX_ATTRIBUTE]),
                    "mtp.request_id": request_id})


def inject(span: Any, headers: list[tuple[str, str]]) -> None:
    """Replace the client's trace headers in ``headers`` by ones naming ``span``."""
    # By length first: most requests carry no trace header, and no other name is
    # normalised for nothing.
    drop = [i for i, (name, _) in enumerate(headers)
            if len(name) in (10, 11) and normal(name) in TRACE_HEADERS]
    for i in reversed(drop):
        del headers[i]
    headers.extend(tracing.headers_of(span).items())


def finish(span: Any, principal: Principal | None, tenant: str, service: str,
           operation: str | None, outcome: str, status: int) -> None:
    """Record what the request became and end its span.

    The user id is not recorded: traces leave the platform (a collector), and the
    audit log, which stays, already ties the request id to the user.
    """
    if service:
        span.update_name(f"sidecar {span.name.split(' ', 2)[1]} /services/{service}"
                         + (f"/{operation}" if operation else ""))
    span.set_attributes({
        "mtp.tenant": tenant, "mtp.service": service, "mtp.operation": operation or "",
        "mtp.auth_method": principal.auth_method if principal is not None else "",
        "mtp.decision": outcome, "http.response.status_code": status})
    tracing.set_error(span, status)
    span.end()
