"""The parts every OpenAPI document shares: error statuses, component schemas, headers
and responses, and the routes every tenant has (framework/openapi.py puts them together)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PROBLEM = "application/problem+json"
JSON = "application/json"
JOB_ID_PATTERN = "^[0-9a-f]{32}$"
SCHEMAS = "#/components/schemas/"

# Every error status of the HTTP contract (DESIGN.md), with what it means here.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Bad request: the body is not JSON, does not match the input schema, "
                        "or a query parameter is wrong."),
    401: ("Unauthenticated", "Valid credentials are required."),
    403: ("Forbidden", "The credential belongs to another tenant, no authorization rule grants "
                       "this call, or the service is disabled."),
    404: ("NotFound", "No such service, operation or job (or the job is not yours)."),
    408: ("RequestTimeout", "The request body did not arrive in time."),
    409: ("Conflict", "The job has already started or finished; only a queued job can be "
                      "cancelled."),
    413: ("PayloadTooLarge", "The request body is over MTP_MAX_BODY."),
    414: ("UriTooLong", "The request target is over the HTTP parser's limit."),
    429: ("TooManyRequests", "A rate limit, the concurrency limit or the daily quota refused "
                             "the call."),
    431: ("HeadersTooLarge", "The request's header fields are over the HTTP parser's limit."),
    500: ("InternalError", "The service raised, or its result is not JSON or too large; the "
                           "error_id is in the log."),
    502: ("BadGateway", "The framework is unreachable."),
    503: ("Unavailable", "Saturated, a dependency is down, or the service's circuit breaker is "
                        "open."),
    504: ("GatewayTimeout", "The service's deadline passed."),
    508: ("LoopDetected", "context.call nested too deeply (a call cycle)."),
}
# What can answer each kind of route (the sidecar's parser and stages, then the framework).
PARSER = (414, 431)
GATEWAY = (*PARSER, 401, 403, 429, 502, 503, 504)
SERVICE_ERRORS = (*GATEWAY, 400, 404, 408, 413, 500, 508)
JOB_ERRORS = (*GATEWAY, 404)


def ref(kind: str, name: str) -> dict[str, str]:
    """A reference to ``#/components/<kind>/<name>``."""
    return {"$ref": f"#/components/{kind}/{name}"}


def responses_for(statuses: Iterable[int]) -> dict[str, Any]:
    """The error responses of ``statuses``, by reference."""
    return {str(status): ref("responses", ERRORS[status][0]) for status in sorted(statuses)}


def success_headers() -> dict[str, Any]:
    """Headers every answer through the sidecar may carry."""
    return {"X-Request-ID": ref("headers", "X-Request-ID"),
            "RateLimit-Limit": ref("headers", "RateLimit-Limit"),
            "RateLimit-Remaining": ref("headers", "RateLimit-Remaining"),
            "RateLimit-Reset": ref("headers", "RateLimit-Reset"),
            "X-Quota-Warning": ref("headers", "X-Quota-Warning")}


