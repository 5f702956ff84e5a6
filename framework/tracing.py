"""OpenTelemetry traces: off unless the standard ``OTEL_*`` variables ask for them.

Off (the default) nothing here imports OpenTelemetry, no tracer provider is
installed and every hook on the request path is one test of :data:`ENABLED`, a
module-level flag. On, the process has one SDK tracer provider (also the API's
global one, so tenant code's own spans join the request's trace) exporting through
``OTEL_TRACES_EXPORTER`` (``otlp``, the default when ``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``..._TRACES_ENDPOINT`` is set, or ``console``); the OTLP exporter is an optional
package, imported only then.

Trace context crosses processes as W3C ``traceparent``/``tracestate`` only (the
W3C propagator itself, not ``OTEL_PROPAGATORS``). It is data, never identity: no
identity value is read from it, and a malformed one is ignored (a new trace).
A job stores the context of the request that queued it (:func:`carrier`) and runs
in a span of its own trace that links to it (:func:`linked_span`); an event
delivery is meant to do the same: store :func:`carrier` when the event is emitted,
deliver inside :func:`link_span`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from framework import __version__
from framework.tenant_config import ConfigError

ENABLED = False  # the only thing the request path looks at while tracing is off
_state: dict[str, Any] = {}  # provider, tracer, propagator, trace (the API module)

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
ENV = "environment"
MAX_ATTRIBUTE = 200  # a client's path in a span attribute, at most
# The platform's own routes, asked by probes and the sidecar itself (never with a
# client's trace): no span in the framework, as none in the sidecar for health.
UNTRACED = frozenset(("/healthz", "/readyz", "/metrics", "/internal/catalog"))
OTLP_PACKAGES = {
    "http/protobuf": ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                      "opentelemetry-exporter-otlp-proto-http"),
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
             "opentelemetry-exporter-otlp-proto-grpc"),
}
# The propagator warns about every malformed header: a client must not be able to
# write a log line per request.
QUIET_LOGGERS = ("opentelemetry.trace.propagation.tracecontext", "opentelemetry.trace.span")


def text(value: str) -> str:
    """``value`` as an attribute any exporter can encode: a client's undecodable bytes
    (surrogate escapes) would make the protobuf encoder drop the whole batch."""
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for ([] = tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        # No exporter named: on only when an OTLP endpoint is given, so an unset
        # environment never sends anything anywhere (the spec's default is otlp).
        endpoint = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        return ["otlp"] if endpoint else []
    return [name for name in (n.strip() for n in raw.split(",")) if name and name != "none"]


def make_exporter(name: str, environ: Mapping[str, str]) -> Any:
    """One span exporter by its OTEL_TRACES_EXPORTER name; ConfigError when unusable."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(ENV, "OTEL_TRACES_EXPORTER",
                          f"unknown exporter {name!r} (otlp, console or none)")
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol not in OTLP_PACKAGES:
        raise ConfigError(ENV, "OTEL_EXPORTER_OTLP_PROTOCOL",
                          f"unsupported protocol {protocol!r} (http/protobuf or grpc)")
    module, package = OTLP_PACKAGES[protocol]
    try:
        exporter = importlib.import_module(module).OTLPSpanExporter
    except ImportError:
        raise ConfigError(ENV, "OTEL_TRACES_EXPORTER",
                          f"otlp ({protocol}) needs the package {package}") from None
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and base and protocol == "http/protobuf":
        endpoint = base.rstrip("/") + "/v1/traces"  # the spec's rule for the base URL
    elif not endpoint:
        endpoint = base
    # Headers, timeouts, certificates: the exporter reads its own OTEL_EXPORTER_OTLP_*.
    return exporter(endpoint=endpoint) if endpoint else exporter()


