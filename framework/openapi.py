"""The OpenAPI 3.1 document of a tenant's HTTP API, as a client sees it through the sidecar.

Pure document building (no web framework): ``GET /openapi.json`` (framework/openapi_view.py)
passes the services the caller may invoke, ``mtp openapi`` every enabled service. The
document describes the sidecar's answers: every route here is reached through it, and
every error is problem+json (RFC 9457) with the request id.

Service paths are literal (``/services/orders/create``, not ``/services/{service}``), one
per operation the caller may invoke, so the document offers nothing that would be
answered 403 or 404. Request bodies come from ``INPUT_SCHEMA``: each is a component
schema, its local ``$ref`` pointers (``#``, ``#/$defs/x``) rewritten to point into that
component, since inside the document ``#`` is the document itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from framework import __version__
from framework.openapi_parts import (
    JSON,
    SCHEMAS,
    SERVICE_ERRORS,
    base_schemas,
    error_responses,
    fixed_paths,
    headers,
    ref,
    responses_for,
    success_headers,
)
from framework.registry import ServiceSpec
from framework.tenant_config import TenantConfig

OPENAPI_VERSION = "3.1.0"
# Keywords whose values are data, not schemas: a "$ref" key inside them is not a reference.
DATA_KEYWORDS = frozenset(("const", "enum", "default", "examples", "example"))


@dataclass(frozen=True)
class Offered:
    """A service in the document, with the operations offered (all or the caller's)."""

    spec: ServiceSpec
    operations: tuple[str, ...]


def offer_all(specs: Iterable[ServiceSpec]) -> list[Offered]:
    """Every operation of every service (the offline document)."""
    return [Offered(spec, spec.operations) for spec in specs]


def document(tenant: TenantConfig, services: Iterable[Offered]) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``tenant`` offering ``services``."""
    schemas = base_schemas()
    paths: dict[str, Any] = {}
    tags = []
    for offered in sorted(services, key=lambda o: o.spec.name):
        spec = offered.spec
        tags.append({"name": spec.name, "description": spec.description or spec.name})
        body_ref = None
        schema = input_schema(spec)
        if schema is not None:
            key = f"input.{spec.name}"
            schemas[key] = rebase(schema, SCHEMAS + key)
            body_ref = {"$ref": SCHEMAS + key}
        targets = [(op, f"/services/{spec.name}/{op}") for op in offered.operations]
        if not spec.operations:
            targets = [(None, f"/services/{spec.name}")]
        for operation, path in targets:
            paths[path] = service_path(spec, operation, body_ref)
    paths.update(fixed_paths())
    tags.append({"name": "platform", "description": "Routes every tenant has."})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"{tenant.name or tenant.tenant_id} services",
            "version": __version__,
            "description": (
                f"The services of tenant {tenant.tenant_id!r} on mtp {__version__}. A service "
                "call answers 200 with what the service returned, or 202 with a job to poll "
                "at its Location when it runs asynchronously (`Prefer: respond-async` or "
                "`?mode=async`; a service's mode says which of them it allows). Every error "
                "is application/problem+json (RFC 9457) with the request id. Event routes "
                "are not part of this version."),
        },
        "servers": [{"url": "/"}],
        "security": security(tenant),
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": error_responses(),
            "headers": headers(),
            "securitySchemes": security_schemes(tenant),
        },
    }


def input_schema(spec: ServiceSpec) -> Any:
    """The service's INPUT_SCHEMA (the registry keeps it in the validator), or None."""
    return spec.validator.schema if spec.validator is not None else None


def accepts_empty(spec: ServiceSpec) -> bool:
    """Whether the payload of a call without a body ({}) passes INPUT_SCHEMA."""
    if spec.validator is None:
        return True
    try:
        return bool(spec.validator.is_valid({}))
    except Exception:  # e.g. a $ref that cannot be resolved: calls fail too, offer less
        return False


def rebase(schema: Any, base: str) -> Any:
    """``schema`` with its local JSON-pointer ``$ref``s pointing below ``base`` instead of ``#``.

    A schema (or subschema) with its own ``$id`` is its own resource, where ``#`` already
    means itself: left as it is.
    """
    if isinstance(schema, dict) and "$id" in schema:
        return schema
    return _rebase(schema, base)


def _rebase(node: Any, base: str) -> Any:
    if isinstance(node, list):
        return [_rebase(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("$ref", "$dynamicRef") and isinstance(value, str) and (
                value == "#" or value.startswith("#/")):
            out[key] = base + value[1:]
        elif key in DATA_KEYWORDS or (isinstance(value, dict) and "$id" in value):
            out[key] = value
        else:
            out[key] = _rebase(value, base)
    return out


def service_path(spec: ServiceSpec, operation: str | None,
                 body_ref: dict[str, str] | None) -> dict[str, Any]:
    """The path item of one service operation: GET and POST, the same call."""
    name = spec.name if operation is None else f"{spec.name}.{operation}"
    modes = {"sync": "runs synchronously only (`Prefer: respond-async` is ignored, "
                     "`?mode=async` is 400)",
             "async": "runs asynchronously only: every call is answered 202 with a job",
             "both": "runs synchronously (200) unless the call asks for a job with "
                     "`Prefer: respond-async` or `?mode=async` (202)"}
    description = (f"{spec.doc or spec.name}\n\nThis service {modes[spec.mode]}. "
                   f"Deadline: {spec.timeout:g} s (504 past it).")
    parameters: list[dict[str, Any]] = [{
        "name": "mode", "in": "query", "required": False,
        "description": {
            "sync": "Only `sync`: this service does not run as a job (`async` is 400).",
            "async": "Ignored: every call of this service runs as a job.",
            "both": "`async` runs the call as a job (202); `sync` runs it in the request, "
                    "even with `Prefer: respond-async`."}[spec.mode],
        "schema": {"type": "string",
                   "enum": ["sync"] if spec.mode == "sync" else ["sync", "async"]},
    }]
    responses: dict[str, Any] = {}
    if spec.mode != "sync":
        parameters.append({
            "name": "Prefer", "in": "header", "required": False,
            "description": "RFC 7240: `respond-async` runs the call as a job; with "
                           "`wait=N` (N <= 60) the answer waits up to N s and is the 200 of "
                           "a sync call if the job is done by then.",
            "schema": {"type": "string"},
            "examples": {"async": {"value": "respond-async"},
                         "wait": {"value": "respond-async, wait=5"}}})
    sync_note = ("What the service returned." if spec.mode == "sync" else
                 "What the service returned" + (
                     " (only with `Prefer: respond-async, wait=N`, when the job was done in "
                     "time)." if spec.mode == "async" else
                     ": a sync call, or a job done within `Prefer: wait=N`."))
    responses["200"] = {
        "description": sync_note,
        "headers": {**success_headers(),
                    "Preference-Applied": ref("headers", "Preference-Applied")},
        "content": {JSON: {"schema": {"description": "Any JSON value."}}},
    }
    if spec.mode != "sync":
        responses["202"] = {
            "description": "Queued as a job: poll its Location.",
            "headers": {**success_headers(),
                        "Location": {"required": True,
                                     "description": "`/jobs/{job_id}` of the new job.",
                                     "schema": {"type": "string",
                                                "pattern": "^/jobs/[0-9a-f]{32}$"}},
                        "Preference-Applied": ref("headers", "Preference-Applied")},
            "content": {JSON: {"schema": {"$ref": SCHEMAS + "JobAccepted"}}},
            "links": {
                "GetJob": {"operationId": "get_job",
                           "parameters": {"job_id": "$response.body#/job_id"},
                           "description": "The job's state and result."},
                "CancelJob": {"operationId": "cancel_job",
                              "parameters": {"job_id": "$response.body#/job_id"},
                              "description": "Cancel the job while it is queued."},
            },
        }
    responses.update(responses_for(SERVICE_ERRORS))
    extensions = {"x-mtp-mode": spec.mode, "x-mtp-timeout": spec.timeout}
    item: dict[str, Any] = {}
    body = {
        # A call without a body has the payload {}: required where the schema refuses {}.
        "required": not accepts_empty(spec),
        "description": "The payload (context.payload); a call without a body has the "
                       "payload {}.",
        "content": {JSON: {"schema": body_ref or {"description": "Any JSON value."}}},
    }
    for method in ("get", "post"):
        operation_object: dict[str, Any] = {
            # Unique: names and operations never hold a dot.
            "operationId": f"{method}.{name}",
            "tags": [spec.name],
            "summary": spec.description or f"Call {name}",
            "description": description,
            "parameters": parameters,
            # GET is the same call as POST, body included (RFC 9110 leaves a GET body's
            # meaning to the server; here it is the payload, as for POST).
            "requestBody": body,
            "responses": responses,
            **extensions,
        }
        item[method] = operation_object
    return item


def security_schemes(tenant: TenantConfig) -> dict[str, Any]:
    """The credentials this tenant's sidecar accepts."""
    schemes: dict[str, Any] = {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": f"A JWT ({', '.join(tenant.jwt.algorithms)}) with sub, exp "
                                  f"and the {tenant.jwt.tenant_claim!r} claim."},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                   "description": "An API key of this tenant."},
    }
    if tenant.ldap.enabled:
        schemes["basic"] = {"type": "http", "scheme": "basic",
                            "description": "A directory (LDAP) username and password."}
    return schemes


def security(tenant: TenantConfig) -> list[dict[str, list[str]]]:
    """Any one of the schemes (alternatives)."""
    return [{name: []} for name in security_schemes(tenant)]
