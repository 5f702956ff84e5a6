"""Traces across every boundary: client -> sidecar -> framework -> context.call -> job.

Both the sidecar and the framework run in this process (tests/framework/traced_stack.py)
and talk HTTP over loopback: the framework's span continues the sidecar's only through
the traceparent header the sidecar sends, exactly as between two processes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from framework import tracing
from tests.framework.traced_stack import Stack, auth, traced_stack

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with traced_stack(tmp_path_factory.mktemp("traced")) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(stack: Stack) -> None:
    assert stack.exporter is not None
    stack.exporter.clear()


def hexid(value: int, digits: int) -> str:
    return format(value, f"0{digits}x")


def one(spans: list[Any], prefix: str) -> Any:
    found = [s for s in spans if s.name.startswith(prefix)]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def test_sync_call_chain_sidecar_framework_context_call(stack: Stack) -> None:
    reply = stack.call("POST", "/services/front", {**auth(), "traceparent": TRACEPARENT,
                                                   "tracestate": "vendor=abc"}, {})
    assert reply.status == 200, reply.body
    spans = stack.spans(3)
    sidecar = one(spans, "sidecar POST /services/front")
    framework = one(spans, "framework POST /services/front")
    nested = one(spans, "context.call inner")
    # One trace, the client's, and each span the child of the one before.
    assert {hexid(s.context.trace_id, 32) for s in spans} == {TRACE_ID}
    assert hexid(sidecar.parent.span_id, 16) == CLIENT_SPAN and sidecar.parent.is_remote
    assert framework.parent.span_id == sidecar.context.span_id and framework.parent.is_remote
    assert nested.parent.span_id == framework.context.span_id
    assert sidecar.kind == framework.kind == SpanKind.SERVER
    # The client's tracestate travels on (W3C), through the sidecar's span to the framework.
    assert framework.context.trace_state.get("vendor") == "abc"
    assert dict(sidecar.attributes) == {
        "http.request.method": "POST", "url.path": "/services/front",
        "mtp.request_id": reply.headers["X-Request-ID"], "mtp.tenant": "acme",
        "mtp.service": "front", "mtp.operation": "", "mtp.auth_method": "jwt",
        "mtp.decision": "allowed", "http.response.status_code": 200}
    assert framework.attributes["mtp.service"] == "front"
    assert framework.attributes["mtp.auth_method"] == "jwt"
    assert framework.attributes["mtp.request_id"] == reply.headers["X-Request-ID"]
    assert framework.attributes["http.response.status_code"] == 200
    assert nested.attributes["mtp.caller"] == "front"
    assert nested.attributes["mtp.status"] == 200
    assert sidecar.resource.attributes["mtp.tenant"] == "acme"
    # context.logger lines carry the trace id (the handler's and the nested one's).
    lines = {line["msg"]: line for line in stack.log_lines()
             if line["msg"] in ("front called", "inner called")
             and line["request_id"] == reply.headers["X-Request-ID"]}
    assert lines["front called"]["trace_id"] == TRACE_ID
    assert lines["inner called"]["trace_id"] == TRACE_ID


def test_without_client_context_the_sidecar_starts_the_trace(stack: Stack) -> None:
    reply = stack.call("POST", "/services/front", auth(), {})
    assert reply.status == 200
    spans = stack.spans(3)
    sidecar = one(spans, "sidecar POST")
    framework = one(spans, "framework POST")
    assert sidecar.parent is None
    assert framework.parent.span_id == sidecar.context.span_id
    assert framework.context.trace_id == sidecar.context.trace_id


def test_job_span_links_to_the_request_that_queued_it(stack: Stack) -> None:
    reply = stack.call("POST", "/services/front",
                       {**auth(), "traceparent": TRACEPARENT,
                        "Prefer": "respond-async, wait=10"}, {})
    assert reply.status == 200, reply.body
    spans = stack.spans(4)
    framework = one(spans, "framework POST /services/front")
    job = one(spans, "job front")
    nested = one(spans, "context.call inner")
    # The job is a trace of its own, linked to the request's span in the framework.
    assert hexid(framework.context.trace_id, 32) == TRACE_ID
    assert job.context.trace_id != framework.context.trace_id and job.parent is None
    assert [link.context.span_id for link in job.links] == [framework.context.span_id]
    assert job.links[0].context.trace_id == framework.context.trace_id
    assert job.kind == SpanKind.CONSUMER
    assert job.attributes["mtp.service"] == "front"
    assert job.attributes["mtp.auth_method"] == "jwt"
    assert job.attributes["mtp.status"] == 200
    # context.call inside the job is the job span's child; its log lines carry its trace.
    assert nested.parent.span_id == job.context.span_id
    job_trace = hexid(job.context.trace_id, 32)
    lines = [line for line in stack.log_lines() if line["msg"] == "inner called"
             and line["request_id"] == reply.headers["X-Request-ID"]]
    assert [line["trace_id"] for line in lines] == [job_trace]


def test_event_delivery_span_links_to_the_span_that_emitted_it(stack: Stack) -> None:
    reply = stack.call("POST", "/services/emitter", {**auth(), "traceparent": TRACEPARENT}, {})
    assert reply.status == 200, reply.body
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not [
            s for s in stack.spans(0) if s.name == "mtp.event.deliver"]:
        time.sleep(0.05)
    spans = stack.spans(0)
    emitted = one(spans, "framework POST /services/emitter")
    delivery = one(spans, "mtp.event.deliver")
    # A delivery is a trace of its own (it may run much later), linked to the emitter's span.
    assert hexid(emitted.context.trace_id, 32) == TRACE_ID
    assert delivery.parent is None and delivery.context.trace_id != emitted.context.trace_id
    assert [link.context.span_id for link in delivery.links] == [emitted.context.span_id]
    assert delivery.attributes["mtp.service"] == "inner"
    assert delivery.attributes["mtp.event.type"] == "order.created"


def test_refused_request_has_a_span_with_the_decision(stack: Stack) -> None:
    reply = stack.call("POST", "/services/front", {"Authorization": "Bearer nope",
                                                   "traceparent": TRACEPARENT}, {})
    assert reply.status == 401
    sidecar = one(stack.spans(1), "sidecar POST")
    assert sidecar.attributes["mtp.decision"] == "unauthenticated"  # the audit outcome
    assert sidecar.attributes["mtp.service"] == ""
    assert sidecar.attributes["http.response.status_code"] == 401
    assert sidecar.status.status_code == StatusCode.UNSET  # a client's error is not ours
    assert not [s for s in stack.spans(1) if s.name.startswith("framework")]


def test_server_error_marks_the_spans(stack: Stack) -> None:
    reply = stack.call("POST", "/services/boom", auth(), {})
    assert reply.status == 500
    spans = stack.spans(2)
    for span in (one(spans, "sidecar POST /services/boom"),
                 one(spans, "framework POST /services/boom")):
        assert span.attributes["http.response.status_code"] == 500
        assert span.status.status_code == StatusCode.ERROR


def test_link_span_without_context_or_tracing(stack: Stack) -> None:
    with tracing.link_span("event demo", {"traceparent": "garbage"}, {"k": "v"}) as span:
        assert span.is_recording()
    done = one(stack.spans(1), "event demo")
    assert list(done.links) == [] and done.parent is None
    assert done.attributes["k"] == "v"


def test_link_span_is_a_no_op_when_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "ENABLED", False)
    with tracing.link_span("event demo", {}) as span:
        assert span is None


def test_paths_in_spans_are_always_encodable(stack: Stack) -> None:
    # Raw non-ASCII bytes in the target: the parser refuses them, before any span.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as conn:
        conn.sendall(b"GET /services/fr\xffont HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 400 ")
    # Percent-encoded: invalid UTF-8 stays encoded, valid UTF-8 is decoded.
    reply = stack.call("GET", "/services/fr%FFont%C3%A9", auth())
    assert reply.status == 404
    [span] = stack.spans(1)
    assert span.attributes["url.path"] == "/services/fr%FFont\u00e9"
    # Anything else (a surrogate escape) is made encodable; exporters would drop the batch.
    assert tracing.text("/a\udcff\u00e9") == "/a\\udcff\u00e9"
    assert tracing.text("/plain") == "/plain"


def test_carrier_is_empty_when_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "ENABLED", False)
    assert tracing.carrier() == {}


def test_the_platforms_own_routes_have_no_framework_span(stack: Stack) -> None:
    assert stack.call("GET", "/readyz").status == 200  # the sidecar asks the framework's
    assert stack.call("GET", "/metrics", auth()).status == 403
    assert [s.name for s in stack.spans(1)] == ["sidecar GET"]  # /metrics: the sidecar's
