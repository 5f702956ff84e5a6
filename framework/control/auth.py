"""Operator authentication for the admin API: a platform-admin JWT or an operator API key.

JWTs are HS* signed with MTP_OPERATOR_JWT_SECRET; the accepted algorithms are
fixed here, never read from the token, and ``sub`` and ``exp`` are required.
API keys are stored only as SHA-256 hashes in MTP_OPERATOR_KEYS_FILE (TOML,
``[keys.<name>] hash = "sha256:<hex>"``). Tenant credentials never pass: a token
carrying a tenant claim is refused even when its signature checks out (a shared
secret by mistake), and tenant API keys are simply not in the operator's file.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from framework.control.errors import Forbidden, Unauthenticated
from framework.tenant_config import _read_toml, _validate

ALGORITHMS = ("HS256", "HS384", "HS512")
ROLE = "platform-admin"
TENANT_CLAIMS = ("tenant_id", "tenant")
KEYS_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["keys"],
    "properties": {"keys": {
        "type": "object",
        "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
        "additionalProperties": {
            "type": "object", "additionalProperties": False, "required": ["hash"],
            "properties": {"hash": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}},
        },
    }},
}


@dataclass(frozen=True)
class Operator:
    """Who made an admin call (the audit line names them)."""

    name: str
    method: str  # "jwt" or "api_key"


def load_operator_keys(path: str) -> dict[str, bytes]:
    """name -> SHA-256 digest from the keys file (ConfigError names file, key, reason)."""
    if not path:
        return {}
    data = _read_toml(Path(path))
    _validate(data, KEYS_SCHEMA, path)
    return {name: bytes.fromhex(k["hash"].removeprefix("sha256:"))
            for name, k in data["keys"].items()}


class OperatorAuth:
    """Checks one request's headers; raises Unauthenticated (401) or Forbidden (403)."""

    def __init__(self, jwt_secret: bytes, keys: dict[str, bytes]) -> None:
        self.secret = jwt_secret
        self.keys = keys

    def authenticate(self, headers: Any) -> Operator:
        """The operator behind ``headers`` (a multidict: repeated headers are seen)."""
        bearer = headers.getall("Authorization", [])
        api_keys = headers.getall("X-API-Key", [])
        if len(bearer) + len(api_keys) > 1:
            raise Unauthenticated("exactly one credential is accepted")
        if api_keys:
            return self._api_key(api_keys[0])
        if not bearer:
            raise Unauthenticated()
        scheme, _, token = bearer[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("an operator bearer token or API key is required")
        return self._jwt(token.strip())

    def _api_key(self, key: str) -> Operator:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = ""
        for name, want in self.keys.items():  # compare all: no early exit to time
            if hmac.compare_digest(digest, want):
                found = name
        if not found:
            raise Unauthenticated("unknown operator API key")
        return Operator(found, "api_key")

    def _jwt(self, token: str) -> Operator:
        if not self.secret:
            raise Unauthenticated("operator tokens are not enabled")
        try:
            claims = jwt.decode(token, self.secret, algorithms=list(ALGORITHMS),
                                options={"require": ["sub", "exp"],
                                         "verify_aud": False})
        except jwt.PyJWTError:
            raise Unauthenticated("invalid operator token") from None
        if any(c in claims for c in TENANT_CLAIMS):
            raise Forbidden("a tenant's credential is never an operator's", kind="not-operator")
        roles = claims.get("roles", [])
        if isinstance(roles, str):
            roles = roles.split(",")
        if not isinstance(roles, list) or ROLE not in roles:
            raise Forbidden(f"role {ROLE} is required", kind="not-operator")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > 200:
            raise Unauthenticated("invalid operator token")
        return Operator(sub, "jwt")


def load_auth(jwt_secret: bytes, keys_file: str) -> OperatorAuth:
    """The checker; a keys file that fails its check stops the start (ConfigError)."""
    return OperatorAuth(jwt_secret, load_operator_keys(keys_file))
