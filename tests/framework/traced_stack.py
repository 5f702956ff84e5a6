"""The sidecar and the framework in this process, over real loopback sockets, for traces.

The sidecar serves on its own event loop thread (sidecar/front.py, as `mtp sidecar`
does); the framework is the real Flask app (hooks, operations, SQLite jobs on their
threads) behind werkzeug's threaded server. Every span of both goes to one in-memory
exporter, so a test reads the whole chain; the trace context still crosses from one
to the other only as the HTTP headers the sidecar sends.
"""

from __future__ import annotations

import asyncio
import io
import json
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from werkzeug.serving import make_server

from framework import logs, tracing
from framework.app import create_app as create_framework
from framework.settings import Settings
from sidecar.front import serve
from sidecar.startup import create_app as create_sidecar
from tests.helpers import free_port, wait_for_port
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, Reply, call, token

TENANT_TOML = """
[tenant]
id = "acme"

[auth.jwt]
algorithms = ["HS256"]
leeway = 0

[services.front]
[services.inner]
[services.boom]
[services.emitter]

[[events.routes]]
types = ["order.*"]
service = "inner"
"""

SERVICES = {
    "front": '''
        """Logs, calls inner, and shows the identity it was given."""

        def handle(context):
            context.logger.info("front called")
            inner = context.call("inner", {"n": 1})
            return {"inner": inner, "tenant_id": context.tenant_id, "user": context.user,
                    "groups": list(context.groups), "roles": list(context.roles),
                    "auth_method": context.auth_method, "request_id": context.request_id}
    ''',
    "boom": '''
        """Fails."""

        def handle(context):
            raise RuntimeError("boom")
    ''',
    "emitter": '''
        """Publishes an event that the route above delivers to inner."""

        def handle(context):
            return {"id": context.emit("order.created", {"n": 1}, subject="eu/1")}
    ''',
    "inner": '''
        """Logs and answers."""

        def handle(context):
            context.logger.info("inner called")
            return {"ok": True}
    ''',
}


def make_tenant(root: Path) -> Path:
    (root / "services").mkdir(parents=True, exist_ok=True)
    (root / "tenant.toml").write_text(TENANT_TOML)
    for name, body in SERVICES.items():
        (root / "services" / f"{name}.py").write_text(textwrap.dedent(body).lstrip())
    return root


@dataclass
class Stack:
    port: int  # the sidecar's
    framework_port: int
    exporter: InMemorySpanExporter | None
    log: io.StringIO

    def call(self, method: str, path: str, headers: dict[str, str] | list | None = None,
             body: Any = None) -> Reply:
        data = json.dumps(body).encode() if body is not None else None
        return call(self.port, method, path, headers, data)

    def spans(self, count: int, timeout: float = 5.0) -> list[Any]:
        """The finished spans, once there are at least ``count``."""
        assert self.exporter is not None
        deadline = time.monotonic() + timeout
        while len(self.exporter.get_finished_spans()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.exporter.get_finished_spans())

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line]


def auth(**extra: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(**extra)}", "Content-Type": "application/json"}


@contextmanager
def traced_stack(tmp: Path, traced: bool = True) -> Iterator[Stack]:
    """Sidecar + framework for the tenant above; ``traced``: spans to an in-memory exporter."""
    exporter = InMemorySpanExporter() if traced else None
    if traced:
        # One provider for both "processes": the sidecar's (edge) sampling.
        tracing.setup({}, "mtp-test", "acme", exporter=exporter, edge=True)
    root = make_tenant(tmp / "tenant")
    fport, sport = free_port(), free_port()
    fsettings = Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET,
                                   "MTP_DATA_DIR": str(tmp / "data"),
                                   "MTP_TENANT_DIR": str(root)})
    app = create_framework(fsettings, fsettings.load_tenant(), background=False)
    app.extensions["mtp.events"].dispatcher.start()  # deliveries, without the reaper
    log = io.StringIO()
    logs.setup("INFO", "acme", stream=log)
    server = make_server("127.0.0.1", fport, app, threaded=True)
    fthread = threading.Thread(target=server.serve_forever, daemon=True)
    fthread.start()
    ssettings = Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET,
                                   "MTP_JWT_SECRET": JWT_SECRET, "MTP_TENANT_DIR": str(root),
                                   "MTP_UPSTREAM": f"127.0.0.1:{fport}"})
    sidecar_app = create_sidecar(ssettings, ssettings.load_tenant())
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def run_sidecar() -> None:
        async with sidecar_app.started() as sidecar:
            await serve(sidecar.handle, shutdown_timeout=1, host="127.0.0.1", port=sport,
                        stop=stop)

    sthread = threading.Thread(target=loop.run_until_complete, args=(run_sidecar(),),
                               daemon=True)
    sthread.start()
    try:
        wait_for_port(sport)
        yield Stack(sport, fport, exporter, log)
    finally:
        loop.call_soon_threadsafe(stop.set)
        sthread.join(10)
        loop.close()
        server.shutdown()
        fthread.join(10)
        app.extensions["mtp.events"].close()
        app.extensions["mtp.operations"].close()
        app.extensions["mtp"].close()
        logs.setup("INFO", "acme")  # back to stderr: the StringIO goes with this stack
        if traced:
            tracing.shutdown()
