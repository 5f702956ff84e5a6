"""The service catalog the sidecar enforces deadlines from: every service's timeout.

``GET /internal/catalog`` (signed by the sidecar like every request, answered
only to a valid signature) returns ``{"version", "default", "services": {name:
timeout}}`` with the timeouts of module ``TIMEOUT``, ``[services.X] timeout`` or
the default, and signs its body (``X-Catalog-Signature``, HMAC-SHA256 with the
shared secret) so the sidecar trusts no other answer. ``/readyz`` names the
catalog's version: the sidecar fetches the catalog again when it changes (a new
config version, a service module replaced). A service that is missing, disabled
or does not load is left out; the sidecar gives it the default deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from flask import Flask, Response, request

from framework import signing
from framework.errors import FrameworkError, Unauthenticated
from framework.registry import DEFAULT_TIMEOUT
from framework.runtime import Runtime
from framework.verify import raw_target, signed_headers

PATH = "/internal/catalog"
SIGNATURE = "X-Catalog-Signature"
CACHE_SECONDS = 1.0  # /readyz asks for the version on every probe: rebuilt at most this often


def body_signature(secret: bytes, body: bytes) -> str:
    """The catalog answer's signature: ``v1=`` + hex HMAC-SHA256 of the body."""
    return "v1=" + hmac.digest(secret, b"mtp-catalog\n" + body, "sha256").hex()


def timeouts(rt: Runtime) -> dict[str, float]:
    """Service -> timeout (seconds) of every service that loads and is enabled."""
    found = {}
    for name in rt.registry.names():
        try:
            found[name] = rt.registry.resolve(name).timeout
        except FrameworkError:
            continue  # disabled, not entitled or broken: answered at once, default deadline
    return found


def build(rt: Runtime) -> dict[str, Any]:
    """The catalog document with its version (a digest of its content)."""
    content = {"default": DEFAULT_TIMEOUT, "services": timeouts(rt)}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": digest, **content}


class CatalogCache:
    """The catalog, rebuilt when the config changes or CACHE_SECONDS passed."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._doc: dict[str, Any] = {}
        self._key: tuple[int, float] = (0, 0.0)

    def current(self) -> dict[str, Any]:
        now = time.monotonic()
        tenant_id, built = self._key
        if tenant_id != id(self.rt.tenant) or now - built >= CACHE_SECONDS or not self._doc:
            self._doc = build(self.rt)
            self._key = (id(self.rt.tenant), now)
        return self._doc

    def version(self) -> str:
        return str(self.current()["version"])


def register(app: Flask, rt: Runtime) -> CatalogCache:
    """Add ``GET /internal/catalog``; returns the cache /readyz reads the version from."""
    cache = CatalogCache(rt)

    @app.get(PATH)
    def catalog() -> Response:
        environ = request.environ
        # Identity-free like /readyz, but only the sidecar may read it.
        if not signing.verify(rt.secret, "GET", raw_target(environ), signed_headers(environ)):
            raise Unauthenticated("missing, invalid or expired sidecar signature")
        body = json.dumps(cache.current(), separators=(",", ":")).encode()
        return Response(body, content_type="application/json",
                        headers={SIGNATURE: body_signature(rt.secret, body)})

    return cache
