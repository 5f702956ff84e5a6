"""A naive aiohttp reverse proxy: the issue's reference point for the sidecar (bench only).

    python bench/naive_proxy.py LISTEN_PORT UPSTREAM   (UPSTREAM: host:port or unix:/path)

What a first version would be: the high-level app with a catch-all route, one shared
``ClientSession`` (pooled keep-alive), headers copied minus hop-by-hop, bodies read
whole. No authentication, limits, audit or signing.
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
       "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    base = "http://framework" if upstream.startswith("unix:") else f"http://{upstream}"

    async def session_ctx(app: web.Application):
        connector = (aiohttp.UnixConnector(path=upstream[5:]) if upstream.startswith("unix:")
                     else aiohttp.TCPConnector())
        app["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app["session"].close()

    async def proxy(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        async with request.app["session"].request(
                request.method, base + request.path_qs, headers=headers,
                data=body or None, allow_redirects=False) as up:
            content = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            return web.Response(status=up.status, body=content, headers=out)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
