"""What tracing costs per request, off and on: the sidecar's handler and the framework's app.

    .venv/bin/python bench/tracing_cost.py [requests, default 5000]

In one process, CPU time (``time.process_time``), best of 5 runs of ``requests`` calls:

- ``Sidecar.handle`` with the upstream stubbed (as bench/sidecar_micro.py: HS256 JWT
  from the token cache, limits, strip/inject/sign, audit to a file, metrics);
- the framework's Flask app through its WSGI interface (werkzeug's test client: signature
  check, hooks, a sync call of a service that returns at once).

Off is the default (no OTEL_* set): the request path tests one flag. On is the SDK's
tracer provider and the W3C propagator, each span handed as it ends to an exporter that
drops it (an operator's OTLP exporter gets batches on a thread of its own, off the
request path; its network cost is not counted here). The first rows also say

"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework import signing, tracing
from framework.settings import Settings
from framework.tenant_config import parse_tenant

SIDECAR_SECRET = "bench-sidecar-secret-" + "x" * 32
JWT_SECRET = "bench-jwt-secret-" + "y" * 48
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Dropped:
    """A span exporter that drops what it is given (the SDK's work, not the network's)."""

    def export(self, spans: object) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


def tracing_on() -> None:
    """On: the SDK's provider, the W3C propagator, every span to an exporter that drops it."""
    tracing.setup({}, "bench", "bench", exporter=Dropped())


def best(n: int, fn: Callable[[], None]) -> float:
    """µs of CPU per call of ``fn``, best of 5 runs of ``n`` calls."""
    times = []
    for _ in range(5):
        t = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - t) / n * 1e6)
    return min(times)


def sidecar_rows(n: int, tmp: Path, traced: bool) -> list[tuple[str, float]]:
    import uvloop
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.http import HttpRequestParser

    from sidecar.front import Front, Request
    from sidecar.proxy import UpstreamReply
    from sidecar.startup import create_app

    reply = UpstreamReply(200, [("Content-Type", "application/json")], b'{"ok":true}')
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET,
                                  "MTP_JWT_SECRET": JWT_SECRET, "MTP_UPSTREAM": "unix:/x",
                                  "MTP_AUDIT_FILE": str(tmp / "audit.log")})
    tenant = parse_tenant({"tenant": {"id": "bench"}, "auth": {"jwt": {"algorithms": ["HS256"]}},
                           "limits": {"rate": 1e9, "burst": 1_000_000_000}})
    token = jwt.encode({"sub": "alice", "tenant_id": "bench", "exp": int(time.time()) + 3600},
                       JWT_SECRET, "HS256")
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    rows = []
    for label, extra in (("", ""), (" + client traceparent", f"traceparent: {TRACEPARENT}\r\n")):
        raw = (f"GET /services/hello HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n{extra}"
               f"Authorization: Bearer {token}\r\n\r\n").encode()
        parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16, auto_decompress=False)
        (message, payload), = parser.feed_data(raw)[0]

        async def stub_send(*_args: object, **_kw: object) -> UpstreamReply:
            return reply

        context = create_app(settings, tenant).started()
        sidecar = loop.run_until_complete(context.__aenter__())
        sidecar.upstream.send = stub_send  # type: ignore[method-assign]
        conn = Front(sidecar.handle, loop)()

        async def many(k: int) -> None:
            for _ in range(k):
                await sidecar.handle(Request(message, payload, conn))  # noqa: B023

        def run(k: int = n) -> None:
            loop.run_until_complete(many(k))

        state = "on" if traced else "off"
        rows.append((f"sidecar, Sidecar.handle{label}, tracing {state}", best(1, run) / n))
        loop.run_until_complete(context.__aexit__(None, None, None))
    loop.close()
    return rows


def framework_rows(n: int, tmp: Path, traced: bool) -> list[tuple[str, float]]:
    from framework.app import create_app

    root = tmp / f"tenant-{traced}"
    (root / "services").mkdir(parents=True)
    (root / "tenant.toml").write_text('[tenant]\nid = "bench"\n\n[services.hello]\n')
    (root / "services" / "hello.py").write_text(
        '"""Hello."""\n\n\ndef handle(context):\n    return {"hello": context.user}\n')
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET,
                                  "MTP_DATA_DIR": str(tmp / f"data-{traced}"),
                                  "MTP_TENANT_DIR": str(root), "MTP_LOG_LEVEL": "WARNING"})
    app = create_app(settings, settings.load_tenant(), background=False)
    client = app.test_client()
    who = {signing.REQUEST_ID: "bench", signing.TENANT: "bench", signing.USER: "alice",
           signing.GROUPS: "", signing.ROLES: "", signing.AUTH_METHOD: "jwt"}
    body = json.dumps({}).encode()
    rows = []
    for label, extra in (("", {}), (" + traceparent", {"traceparent": TRACEPARENT})):
        def call(extra: dict[str, str] = extra) -> None:
            headers = {**who, **signing.sign(SIDECAR_SECRET.encode(), "POST",
                                             "/services/hello", who, body=body), **extra}
            answer = client.post("/services/hello", data=body, headers=headers,
                                 content_type="application/json")
            assert answer.status_code == 200, answer.data

        state = "on" if traced else "off"
        rows.append((f"framework, WSGI app{label}, tracing {state}", best(n, call)))
    app.extensions["mtp.operations"].close()
    app.extensions["mtp"].close()
    return rows


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    tmp = Path(tempfile.mkdtemp(prefix="mtp-tracing-cost-"))
    print(f"{n} requests each, best of 5, CPU µs per request (load average "
          f"{os.getloadavg()[0]:.2f})")
    print("| what | µs |")
    print("|---|---|")
    # Off first, before this process has set anything up.
    for name, us in sidecar_rows(n, tmp, False) + framework_rows(n, tmp, False):
        print(f"| {name} | {us:.1f} |")
    tracing_on()
    for name, us in sidecar_rows(n, tmp, True) + framework_rows(n, tmp, True):
        print(f"| {name} | {us:.1f} |")
    tracing.shutdown()


if __name__ == "__main__":
    main()
