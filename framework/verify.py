"""Step 6: trust identity headers only with the sidecar's valid signature.

Only ``/healthz`` answers without a signature. Unsigned or forged requests are
401; a request signed correctly but held past the signature's lifetime on its way
(a stalled framework, a long queue) is 503 with ``Retry-After``, because the
client did nothing wrong; a correctly signed request for another tenant than this
runtime's is 403. ``/readyz`` and ``/metrics`` need a signature but no caller (the
sidecar's own checks sign an empty identity). Identity values are read with
:mod:`framework.identity`, the rule the sidecar built them by.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

from framework import identity, signing
from framework.errors import Forbidden, Unauthenticated, Unavailable

UNSIGNED = frozenset({"/healthz"})
# Signed, but no caller: the sidecar's own checks (and its service-catalog fetch).
IDENTITY_FREE = frozenset({"/readyz", "/metrics", "/internal/catalog"})
AUTH_METHODS = frozenset({"jwt", "api_key", "ldap"})
_ANONYMOUS = (signing.TENANT, signing.USER, signing.GROUPS, signing.ROLES, signing.AUTH_METHOD)


@dataclass(frozen=True)
class Identity:
    """Who is calling, as the sidecar established it."""

    tenant: str
    user: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    auth_method: str

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


def raw_target(environ: Mapping[str, object]) -> str:
    """The request target (path and query) exactly as it came over the wire."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if isinstance(raw, str) and raw:
        return raw
    path = quote(str(environ.get("PATH_INFO", "")), safe="/:@!$&'()*+,;=-._~")
    query = environ.get("QUERY_STRING")
    return f"{path}?{query}" if query else path


_WSGI_KEYS = tuple(
    (name, "HTTP_" + name.upper().replace("-", "_"))
    for name in (*signing.SIGNED_HEADERS, signing.TIMESTAMP, signing.SIGNATURE,
                 signing.BODY_SHA256)
)


def signed_headers(environ: Mapping[str, object]) -> dict[str, str]:
    """The headers the signature covers, read once from the WSGI environ."""
    return {name: str(environ.get(key, "")) for name, key in _WSGI_KEYS}


def check_signature(secret: bytes, method: str, target: str,
                    headers: Mapping[str, str]) -> None:
    """Raise 401 for a missing or forged signature, 503 for a valid one held too long."""
    verdict = signing.check(secret, method, target, headers)
    if verdict is signing.Verdict.STALE:
        raise Unavailable("the request was held too long before it reached the framework; "
                          "retry it")
    if verdict is not signing.Verdict.VALID:
        raise Unauthenticated("missing or invalid sidecar signature")


def identify(secret: bytes, tenant_id: str, method: str, target: str,
             headers: Mapping[str, str], path: str = "") -> Identity | None:
    """The caller's identity from signed headers; raises 401/403/503 errors.

    None for a signed request without a caller to a route that needs none (``path``
    in :data:`IDENTITY_FREE`).
    """
    check_signature(secret, method, target, headers)
    if path in IDENTITY_FREE and not any(headers.get(h) for h in _ANONYMOUS):
        return None
    tenant = headers.get(signing.TENANT, "")
    if tenant != tenant_id:
        raise Forbidden("this runtime serves another tenant")
    user = headers.get(signing.USER, "")
    method_name = headers.get(signing.AUTH_METHOD, "")
    if not identity.usable(user) or method_name not in AUTH_METHODS:
        raise Unauthenticated("the signed request names no usable user or auth method")
    return Identity(
        tenant=tenant,
        user=user,
        groups=identity.split(headers.get(signing.GROUPS, "")),
        roles=identity.split(headers.get(signing.ROLES, "")),
        auth_method=method_name,
    )
