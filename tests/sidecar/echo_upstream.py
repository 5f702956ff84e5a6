"""A stand-in framework for sidecar tests: verifies the sidecar's signature and echoes.

Run as ``python -m tests.sidecar.echo_upstream unix:/path`` with MTP_SIDECAR_SECRET set.
Unsigned or forged requests, or a body other than the signed one, get 401.
``/echo...`` and ``/services/...`` answer the headers and body they received as JSON;
``/slow`` sleeps ``?s=`` seconds; ``/big`` answers ``?n=`` bytes (chunked with
``?chunked=1``); ``/metrics`` a line of text.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web

from framework import signing


async def handle(request: web.Request) -> web.StreamResponse:
    secret = os.environ["MTP_SIDECAR_SECRET"].encode()
    body = await request.read()
    if not signing.verify(secret, request.method, request.raw_path, request.headers,
                          body=body):
        return web.json_response({"error": "unsigned"}, status=401)
    if request.path == "/slow":
        await asyncio.sleep(float(request.query.get("s", "1")))
    if request.path == "/big":
        size = int(request.query["n"])
        if request.query.get("chunked"):
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b"x" * size)
            await resp.write_eof()
            return resp
        return web.Response(body=b"x" * size)
    if request.path == "/metrics":
        return web.Response(text="framework_up 1\n")
    if request.path == "/fail":
        return web.json_response({"error": "boom"}, status=503)
    return web.json_response(
        {"path": request.raw_path, "method": request.method,
         "headers": [[k, v] for k, v in request.headers.items()],
         "body": body.decode("utf-8", "replace")},
        headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-Upstream": "echo"})


def main() -> None:
    where = sys.argv[1]
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    if where.startswith("unix:"):
        web.run_app(app, path=where[5:], print=None, access_log=None)
    else:
        host, port = where.rsplit(":", 1)
        web.run_app(app, host=host, port=int(port), print=None, access_log=None)


if __name__ == "__main__":
    main()
