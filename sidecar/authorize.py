"""Stage 3: may this principal call this service operation? (policy in framework/authz.py)"""

from __future__ import annotations

import re

from framework.authz import Decision, decide
from framework.tenant_config import SERVICE_NAME_RE, AuthzSettings
from sidecar.errors import Forbidden, NotFound
from sidecar.principal import Principal

PREFIX = "/services/"
OPERATION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def refuse_ambiguous_path(path: str, raw_path: str) -> None:
    """NotFound for a path with empty (``//``), ``.`` or ``..`` segments.

    Servers differ in whether they merge slashes and resolve dot segments: gunicorn
    and Werkzeug route ``//services/x`` (or ``/%2Fservices/x``) as ``/services/x``,
    which the sidecar would have taken for another route and never authorized.
    Refusing such paths keeps the path the sidecar checked and the path the framework
    routes the same. Empty segments are looked for in the decoded path (the raw one
    of an absolute-form request starts with ``http://``), dot segments in both.
    """
    if "//" in path:
        raise NotFound("empty segment in path")
    for candidate in (path, raw_path):
        if "/." in candidate:
            segments = candidate.split("?", 1)[0].split("/")
            if "." in segments or ".." in segments:
                raise NotFound("dot segment in path")


def service_target(path: str) -> tuple[str, str | None] | None:
    """(service, operation) of a /services/... path; None for other paths; NotFound if malformed.

    ``path`` is the decoded path; the proxy forwards exactly the path checked here,
    so the framework can never route a request differently from what was authorized.
    """
    if not path.startswith(PREFIX):
        return None
    parts = path[len(PREFIX):].split("/")
    # fullmatch: "$" alone also matches before a final newline, and a decoded "%0A"
    # would then travel in the request line the framework is sent.
    if len(parts) > 2 or not SERVICE_NAME_RE.fullmatch(parts[0]):
        raise NotFound("malformed service path")
    if len(parts) == 2:
        if not OPERATION_RE.fullmatch(parts[1]):
            raise NotFound("malformed operation")
        return parts[0], parts[1]
    return parts[0], None


def authorize(authz: AuthzSettings, principal: Principal, service: str,
              operation: str | None) -> Decision:
    """The allowing decision, or Forbidden carrying the refusal's reason."""
    decision = decide(authz, principal, service, operation)
    if not decision.allowed:
        raise Forbidden(decision.reason)
    return decision
