"""A real JWKS endpoint for tests: an aiohttp server on loopback in its own thread.

It serves whatever key set it is given (rotate by calling ``publish``), counts the fetches,
and can be stopped and started again on the same port to simulate an IdP outage.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.helpers import free_port


@dataclass
class SigningKey:
    """A private key with its kid and algorithm; ``token()`` signs, ``jwk`` is the public half."""

    kid: str
    algorithm: str
    private: Any
    publish_alg: bool = True  # False: the JWK carries no "alg" (RFC 7517 makes it optional)

    @classmethod
    def generate(cls, kid: str, algorithm: str, publish_alg: bool = True) -> SigningKey:
        """A fresh key: RS256 or PS256 (RSA 2048), ES256 (P-256) or EdDSA (Ed25519)."""
        if algorithm in ("RS256", "PS256"):
            private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif algorithm == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(algorithm)
        return cls(kid, algorithm, private, publish_alg)

    @property
    def jwk(self) -> dict[str, Any]:
        codec = {"RS256": RSAAlgorithm, "PS256": RSAAlgorithm, "ES256": ECAlgorithm,
                 "EdDSA": OKPAlgorithm}[self.algorithm]
        data = dict(codec.to_jwk(self.private.public_key(), as_dict=True))
        data.update(kid=self.kid, use="sig")
        if self.publish_alg:
            data["alg"] = self.algorithm
        return data

    def token(self, claims: dict[str, Any], kid: str | None = "",
              algorithm: str | None = None) -> str:
        """A JWT signed with this key; ``kid`` overrides the header's kid (None: no kid),
        ``algorithm`` the key's own algorithm (an RSA key signs RS256 and PS256 alike)."""
        headers = {} if kid is None else {"kid": kid or self.kid}
        return jwt.encode(claims, self.private, algorithm=algorithm or self.algorithm,
                          headers=headers)


@dataclass
class JwksServer:
    """Serves ``{"keys": [...]}`` at ``/jwks.json``; ``hits`` counts the requests."""

    port: int = field(default_factory=free_port)
    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    status: int = 200
    body: bytes | None = None  # when set, served instead of the key set
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def publish(self, *keys: SigningKey) -> None:
        """Serve these keys from now on (a rotation)."""
        self.keys = [k.jwk for k in keys]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.body is not None:
            return web.Response(body=self.body, status=self.status,
                                content_type="application/json")
        return web.json_response({"keys": self.keys}, status=self.status)

    def start(self) -> None:
        """Listen on 127.0.0.1:port in a background thread."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_get("/jwks.json", self._handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
            ready.set()

        def main() -> None:
            assert self._loop is not None
            self._loop.run_until_complete(serve())
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=main, name="jwks-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("JWKS test server did not start")

    def stop(self) -> None:
        """Close the listener and end the thread (the port can be reused by ``start``)."""
        if self._loop is None or self._runner is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = self._runner = self._thread = None


def claims(sub: str = "alice", tenant: str = "acme", ttl: int = 300,
           **extra: Any) -> dict[str, Any]:
    """Token claims with ``sub``, the tenant claim and an expiry."""
    now = int(time.time())
    return {"sub": sub, "tenant_id": tenant, "iat": now, "exp": now + ttl, **extra}
