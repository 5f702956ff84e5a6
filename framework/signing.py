"""The sidecar's signature on identity headers: one canonical string, both processes.

The sidecar signs every request it forwards; the framework refuses any request
whose signature does not verify, so identity headers are trusted only with
proof they came from the sidecar.

Canonical string (UTF-8, fields joined by ``\\n``)::

    v1
    <X-Sidecar-Timestamp: integer unix seconds>
    <HTTP method, upper case>
    <raw path with query string, as sent upstream>
    <X-Request-ID>
    <X-Tenant-ID>
    <X-User-ID>
    <X-User-Groups>
    <X-User-Roles>
    <X-Auth-Method>

``X-Sidecar-Signature`` is ``v1=`` + hex HMAC-SHA256 of that string with
``MTP_SIDECAR_SECRET``. A signature is valid for ``MAX_SKEW`` seconds either way.
The body is not signed: it travels over a unix socket or loopback from the
sidecar, which caps it; signing binds the identity to the method, path and request.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping

VERSION = "v1"
MAX_SKEW = 30

TIMESTAMP = "X-Sidecar-Timestamp"
SIGNATURE = "X-Sidecar-Signature"
REQUEST_ID = "X-Request-ID"
TENANT = "X-Tenant-ID"
USER = "X-User-ID"
GROUPS = "X-User-Groups"
ROLES = "X-User-Roles"
AUTH_METHOD = "X-Auth-Method"

SIGNED_HEADERS = (REQUEST_ID, TENANT, USER, GROUPS, ROLES, AUTH_METHOD)


def canonical(timestamp: str, method: str, path: str, headers: Mapping[str, str]) -> bytes:
    """The string that is signed; ``headers`` must hold the identity headers."""
    parts = [VERSION, timestamp, method.upper(), path]
    parts.extend(headers.get(h, "") for h in SIGNED_HEADERS)
    return "\n".join(parts).encode()


def sign(secret: bytes, method: str, path: str, headers: Mapping[str, str],
         now: float | None = None) -> dict[str, str]:
    """The two signature headers for a request carrying ``headers``."""
    ts = str(int(time.time() if now is None else now))
    mac = hmac.digest(secret, canonical(ts, method, path, headers), "sha256").hex()
    return {TIMESTAMP: ts, SIGNATURE: f"{VERSION}={mac}"}


def verify(secret: bytes, method: str, path: str, headers: Mapping[str, str],
           now: float | None = None) -> bool:
    """True when the request's signature is valid, fresh and made with ``secret``."""
    ts = headers.get(TIMESTAMP, "")
    given = headers.get(SIGNATURE, "")
    # ASCII digits, a sane length: '²'.isdigit() is True and int() refuses it, as it
    # refuses 4300+ digits; either would have been a 500 instead of this 401.
    if (not secret or not (ts.isascii() and ts.isdigit()) or len(ts) > 12
            or not given.startswith(VERSION + "=")):
        return False
    if abs((time.time() if now is None else now) - int(ts)) > MAX_SKEW:
        return False
    mac = hmac.digest(secret, canonical(ts, method, path, headers), "sha256").hex()
    # Compare bytes: compare_digest refuses non-ASCII str, and a forged header may hold any.
    return hmac.compare_digest(given[len(VERSION) + 1:].encode(), mac.encode())
