"""A real OTLP/HTTP trace receiver on loopback (protobuf), run in a thread, for tests.

It decodes what the platform's exporter sends the way a collector would
(``ExportTraceServiceRequest``) and keeps each span as a plain :class:`Received`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class Received:
    service: str  # the resource's service.name: mtp-sidecar, mtp-framework...
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # '' for a root span
    attributes: dict[str, Any]
    links: tuple[str, ...]  # span ids linked to


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[Received]:
    request = ExportTraceServiceRequest.FromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                out.append(Received(
                    str(resource.get("service.name", "")), span.name, span.trace_id.hex(),
                    span.span_id.hex(), span.parent_span_id.hex(),
                    {a.key: _value(a.value) for a in span.attributes},
                    tuple(link.span_id.hex() for link in span.links)))
    return out


@dataclass
class OtlpReceiver:
    spans: list[Received] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)
    server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.paths.add(self.path)
                receiver.spans.extend(decode(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def wait(self, predicate: Any, timeout: float = 15.0) -> list[Received]:
        """The spans received, once ``predicate(spans)`` holds (AssertionError if never)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"spans never matched: {[(s.service, s.name) for s in self.spans]}")
