"""JWT verification: every way a token can be wrong is refused, and the cache is never laxer."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from types import SimpleNamespace

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from framework.jwt_keys import load_public_key
from framework.tenant_config import JwtSettings, TenantConfig
from sidecar.principal import JWT
from sidecar.tokens import TokenInvalid, TokenVerifier

SECRET = "s3cret-for-tests-" + "0123456789abcdef" * 3
HS = JwtSettings(algorithms=("HS256",), leeway=0)


def claims(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"sub": "alice", "tenant_id": "acme", "exp": int(time.time()) + 60,
                               "groups": ["sales"], "roles": ["admin"]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def verify(verifier: TokenVerifier, token: str):
    return asyncio.run(verifier.verify(token))


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_pem(rsa_key) -> bytes:
    return rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def test_valid_hs256_token_gives_its_principal() -> None:
    p = verify(TokenVerifier(HS, secret=SECRET), jwt.encode(claims(), SECRET, "HS256"))
    assert (p.tenant, p.user, p.groups, p.roles, p.auth_method) == (
        "acme", "alice", ("sales",), ("admin",), JWT)


# Claims are built when the test runs, not at collection: a token made at collection
# time may have expired by the time a long suite reaches it.
@pytest.mark.parametrize("overrides, why", [
    (lambda: {"exp": int(time.time()) - 5}, "ExpiredSignatureError"),
    (lambda: {"nbf": int(time.time()) + 300}, "ImmatureSignatureError"),
    (lambda: {"sub": None}, "MissingRequiredClaimError"),
    (lambda: {"exp": None}, "MissingRequiredClaimError"),
    (lambda: {"tenant_id": None}, "tenant_id"),
    (lambda: {"roles": [1]}, "roles"),
    (lambda: {"sub": "bad\nuser"}, "control character"),
    (lambda: {"sub": " alice"}, "whitespace"),
    (lambda: {"sub": "a,b"}, "comma"),
])
def test_bad_claims_are_refused(overrides, why: str) -> None:
    token = jwt.encode(claims(**overrides()), SECRET, "HS256")
    with pytest.raises(TokenInvalid, match=why):
        verify(TokenVerifier(HS, secret=SECRET), token)


def test_wrong_signature_is_refused() -> None:
    with pytest.raises(TokenInvalid, match="InvalidSignatureError"):
        verify(TokenVerifier(HS, secret=SECRET), jwt.encode(claims(), "another-secret-value-" * 4,
                                                            "HS256"))


def test_alg_none_is_refused() -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(TokenInvalid, match="InvalidAlgorithmError"):
        verify(TokenVerifier(HS, secret=SECRET), token)


def test_algorithm_outside_the_config_is_refused() -> None:
    token = jwt.encode(claims(), SECRET, "HS512")
    with pytest.raises(TokenInvalid, match="InvalidAlgorithmError"):
        verify(TokenVerifier(HS, secret=SECRET), token)


def test_garbage_is_refused() -> None:
    with pytest.raises(TokenInvalid, match="DecodeError"):
        verify(TokenVerifier(HS, secret=SECRET), "not.a.token")


def _forge_hs256(payload: dict, key: bytes) -> str:
    """An HS256 token MACed with ``key`` (PyJWT refuses to do this with a PEM, on purpose)."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_hs_rs_confusion_public_pem_as_hmac_secret_is_refused(rsa_key, rsa_pem,
                                                             tmp_path: Path) -> None:
    pem_file = tmp_path / "pub.pem"
    pem_file.write_bytes(rsa_pem)
    rs = JwtSettings(algorithms=("RS256",), public_key_file=str(pem_file), leeway=0)
    verifier = TokenVerifier(rs, public_key=load_public_key(TenantConfig(tenant_id="a", jwt=rs)))
    assert verify(verifier, jwt.encode(claims(), rsa_key, "RS256")).user == "alice"
    forged = _forge_hs256(claims(), rsa_pem)
    with pytest.raises(TokenInvalid, match="InvalidAlgorithmError"):
        verify(verifier, forged)
    # And an HS256 tenant whose secret happened to be that PEM still refuses it as a key.
    pem_secret = TokenVerifier(HS, secret=rsa_pem.decode())
    with pytest.raises(TokenInvalid):
        verify(pem_secret, forged)