def make_sampler(environ: Mapping[str, str], edge: bool) -> Any:
    """OTEL_TRACES_SAMPLER (default ``parentbased_always_on``) and its ``_ARG``.

    At the ``edge`` (the sidecar) a client's parent is continued but its sampled flag
    decides nothing: whether a request is traced is the platform's choice, so a client
    can neither hide its requests from traces nor make every one of them traced.
    """
    from opentelemetry.sdk.trace import sampling

    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    root_name = name.removeprefix("parentbased_")
    if root_name == "always_on":
        root = sampling.ALWAYS_ON
    elif root_name == "always_off":
        root = sampling.ALWAYS_OFF
    elif root_name == "traceidratio":
        raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0"
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(ENV, "OTEL_TRACES_SAMPLER_ARG",
                              f"a ratio between 0 and 1, got {raw!r}")
        root = sampling.TraceIdRatioBased(ratio)
    else:
        raise ConfigError(ENV, "OTEL_TRACES_SAMPLER", f"unsupported sampler {name!r} "
                          "(always_on, always_off, traceidratio, or parentbased_ of one)")
    if edge:
        return sampling.ParentBased(root, remote_parent_sampled=root,
                                    remote_parent_not_sampled=root)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def setup(environ: Mapping[str, str], service_name: str, tenant_id: str,
          exporter: Any = None, edge: bool = False) -> bool:
    """Turn tracing on when ``environ`` asks for it (or ``exporter`` is given: tests).

    Exporters named in the environment batch their spans (a background thread);
    ``exporter`` gets each span as it ends. ``edge``: the process that takes trace
    context from clients (see :func:`make_sampler`). True when tracing is on.
    """
    global ENABLED
    names = exporter_names(environ)
    if exporter is None and not names:
        return False
    exporters = [make_exporter(name, environ) for name in names]  # errors before anything
    sampler = make_sampler(environ, edge)
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    shutdown()
    resource = Resource.create({
        "service.name": environ.get("OTEL_SERVICE_NAME") or service_name,
        "service.version": __version__, "mtp.tenant": tenant_id})
    provider = TracerProvider(resource=resource, sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    for each in exporters:
        provider.add_span_processor(BatchSpanProcessor(each))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _state.update(provider=provider, tracer=provider.get_tracer("mtp", __version__),
                  propagator=TraceContextTextMapPropagator(), trace=trace)
    if exporter is None:
        # A real process sets this up once: tenant code's own spans (the OpenTelemetry
        # API's global tracer) then join the request's trace. Tests keep the global
        # alone, as it can be set only once per process.
        trace.set_tracer_provider(provider)
    ENABLED = True
    return True


def shutdown() -> None:
    """Tracing off; the spans still buffered are exported first."""
    global ENABLED
    ENABLED = False
    provider = _state.get("provider")
    _state.clear()
    if provider is not None:
        provider.shutdown()


def flush() -> None:
    """Export the spans buffered so far (a process about to stop)."""
    provider = _state.get("provider")
    if provider is not None:
        provider.force_flush()


class HeaderGetter:
    """Header values from a multi-valued mapping (aiohttp's), repeated ones joined."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = carrier.getall(key, None)
        # Repeated fields are one list (RFC 9110 5.3): two traceparents then fail to
        # parse and are ignored, as W3C asks; tracestates are joined.
        return [",".join(values)] if values else None

    def keys(self, carrier: Any) -> list[str]:
        return list(carrier.keys())


class EnvironGetter:
    """Header values from a WSGI environ (the server joined repeated ones)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


HEADERS, ENVIRON = HeaderGetter(), EnvironGetter()


def extract(carrier: Any, getter: Any = None) -> Any:
    """The OpenTelemetry context ``carrier`` names (an empty one when it names none)."""
    if getter is None:
        return _state["propagator"].extract(carrier)
    return _state["propagator"].extract(carrier, getter=getter)


def start_span(name: str, parent: Any, kind: str = "SERVER",
               attributes: Mapping[str, Any] | None = None, links: Any = None) -> Any:
    """A span (not made current) under the context ``parent``."""
    trace = _state["trace"]
    return _state["tracer"].start_span(name, context=parent, kind=getattr(trace.SpanKind, kind),
                                       attributes=attributes, links=links)


def headers_of(span: Any) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) naming ``span``, as W3C headers."""
    trace = _state["trace"]
    out: dict[str, str] = {}
    _state["propagator"].inject(out, context=trace.set_span_in_context(span))
    return out


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers ({} when none is, or tracing is off)."""
    if not ENABLED:
        return {}
    out: dict[str, str] = {}
    _state["propagator"].inject(out)
    return out


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits ('' when no span is current)."""
    context = _state["trace"].get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def set_error(span: Any, status: int) -> None:
    """A span whose request ended in a server error is marked so."""
    if status >= 500:
        trace = _state["trace"]
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"HTTP {status}"))


@contextmanager
def child_span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A span under the current one, current while the block runs."""
    with _state["tracer"].start_as_current_span(
            name, kind=_state["trace"].SpanKind.INTERNAL, attributes=attributes) as span:
        yield span


