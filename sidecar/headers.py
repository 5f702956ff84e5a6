"""What crosses the sidecar: pure functions over header sets, no IO.

Towards the framework, the client's headers are copied except anything that
could claim an identity or steer a proxy: ``X-Tenant-*``, ``X-User-*``,
``X-Auth-*``, ``X-Sidecar-*``, ``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``,
``X-Request-ID``, ``Authorization``, ``X-API-Key``, ``Proxy-*`` and the hop-by-hop
headers (``Connection`` and every header it names, ``Keep-Alive``, ``TE``,
``Trailer``, ``Transfer-Encoding``, ``Upgrade``), plus ``Host``, ``Content-Length``
and ``Expect``, which the proxy sets itself. Names are compared case-insensitively
with ``_`` read as ``-``, because WSGI servers map both to the same variable.
Then the identity headers, ``X-Forwarded-For``/``-Proto`` and the signature (with the
body's digest) are added.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from framework import identity, signing
from sidecar.principal import Principal

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
STRIPPED = HOP_BY_HOP | frozenset({
    "authorization", "x-api-key", "forwarded", "x-real-ip", "x-request-id", "host",
    "content-length", "expect",
})
STRIPPED_PREFIXES = ("x-tenant-", "x-user-", "x-auth-", "x-sidecar-", "x-forwarded-", "proxy-")
# Headers the framework's answer must not pass back as they are (the sidecar sets its own).
RESPONSE_DROPPED = HOP_BY_HOP | frozenset({"content-length", "date", "server",
                                           "x-request-id"})

# gunicorn refuses a request line over 4094 bytes or more than 100 header fields with
# an HTML page (limit_request_line, limit_request_fields); the sidecar refuses such
# requests first, as problem+json, leaving room for the headers it adds itself.
MAX_REQUEST_LINE = 4094
MAX_CLIENT_HEADERS = 80

FORWARDED_FOR = "X-Forwarded-For"
FORWARDED_PROTO = "X-Forwarded-Proto"
IDENTITY = frozenset(h.lower() for h in (*signing.SIGNED_HEADERS, signing.TIMESTAMP,
                                          signing.SIGNATURE, signing.BODY_SHA256,
                                          FORWARDED_FOR, FORWARDED_PROTO))


def normal(name: str) -> str:
    """The form names are compared in."""
    return name.lower().replace("_", "-")


# Connection values that name no header that is not dropped anyway (the common case).
PLAIN_CONNECTION = frozenset({"keep-alive", ""})


def is_connection(name: str) -> bool:
    """Whether a header name is Connection (any case)."""
    return len(name) == 10 and name.lower() == "connection"


def names_headers(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a Connection header names other headers (which are then hop-by-hop too)."""
    return any(is_connection(name) and value.strip().lower() not in PLAIN_CONNECTION
               for name, value in headers)


def connection_named(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names listed in the client's Connection header(s): hop-by-hop too."""
    named: set[str] = set()
    for name, value in headers:
        if normal(name) == "connection":
            named.update(normal(v.strip()) for v in value.split(",") if v.strip())
    return frozenset(named)


# Header names repeat from request to request: each spelling's verdict is remembered
# (bounded, so hostile names cannot grow it without limit).
@lru_cache(maxsize=4096)
def is_stripped(name: str) -> bool:
    """Whether a client header must not reach the framework (before Connection is read)."""
    n = normal(name)
    return n in STRIPPED or n.startswith(STRIPPED_PREFIXES)


@lru_cache(maxsize=4096)
def is_dropped(name: str) -> bool:
    """Whether a header of the framework's answer is not passed on as it is."""
    return normal(name) in RESPONSE_DROPPED


def identity_headers(principal: Principal | None, request_id: str) -> dict[str, str]:
    """The identity the framework is told about (empty values when anonymous)."""
    if principal is None:
        return {signing.REQUEST_ID: request_id, signing.TENANT: "", signing.USER: "",
                signing.GROUPS: "", signing.ROLES: "", signing.AUTH_METHOD: ""}
    return {
        signing.REQUEST_ID: request_id,
        signing.TENANT: principal.tenant,
        signing.USER: principal.user,
        signing.GROUPS: identity.join(principal.groups),
        signing.ROLES: identity.join(principal.roles),
        signing.AUTH_METHOD: principal.auth_method,
    }


def upstream_headers(client: Iterable[tuple[str, str]], who: dict[str, str], *,
                     secret: bytes, method: str, path: str, peer: str, proto: str,
                     body: bytes | None = None, now: float | None = None
                     ) -> list[tuple[str, str]]:
    """The headers sent to the framework: the client's safe ones, then ours, signed.

    ``body`` is exactly what will be sent: the signature covers its SHA-256.
    """
    items = list(client)
    out = [(name, value) for name, value in items if not is_stripped(name)]
    if len(out) < len(items) and names_headers(items):
        extra = connection_named(items)
        out = [(name, value) for name, value in out if normal(name) not in extra]
    out.extend(who.items())
    out.append((FORWARDED_FOR, peer))
    out.append((FORWARDED_PROTO, proto))
    out.extend(signing.sign(secret, method, path, who, now, body).items())
    return out


def response_headers(upstream: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The framework's answer headers that are passed on to the client."""
    out = [(name, value) for name, value in upstream if not is_dropped(name)]
    if len(out) < len(upstream) and names_headers(upstream):
        extra = connection_named(upstream)
        out = [(name, value) for name, value in out if normal(name) not in extra]
    return out
