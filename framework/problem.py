"""RFC 9457 problem details and request ids, shared by both processes."""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from random import getrandbits
from typing import Any

CONTENT_TYPE = "application/problem+json"
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
TYPE_PREFIX = "urn:mtp:problem:"


def request_id(given: str | None) -> str:
    """The client's request id when it is well formed, else a new one.

    A new id is 128 random bits in hex, like ``uuid4().hex``, but without uuid4's
    getrandom() system call: it runs on every request and only correlates log lines
    (a client may choose its own anyway).
    """
    # fullmatch: "$" alone also matches before a final newline ("abc\n" passed).
    if given and REQUEST_ID_RE.fullmatch(given):
        return given
    return f"{getrandbits(128):032x}"


def problem(status: int, detail: str, request_id: str, *, kind: str | None = None,
            **extra: Any) -> dict[str, Any]:
    """A problem document; ``kind`` names the type (default: the status phrase)."""
    phrase = HTTPStatus(status).phrase
    slug = kind or phrase.lower().replace(" ", "-").replace("'", "")
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug,
        "title": phrase,
        "status": status,
        "detail": detail,
        "request_id": request_id,
    }
    body.update(extra)
    return body


def problem_bytes(status: int, detail: str, request_id: str, *, kind: str | None = None,
                  **extra: Any) -> bytes:
    """:func:`problem` serialised."""
    return json.dumps(problem(status, detail, request_id, kind=kind, **extra)).encode()
