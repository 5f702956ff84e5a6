"""Test helpers for this tenant's services: load a module file, build a context.

Each test imports its service straight from ``services/<name>.py`` and calls
``handle`` with a plain context object carrying the fields the platform passes
(DESIGN: tenant_id, service, operation, user, groups, roles, auth_method,
payload, params, request_id, config, flags, logger, deadline). No server and no
framework import are needed, so these tests run anywhere pytest does.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SERVICES = Path(__file__).resolve().parents[1] / "services"


def load_service(name: str) -> ModuleType:
    """Import ``services/<name>.py`` as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"tenant_service_{name}", SERVICES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Flags:
    """Feature flags as the platform hands them over: ``enabled(name)``."""

    on: set[str] = field(default_factory=set)

    def enabled(self, name: str) -> bool:
        return name in self.on


@dataclass
class Context:
    """The fields of the platform's request context that services read."""

    service: str
    operation: str | None = None
    payload: Any = None
    params: dict[str, str] = field(default_factory=dict)
    tenant_id: str = "demo"
    user: str = "alice"
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    auth_method: str = "jwt"
    request_id: str = "test-request"
    config: dict[str, Any] = field(default_factory=dict)
    flags: Flags = field(default_factory=Flags)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("tenant.test"))
    deadline: float = field(default_factory=lambda: time.monotonic() + 30)


@pytest.fixture
def make_context():
    """``make_context("orders", operation="create", payload={...})`` -> a Context."""
    return Context
