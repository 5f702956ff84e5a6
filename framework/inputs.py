"""Step 7b: what the caller asked for — payload, schema check, sync or async."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

import jsonschema.exceptions
from gunicorn.http.errors import ParseException

from framework import signing
from framework.errors import BadRequest, InvalidInput, PayloadTooLarge, Unauthenticated
from framework.registry import ServiceSpec

MAX_WAIT = 60  # seconds a `Prefer: wait=N` may hold a request
MAX_DETAIL = 300
READ_CHUNK = 64 * 1024
# ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and int() refuses
# strings past 4300 digits; both would have been a 500 for a client's header.
WAIT_RE = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Prefer:
    """The parts of RFC 7240 ``Prefer`` the framework honours."""

    respond_async: bool = False
    wait: int | None = None


def parse_prefer(values: Iterable[str]) -> Prefer:
    """Parse every ``Prefer`` header; unknown preferences are ignored as the RFC says."""
    respond_async, wait = False, None
    for value in values:
        for item in value.split(","):
            name, _, arg = item.split(";", 1)[0].partition("=")
            name, arg = name.strip().lower(), arg.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and WAIT_RE.fullmatch(arg):
                wait = MAX_WAIT if len(arg) > 9 else min(int(arg), MAX_WAIT)
    return Prefer(respond_async, wait)


@dataclass(frozen=True)
class Dispatch:
    """How to run this call, and which preferences were applied."""

    run_async: bool
    wait: int | None
    applied: str | None  # the Preference-Applied value, or None


def choose(spec: ServiceSpec, prefer: Prefer, mode_param: str | None) -> Dispatch:
    """Apply MODE, ``?mode=`` and ``Prefer`` together."""
    if mode_param not in (None, "sync", "async"):
        raise BadRequest("query parameter mode must be 'sync' or 'async'")
    if spec.mode == "sync":
        if mode_param == "async":
            raise BadRequest(f"service {spec.name!r} runs only synchronously")
        return Dispatch(False, None, None)  # Prefer is ignored, and not acknowledged
    if spec.mode == "async" or mode_param == "async" or (
            prefer.respond_async and mode_param != "sync"):
        wait = prefer.wait if prefer.respond_async else None
        applied = None
        if prefer.respond_async:
            applied = "respond-async" + (f", wait={wait}" if wait is not None else "")
        return Dispatch(True, wait, applied)
    return Dispatch(False, None, None)


def check_digest(body: bytes, digest: str) -> bytes:
    """``body`` when it is the one the sidecar signed (``digest``), else 401."""
    if not signing.body_matches({signing.BODY_SHA256: digest}, body):
        raise Unauthenticated("the body is not the one the sidecar signed")
    return body


def read_body(stream: IO[bytes], content_length: int | None, max_body: int,
              digest: str) -> bytes:
    """The request body, refused with 413 past ``max_body`` (also when chunked), and with
    401 when it is not the body whose SHA-256 (``digest``) the signature covers."""
    if content_length is not None and content_length > max_body:
        raise PayloadTooLarge(f"request body is over {max_body} bytes")
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = stream.read(min(READ_CHUNK, max_body + 1 - total))
        except (ParseException, OSError):
            # gunicorn's reader: a malformed chunked body (InvalidChunkSize...) or one that
            # ends early (NoMoreData). The client's framing, so 400, not 500.
            raise BadRequest("the request body could not be read (malformed or cut short)"
                             ) from None
        if not chunk:
            return check_digest(b"".join(chunks), digest)
        total += len(chunk)
        if total > max_body:
            raise PayloadTooLarge(f"request body is over {max_body} bytes")
        chunks.append(chunk)


class _NotJson(ValueError):
    """A number JSON (RFC 8259) cannot carry, although Python's json module reads it."""


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _NotJson(f"number {text[:40]} is out of range")
    return value


def parse_payload(body: bytes) -> Any:
    """The JSON body; an empty body is ``{}``."""
    if not body.strip():
        return {}
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, _NotJson):
            reason = str(exc)
        elif isinstance(exc, json.JSONDecodeError):
            reason = exc.msg
        elif isinstance(exc, UnicodeDecodeError):  # json.loads decodes bytes itself
            reason = "not UTF-8 text"
        elif isinstance(exc, RecursionError):
            reason = "too deeply nested"
        else:  # int() refuses numbers past 4300 digits
            reason = "a number is too long"
        raise BadRequest(f"request body is not valid JSON: {reason}") from None


def validate(spec: ServiceSpec, payload: Any) -> None:
    """Check the payload against the service's INPUT_SCHEMA (400 naming the path)."""
    if spec.validator is None:
        return
    try:
        error = jsonschema.exceptions.best_match(spec.validator.iter_errors(payload))
    except RecursionError:
        # A recursive schema ($ref "#") descends as deep as the payload nests: the
        # client's payload is what is too deep, so 400, not the 500 it was.
        raise InvalidInput("payload is nested too deeply to check against the input schema",
                           path="$") from None
    if error is None:
        return
    message = error.message
    if len(message) > MAX_DETAIL:
        message = message[:MAX_DETAIL] + "..."
    raise InvalidInput(f"payload does not match the input schema: {message}",
                       path=error.json_path)
