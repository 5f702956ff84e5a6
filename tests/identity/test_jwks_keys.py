"""JwksKeys against a real aiohttp JWKS endpoint: algorithms, caching, rotation, outages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import jwt
import pytest

from sidecar.jwks import JwksKeys, JwksUnavailable, SetKey, UnknownKey
from tests.identity.jwks_server import JwksServer, SigningKey, claims

T = TypeVar("T")

ALGORITHMS = ("RS256", "ES256", "EdDSA")


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    """One key per algorithm plus a second RSA key for rotations."""
    made = {alg: SigningKey.generate(f"{alg.lower()}-1", alg) for alg in ALGORITHMS}
    made["next"] = SigningKey.generate("rs256-2", "RS256")
    return made


@pytest.fixture(scope="module")
def module_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(module_server: JwksServer, keys: dict[str, SigningKey]) -> Iterator[JwksServer]:
    """The module's JWKS server reset to serve the three first keys; running after the test."""
    module_server.publish(*(keys[a] for a in ALGORITHMS))
    module_server.hits, module_server.status, module_server.body = 0, 200, None
    yield module_server
    if module_server._thread is None:
        module_server.start()


def run(url: str, scenario: Callable[[JwksKeys], Awaitable[T]], cache_ttl: float = 300,
        **options: Any) -> T:
    async def main() -> T:
        jwks = JwksKeys(url, cache_ttl, **options)
        try:
            return await scenario(jwks)
        finally:
            await jwks.close()
            await jwks.close()  # closing twice is harmless
    return asyncio.run(main())


def verify(token: str, key: SetKey) -> dict[str, Any]:
    return jwt.decode(token, key.key, algorithms=[jwt.get_unverified_header(token)["alg"]])


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_each_algorithm_verifies(server: JwksServer, keys: dict[str, SigningKey],
                                 alg: str) -> None:
    token = keys[alg].token(claims("alice"))
    key = run(server.url, lambda j: j.key_for(jwt.get_unverified_header(token)["kid"], alg))
    assert key.alg == alg
    assert verify(token, key)["sub"] == "alice"


def test_keys_are_cached_and_concurrent_callers_share_a_fetch(server: JwksServer) -> None:
    async def scenario(j: JwksKeys) -> None:
        await asyncio.gather(*(j.key_for(kid, alg) for kid, alg in
                               (("rs256-1", "RS256"), ("es256-1", "ES256"),
                                ("eddsa-1", "EdDSA")) * 10))
        for _ in range(20):
            await j.key_for("es256-1", "ES256")
    run(server.url, scenario)
    assert server.hits == 1


def test_rotation_without_restart(server: JwksServer, keys: dict[str, SigningKey]) -> None:
    new_token = keys["next"].token(claims("bob"))

    async def scenario(j: JwksKeys) -> None:
        await j.key_for("rs256-1", "RS256")
        server.publish(keys["next"])  # the IdP rotates: the old key is gone
        await asyncio.sleep(0.25)  # past the refetch interval
        assert verify(new_token, await j.key_for("rs256-2", "RS256"))["sub"] == "bob"
        await asyncio.sleep(0.25)
        with pytest.raises(UnknownKey):
            await j.key_for("rs256-1", "RS256")
    run(server.url, scenario, refetch_interval=0.2)
    assert server.hits == 3


def test_expired_cache_is_refreshed(server: JwksServer, keys: dict[str, SigningKey]) -> None:
    async def scenario(j: JwksKeys) -> None:
        await j.key_for("rs256-1", "RS256")
        server.publish(keys["next"])
        await asyncio.sleep(0.3)  # past the TTL: the known kid is checked against a new set
        with pytest.raises(UnknownKey):
            await j.key_for("rs256-1", "RS256")
    run(server.url, scenario, cache_ttl=0.2)
    assert server.hits == 2


def test_unknown_kid_flood_is_rate_limited(server: JwksServer) -> None:
    async def scenario(j: JwksKeys) -> int:
        await j.key_for("rs256-1", "RS256")
        refused = 0
        for i in range(50):
            try:
                await j.key_for(f"bogus-{i}", "RS256")
            except UnknownKey:
                refused += 1
        results = await asyncio.gather(*(j.key_for(f"x{i}", "RS256") for i in range(50)),
                                       return_exceptions=True)
        refused += sum(isinstance(r, UnknownKey) for r in results)
        return refused
    assert run(server.url, scenario, refetch_interval=60) == 100
    assert server.hits == 1


def test_unknown_kid_refetches_at_most_once_per_interval(server: JwksServer) -> None:
    async def scenario(j: JwksKeys) -> None:
        await j.key_for("rs256-1", "RS256")
        for _ in range(3):
            await asyncio.sleep(0.25)
            results = await asyncio.gather(*(j.key_for("bogus", "RS256") for _ in range(20)),
                                           return_exceptions=True)
            assert all(isinstance(r, UnknownKey) for r in results)
    run(server.url, scenario, refetch_interval=0.2)
    assert server.hits == 4  # the first fetch and one per interval, not one per request