def fixed_paths() -> dict[str, Any]:
    """The routes every tenant has: the service list, jobs, this document, health."""
    job_param = {"name": "job_id", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": JOB_ID_PATTERN}}
    job_ok = {"headers": success_headers(),
              "content": {JSON: {"schema": {"$ref": SCHEMAS + "Job"}}}}
    no_credentials: list[dict[str, list[str]]] = []
    return {
        "/services": {"get": {
            "operationId": "list_services", "tags": ["platform"],
            "summary": "The services the caller may invoke",
            "responses": {"200": {"description": "The services and operations you may call.",
                                  "headers": success_headers(),
                                  "content": {JSON: {"schema": {
                                      "$ref": SCHEMAS + "ServiceList"}}}},
                          **responses_for(GATEWAY)}}},
        "/jobs/{job_id}": {
            "parameters": [job_param],
            "get": {"operationId": "get_job", "tags": ["platform"],
                    "summary": "A job's state and, once finished, its result or error",
                    "description": "Visible to the principal that created it and to role "
                                   "admin; 404 to anyone else.",
                    "responses": {"200": {"description": "The job.", **job_ok},
                                  **responses_for(JOB_ERRORS)}},
            "delete": {"operationId": "cancel_job", "tags": ["platform"],
                       "summary": "Cancel a job that has not started",
                       "responses": {"200": {"description": "The job, now cancelled.",
                                             **job_ok},
                                     **responses_for((*JOB_ERRORS, 409))}},
        },
        "/openapi.json": {"get": {
            "operationId": "openapi", "tags": ["platform"],
            "summary": "This document, for the caller",
            "responses": {"200": {"description": "The OpenAPI document.",
                                  "headers": success_headers(),
                                  "content": {JSON: {"schema": {"type": "object"}}}},
                          **responses_for(GATEWAY)}}},
        "/healthz": {"get": {
            "operationId": "healthz", "tags": ["platform"], "security": no_credentials,
            "summary": "Liveness of the sidecar (no credentials)",
            "responses": {"200": {"description": "Alive.",
                                  "headers": {"X-Request-ID": ref("headers", "X-Request-ID")},
                                  "content": {JSON: {"schema": {"$ref": SCHEMAS + "Health"}}}},
                          **responses_for(PARSER)}}},
        "/readyz": {"get": {
            "operationId": "readyz", "tags": ["platform"], "security": no_credentials,
            "summary": "Readiness: the framework answers and its config is loaded "
                       "(no credentials)",
            "responses": {"200": {"description": "Ready.",
                                  "headers": {"X-Request-ID": ref("headers", "X-Request-ID")},
                                  "content": {JSON: {"schema": {"$ref": SCHEMAS + "Health"}}}},
                          **responses_for((*PARSER, 503))}}},
    }


def base_schemas() -> dict[str, Any]:
    """The component schemas every document has."""
    nullable_time = {"type": ["string", "null"], "format": "date-time"}
    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details, with the request id.",
            "required": ["type", "title", "status", "detail", "request_id"],
            "properties": {
                "type": {"type": "string", "format": "uri-reference",
                         "description": "urn:mtp:problem:<kind>"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "request_id": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
                "error_id": {"type": "string",
                             "description": "On 500: the id of the log line with the cause."},
                "path": {"type": "string",
                         "description": "On 400 invalid-input: where the payload is wrong."},
            },
        },
        "JobAccepted": {
            "type": "object", "required": ["job_id", "status"],
            "properties": {"job_id": {"type": "string", "pattern": JOB_ID_PATTERN},
                           "status": {"const": "queued"}},
        },
        "Job": {
            "type": "object",
            "required": ["job_id", "service", "operation", "status", "created_at"],
            "properties": {
                "job_id": {"type": "string", "pattern": JOB_ID_PATTERN},
                "service": {"type": "string"},
                "operation": {"type": ["string", "null"]},
                "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                "request_id": {"type": ["string", "null"]},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": nullable_time,
                "finished_at": nullable_time,
                "result": {"description": "What the service returned (status succeeded)."},
                "error": {"$ref": SCHEMAS + "Problem"},
            },
        },
        "ServiceList": {
            "type": "object", "required": ["services"],
            "properties": {"services": {"type": "array", "items": {
                "type": "object", "required": ["name", "description", "operations", "mode"],
                "properties": {"name": {"type": "string"},
                               "description": {"type": "string"},
                               "operations": {"type": "array", "items": {"type": "string"}},
                               "mode": {"enum": ["sync", "async", "both"]}}}}},
        },
        "Health": {
            "type": "object", "required": ["status"],
            "properties": {"status": {"type": "string"}, "tenant": {"type": "string"},
                           "limiter": {"type": "string"}},
        },
    }


def headers() -> dict[str, Any]:
    """The component headers."""
    def integer(description: str, required: bool = False) -> dict[str, Any]:
        return {"description": description, "required": required,
                "schema": {"type": "string", "pattern": "^[0-9]+$"}}

    return {
        "X-Request-ID": {"description": "The request id (the client's when well formed).",
                         "required": True, "schema": {"type": "string"}},
        "Retry-After": integer("Whole seconds to wait before trying again.", required=True),
        "RateLimit-Limit": integer("The binding limit's quota."),
        "RateLimit-Remaining": integer("What is left of it."),
        "RateLimit-Reset": integer("Seconds until it resets."),
        "X-Quota-Warning": {"description": "Past 80% of the daily quota.",
                            "schema": {"type": "string"}},
        "Preference-Applied": {"description": "RFC 7240: the preferences honoured.",
                               "schema": {"type": "string"}},
        "WWW-Authenticate": {"description": "The challenge.", "required": True,
                             "schema": {"type": "string"}},
        "Allow": {"description": "The methods allowed.", "schema": {"type": "string"}},
    }


def error_responses() -> dict[str, Any]:
    """One component response per error status: problem+json, with its headers."""
    found: dict[str, Any] = {}
    for status, (name, description) in sorted(ERRORS.items()):
        hdrs: dict[str, Any] = {"X-Request-ID": ref("headers", "X-Request-ID")}
        if status == 401:
            hdrs["WWW-Authenticate"] = ref("headers", "WWW-Authenticate")
        if status == 429:
            hdrs["Retry-After"] = ref("headers", "Retry-After")
            for name_ in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
                hdrs[name_] = ref("headers", name_)
        if status == 503:
            hdrs["Retry-After"] = {"description": "When saturated or the breaker is open.",
                                   "schema": {"type": "string", "pattern": "^[0-9]+$"}}
        found[name] = {"description": description, "headers": hdrs,
                       "content": {PROBLEM: {"schema": {"$ref": SCHEMAS + "Problem"}}}}
    return found
