"""Step 6: trust identity headers only with the sidecar's valid signature.

Unsigned, forged or stale requests are 401; a correctly signed request for
another tenant than this runtime's is 403. Only the identity-free routes
(``/healthz``, ``/readyz``, ``/metrics``) are exempt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

from framework import signing
from framework.errors import Forbidden, Unauthenticated

# /internal/catalog carries no identity either; its view checks the signature itself.
EXEMPT = frozenset({"/healthz", "/readyz", "/metrics", "/internal/catalog"})
AUTH_METHODS = frozenset({"jwt", "api_key", "ldap"})


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


def _split(value: str) -> tuple[str, ...]:
    return tuple(part for part in (p.strip() for p in value.split(",")) if part)


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
    for name in (*signing.SIGNED_HEADERS, signing.TIMESTAMP, signing.SIGNATURE)
)


def signed_headers(environ: Mapping[str, object]) -> dict[str, str]:
    """The headers the signature covers, read once from the WSGI environ."""
    return {name: str(environ.get(key, "")) for name, key in _WSGI_KEYS}


def identify(secret: bytes, tenant_id: str, method: str, target: str,
             headers: Mapping[str, str]) -> Identity:
    """The caller's identity from signed headers; raises 401/403 errors."""
    if not signing.verify(secret, method, target, headers):
        raise Unauthenticated("missing, invalid or expired sidecar signature")
    tenant = headers.get(signing.TENANT, "")
    if tenant != tenant_id:
        raise Forbidden("this runtime serves another tenant")
    user = headers.get(signing.USER, "")
    method_name = headers.get(signing.AUTH_METHOD, "")
    if not user or method_name not in AUTH_METHODS:
        raise Unauthenticated("the signed request names no user or auth method")
    return Identity(
        tenant=tenant,
        user=user,
        groups=_split(headers.get(signing.GROUPS, "")),
        roles=_split(headers.get(signing.ROLES, "")),
        auth_method=method_name,
    )
