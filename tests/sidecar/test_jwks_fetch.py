"""JWKS fetching over a real loopback server that sends the key set in pieces."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from sidecar import jwks
from sidecar.jwks import JwksKeys
from tests.identity.jwks_server import SigningKey

KEY = SigningKey.generate("rs-1", "RS256")


def fetch_dribbled(kid: str) -> str | None:
    """Serve the key set (padded with copies) in 1000-byte pieces and ask for ``kid``."""
    # Padding keys make the document span many writes, as a large IdP key set does.
    others = [{**KEY.jwk, "kid": f"pad-{i}"} for i in range(20)]
    body = json.dumps({"keys": [*others, KEY.jwk]}).encode()

    async def dribble(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(body), 1000):
            await resp.write(body[start:start + 1000])
            await asyncio.sleep(0.01)  # each piece arrives on its own
        await resp.write_eof()
        return resp

    async def go() -> str | None:
        app = web.Application()
        app.router.add_get("/jwks.json", dribble)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        keys = JwksKeys(f"http://127.0.0.1:{port}/jwks.json", cache_ttl=60)
        try:
            found = await keys.key_for(kid, "RS256")
            return found.kid
        finally:
            await keys.close()
            await runner.cleanup()

    return asyncio.run(go())


def test_a_key_set_sent_in_pieces_is_read_whole() -> None:
    assert fetch_dribbled("rs-1") == "rs-1"


def test_a_key_set_over_the_cap_without_a_length_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(jwks, "_MAX_BYTES", 5000)
    with pytest.raises(jwks.JwksUnavailable):
        fetch_dribbled("rs-1")
