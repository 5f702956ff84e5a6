"""A tenant with event routes, served by a real `mtp run` (tests/events/test_*.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.sidecar.run_stack import RunStack, tenant_toml, write_tenant

# Appends what it was given to the file named in its config: one JSON line per call.
RECORD = '''"""Record the event it was given."""
import json
import os
import time


def handle(context):
    started = time.time()
    event = getattr(context, "event", None)
    fd = os.open(context.config["out"] + ".started", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, json.dumps({"id": (event or {}).get("id"), "pid": os.getpid()}).encode()
                 + b"\\n")
    finally:
        os.close(fd)
    data = context.payload if isinstance(context.payload, dict) else {}
    time.sleep(float(data.get("sleep", 0)))
    line = json.dumps({"service": context.service, "event": event, "payload": context.payload,
                       "user": context.user, "request_id": context.request_id,
                       "started": started, "ended": time.time()})
    fd = os.open(context.config["out"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode() + b"\\n")
    finally:
        os.close(fd)
    return {"ok": True}
'''

# Fails while the file named in its config exists.
FLAKY = '''"""Fail while a marker file exists, else record."""
import json
import os


def handle(context):
    if os.path.exists(context.config["marker"]):
        raise RuntimeError("not yet")
    with open(context.config["out"], "a") as fh:
        fh.write(json.dumps({"event": context.event}) + "\\n")
    return {"ok": True}
'''

EMITTER = '''"""Publish an event from a service."""


def handle(context):
    data = context.payload or {}
    return {"id": context.emit(data["type"], data.get("data"), subject=data.get("subject"))}
'''


def events_toml(root: Path, extra_routes: str = "") -> str:
    base = tenant_toml().replace('''[[authz.rules]]
service = "*"
roles = ["admin"]''', '''[[authz.rules]]
service = "*"
roles = ["admin"]

[[authz.rules]]
service = "record"

[[authz.rules]]
service = "eu"

[[authz.rules]]
service = "flaky"

[[authz.rules]]
service = "emitter"

[[authz.rules]]
events = ["order.*", "flaky.*", "secret.*", "emitted.*", "slow.*"]

[[authz.rules]]
events = ["admin.*"]
roles = ["admin"]''')
    return base + f'''
[services.record]
config = {{ out = "{root / 'record.jsonl'}" }}

[services.eu]
config = {{ out = "{root / 'eu.jsonl'}" }}

[services.secret]
config = {{ out = "{root / 'secret.jsonl'}" }}

[services.flaky]
config = {{ out = "{root / 'flaky.jsonl'}", marker = "{root / 'failing'}" }}

[[events.routes]]
types = ["order.*", "emitted.*", "slow.*"]
service = "record"

[[events.routes]]
types = ["order.created"]
subject = "eu/*"
service = "eu"

[[events.routes]]
types = ["flaky.*"]
service = "flaky"
retries = 2
backoff = 0.05

[[events.routes]]
types = ["secret.*"]
service = "secret"
{extra_routes}'''


def write_events_tenant(root: Path, extra_routes: str = "") -> Path:
    tdir = write_tenant(root, events_toml(root, extra_routes))
    services = tdir / "services"
    (services / "record.py").write_text(RECORD)
    (services / "eu.py").write_text(RECORD)
    (services / "secret.py").write_text(RECORD)
    (services / "flaky.py").write_text(FLAKY)
    (services / "emitter.py").write_text(EMITTER)
    return tdir


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_lines(path: Path, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The records of ``path`` once there are at least ``count`` (AssertionError if not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = lines(path)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{path.name}: {len(lines(path))} records, wanted {count}")


def structured(run: RunStack, auth: dict[str, str], event: dict[str, Any],
               extra: dict[str, str] | None = None):
    body = json.dumps({"specversion": "1.0", **event}).encode()
    return run.call("POST", "/events", {**auth, "Content-Type": "application/cloudevents+json",
                                        **(extra or {})}, body)


def binary(run: RunStack, auth: dict[str, str], attrs: dict[str, str], data: Any,
           extra: dict[str, str] | None = None):
    headers = {**auth, **{f"ce-{k}": v for k, v in attrs.items()},
               "Content-Type": "application/json", **(extra or {})}
    return run.call("POST", "/events", headers, json.dumps(data).encode())


def audit_events(run: RunStack) -> list[dict[str, Any]]:
    return [line for line in lines(run.audit) if line.get("method") == "EVENT"]
