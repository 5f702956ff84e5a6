"""A throwaway tenant with services that exercise every path of the framework."""

from __future__ import annotations

import textwrap
from pathlib import Path

SECRET = "test-sidecar-secret-0123456789"
TENANT = "acme"

TENANT_TOML = """
[tenant]
id = "acme"
name = "Acme"
framework_version = "0.1.0"

[services.echo]
config = { currency = "EUR" }

[services.hang]
timeout = 0.5

[services.disabled]
enabled = false

[services.forced]
mode = "sync"

[flags.beta]
enabled = true
rollout_percent = 0
users = ["alice"]
"""

SERVICES = {
    "echo": '''
        """Echo the context back."""
        import os
        import time

        def handle(context):
            context.logger.info("echo called", extra={"keys": sorted(context.payload)})
            if context.payload.get("sleep"):
                time.sleep(context.payload["sleep"])
            return {
                "tenant_id": context.tenant_id, "service": context.service,
                "operation": context.operation, "user": context.user,
                "groups": list(context.groups), "roles": list(context.roles),
                "auth_method": context.auth_method, "payload": context.payload,
                "params": dict(context.params), "request_id": context.request_id,
                "config": dict(context.config), "beta": context.flags.enabled("beta"),
                "time_left": context.time_left() > 0, "pid": os.getpid(),
            }
    ''',
    "boom": '''
        """Always raises."""

        def handle(context):
            raise RuntimeError("secret internal detail")
    ''',
    "hang": '''
        """Sleeps past its deadline."""
        import time

        def handle(context):
            time.sleep(context.payload.get("seconds", 2))
            return {"woke": True}
    ''',
    "huge": '''
        """Returns more than MTP_MAX_RESULT."""

        def handle(context):
            return {"blob": "x" * 200_000}
    ''',
    "nonjson": '''
        """Returns something JSON cannot encode."""

        def handle(context):
            return {"when": object()}
    ''',
    "ops": '''
        """Operations, sync only, with a schema."""
        OPERATIONS = ["create", "get"]
        MODE = "sync"
        TIMEOUT = 5
        INPUT_SCHEMA = {
            "type": "object",
            "properties": {"qty": {"type": "integer", "minimum": 1}},
            "additionalProperties": False,
        }

        def handle(context):
            return {"op": context.operation, "payload": context.payload}
    ''',
    "slow": '''
        """Async only: a job that takes a while."""
        import time
        MODE = "async"
        TIMEOUT = 30

        def handle(context):
            time.sleep(context.payload.get("seconds", 0.05))
            if context.payload.get("fail"):
                raise ValueError("job failed")
            return {"done": True, "by": context.user}
    ''',
    "forced": '''
        """Declares both; tenant.toml forces sync."""
        MODE = "both"

        def handle(context):
            return {"ok": True}
    ''',
    "disabled": '''
        """Switched off in tenant.toml."""

        def handle(context):
            return {"ok": True}
    ''',
    "broken": '''
        """Does not even parse."""

        def handle(context)
            return 1
    ''',
    "nohandle": '''
        """Forgot handle."""
        HANDLE = None
    ''',
    "os": '''
        """A tenant module named like the stdlib: must never shadow it."""
        from pathlib import Path
        Path(__file__).with_name("os_imported.marker").write_text("x")

        def handle(context):
            return {"tenant_os": True}
    ''',
    "__init__": '''
        from pathlib import Path
        Path(__file__).with_name("init_imported.marker").write_text("x")
    ''',
    "Hello": '''
        from pathlib import Path
        Path(__file__).with_name("upper_imported.marker").write_text("x")

        def handle(context):
            return {"upper": True}
    ''',
}


def make_tenant(root: Path, toml: str = TENANT_TOML, services: dict[str, str] | None = None,
                ) -> Path:
    """Write tenant.toml and services/ under ``root``; returns ``root``."""
    (root / "services").mkdir(parents=True, exist_ok=True)
    (root / "tenant.toml").write_text(toml)
    for name, source in (SERVICES if services is None else services).items():
        (root / "services" / f"{name}.py").write_text(textwrap.dedent(source).lstrip())
    return root


def markers(root: Path) -> list[str]:
    """Side-effect files written by modules that must not have been imported."""
    return sorted(p.name for p in (root / "services").glob("*.marker"))
