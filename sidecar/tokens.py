"""JWT bearer tokens: pure verification with PyJWT, and a cache of verified tokens.

Algorithms come only from ``[auth.jwt] algorithms`` (never from the token header,
``none`` never). ``exp`` and ``sub`` are required; ``exp``, ``nbf`` and ``iat`` are
checked with ``leeway``; ``iss``/``aud`` when configured. A verified token is
cached by the SHA-256 of its text until it expires, and the expiry is checked
again on every hit, so a cache hit is never more permissive than a verification.
With a JWKS key source the entry also remembers the key that verified the token:
a hit asks the key source for that kid again (which refreshes the set past its
TTL) and counts only while the same key is still published, so removing a key
from the set ends its tokens' cached validity at the next refresh.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from cachetools import TLRUCache

from framework.tenant_config import JwtSettings
from sidecar.principal import JWT, BadIdentity, Principal

if TYPE_CHECKING:
    from jwt.types import Options  # a TypedDict: a plain dict at run time

CACHE_SIZE = 50_000


class TokenInvalid(Exception):
    """The token is not acceptable; the message is the audit reason, never shown to clients."""


class SourceKey(Protocol):
    """A key from a key source: the key object and what identifies its published form."""

    key: Any
    fingerprint: bytes


class KeySource(Protocol):
    """Where asymmetric keys come from when a JWKS URL is configured (sidecar/jwks.py)."""

    async def key_for(self, kid: str | None, algorithm: str) -> SourceKey: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class _Verified:
    """A cache entry: who the token names, until when, and which key vouched for it."""

    principal: Principal
    expires: float
    kid: str | None = None
    algorithm: str = ""
    fingerprint: bytes = b""


def _str_list(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, ())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TokenInvalid(f"claim {name!r} must be a list of strings")
    return tuple(value)


def principal_from_claims(claims: dict[str, Any], tenant_claim: str) -> Principal:
    """The principal a verified token names (TokenInvalid on a malformed claim)."""
    tenant = claims.get(tenant_claim)
    if not isinstance(tenant, str) or not tenant:
        raise TokenInvalid(f"claim {tenant_claim!r} missing or not a string")
    try:
        return Principal.build(tenant, claims["sub"], _str_list(claims, "groups"),
                               _str_list(claims, "roles"), JWT)
    except BadIdentity as exc:
        raise TokenInvalid(f"claims: {exc}") from None


class TokenVerifier:
    """Verifies bearer tokens for one tenant's ``[auth.jwt]`` settings."""

    def __init__(self, cfg: JwtSettings, *, secret: str = "", public_key: Any = None,
                 keys: KeySource | None = None, cache_size: int = CACHE_SIZE,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._algorithms = list(cfg.algorithms)
        self._key: Any = secret.encode() if cfg.uses_hmac else public_key
        self._keys = keys
        self._clock = clock
        self._options: Options = {"require": ["exp", "sub"], "verify_aud": bool(cfg.audience)}
        self._issuer = cfg.issuer or None
        self._audience = cfg.audience or None
        # Entry lives until exp + leeway; TLRU evicts by that time, LRU beyond the size.
        self._cache: TLRUCache[bytes, _Verified] = TLRUCache(
            maxsize=cache_size, ttu=lambda _k, v, _now: v.expires, timer=clock)

    def decode(self, token: str, key: Any) -> dict[str, Any]:
        """Verify ``token`` with ``key``; the claims, or TokenInvalid naming the reason."""
        try:
            return jwt.decode(token, key=key, algorithms=self._algorithms, options=self._options,
                              leeway=self.cfg.leeway, issuer=self._issuer,
                              audience=self._audience)
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"jwt: {type(exc).__name__}: {exc}") from None

    def cached(self, digest: bytes) -> _Verified | None:
        """A cache entry for a token digest that has not expired."""
        hit = self._cache.get(digest)
        if hit is not None and self._clock() < hit.expires:
            return hit
        return None

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token (TokenInvalid otherwise)."""
        if not token.isascii():
            # A JWS is base64url and dots; other bytes (surrogate-escaped by the HTTP
            # server) would make PyJWT's encode("utf-8") raise outside PyJWTError.
            raise TokenInvalid("jwt: token is not ASCII")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        hit = self.cached(digest)
        if hit is not None:
            if self._keys is None:
                return hit.principal  # the configured key cannot change while we run
            # UnknownKey here (the key left the set) refuses the token, as a fresh check would.
            current = await self._keys.key_for(hit.kid, hit.algorithm)
            if current.fingerprint == hit.fingerprint:
                return hit.principal
            self._cache.pop(digest, None)  # same kid, other key: verify again below
        if self._keys is None:
            claims = self.decode(token, self._key)
            entry = _Verified(principal_from_claims(claims, self.cfg.tenant_claim),
                              float(claims["exp"]) + self.cfg.leeway)
        else:
            kid, algorithm = self._header(token)
            source_key = await self._keys.key_for(kid, algorithm)
            claims = self.decode(token, source_key.key)
            entry = _Verified(principal_from_claims(claims, self.cfg.tenant_claim),
                              float(claims["exp"]) + self.cfg.leeway,
                              kid, algorithm, source_key.fingerprint)
        self._cache[digest] = entry
        return entry.principal

    def _header(self, token: str) -> tuple[str | None, str]:
        """The token's kid and alg, the alg one the tenant allows (before any key lookup)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"jwt: {type(exc).__name__}: {exc}") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            # Checked here too so that a made-up alg never reaches the key source.
            raise TokenInvalid("jwt: InvalidAlgorithmError: the specified alg value is not "
                               "allowed")
        return (kid if isinstance(kid, str) else None), algorithm

    async def close(self) -> None:
        """Release the key source, if any."""
        if self._keys is not None:
            await self._keys.close()