def test_missing_kid_uses_the_only_key(server: JwksServer, keys: dict[str, SigningKey]) -> None:
    token = keys["EdDSA"].token(claims("carol"), kid=None)

    async def scenario(j: JwksKeys) -> SetKey:
        with pytest.raises(UnknownKey):  # three keys: which one is ambiguous
            await j.key_for(None, "EdDSA")
        server.publish(keys["EdDSA"])
        await asyncio.sleep(0.25)
        return await j.key_for(None, "EdDSA")
    assert verify(token, run(server.url, scenario, refetch_interval=0.2))["sub"] == "carol"


def test_cached_keys_are_used_while_the_endpoint_is_down(server: JwksServer,
                                                         keys: dict[str, SigningKey]) -> None:
    async def scenario(j: JwksKeys) -> None:
        await j.key_for("rs256-1", "RS256")
        server.stop()
        await asyncio.sleep(0.3)  # past TTL and interval: a refetch is tried and fails
        assert (await j.key_for("rs256-1", "RS256")).alg == "RS256"
        with pytest.raises(JwksUnavailable):  # only the IdP could say whether it exists
            await j.key_for("rs256-2", "RS256")
        server.publish(keys["next"])
        server.start()
        await asyncio.sleep(0.25)
        assert (await j.key_for("rs256-2", "RS256")).alg == "RS256"
    run(server.url, scenario, cache_ttl=0.2, refetch_interval=0.2)


def test_endpoint_down_from_the_start_is_unavailable(server: JwksServer) -> None:
    server.stop()

    async def scenario(j: JwksKeys) -> None:
        for _ in range(2):  # the second call is inside the interval: no new attempt
            with pytest.raises(JwksUnavailable):
                await j.key_for("rs256-1", "RS256")
    run(server.url, scenario, timeout=2)


@pytest.mark.parametrize("status, body", [
    (500, b'{"keys": []}'),
    (200, b"<html>not json</html>"),
    (200, b'{"keys": []}'),
    (200, b'{"no": "keys"}'),
    (200, b'[1, 2]'),
    (200, b'{"keys": [{"kty": "RSA", "kid": "broken"}, "junk", {"kty": "nope"}]}'),
    (200, b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "%%%", "kid": "bad-b64"}]}'),
    (200, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "use": "enc"}]}'),
    (200, b'{"keys": [' + b'"x",' * 400_000 + b'"x"]}'),
])
def test_bad_key_sets_are_unavailable(server: JwksServer, status: int, body: bytes) -> None:
    server.status, server.body = status, body
    with pytest.raises(JwksUnavailable):
        run(server.url, lambda j: j.key_for("rs256-1", "RS256"))


def test_unusable_keys_are_skipped(server: JwksServer, keys: dict[str, SigningKey]) -> None:
    server.keys = [{"kty": "RSA", "kid": "broken"}, keys["ES256"].jwk]
    assert run(server.url, lambda j: j.key_for("es256-1", "ES256")).alg == "ES256"


def test_a_key_without_alg_serves_every_algorithm_of_its_type(server: JwksServer) -> None:
    rsa_key = SigningKey.generate("rsa-any", "RS256", publish_alg=False)
    server.keys = [rsa_key.jwk, {"kty": "RSA", "kid": "odd", "alg": 256}]

    async def scenario(j: JwksKeys) -> None:
        for alg in ("RS256", "RS512", "PS256", "PS384"):
            key = await j.key_for("rsa-any", alg)
            assert key.alg is None
            assert verify(rsa_key.token(claims(), algorithm=alg), key)["sub"] == "alice"
        for alg in ("ES256", "EdDSA", "HS256", "XX1"):
            with pytest.raises(UnknownKey, match="cannot verify"):
                await j.key_for("rsa-any", alg)
        with pytest.raises(UnknownKey):  # a JWK whose alg is not a string is skipped
            await j.key_for("odd", "RS256")
    run(server.url, scenario, refetch_interval=60)
    assert server.hits == 1  # a known kid with the wrong alg never causes a refetch


def test_a_key_with_alg_serves_only_that_algorithm(server: JwksServer,
                                                   keys: dict[str, SigningKey]) -> None:
    async def scenario(j: JwksKeys) -> None:
        assert (await j.key_for("rs256-1", "RS256")).alg == "RS256"
        with pytest.raises(UnknownKey, match="RS256"):
            await j.key_for("rs256-1", "PS256")
    run(server.url, scenario)


def test_an_ec_key_serves_only_the_algorithm_of_its_curve(server: JwksServer) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    p384 = dict(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(),
                                   as_dict=True))
    server.keys = [{**p384, "kid": "p384"}]

    async def scenario(j: JwksKeys) -> None:
        assert (await j.key_for("p384", "ES384")).kid == "p384"
        with pytest.raises(UnknownKey):
            await j.key_for("p384", "ES256")
    run(server.url, scenario)
