"""The CloudEvents 1.0 HTTP binding: an HTTP request into an :class:`Event`, and back.

Parsing and serialising are the ``cloudevents`` SDK's; this module adds what the SDK
leaves to the receiver: a required attribute that is missing is an error naming it
(the SDK makes up an ``id`` for a structured event that has none and assumes
``specversion``), and every failure is a :class:`BadEvent` naming the attribute, which
``POST /events`` answers 400.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_structured_event
from cloudevents.core.exceptions import BaseCloudEventException, CloudEventValidationError
from cloudevents.core.v1.event import CloudEvent

STRUCTURED = "application/cloudevents+json"
REQUIRED = ("id", "source", "specversion", "type")
MAX_ATTRIBUTE = 256  # characters of id, source, type, subject (they are stored and logged)
TYPE_RE = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces: safe in logs


class BadEvent(ValueError):
    """The request is no valid CloudEvent; ``attribute`` names what is wrong."""

    def __init__(self, attribute: str, reason: str) -> None:
        super().__init__(f"{attribute}: {reason}")
        self.attribute, self.reason = attribute, reason


@dataclass
class Event:
    """One event as the engine stores and delivers it."""

    id: str
    source: str
    type: str
    subject: str | None = None
    time: str = ""
    data: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. traceparent

    def public(self) -> dict[str, Any]:
        """``context.event``: the attributes and the data."""
        return {"id": self.id, "source": self.source, "type": self.type,
                "subject": self.subject, "time": self.time, "data": self.data}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event(event_type: str, data: Any, subject: str | None, source: str) -> Event:
    """An event published by a service (``context.emit``)."""
    check_attribute("type", event_type)
    if subject is not None:
        check_attribute("subject", subject)
    return Event(uuid.uuid4().hex, source, event_type, subject, now_iso(), data)


def check_attribute(name: str, value: Any) -> None:
    """BadEvent unless ``value`` is a usable string for attribute ``name``."""
    if not isinstance(value, str) or not value:
        raise BadEvent(name, "must be a non-empty string")
    if len(value) > MAX_ATTRIBUTE:
        raise BadEvent(name, f"longer than {MAX_ATTRIBUTE} characters")
    if name == "type" and not TYPE_RE.fullmatch(value):
        raise BadEvent(name, "must be printable ASCII without spaces")
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
        raise BadEvent(name, "contains control characters")


def _present(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The attributes the request carries, as sent (binary: ce-* headers; else the body)."""
    attrs = {k.lower()[3:]: v for k, v in headers.items() if k.lower().startswith("ce-")}
    if attrs:
        return attrs
    if headers.get("content-type", "").split(";")[0].strip().lower() != STRUCTURED:
        raise BadEvent("content-type", f"use {STRUCTURED} or binary mode (ce-* headers)")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadEvent("data", "the structured event is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadEvent("data", "the structured event must be a JSON object")
    return doc


def parse_http(headers: Mapping[str, str], body: bytes) -> Event:
    """The event in a ``POST /events`` request (``headers`` with lower-case names)."""
    sent = _present(headers, body)
    for name in REQUIRED:
        if name not in sent:
            raise BadEvent(name, "required attribute missing")
    if "time" in sent:
        try:
            datetime.fromisoformat(str(sent["time"]).replace("Z", "+00:00"))
        except ValueError:
            raise BadEvent("time", "must be an RFC 3339 timestamp") from None
    try:
        event = from_http_event(HTTPMessage(dict(headers), body))
    except CloudEventValidationError as exc:
        name = next(iter(exc.errors), "event")
        raise BadEvent(name, "; ".join(str(e) for e in exc.errors[name])) from None
    except BaseCloudEventException as exc:
        raise BadEvent(str(getattr(exc, "attribute_name", "event")), str(exc)) from None
    except (ValueError, TypeError, AttributeError) as exc:  # the SDK's own parse errors
        raise BadEvent("data", f"invalid event: {type(exc).__name__}") from None
    attrs = event.get_attributes()
    if attrs.get("specversion") != "1.0":
        raise BadEvent("specversion", "must be 1.0")
    for name in ("id", "source", "type"):
        check_attribute(name, attrs.get(name))
    subject = attrs.get("subject")
    if subject is not None:
        check_attribute("subject", subject)
    data = event.get_data()
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError:
            raise BadEvent("data", "binary data must be UTF-8 text or JSON") from None
    when = attrs.get("time")
    stamp = when.isoformat().replace("+00:00", "Z") if isinstance(when, datetime) else now_iso()
    extra = trace_context(attrs)
    return Event(attrs["id"], attrs["source"], attrs["type"], subject, stamp, data, extra)


TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_context(values: Mapping[str, Any]) -> dict[str, str]:
    """W3C trace context (``traceparent``, ``tracestate``) from CloudEvents attributes
    (the Distributed Tracing extension) or HTTP headers; malformed values are dropped."""
    parent = values.get("traceparent")
    if not isinstance(parent, str) or not TRACEPARENT_RE.fullmatch(parent):
        return {}
    found = {"traceparent": parent}
    state = values.get("tracestate")
    if isinstance(state, str) and len(state) <= 512 and state.isprintable():
        found["tracestate"] = state
    return found


def to_http(event: Event) -> tuple[dict[str, str], bytes]:
    """The event as a structured CloudEvents request (headers, body): sink routes."""
    attrs: dict[str, Any] = {"id": event.id, "source": event.source, "type": event.type,
                             "specversion": "1.0",
                             "time": datetime.fromisoformat(event.time.replace("Z", "+00:00"))}
    if event.subject is not None:
        attrs["subject"] = event.subject
    if event.data is not None:
        attrs["datacontenttype"] = "application/json"
    attrs.update(trace_context(event.extra))  # the trace goes on to the receiving mtp
    message = to_structured_event(CloudEvent(attrs, event.data))
    return dict(message.headers), message.body