def test_issuer_and_audience_are_checked_when_set() -> None:
    cfg = JwtSettings(algorithms=("HS256",), issuer="https://idp", audience="mtp", leeway=0)
    v = TokenVerifier(cfg, secret=SECRET)
    good = claims(iss="https://idp", aud="mtp")
    assert verify(v, jwt.encode(good, SECRET, "HS256")).user == "alice"
    with pytest.raises(TokenInvalid, match="InvalidIssuerError"):
        verify(v, jwt.encode({**good, "iss": "https://evil"}, SECRET, "HS256"))
    with pytest.raises(TokenInvalid, match="InvalidAudienceError"):
        verify(v, jwt.encode({**good, "aud": "other"}, SECRET, "HS256"))
    with pytest.raises(TokenInvalid, match="MissingRequiredClaimError"):
        verify(v, jwt.encode(claims(aud="mtp"), SECRET, "HS256"))


def test_custom_tenant_claim() -> None:
    cfg = JwtSettings(algorithms=("HS256",), tenant_claim="org", leeway=0)
    token = jwt.encode(claims(tenant_id=None, org="acme"), SECRET, "HS256")
    assert verify(TokenVerifier(cfg, secret=SECRET), token).tenant == "acme"


def test_cache_hit_still_checks_expiry() -> None:
    now = [1000.0]
    v = TokenVerifier(HS, secret=SECRET, clock=lambda: now[0])
    token = jwt.encode(claims(exp=int(time.time()) + 2), SECRET, "HS256")
    first = verify(v, token)
    assert verify(v, token) is first  # served from the cache
    import hashlib
    digest = hashlib.sha256(token.encode()).digest()
    expires = v._cache[digest].expires
    # Pretend the clock moved past exp: the cached entry must not be honoured.
    now[0] = expires + 1
    assert v.cached(digest) is None
    with pytest.raises(TokenInvalid, match="Expired"):
        verify(v, jwt.encode(claims(exp=int(time.time()) - 1), SECRET, "HS256"))


class _Keys:
    """A key source like sidecar/jwks.py's, for the JWKS code path."""

    def __init__(self, key) -> None:
        self.kids: list = []
        self.closed = False
        self.publish(key)

    def publish(self, key, fingerprint: bytes = b"one") -> None:
        """What the set holds now: ``None`` is a removed key."""
        self.current = None if key is None else SimpleNamespace(key=key, fingerprint=fingerprint)

    async def key_for(self, kid, algorithm):
        self.kids.append((kid, algorithm))
        if self.current is None:
            raise LookupError(f"no key {kid}")
        return self.current

    async def close(self) -> None:
        self.closed = True


def test_key_source_is_asked_by_kid_and_alg(rsa_key) -> None:
    keys = _Keys(rsa_key.public_key())
    cfg = JwtSettings(algorithms=("RS256", "PS256"), jwks_url="http://idp/jwks", leeway=0)
    v = TokenVerifier(cfg, keys=keys)
    token = jwt.encode(claims(), rsa_key, "PS256", headers={"kid": "k1"})
    assert verify(v, token).user == "alice"
    assert keys.kids == [("k1", "PS256")]
    with pytest.raises(TokenInvalid, match="DecodeError"):
        verify(v, "garbage")
    asyncio.run(v.close())
    assert keys.closed


def test_an_alg_the_tenant_does_not_allow_never_reaches_the_key_source(rsa_key) -> None:
    keys = _Keys(rsa_key.public_key())
    v = TokenVerifier(JwtSettings(algorithms=("RS256",), jwks_url="http://idp", leeway=0),
                      keys=keys)
    for alg in ("PS256", "none"):
        token = jwt.encode(claims(), rsa_key if alg != "none" else None, alg)
        with pytest.raises(TokenInvalid, match="InvalidAlgorithmError"):
            verify(v, token)
    assert keys.kids == []


def test_a_cached_token_is_only_as_good_as_its_key(rsa_key) -> None:
    keys = _Keys(rsa_key.public_key())
    v = TokenVerifier(JwtSettings(algorithms=("RS256",), jwks_url="http://idp", leeway=0),
                      keys=keys)
    token = jwt.encode(claims(), rsa_key, "RS256", headers={"kid": "k1"})
    first = verify(v, token)
    assert verify(v, token) is first  # a hit: the key is still the one that verified it
    # The same kid now names another key: the hit does not count, the token is checked
    # again (and still verifies: only the published form changed).
    keys.publish(rsa_key.public_key(), b"two")
    again = verify(v, token)
    assert again == first and again is not first
    keys.publish(None)  # the key left the set: the cached token goes with it
    with pytest.raises(LookupError):
        verify(v, token)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys.publish(other.public_key(), b"three")  # rotated under the same kid
    with pytest.raises(TokenInvalid, match="InvalidSignatureError"):
        verify(v, token)
