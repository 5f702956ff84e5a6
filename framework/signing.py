"""The sidecar's signature on a request: one canonical string, both processes.

The sidecar signs every request it forwards; the framework refuses any request
whose signature does not verify, so identity headers are trusted only with
proof they came from the sidecar.

Canonical string (UTF-8, fields joined by ``\\n``)::

    v2
    <X-Sidecar-Timestamp: integer unix seconds>
    <HTTP method, upper case>
    <raw path with query string, as sent upstream>
    <X-Sidecar-Body-SHA256: hex SHA-256 of the body as sent, of b"" when there is none>
    <X-Request-ID>
    <X-Tenant-ID>
    <X-User-ID>
    <X-User-Groups>
    <X-User-Roles>
    <X-Auth-Method>

``X-Sidecar-Signature`` is ``v2=`` + hex HMAC-SHA256 of that string with
``MTP_SIDECAR_SECRET``. The digest travels in ``X-Sidecar-Body-SHA256`` so the
signature can be checked before the body is read; the framework then checks the
digest against the body it reads, so a captured request cannot be replayed with
another body. A signature is fresh for ``MAX_SKEW`` seconds either way: a valid
but stale one is told apart (:data:`STALE`) because it means the request was held
too long on its way (the framework answers 503, not 401).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from enum import Enum

VERSION = "v2"
MAX_SKEW = 30

TIMESTAMP = "X-Sidecar-Timestamp"
SIGNATURE = "X-Sidecar-Signature"
BODY_SHA256 = "X-Sidecar-Body-SHA256"
REQUEST_ID = "X-Request-ID"
TENANT = "X-Tenant-ID"
USER = "X-User-ID"
GROUPS = "X-User-Groups"
ROLES = "X-User-Roles"
AUTH_METHOD = "X-Auth-Method"

SIGNED_HEADERS = (REQUEST_ID, TENANT, USER, GROUPS, ROLES, AUTH_METHOD)
EMPTY_BODY = hashlib.sha256(b"").hexdigest()


class Verdict(Enum):
    """What a signature check found."""

    VALID = "valid"
    STALE = "stale"      # made with the secret, but outside MAX_SKEW
    INVALID = "invalid"  # missing, malformed or forged


def body_digest(body: bytes | None) -> str:
    """The hex SHA-256 a signature carries for ``body`` (None: no body)."""
    return hashlib.sha256(body).hexdigest() if body else EMPTY_BODY


def canonical(timestamp: str, method: str, path: str, digest: str,
              headers: Mapping[str, str]) -> bytes:
    """The string that is signed; ``headers`` must hold the identity headers."""
    parts = [VERSION, timestamp, method.upper(), path, digest]
    parts.extend(headers.get(h, "") for h in SIGNED_HEADERS)
    # surrogateescape: a header value the HTTP server could not decode as UTF-8
    # makes a string that cannot verify, never an exception.
    return "\n".join(parts).encode("utf-8", "surrogateescape")


def _mac(secret: bytes, ts: str, method: str, path: str, digest: str,
         headers: Mapping[str, str]) -> str:
    return hmac.digest(secret, canonical(ts, method, path, digest, headers), "sha256").hex()


def sign(secret: bytes, method: str, path: str, headers: Mapping[str, str],
         now: float | None = None, body: bytes | None = None) -> dict[str, str]:
    """The signature headers for a request carrying ``headers`` and ``body``."""
    ts = str(int(time.time() if now is None else now))
    digest = body_digest(body)
    mac = _mac(secret, ts, method, path, digest, headers)
    return {TIMESTAMP: ts, BODY_SHA256: digest, SIGNATURE: f"{VERSION}={mac}"}


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _is_digest(value: str) -> bool:
    # One regex match: a per-character generator cost ~5 us on every signed request.
    return _DIGEST.fullmatch(value) is not None


def check(secret: bytes, method: str, path: str, headers: Mapping[str, str],
          now: float | None = None) -> Verdict:
    """The verdict on a request's signature over the body digest it claims.

    The caller must still compare that digest with the body it reads
    (:func:`body_matches`).
    """
    ts = headers.get(TIMESTAMP, "")
    given = headers.get(SIGNATURE, "")
    digest = headers.get(BODY_SHA256, "")
    # ASCII digits, a sane length: '²'.isdigit() is True and int() refuses it, as it
    # refuses 4300+ digits; either would have been a 500 instead of this 401.
    if (not secret or not (ts.isascii() and ts.isdigit()) or len(ts) > 12
            or not given.startswith(VERSION + "=") or not _is_digest(digest)):
        return Verdict.INVALID
    mac = _mac(secret, ts, method, path, digest, headers)
    # Compare bytes: compare_digest refuses non-ASCII str, and a forged header may hold any.
    if not hmac.compare_digest(given[len(VERSION) + 1:].encode("utf-8", "surrogateescape"),
                               mac.encode()):
        return Verdict.INVALID
    if abs((time.time() if now is None else now) - int(ts)) > MAX_SKEW:
        return Verdict.STALE
    return Verdict.VALID


def body_matches(headers: Mapping[str, str], body: bytes | None) -> bool:
    """Whether ``body`` is the one the (checked) signature names."""
    return hmac.compare_digest(headers.get(BODY_SHA256, "").encode("ascii", "replace"),
                               body_digest(body).encode())


def verify(secret: bytes, method: str, path: str, headers: Mapping[str, str],
           now: float | None = None, body: bytes | None = None) -> bool:
    """True when the signature is valid, fresh, made with ``secret`` and names ``body``."""
    return (check(secret, method, path, headers, now) is Verdict.VALID
            and body_matches(headers, body))
