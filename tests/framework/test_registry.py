"""Service registry: names, loading, caching, the three failures, declarations, dev reload."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from framework.errors import Forbidden, ServiceInvalid, ServiceLoadFailed, ServiceNotFound
from framework.registry import Registry
from framework.tenant_config import ConfigError, parse_tenant
from tests.framework.tenant import TENANT_TOML, make_tenant, markers

TENANT = parse_tenant({"tenant": {"id": "acme"}, "services": {
    "shaped": {"mode": "async", "timeout": 2.5}, "off": {"enabled": False}}})


def registry(tmp_path: Path, services: dict[str, str], dev: bool = False) -> Registry:
    root = make_tenant(tmp_path, TENANT_TOML, services)
    return Registry(root, TENANT, dev=dev)


COUNTING = '''
"""Counts its imports."""
from pathlib import Path
counter = Path(__file__).with_name("imports.count")
counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))

def handle(context):
    return 1
'''


def test_a_module_is_imported_once_and_cached(tmp_path: Path):
    reg = registry(tmp_path, {"counted": COUNTING})
    first = reg.resolve("counted")
    assert reg.resolve("counted") is first
    assert (tmp_path / "services" / "imports.count").read_text() == "1"
    assert first.description == "Counts its imports." and first.mode == "both"
    assert first.timeout == 30.0 and first.operations == () and first.validator is None


@pytest.mark.parametrize("name", ["..", "../x", "os.path", "__init__", "Hello", "a" * 65,
                                  "echo\n", "", "1abc", "a-b", "a b", "é"])
def test_hostile_names_are_refused_before_the_filesystem(tmp_path: Path, name: str):
    reg = registry(tmp_path, {"__init__": "open('x.marker','w')", "Hello": "import sys"})
    with pytest.raises(ServiceNotFound):
        reg.resolve(name)
    assert markers(tmp_path) == []


def test_a_tenant_os_module_does_not_shadow_the_stdlib(tmp_path: Path):
    reg = registry(tmp_path, {"os": 'X = 1\ndef handle(c):\n    return "tenant"\n',
                              "json": "def handle(c):\n    return 2\n"})
    spec = reg.resolve("os")
    assert spec.handle(None) == "tenant"
    assert sys.modules["os"] is os and "tenant" not in repr(sys.modules["os"])
    assert spec.handle.__module__ == f"{reg.package}.os"
    import json

    assert json.dumps is not None and reg.resolve("json").handle(None) == 2


def test_missing_module_disabled_service_and_directory_entries(tmp_path: Path):
    reg = registry(tmp_path, {})
    (tmp_path / "services" / "adir.py").mkdir()
    with pytest.raises(ServiceNotFound):
        reg.resolve("missing")
    with pytest.raises(ServiceNotFound):
        reg.resolve("adir")
    with pytest.raises(Forbidden):
        reg.resolve("off")


def test_import_failures_name_file_and_line_and_are_cached(tmp_path: Path):
    reg = registry(tmp_path, {
        "syntax": "def handle(c)\n    return 1\n",
        "raises": '"""x"""\n\nraise RuntimeError("boom at import")\n',
        "deep": "import nonexistent_module_xyz\n",
        "exits": "import sys\nsys.exit(3)\n",
    })
    with pytest.raises(ServiceLoadFailed) as err:
        reg.resolve("syntax")
    assert err.value.detail.startswith("services/syntax.py, line 1: SyntaxError")
    with pytest.raises(ServiceLoadFailed) as err:
        reg.resolve("raises")
    assert "services/raises.py, line 3: RuntimeError" in err.value.detail
    first_id = err.value.error_id
    with pytest.raises(ServiceLoadFailed) as again:
        reg.resolve("raises")
    assert again.value.error_id == first_id  # cached, not re-imported
    with pytest.raises(ServiceLoadFailed, match="ModuleNotFoundError"):
        reg.resolve("deep")
    with pytest.raises(ServiceLoadFailed, match="SystemExit"):
        reg.resolve("exits")
    assert f"{reg.package}.raises" not in sys.modules


@pytest.mark.parametrize(("source", "reason"), [
    ("X = 1", "no callable handle"),
    ("handle = 3", "no callable handle"),
    ("def handle(c): pass\nfallback = 1", "fallback is not callable"),
    ("def handle(c): pass\nOPERATIONS = 'create'", "OPERATIONS"),
    ("def handle(c): pass\nOPERATIONS = ['Bad Name']", "OPERATIONS"),
    ("def handle(c): pass\nMODE = 'later'", "MODE"),
    ("def handle(c): pass\nTIMEOUT = 0", "TIMEOUT"),
    ("def handle(c): pass\nTIMEOUT = True", "TIMEOUT"),
    ("def handle(c): pass\nTIMEOUT = float('nan')", "TIMEOUT"),
    ("def handle(c): pass\nINPUT_SCHEMA = [1]", "INPUT_SCHEMA must be"),
    ("def handle(c): pass\nINPUT_SCHEMA = {'type': 'nothing'}", "not a valid schema"),
])
def test_unusable_modules_are_a_distinct_error(tmp_path: Path, source: str, reason: str):
    reg = registry(tmp_path, {"svc": source})
    with pytest.raises(ServiceInvalid, match=reason):
        reg.resolve("svc")


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_tenant_toml_timeout_without_a_deadline_is_refused(value: float):
    # Refused when tenant.toml is read, so no service can be resolved with it.
    with pytest.raises(ConfigError, match=r"services\.svc\.timeout: must be a finite"):
        parse_tenant({"tenant": {"id": "acme"}, "services": {"svc": {"timeout": value}}})


def test_declarations_and_tenant_overrides(tmp_path: Path):
    reg = registry(tmp_path, {
        "full": '"""\n  First line.\n\nMore."""\nOPERATIONS = ["create", "get"]\nMODE = "sync"\n'
                'TIMEOUT = 4\nINPUT_SCHEMA = {"type": "object"}\n'
                'def handle(c): pass\ndef fallback(c): pass\n',
        "shaped": "MODE = 'sync'\nTIMEOUT = 9\ndef handle(c): pass\n",
    })
    full = reg.resolve("full")
    assert full.description == "First line." and full.operations == ("create", "get")
    assert full.mode == "sync" and full.timeout == 4 and full.fallback is not None
    assert full.validator.is_valid({}) and not full.validator.is_valid([])
    assert full.listing() == {"name": "full", "description": "First line.",
                              "operations": ["create", "get"], "mode": "sync"}
    shaped = reg.resolve("shaped")
    assert shaped.mode == "async" and shaped.timeout == 2.5


def test_dev_mode_reloads_a_changed_module(tmp_path: Path):
    reg = registry(tmp_path, {"live": "def handle(c):\n    return 1\n"}, dev=True)
    assert reg.resolve("live").handle(None) == 1
    assert reg.resolve("live") is reg.resolve("live")  # unchanged: the cached module
    path = tmp_path / "services" / "live.py"
    path.write_text("def handle(c):\n    return 22\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert reg.resolve("live").handle(None) == 22
    path.unlink()
    with pytest.raises(ServiceNotFound):
        reg.resolve("live")


def test_production_mode_keeps_the_loaded_module(tmp_path: Path):
    reg = registry(tmp_path, {"live": "def handle(c):\n    return 1\n"})
    reg.resolve("live")
    path = tmp_path / "services" / "live.py"
    path.write_text("def handle(c):\n    return 22\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert reg.resolve("live").handle(None) == 1


def test_services_may_import_their_siblings_relatively(tmp_path: Path):
    reg = registry(tmp_path, {"helpers": "VALUE = 41\ndef handle(c): pass\n",
                              "user": "from . import helpers\n"
                                      "def handle(c):\n    return helpers.VALUE + 1\n"})
    assert reg.resolve("user").handle(None) == 42


def test_listing_and_problems(tmp_path: Path):
    reg = registry(tmp_path, {"good": '"""Good."""\ndef handle(c): pass\n',
                              "bad": "x = (\n", "off": "HANDLE = 1\n",
                              "Upper": "", "__init__": ""})
    assert [s.name for s in reg.available()] == ["good"]
    problems = reg.problems()
    assert any(p.startswith("services/bad.py, line 1") for p in problems)
    assert any("services/Upper.py: not a valid service name" in p for p in problems)
    assert any("services.shaped: no module" in p for p in problems)
    assert "services/off.py: no callable handle(context)" in problems  # disabled, still checked
    assert Registry(tmp_path / "nowhere", TENANT).names() == []
