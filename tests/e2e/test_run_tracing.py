"""Traces through the real `mtp run` (sidecar and gunicorn framework processes).

With OTEL_EXPORTER_OTLP_ENDPOINT set, both processes export over OTLP/HTTP to a
receiver here, and the chain client -> sidecar -> framework is assembled from what
they sent. Tracing on or off, a client's traceparent/tracestate, however odd, changes
nothing of the identity a service sees and never causes a server error.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.e2e.otlp_receiver import OtlpReceiver, Received
from tests.helpers import free_port, stop
from tests.sidecar.run_stack import (
    RunStack,
    run_env,
    start_default,
    start_run,
    tenant_toml,
    write_tenant,
)
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, token

pytestmark = pytest.mark.slow

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
VALID = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
IDENTITY = ("tenant_id", "user", "groups", "roles", "auth_method")

# (header name, value): malformed, invalid or identity-looking trace context.
ODD = [
    ("traceparent", "garbage"),
    ("traceparent", f"00-{'0' * 32}-{'0' * 16}-01"),  # all-zero ids: invalid
    ("traceparent", f"ff-{TRACE_ID}-{CLIENT_SPAN}-01"),  # version ff: invalid
    ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01-x-tenant-id-evil"),  # 00 with a tail
    ("traceparent", f"{VALID}, 00-{'1' * 32}-{'2' * 16}-01"),  # two in one field
    ("TRACEPARENT", f"00-{TRACE_ID.upper()}-{CLIENT_SPAN}-01"),  # upper-case hex: invalid
    ("traceparent", "00-" + "a" * 4000),
    ("traceparent", "00-\u00e9\u00e9-x"),  # non-ASCII (Latin-1 on the wire)
    ("trace_parent", VALID),  # underscore spelling: dropped by gunicorn
    ("tracestate", "x-tenant-id=evil,x-user-id=mallory,x-auth-method=api_key"),
    ("tracestate", ",".join(f"k{i}=v" for i in range(200))),
    ("tracestate", "=" * 600),
]


SPANNER = '''"""Makes a span of its own with the OpenTelemetry API."""
from opentelemetry import trace


def handle(context):
    with trace.get_tracer("tenant").start_as_current_span("tenant work") as span:
        span.set_attribute("tenant.rows", 3)
    return {"ok": True}
'''


def who(stack: RunStack, extra: list[tuple[str, str]]) -> tuple[int, dict]:
    headers = [("Authorization", f"Bearer {token(groups=['sales'], roles=['viewer'])}"),
               ("Content-Type", "application/json"), *extra]
    reply = stack.call("POST", "/services/whoami", headers, b"{}")
    body = reply.json() if reply.body else {}
    return reply.status, {k: body.get(k) for k in IDENTITY}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    running = OtlpReceiver().start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory,
           receiver: OtlpReceiver) -> Iterator[RunStack]:
    root = tmp_path_factory.mktemp("traced")
    # OTEL_BSP_SCHEDULE_DELAY: the exporters send every 100 ms instead of every 5 s.
    tdir = write_tenant(root, tenant_toml() + '[[authz.rules]]\nservice = "spanner"\n')
    (tdir / "services" / "spanner.py").write_text(SPANNER)
    env = run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                  OTEL_BSP_SCHEDULE_DELAY="100")
    stack = start_run(root, tdir, env)
    yield stack
    stop(stack.proc)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def untraced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunStack]:
    root = tmp_path_factory.mktemp("untraced")
    stack = start_default(root)
    yield stack
    stop(stack.proc)
    shutil.rmtree(root, ignore_errors=True)


def by_request(spans: list[Received], rid: str) -> dict[str, Received]:
    return {s.service: s for s in spans if s.attributes.get("mtp.request_id") == rid}


def test_chain_from_the_client_through_sidecar_and_framework_processes(
        traced: RunStack, receiver: OtlpReceiver) -> None:
    headers = [("Authorization", f"Bearer {token()}"), ("Content-Type", "application/json"),
               ("traceparent", VALID), ("tracestate", "vendor=1")]
    reply = traced.call("POST", "/services/whoami", headers, b"{}")
    assert reply.status == 200, reply.body
    rid = reply.headers["X-Request-ID"]
    spans = by_request(receiver.wait(lambda got: len(by_request(got, rid)) == 2), rid)
    sidecar, framework = spans["mtp-sidecar"], spans["mtp-framework"]
    assert sidecar.name == "sidecar POST /services/whoami"
    assert framework.name == "framework POST /services/whoami"
    assert sidecar.trace_id == framework.trace_id == TRACE_ID
    assert sidecar.parent_id == CLIENT_SPAN
    assert framework.parent_id == sidecar.span_id  # the sidecar's context, not the client's
    assert sidecar.attributes | {"mtp.request_id": ""} == {
        "http.request.method": "POST", "url.path": "/services/whoami", "mtp.request_id": "",
        "mtp.tenant": "acme", "mtp.service": "whoami", "mtp.operation": "",
        "mtp.auth_method": "jwt", "mtp.decision": "allowed", "http.response.status_code": 200}
    assert framework.attributes["mtp.auth_method"] == "jwt"
    assert receiver.paths == {"/v1/traces"}


@pytest.mark.parametrize(("name", "value"), ODD, ids=[f"{n}:{v[:24]}" for n, v in ODD])
def test_odd_trace_context_changes_no_identity_traced(
        traced: RunStack, receiver: OtlpReceiver, name: str, value: str) -> None:
    baseline = who(traced, [])
    status, seen = who(traced, [(name, value)])
    assert status == 200 and seen == baseline[1]
    assert seen == {"tenant_id": "acme", "user": "alice", "groups": ["sales"],
                    "roles": ["viewer"], "auth_method": "jwt"}


def test_malformed_traceparent_starts_a_new_trace(traced: RunStack,
                                                  receiver: OtlpReceiver) -> None:
    headers = [("Authorization", f"Bearer {token()}"), ("Content-Type", "application/json"),
               ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01-extra")]
    reply = traced.call("POST", "/services/whoami", headers, b"{}")
    assert reply.status == 200
    rid = reply.headers["X-Request-ID"]
    spans = by_request(receiver.wait(lambda got: len(by_request(got, rid)) == 2), rid)
    sidecar, framework = spans["mtp-sidecar"], spans["mtp-framework"]
    assert sidecar.parent_id == "" and sidecar.trace_id != TRACE_ID
    assert framework.parent_id == sidecar.span_id


def test_a_client_cannot_switch_tracing_off_with_the_sampled_flag(
        traced: RunStack, receiver: OtlpReceiver) -> None:
    headers = [("Authorization", f"Bearer {token()}"), ("Content-Type", "application/json"),
               ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-00")]  # "not sampled"
    reply = traced.call("POST", "/services/whoami", headers, b"{}")
    assert reply.status == 200
    rid = reply.headers["X-Request-ID"]
    spans = by_request(receiver.wait(lambda got: len(by_request(got, rid)) == 2), rid)
    assert spans["mtp-sidecar"].trace_id == TRACE_ID  # continued, and recorded all the same
    assert spans["mtp-framework"].parent_id == spans["mtp-sidecar"].span_id


@pytest.mark.parametrize(("name", "value"), ODD, ids=[f"{n}:{v[:24]}" for n, v in ODD])
def test_odd_trace_context_changes_no_identity_untraced(
        untraced: RunStack, name: str, value: str) -> None:
    # Tracing off: the client's trace headers reach the framework as they are (data).
    status, seen = who(untraced, [(name, value)])
    assert status == 200, seen
    assert seen == {"tenant_id": "acme", "user": "alice", "groups": ["sales"],
                    "roles": ["viewer"], "auth_method": "jwt"}


def test_tracing_off_a_valid_traceparent_is_plain_data(untraced: RunStack) -> None:
    status, _ = who(untraced, [("traceparent", VALID)])
    assert status == 200
    assert "trace_id" not in untraced.output()


def test_a_handlers_own_span_joins_the_request_trace(traced: RunStack,
                                                     receiver: OtlpReceiver) -> None:
    reply = traced.call("POST", "/services/spanner", [
        ("Authorization", f"Bearer {token()}"), ("Content-Type", "application/json"),
        ("traceparent", VALID)], b"{}")
    assert reply.status == 200, reply.body
    rid = reply.headers["X-Request-ID"]
    spans = by_request(receiver.wait(lambda got: len(by_request(got, rid)) == 2), rid)
    framework = spans["mtp-framework"]
    mine = receiver.wait(lambda got: any(
        s.name == "tenant work" and s.parent_id == framework.span_id for s in got))
    own = next(s for s in mine if s.name == "tenant work" and s.parent_id == framework.span_id)
    assert own.service == "mtp-framework" and own.trace_id == TRACE_ID
    assert own.attributes == {"tenant.rows": 3}
