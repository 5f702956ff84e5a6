"""A tenant whose services use every part of the OpenAPI document (modes, operations, schemas)."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

API_KEY = "openapi-key-0123456789"

TENANT_TOML = f"""
[tenant]
id = "acme"
name = "Acme"
framework_version = "0.1.0"

[services.hidden]
enabled = false

[auth.jwt]
algorithms = ["HS256"]
leeway = 0

[auth.api_keys.ci-bot]
hash = "sha256:{hashlib.sha256(API_KEY.encode()).hexdigest()}"
roles = ["deployer"]

[authz]
enabled = true

[[authz.rules]]
service = "whoami"

[[authz.rules]]
service = "tree"

[[authz.rules]]
service = "report"

[[authz.rules]]
service = "orders"
operations = ["create"]
groups = ["sales"]

[[authz.rules]]
service = "*"
operations = ["*"]
roles = ["admin"]

[limits]
rate = 10000
burst = 10000
"""

SERVICES = {
    "whoami": '''
        """Who called, and with what."""

        def handle(context):
            return {"user": context.user, "payload": context.payload}
    ''',
    "orders": '''
        """Create and fetch orders.

        An order names an item and how many of it.
        """
        OPERATIONS = ["create", "get"]
        INPUT_SCHEMA = {
            "type": "object",
            "required": ["item"],
            "properties": {"item": {"$ref": "#/$defs/item"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 100}},
            "additionalProperties": False,
            "$defs": {"item": {"type": "string", "minLength": 1, "maxLength": 20}},
        }

        def handle(context):
            return {"operation": context.operation, "order": context.payload}
    ''',
    "tree": '''
        """Count the nodes of a tree (a recursive schema)."""
        MODE = "sync"
        TIMEOUT = 5
        INPUT_SCHEMA = {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "maxLength": 10},
                           "children": {"type": "array", "items": {"$ref": "#"},
                                        "maxItems": 2}},
        }

        def count(node):
            return 1 + sum(count(child) for child in node.get("children", []))

        def handle(context):
            return {"nodes": count(context.payload)}
    ''',
    "report": '''
        """Build a report, always as a job."""
        MODE = "async"

        def handle(context):
            return {"report": "done"}
    ''',
    "hidden": '''
        """Disabled in tenant.toml."""

        def handle(context):
            return {}
    ''',
    "broken": '''
        """Raises on import."""
        raise RuntimeError("cannot start")
    ''',
}


def make_openapi_tenant(root: Path) -> Path:
    """Write the tenant under ``root`` and return it."""
    (root / "services").mkdir(parents=True)
    (root / "tenant.toml").write_text(TENANT_TOML)
    for name, source in SERVICES.items():
        (root / "services" / f"{name}.py").write_text(textwrap.dedent(source).lstrip())
    return root
