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
from sidecar.errors import HeadersTooLarge, UriTooLong
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

FORWARDED_FOR = "X-Forwarded-For"
FORWARDED_PROTO = "X-Forwarded-Proto"
IDENTITY = frozenset(h.lower() for h in (*signing.SIGNED_HEADERS, signing.TIMESTAMP,
                                          signing.SIGNATURE, signing.BODY_SHA256,
                                          FORWARDED_FOR, FORWARDED_PROTO))

# gunicorn's limits (its defaults: framework/cli/serve.py sets none of them). gunicorn
# answers a request over one with an HTML page, so the sidecar refuses it first, as
# problem+json, counting what it adds itself (identity, signature, Host, Content-Length).
# Every other rule gunicorn has that llhttp lacks is met by what the sidecar forwards:
# names are tokens and values free of controls (llhttp, strict), a duplicate Host or
# Content-Type is refused by llhttp, Expect / Transfer-Encoding / X-Forwarded-* are
# stripped, names with "_" are dropped by gunicorn (header_map = "drop") but counted here.
MAX_REQUEST_LINE = 4094  # limit_request_line: "METHOD target HTTP/1.1" without its CRLF
MAX_FIELDS = 100  # limit_request_fields
MAX_FIELD_LINE = 8190  # limit_request_field_size: "Name: value" with its CRLF
# (gunicorn's head buffer, fields x (line + 2) + 4, holds any head within these two.)
PROXY_FIELDS = 2  # Host and Content-Length, written by the upstream client (http1.py)
OWN_FIELDS = len(IDENTITY) + PROXY_FIELDS
MAX_CLIENT_HEADERS = MAX_FIELDS - OWN_FIELDS  # forwarded client headers at most


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


def _size(text: str) -> int:
    """Bytes ``text`` takes on the wire (the upstream client writes UTF-8, surrogateescape)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))


def check_request_line(method: str, target: str) -> None:
    """UriTooLong when ``METHOD target HTTP/1.1`` is over the framework's limit."""
    if len(method) + _size(target) + 10 > MAX_REQUEST_LINE:
        raise UriTooLong("request line over the framework's limit")


def check_fields(fields: Iterable[tuple[str, str]], more: int) -> None:
    """HeadersTooLarge when ``fields`` plus ``more`` others are over the framework's limits."""
    count = more
    for name, value in fields:
        count += 1
        line = _size(name) + _size(value) + 4  # ": " and CRLF
        if line > MAX_FIELD_LINE:
            raise HeadersTooLarge(f"header field of {line} bytes, over the framework's limit")
    if count > MAX_FIELDS:
        raise HeadersTooLarge(f"{count} header fields, over the framework's {MAX_FIELDS}")


def check_request(method: str, target: str, headers: Iterable[tuple[str, str]]) -> None:
    """Refuse, before any work, a request whose forwarded form the framework would refuse.

    The client's headers that are forwarded count with room for the sidecar's own;
    :func:`check_upstream` then checks exactly what is sent.
    """
    check_request_line(method, target)
    check_fields(((n, v) for n, v in headers if not is_stripped(n)), OWN_FIELDS)


def check_upstream(method: str, path: str, headers: list[tuple[str, str]]) -> None:
    """Refuse a request as it is about to be sent (identity values can be long too)."""
    check_request_line(method, path)
    check_fields(headers, PROXY_FIELDS)
