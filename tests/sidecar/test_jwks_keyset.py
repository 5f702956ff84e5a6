"""JWKS keys through the real sidecar: which key verifies which algorithm, and removed keys.

A JWK without ``alg`` verifies every algorithm its key type can that the tenant allows
(RS256 and PS256 for RSA, ES256 for P-256, EdDSA for Ed25519); a JWK with ``alg`` only that
one. A token verified (and cached) with a key that then leaves the set is refused once the
sidecar has refreshed the set.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.identity.jwks_server import JwksServer, SigningKey, claims
from tests.sidecar.support import SIDECAR_SECRET, Stack, start_upstream

TTL = 1.0  # the sidecar's jwks_cache_ttl: a removed key is refused within it
ALLOWED = ("RS256", "PS256", "ES256", "EdDSA")


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {
        "rsa": SigningKey.generate("rsa-noalg", "RS256", publish_alg=False),
        "ec": SigningKey.generate("ec-noalg", "ES256", publish_alg=False),
        "ed": SigningKey.generate("ed-noalg", "EdDSA", publish_alg=False),
        "rs256": SigningKey.generate("rsa-rs256", "RS256"),
        "ps256": SigningKey.generate("rsa-ps256", "PS256"),
        "old": SigningKey.generate("rsa-old", "RS256"),
    }


@pytest.fixture(scope="module")
def server() -> Iterator[JwksServer]:
    jwks = JwksServer()
    jwks.start()
    yield jwks
    jwks.stop()


@pytest.fixture
def jwks(server: JwksServer, keys: dict[str, SigningKey]) -> JwksServer:
    """The endpoint serving every key of the module again."""
    server.publish(*keys.values())
    return server


@pytest.fixture(scope="module")
def stack(tmp_path_factory, server: JwksServer, keys: dict[str, SigningKey]) -> Iterator[Stack]:
    server.publish(*keys.values())
    d = tmp_path_factory.mktemp("sidecar-jwks-keyset")
    (d / "tenant.toml").write_text(
        f'[tenant]\nid = "acme"\n\n[auth.jwt]\nalgorithms = {list(ALLOWED)!r}\n'
        f'jwks_url = "{server.url}"\njwks_cache_ttl = {TTL}\nleeway = 0\n'.replace("'", '"'))
    sock = d / "up.sock"
    upstream = start_upstream(sock, d / "upstream.log")
    port = free_port()
    env = base_env(MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_TENANT_DIR=str(d),
                   MTP_UPSTREAM=f"unix:{sock}", MTP_LISTEN=f"127.0.0.1:{port}",
                   MTP_AUDIT_FILE=str(d / "audit.log"))
    sidecar = spawn([sys.executable, "-m", "framework", "sidecar"], env, log=d / "sidecar.log")
    try:
        wait_for_port(port, sidecar)
        yield Stack(port, d, d / "overlay.toml", d / "audit.log", sock)
    finally:
        stop(sidecar)
        stop(upstream)


def status(stack: Stack, token: str) -> int:
    return stack.call("GET", "/services/hello", {"Authorization": f"Bearer {token}"}).status


@pytest.mark.parametrize("key, alg", [("rsa", "RS256"), ("rsa", "PS256"), ("ec", "ES256"),
                                      ("ed", "EdDSA")])
def test_a_jwk_without_alg_verifies_each_allowed_algorithm_of_its_type(
        stack: Stack, jwks: JwksServer, keys: dict[str, SigningKey], key: str, alg: str) -> None:
    assert status(stack, keys[key].token(claims(), algorithm=alg)) == 200


def test_a_jwk_without_alg_still_needs_an_allowed_algorithm_and_its_key_type(
        stack: Stack, jwks: JwksServer, keys: dict[str, SigningKey]) -> None:
    assert status(stack, keys["rsa"].token(claims(), algorithm="RS384")) == 401  # not allowed
    # An EC signature presented under the RSA key's kid: the key type cannot verify ES256.
    assert status(stack, keys["ec"].token(claims(), kid="rsa-noalg")) == 401


def test_a_jwk_with_alg_verifies_only_that_algorithm(
        stack: Stack, jwks: JwksServer, keys: dict[str, SigningKey]) -> None:
    assert status(stack, keys["rs256"].token(claims())) == 200
    assert status(stack, keys["ps256"].token(claims())) == 200
    assert status(stack, keys["rs256"].token(claims(sub="bob"), algorithm="PS256")) == 401
    assert status(stack, keys["ps256"].token(claims(sub="bob"), algorithm="RS256")) == 401


def test_a_removed_key_takes_its_cached_tokens_with_it(
        stack: Stack, jwks: JwksServer, keys: dict[str, SigningKey]) -> None:
    old = keys["old"].token(claims(sub="carol"))
    kept = keys["rs256"].token(claims(sub="dave"))
    assert status(stack, old) == 200
    assert status(stack, old) == 200  # now served from the verified-token cache
    assert status(stack, kept) == 200
    jwks.publish(*(k for name, k in keys.items() if name != "old"))  # the IdP drops the key
    time.sleep(TTL + 0.5)  # past the sidecar's key set TTL: the next request refreshes it
    assert status(stack, old) == 401
    assert status(stack, kept) == 200  # tokens of keys still published stay valid
    jwks.publish(*keys.values())  # published again: verifies again (no stale refusal)
    time.sleep(TTL + 0.5)
    assert status(stack, old) == 200
