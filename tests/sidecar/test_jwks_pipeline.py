"""JWKS through the real sidecar: RS256 tokens verified with keys fetched from a live endpoint."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.identity.jwks_server import JwksServer, SigningKey, claims
from tests.sidecar.support import SIDECAR_SECRET, Stack, start_upstream


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("rs-1", "RS256")


@pytest.fixture(scope="module")
def jwks(key: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer()
    server.publish(key)
    server.start()
    try:
        yield server
    finally:
        if server._thread is not None:
            server.stop()


@pytest.fixture(scope="module")
def jwks_stack(tmp_path_factory, jwks: JwksServer) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("sidecar-jwks")
    (d / "tenant.toml").write_text(
        f'[tenant]\nid = "acme"\n\n[auth.jwt]\nalgorithms = ["RS256"]\n'
        f'jwks_url = "{jwks.url}"\njwks_cache_ttl = 300\n')
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


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def test_rs256_token_from_jwks_is_accepted(jwks_stack: Stack, key: SigningKey) -> None:
    r = jwks_stack.call("GET", "/services/hello", bearer(key.token(claims())))
    assert r.status == 200
    assert dict((k.lower(), v) for k, v in r.json()["headers"])["x-user-id"] == "alice"


def test_unknown_kid_and_foreign_key_are_401(jwks_stack: Stack, key: SigningKey) -> None:
    assert jwks_stack.call("GET", "/services/hello",
                           bearer(key.token(claims(), kid="nope"))).status == 401
    stranger = SigningKey.generate("rs-1", "RS256")  # same kid, other key: bad signature
    assert jwks_stack.call("GET", "/services/hello",
                           bearer(stranger.token(claims()))).status == 401


def test_jwks_endpoint_down_is_503_for_keys_not_cached(jwks_stack: Stack, jwks: JwksServer,
                                                       key: SigningKey) -> None:
    jwks.stop()
    try:
        r = jwks_stack.call("GET", "/services/hello", bearer(key.token(claims(), kid="rs-2")))
        assert r.status in (401, 503)
        # A token whose key is cached keeps working during the outage.
        assert jwks_stack.call("GET", "/services/hello",
                               bearer(key.token(claims(sub="bob")))).status == 200
    finally:
        jwks.start()
