"""Stage 1: who is calling. JWT bearer, API key or (when enabled) LDAP Basic.

Every failure is :class:`Unauthenticated` with one generic client message; the
specific reason is only for the audit line. Two ``Authorization`` or two
``X-API-Key`` headers are ambiguous (401): no reader may pick one of them. A
directory or JWKS endpoint that cannot be reached is :class:`Unavailable` (503):
fail closed.
"""

from __future__ import annotations

import base64
import unicodedata
from typing import Any

from multidict import MultiMapping

from sidecar.apikeys import ApiKeys
from sidecar.errors import Unauthenticated, Unavailable
from sidecar.principal import API_KEY, LDAP, BadIdentity, Principal
from sidecar.tokens import TokenInvalid, TokenVerifier

BEARER_CHALLENGE = 'Bearer realm="mtp"'
BASIC_CHALLENGE = 'Basic realm="mtp", charset="UTF-8"'
KNOWN_SCHEMES = frozenset({"basic", "bearer", "digest", "negotiate", "ntlm", "hoba", "mutual",
                           "token", "apikey", "aws4-hmac-sha256"})


class Authenticator:
    """Turns a request's credentials into a :class:`Principal`."""

    def __init__(self, tenant_id: str, tokens: TokenVerifier, keys: ApiKeys,
                 directory: Any = None, unavailable: tuple[type[Exception], ...] = (),
                 unknown_key: tuple[type[Exception], ...] = ()) -> None:
        self.tenant_id = tenant_id
        self.tokens = tokens
        self.keys = keys
        self.directory = directory
        # Exception types of the optional identity modules, imported only when configured.
        self._unavailable = unavailable
        self._unknown_key = unknown_key
        self.challenge = BEARER_CHALLENGE + (", " + BASIC_CHALLENGE if directory else "")

    def fail(self, reason: str) -> Unauthenticated:
        """The one 401 every failure becomes."""
        return Unauthenticated(reason, self.challenge)

    def _one(self, headers: MultiMapping[str], name: str) -> str | None:
        """The one value of a credential header; two of them are ambiguous (401)."""
        values = headers.getall(name, ())
        if len(values) > 1:
            # "The first wins" would let whatever else reads the request pick another.
            raise self.fail(f"{len(values)} {name} headers")
        return values[0] if values else None

    async def authenticate(self, headers: MultiMapping[str]) -> Principal:
        """The caller's principal, or Unauthenticated / Unavailable."""
        authorization = self._one(headers, "Authorization")
        api_key = self._one(headers, "X-API-Key")
        try:
            if authorization is not None and api_key is not None:
                raise self.fail("both Authorization and X-API-Key sent")
            if authorization is not None:
                scheme, _, credential = authorization.strip().partition(" ")
                scheme, credential = scheme.lower(), credential.strip()
                if scheme == "bearer" and credential:
                    principal = await self._bearer(credential)
                elif scheme == "basic" and self.directory is not None:
                    return await self._basic(credential)
                else:
                    # Name the scheme only when it is a known one: a client that sends a
                    # bare key or token has its secret where the scheme would be.
                    shown = repr(scheme) if scheme in KNOWN_SCHEMES else "(unrecognised)"
                    raise self.fail(f"unsupported Authorization scheme {shown}")
            elif api_key is not None:
                principal = self._api_key(api_key)
            else:
                raise self.fail("no credentials")
            if self.directory is not None:
                extra = await self.directory.groups_for(principal.user)
                if extra:
                    principal = principal.with_groups(extra)
            return principal
        except BadIdentity as exc:
            raise self.fail(f"identity: {exc}") from None
        except self._unavailable as exc:
            raise Unavailable(f"identity provider unavailable: {type(exc).__name__}") from None

    async def _bearer(self, token: str) -> Principal:
        try:
            return await self.tokens.verify(token)
        except TokenInvalid as exc:
            raise self.fail(str(exc)) from None
        except self._unknown_key:
            raise self.fail("jwt: unknown signing key") from None

    def _api_key(self, presented: str) -> Principal:
        found = self.keys.lookup(presented)
        if found is None:
            raise self.fail("unknown API key")
        return Principal.build(self.tenant_id, found.name, found.groups, found.roles, API_KEY)

    async def _basic(self, credential: str) -> Principal:
        try:
            decoded = base64.b64decode(credential, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):  # binascii.Error, or non-ASCII input
            raise self.fail("malformed Basic credentials") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username or not password:
            raise self.fail("Basic credentials without username or password")
        if _has_control(password):
            # No directory could accept it (ldap3 refuses it before sending a bind): the
            # client's mistake, 401, never the 503 of a directory that seems down.
            raise self.fail("Basic password with a control character")
        # A user id the identity headers could not carry is refused before any bind
        # (BadIdentity becomes the generic 401 in authenticate()).
        user = Principal.build(self.tenant_id, username, (), (), LDAP)
        try:
            found = await self.directory.login(username, password)
        except self._unavailable as exc:
            raise Unavailable(f"directory unavailable: {type(exc).__name__}") from None
        if found is None:
            raise self.fail("LDAP login refused")
        _dn, groups = found
        return user.with_groups(groups)


def _has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (Unicode category Cc)."""
    return not text.isprintable() and any(unicodedata.category(c) == "Cc" for c in text)