@contextmanager
def linked_span(name: str, stored: Mapping[str, str] | None,
                attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A span of a new trace that links to the context ``stored`` (see :func:`carrier`).

    For work that runs later than the request that asked for it: a job, an event
    delivery. The span is current while the block runs (a nested ``context.call`` is
    its child); a missing or malformed ``stored`` context means no link.
    """
    trace = _state["trace"]
    from opentelemetry.context import Context

    given = stored if isinstance(stored, Mapping) else {}  # a store's odd value: no link
    linked = trace.get_current_span(extract(dict(given))).get_span_context()
    links = [trace.Link(linked)] if linked.is_valid else None
    with _state["tracer"].start_as_current_span(
            name, context=Context(), kind=trace.SpanKind.CONSUMER, attributes=attributes,
            links=links) as span:
        yield span


def link_span(name: str, stored: Mapping[str, str] | None,
              attributes: Mapping[str, Any] | None = None) -> Any:
    """:func:`linked_span` when tracing is on, else a block that does nothing.

    The hook for work started from a stored context (event deliveries): store
    ``carrier()`` with the work ({} while tracing is off), run it ``with link_span(...)``.
    """
    if not ENABLED:
        from contextlib import nullcontext

        return nullcontext()
    return linked_span(name, stored, attributes)


def install(app: Any) -> None:
    """The framework's request span, as Flask hooks (registered only when tracing is on).

    The span continues the ``traceparent`` the request came with (the sidecar's
    span) and is current while the request runs, so handlers, ``context.call``,
    jobs queued and ``context.logger`` see it.
    """
    from flask import g, request

    trace = _state["trace"]
    from opentelemetry import context as otel_context

    @app.before_request
    def trace_start() -> None:
        environ = request.environ
        if environ.get("PATH_INFO") in UNTRACED:
            return
        span = start_span("framework " + str(environ.get("REQUEST_METHOD", "")),
                          extract(environ, ENVIRON),
                          attributes={"http.request.method": environ.get("REQUEST_METHOD", ""),
                                      "url.path": str(environ.get("PATH_INFO", ""))[
                                          :MAX_ATTRIBUTE]})
        g.trace_span = span
        g.trace_token = otel_context.attach(trace.set_span_in_context(span))

    @app.after_request
    def trace_answer(response: Any) -> Any:
        span = g.get("trace_span")
        if span is not None:
            service, operation = g.get("service", ""), g.get("operation", "")
            ident = g.get("identity")
            if service:
                span.update_name(f"framework {request.method} /services/{service}"
                                 + (f"/{operation}" if operation else ""))
            span.set_attributes({
                "mtp.service": service, "mtp.operation": operation or "",
                "mtp.request_id": g.get("request_id", ""),
                "mtp.auth_method": ident.auth_method if ident is not None else "",
                "http.response.status_code": response.status_code})
            set_error(span, response.status_code)
        return response

    @app.teardown_request
    def trace_end(_exc: BaseException | None) -> None:
        span = g.pop("trace_span", None)
        if span is not None:
            span.end()
            otel_context.detach(g.pop("trace_token"))
