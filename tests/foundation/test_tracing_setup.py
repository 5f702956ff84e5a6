"""Tracing is configured by the standard OTEL_* variables, and off without them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from framework import tracing
from framework.app import create_app
from framework.settings import Settings
from framework.tenant_config import ConfigError, parse_tenant

SECRET = "tracing-test-secret-0123456789abcdef"


@pytest.fixture(autouse=True)
def off() -> Iterator[None]:
    yield
    tracing.shutdown()


@pytest.mark.parametrize(("environ", "names"), [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
    ({"OTEL_TRACES_EXPORTER": " Console , otlp "}, ["console", "otlp"]),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, []),
    ({"OTEL_SERVICE_NAME": "x", "OTEL_RESOURCE_ATTRIBUTES": "a=b"}, []),  # no exporter: off
])
def test_exporters_named_by_the_environment(environ: dict[str, str], names: list[str]) -> None:
    assert tracing.exporter_names(environ) == names


def test_nothing_set_means_off() -> None:
    assert tracing.setup({}, "mtp-framework", "acme") is False
    assert tracing.ENABLED is False
    tracing.flush()  # nothing to flush: no provider


def test_otlp_endpoints_follow_the_spec() -> None:
    base = tracing.make_exporter("otlp", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
    assert base._endpoint == "http://c:4318/v1/traces"
    own = tracing.make_exporter("otlp", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                         "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"})
    assert own._endpoint == "http://t/x"
    assert tracing.make_exporter("otlp", {}) is not None  # the exporter's own default


@pytest.mark.parametrize(("environ", "key", "words"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER", "unknown exporter"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_PROTOCOL", "unsupported protocol"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
     "OTEL_TRACES_EXPORTER", "opentelemetry-exporter-otlp-proto-grpc"),
])
def test_unusable_settings_refuse_to_start(environ: dict[str, str], key: str,
                                           words: str) -> None:
    with pytest.raises(ConfigError) as err:
        tracing.setup(environ, "mtp-framework", "acme")
    assert err.value.key == key and words in err.value.reason
    assert tracing.ENABLED is False


def test_framework_refuses_to_start_with_an_unknown_exporter(tmp_path) -> None:
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SECRET, "MTP_DATA_DIR": str(tmp_path),
                                  "OTEL_TRACES_EXPORTER": "bogus"})
    with pytest.raises(ConfigError, match="unknown exporter"):
        create_app(settings, parse_tenant({"tenant": {"id": "acme"}}), background=False)


def test_console_exporter_turns_tracing_on_with_the_service_name() -> None:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    assert isinstance(tracing.make_exporter("console", {}), ConsoleSpanExporter)
    assert tracing.setup({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "edge"},
                         "mtp-sidecar", "acme")
    assert tracing.ENABLED
    resource = tracing._state["provider"].resource.attributes
    assert (resource["service.name"], resource["mtp.tenant"]) == ("edge", "acme")
    with tracing.child_span("demo"):
        assert len(tracing.current_trace_id()) == 32
        assert set(tracing.carrier()) == {"traceparent"}
    assert tracing.current_trace_id() == ""  # no span current
    tracing.flush()
    tracing.shutdown()
    assert not tracing.ENABLED


@pytest.mark.parametrize(("environ", "edge", "described"), [
    ({}, False, "ParentBased{root:AlwaysOnSampler,"),
    ({"OTEL_TRACES_SAMPLER": "always_off"}, False, "AlwaysOffSampler"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, False,
     "TraceIdRatioBased{0.25}"),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}, False,
     "ParentBased{root:TraceIdRatioBased{1.0},"),
])
def test_samplers_from_the_environment(environ: dict[str, str], edge: bool,
                                       described: str) -> None:
    assert tracing.make_sampler(environ, edge).get_description().startswith(described)


def test_the_edge_ignores_a_remote_parents_sampled_flag() -> None:
    from opentelemetry.sdk.trace import sampling
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    parent = set_span_in_context(NonRecordingSpan(SpanContext(
        trace_id=1, span_id=2, is_remote=True, trace_flags=TraceFlags(0))))
    edge = tracing.make_sampler({}, edge=True)
    inner = tracing.make_sampler({}, edge=False)
    decide = sampling.Decision.RECORD_AND_SAMPLE
    assert edge.should_sample(parent, 1, "s").decision == decide
    assert inner.should_sample(parent, 1, "s").decision != decide


@pytest.mark.parametrize(("environ", "key"), [
    ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
     "OTEL_TRACES_SAMPLER_ARG"),
])
def test_unusable_samplers_refuse_to_start(environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        tracing.setup({**environ, "OTEL_TRACES_EXPORTER": "console"}, "mtp-sidecar", "acme")
    assert err.value.key == key and not tracing.ENABLED


def test_service_logger_lines_carry_the_trace_id_only_with_tracing_on() -> None:
    import io
    import json

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from framework import logs

    stream = io.StringIO()
    logs.setup("INFO", "acme", stream=stream)
    try:
        logger = logs.service_logger("acme", "rid-1", "echo", None)
        logger.info("off")
        tracing.setup({}, "mtp-test", "acme", exporter=InMemorySpanExporter())
        logger.info("no span")
        with tracing.child_span("handler"):
            logger.info("in a span")
            expected = tracing.current_trace_id()
        with tracing.linked_span("job", "not a mapping") as job:  # an odd stored value
            assert list(job.links) == []
    finally:
        logs.setup("INFO", "acme")
    lines = {line["msg"]: line for line in map(json.loads, stream.getvalue().splitlines())}
    assert "trace_id" not in lines["off"]
    assert lines["no span"]["trace_id"] == ""
    assert lines["in a span"]["trace_id"] == expected and len(expected) == 32
