"""A tenant whose services exercise metering, breakers, composition and live config."""

from __future__ import annotations

import textwrap
from pathlib import Path

SIDECAR_SECRET = "ops-sidecar-secret-0123456789abcdef"
BILLING_SECRET = "ops-billing-secret"
TENANT = "acme"
PRICES = {"per_call": 0.5, "per_cpu_second": 2.0, "per_gb": 1000.0}
COOLDOWN = 1.0

PUBLIC = ("echo", "boom", "flaky", "nofallback", "slow", "flagged", "composer", "loop",
          "later", "hello")

TENANT_TOML = """
[tenant]
id = "acme"
name = "Acme"
framework_version = "0.1.0"

[services.flaky]
breaker = {{ failures = 2, cooldown = {cooldown} }}

[services.nofallback]
breaker = {{ failures = 2, cooldown = {cooldown} }}

[services.slow]
timeout = 0.3
breaker = {{ failures = 1, cooldown = 60 }}

[services.flagged]
config = {{ color = "blue" }}

[flags.beta]
enabled = false

[authz]
enabled = true
{rules}
[[authz.rules]]
service = "secret"
operations = ["*"]
roles = ["boss"]

[billing]
currency = "EUR"
per_call = {per_call}
per_cpu_second = {per_cpu_second}
per_gb = {per_gb}
webhook_url = "{webhook_url}"
webhook_secret_env = "MTP_BILLING_SECRET"
"""

SERVICES = {
    "echo": '''
        """Echo the caller and payload (and burn a little CPU)."""

        def handle(context):
            sum(i * i for i in range(20000))
            return {"payload": context.payload, "user": context.user,
                    "request_id": context.request_id, "service": context.service}
    ''',
    "hello": '''
        """Say hello."""

        def handle(context):
            return {"hello": context.user}
    ''',
    "boom": '''
        """Always raises (no breaker)."""

        def handle(context):
            raise RuntimeError("boom")
    ''',
    "flaky": '''
        """Fails on request; has a fallback."""

        def handle(context):
            if (context.payload or {}).get("fail"):
                raise RuntimeError("flaky failed")
            return {"ok": True}

        def fallback(context):
            return {"fallback": True, "user": context.user}
    ''',
    "nofallback": '''
        """Fails on request; no fallback."""

        def handle(context):
            if (context.payload or {}).get("fail"):
                raise RuntimeError("failed")
            return {"ok": True}
    ''',
    "slow": '''
        """Sleeps past its 0.3 s deadline on request."""
        import time

        def handle(context):
            time.sleep((context.payload or {}).get("seconds", 0))
            return {"ok": True}
    ''',
    "flagged": '''
        """Shows the live flag and config."""

        def handle(context):
            return {"beta": context.flags.enabled("beta"), "color": context.config.get("color")}
    ''',
    "composer": '''
        """Calls another service with context.call."""

        def handle(context):
            p = context.payload or {}
            inner = context.call(p["service"], p.get("payload"), p.get("operation"))
            return {"inner": inner, "request_id": context.request_id}
    ''',
    "loop": '''
        """Calls itself forever: the depth limit stops it."""

        def handle(context):
            return context.call("loop", {})
    ''',
    "later": '''
        """Async only."""
        MODE = "async"

        def handle(context):
            if (context.payload or {}).get("fail"):
                raise RuntimeError("job failed")
            return {"done": True}
    ''',
    "secret": '''
        """Only role boss may call this."""

        def handle(context):
            return {"secret": 42}
    ''',
}


def make_tenant(root: Path, webhook_url: str = "") -> Path:
    """Write the tenant to ``root``."""
    (root / "services").mkdir(parents=True, exist_ok=True)
    rules = "".join(f'[[authz.rules]]\nservice = "{name}"\noperations = ["*"]\n'
                    for name in PUBLIC)
    (root / "tenant.toml").write_text(TENANT_TOML.format(
        cooldown=COOLDOWN, rules=rules, webhook_url=webhook_url, **PRICES))
    for name, body in SERVICES.items():
        (root / "services" / f"{name}.py").write_text(textwrap.dedent(body).lstrip())
    return root
