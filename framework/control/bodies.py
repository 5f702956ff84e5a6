"""Reading the admin API's requests: JSON bodies, record fields, list cursors.

Everything a client sends is checked here before it reaches the registry: a body
that is not a JSON object, an unknown field, a wrong type, a bad id or placement is
400 naming the field; a plan that is not in the plans file is 422 naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from aiohttp import web

from framework.control.errors import BadRequest, PayloadTooLarge, Unprocessable
from framework.control.plans import PlanSet
from framework.control.store import ACTIVE, SUSPENDED
from framework.tenant_config import TENANT_ID_RE

PLACEMENT_RE = re.compile(r"^(dedicated|pool:[a-z0-9][a-z0-9-]{0,62})$")
MAX_NAME = 200
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
MAX_BODY = 64 * 1024
CREATE_KEYS = frozenset(("id", "name", "plan", "placement"))
PATCH_KEYS = frozenset(("plan", "status", "name", "placement"))


async def read_body(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """The JSON object of the body, with only ``allowed`` fields (else 400)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"the body is over {MAX_BODY} bytes")
    chunks, size = [], 0
    while chunk := await request.content.read(16384):
        size += len(chunk)
        if size > MAX_BODY:  # a chunked body declares no length
            raise PayloadTooLarge(f"the body is over {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return body


def string(body: dict[str, Any], key: str) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value


def check_fields(body: dict[str, Any], plans: PlanSet) -> dict[str, str]:
    """Validate record fields of a create or patch body; the plan is 422 when unknown."""
    out: dict[str, str] = {}
    if "name" in body:
        name = string(body, "name")
        if len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
            raise BadRequest(f"name must be at most {MAX_NAME} printable characters")
        out["name"] = name
    if "placement" in body:
        placement = string(body, "placement")
        if not PLACEMENT_RE.match(placement):
            raise BadRequest('placement must be "dedicated" or "pool:<name>"')
        out["placement"] = placement
    if "status" in body:
        status = string(body, "status")
        if status not in (ACTIVE, SUSPENDED):
            raise BadRequest('status must be "active" or "suspended" (DELETE offboards)')
        out["status"] = status
    if "plan" in body:
        plan = string(body, "plan")
        if plan not in plans.plans:
            raise Unprocessable(f"plan {plan!r} is not in the plans file "
                                f"(plans: {', '.join(sorted(plans.plans))})",
                                kind="unknown-plan", plan=plan)
        out["plan"] = plan
    return out


def encode_cursor(tenant_id: str) -> str:
    """An opaque cursor: the last id looked at, base64url."""
    return base64.urlsafe_b64encode(tenant_id.encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> str:
    """The tenant id a ``cursor`` continues after ('' for none); 400 for one not ours."""
    if not raw:
        return ""
    try:
        tid = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("cursor is not one this API gave out") from None
    if not TENANT_ID_RE.match(tid):
        raise BadRequest("cursor is not one this API gave out")
    return tid
