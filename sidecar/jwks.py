"""Signing keys from a JWKS endpoint: cached, refreshed on expiry or an unknown kid, rate-limited.

Keys are held for ``cache_ttl`` seconds. A token whose ``kid`` is not in the set triggers a
refetch (that is how a rotation is picked up without a restart), but the endpoint is asked at
most once per ``refetch_interval`` seconds however many bogus kids arrive, and concurrent
callers share one fetch. When the endpoint is down the keys already held keep being used; with
no keys at all, or a kid that only a refetch could find, the answer is ``JwksUnavailable``.

A JWK that names its ``alg`` verifies only that algorithm. One without ``alg`` (RFC 7517
makes it optional) verifies every algorithm its key type can: an RSA key RS* and PS*, an EC
key the ES* of its curve, an OKP key EdDSA. Which algorithms the tenant allows is decided by
the caller (sidecar/tokens.py), never by the key set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from jwt.exceptions import InvalidKeyError, PyJWKError

from framework import depstate
from framework.jwt_keys import key_fits

log = logging.getLogger("mtp.sidecar.jwks")

_MAX_BYTES = 1 << 20  # a key set is a few KiB; refuse to buffer anything unreasonable


class UnknownKey(Exception):
    """No key in the (fresh) set matches the token's kid and alg: the token is refused (401)."""


class JwksUnavailable(Exception):
    """The key set could not be fetched and no cached key answers (the sidecar answers 503)."""


@dataclass(frozen=True)
class SetKey:
    """One usable key of a JWK set.

    ``fingerprint`` is the SHA-256 of the JWK as published: a token verified with this key
    stays cached only while the set still holds a key with this kid and fingerprint.
    """

    kid: str | None
    alg: str | None  # the JWK's own "alg", when it names one
    key: Any  # the cryptography public key (bytes for an "oct" key)
    fingerprint: bytes

    def verifies(self, algorithm: str) -> bool:
        """True when this key may verify a token signed with ``algorithm``."""
        if self.alg is not None and self.alg != algorithm:
            return False
        return key_fits(algorithm, self.key)


def _set_key(raw: dict[str, Any]) -> SetKey:
    alg = raw.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("'alg' is not a string")
    # PyJWK checks the key material; the algorithm it infers is not used to pick one.
    key = jwt.PyJWK(raw).key
    kid = raw.get("kid") if isinstance(raw.get("kid"), str) else None
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    return SetKey(kid, alg, key, hashlib.sha256(canonical).digest())


def parse_key_set(data: Any) -> dict[str | None, SetKey]:
    """Usable signing keys of a JWKS document by kid; keys that cannot verify are skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK set: no 'keys' list")
    keys: dict[str | None, SetKey] = {}
    for raw in data["keys"]:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        try:
            key = _set_key(raw)
        except (PyJWKError, InvalidKeyError, ValueError, TypeError, KeyError) as exc:
            log.warning("JWKS key %r skipped: %s", raw.get("kid"), exc)
            continue
        keys[key.kid] = key
    if not keys:
        raise ValueError("the JWK set holds no usable signing key")
    return keys


class JwksKeys:
    """The keys of one JWKS URL, for the sidecar's JWT check."""

    def __init__(self, url: str, cache_ttl: float, refetch_interval: float = 5.0,
                 timeout: float = 5.0) -> None:
        self._url = url
        self._ttl = cache_ttl
        # Never more often than the TTL itself would refresh anyway.
        self._interval = min(refetch_interval, cache_ttl)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._keys: dict[str | None, SetKey] | None = None
        self._expires = 0.0
        self._last_attempt: float | None = None
        self._last_failed = False
        self._fetches = 0  # completed fetch attempts: lets waiters see one finished meanwhile
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._state = depstate.dependency("jwks", log, fresh=True)

    async def key_for(self, kid: str | None, algorithm: str) -> SetKey:
        """The key that verifies a token with this ``kid`` (None: the set's only key) and alg.

        Past the cache TTL the set is fetched again first, so a key removed from the set
        stops verifying (and stops vouching for cached tokens) within one TTL.
        """
        now = time.monotonic()
        if self._keys is not None and now < self._expires:
            key = self._pick(kid)
            if key is not None:
                return self._check(key, algorithm)
        if self._lock.locked() or self._may_fetch(now):
            await self._refresh()  # also waits for a fetch already under way
        if self._keys is None:
            self._state.refused()
            raise JwksUnavailable(f"no keys from {self._url}")
        key = self._pick(kid)
        if key is not None:
            return self._check(key, algorithm)
        if self._last_failed:
            self._state.refused()
            raise JwksUnavailable(f"kid {kid!r} unknown and {self._url} unreachable")
        raise UnknownKey(f"no key with kid {kid!r}")

    @staticmethod
    def _check(key: SetKey, algorithm: str) -> SetKey:
        if not key.verifies(algorithm):
            # Not worth a refetch: the kid is known, it is just not a key for this alg.
            raise UnknownKey(f"key {key.kid!r} ({key.alg or 'no alg'}) cannot verify {algorithm}")
        return key

    def _pick(self, kid: str | None) -> SetKey | None:
        assert self._keys is not None
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= self._interval

    async def _refresh(self) -> None:
        """Fetch the set once for everyone waiting; a failure keeps the keys already held."""
        seen = self._fetches
        async with self._lock:
            if self._fetches != seen:
                return  # another caller fetched while this one waited
            self._last_attempt = time.monotonic()
            try:
                keys = parse_key_set(await self._fetch())
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                self._last_failed = True
                # One line per outage (the dependency state), not one per failed fetch.
                self._state.failed(f"{self._url}: {type(exc).__name__}: {exc}")
                return
            finally:
                self._fetches += 1
            self._keys = keys
            self._expires = time.monotonic() + self._ttl
            self._last_failed = False
            self._state.ok()
            log.info("JWKS from %s: %d key(s)", self._url, len(keys))

    async def _fetch(self) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.get(self._url, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            if (resp.content_length or 0) > _MAX_BYTES:
                raise ValueError("key set too large")
            # read(n) returns what has arrived so far, not the whole body: read to the end.
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > _MAX_BYTES:
                    raise ValueError("key set too large")
        return json.loads(body)  # a JSONDecodeError is a ValueError: a failed fetch

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
