"""The sidecar's trace headers towards the framework: W3C context is data, never identity."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from multidict import CIMultiDict
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from framework import signing, tracing
from framework.verify import identify, signed_headers
from sidecar.headers import identity_headers, upstream_headers
from sidecar.principal import Principal
from sidecar.tracing import inject
from tests.sidecar.support import SIDECAR_SECRET

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def traced() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.setup({}, "mtp-test", "acme", exporter=memory)
    yield memory
    tracing.shutdown()


def principal() -> Principal:
    return Principal(tenant="acme", user="alice", groups=("sales",), roles=("viewer",),
                     auth_method="jwt")


@pytest.mark.parametrize("client", [
    [("traceparent", VALID), ("tracestate", "x-tenant-id=evil")],
    [("TraceParent", "garbage"), ("TRACESTATE", "a=b"), ("trace_parent", VALID)],
    [("traceparent", VALID), ("traceparent", VALID)],
    [],
])
def test_injection_replaces_trace_headers_and_nothing_else(
        traced: InMemorySpanExporter, client: list[tuple[str, str]]) -> None:
    headers_in = [("Accept", "application/json"), *client]
    span = tracing.start_span("sidecar POST", tracing.extract(CIMultiDict(headers_in),
                                                              tracing.HEADERS))
    sent = upstream_headers(headers_in, identity_headers(principal(), "rid-1"),
                            secret=SIDECAR_SECRET.encode(), method="POST", path="/services/x",
                            peer="127.0.0.1", proto="http", body=b"{}")
    before = [(n, v) for n, v in sent if n.lower().replace("_", "-")
              not in ("traceparent", "tracestate")]
    inject(span, sent)
    span.end()
    others = [(n, v) for n, v in sent if n not in ("traceparent", "tracestate")]
    assert others == before  # identity, signature and every other header untouched
    ours = [v for n, v in sent if n == "traceparent"]
    made = span.get_span_context()
    assert ours == [f"00-{made.trace_id:032x}-{made.span_id:016x}-{int(made.trace_flags):02x}"]
    # The framework verifies the signature and reads the identity the sidecar set.
    environ = {"HTTP_" + n.upper().replace("-", "_"): v for n, v in sent}
    ident = identify(SIDECAR_SECRET.encode(), "acme", "POST", "/services/x",
                     signed_headers(environ), "/services/x")
    assert (ident.user, ident.groups, ident.roles, ident.auth_method) == (
        "alice", ("sales",), ("viewer",), "jwt")
    assert signing.TENANT in dict(sent)


def test_one_valid_traceparent_is_the_parent_two_are_ignored(traced) -> None:
    one = tracing.extract(CIMultiDict([("traceparent", VALID)]), tracing.HEADERS)
    two = tracing.extract(CIMultiDict([("traceparent", VALID), ("traceparent", VALID)]),
                          tracing.HEADERS)
    assert format(tracing.start_span("a", one).get_span_context().trace_id, "032x") == TRACE_ID
    assert tracing.start_span("b", two).parent is None  # a new trace (W3C: invalid)
    assert tracing.HEADERS.keys(CIMultiDict([("traceparent", VALID)])) == ["traceparent"]


def test_environ_getter_reads_wsgi_headers(traced) -> None:
    environ = {"HTTP_TRACEPARENT": VALID, "HTTP_TRACESTATE": "a=b", "PATH_INFO": "/x"}
    assert tracing.ENVIRON.keys(environ) == ["traceparent", "tracestate"]
    context = tracing.extract(environ, tracing.ENVIRON)
    span = tracing.start_span("f", context)
    assert span.get_span_context().trace_state.get("a") == "b"
    assert tracing.extract({"traceparent": VALID}) is not None  # a plain dict carrier
