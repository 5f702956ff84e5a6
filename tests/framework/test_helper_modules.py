"""Tenant helper modules: ``services/_x.py`` is imported by services, never served.

Checked through the registry, ``mtp check``, ``mtp invoke``, ``mtp assemble`` and a real
``mtp run`` of the assembled tree (what the image serves).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from framework.errors import ServiceNotFound
from framework.registry import Registry
from framework.tenant_config import parse_tenant
from tests.helpers import base_env, free_port, stop
from tests.sidecar.run_stack import run_env, start_run, tenant_toml
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, token

TENANT = parse_tenant({"tenant": {"id": "acme"}})
HELPER = '''"""Shared by the services: not a service itself (no handle)."""

PREFIX = "Hello"


def greeting(name):
    return f"{PREFIX}, {name}!"
'''
SERVICES = {
    "_text.py": HELPER,
    "greet.py": '"""Greets with the helper."""\nfrom ._text import greeting\n\n\n'
                'def handle(context):\n    return {"message": greeting(context.user)}\n',
    "shout.py": '"""Imports the helper module itself."""\nfrom . import _text\n\n\n'
                'def handle(context):\n    return {"message": _text.greeting("X").upper()}\n',
}


def write(root: Path, files: dict[str, str], toml: str | None = None) -> Path:
    (root / "services").mkdir(parents=True, exist_ok=True)
    (root / "tenant.toml").write_text(toml or '[tenant]\nid = "acme"\n')
    for name, source in files.items():
        (root / "services" / name).write_text(source)
    return root


def mtp(*args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framework", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120,
                          env=base_env(**env), check=False)


def test_services_import_their_helpers_and_helpers_are_not_services(tmp_path: Path) -> None:
    reg = Registry(write(tmp_path, SERVICES), TENANT)
    assert reg.names() == ["greet", "shout"]
    assert reg.problems() == []
    assert reg.resolve("greet").handle(type("C", (), {"user": "ada"})) == {
        "message": "Hello, ada!"}
    assert reg.resolve("shout").handle(None) == {"message": "HELLO, X!"}
    for name in ("_text", "_missing", "__init__"):
        with pytest.raises(ServiceNotFound):
            reg.resolve(name)
    assert [s.name for s in reg.available()] == ["greet", "shout"]


def test_helper_problems_are_named(tmp_path: Path) -> None:
    reg = Registry(write(tmp_path, {
        "_broken.py": "def f(:\n",
        "_Bad.py": "X = 1\n",
        "uses.py": "from ._gone import f\n\ndef handle(c):\n    return f()\n",
        "__init__.py": "",
    }), TENANT)
    found = reg.problems()
    assert any(p.startswith("services/_broken.py, line 1: SyntaxError") for p in found), found
    assert any(p.startswith("services/_Bad.py: not a valid service name")
               for p in found), found
    assert any(p.startswith("services/uses.py") and "ModuleNotFoundError" in p
               for p in found), found
    assert len(found) == 3


def test_dev_mode_reloads_a_changed_helper(tmp_path: Path) -> None:
    root = write(tmp_path, SERVICES)
    reg = Registry(root, TENANT, dev=True)
    assert reg.resolve("shout").handle(None) == {"message": "HELLO, X!"}
    helper = root / "services" / "_text.py"
    # Another size: the bytecode cache keys on source mtime (whole seconds) and size.
    helper.write_text(HELPER.replace('"Hello"', '"Good day"'))
    assert reg.resolve("shout").handle(None) == {"message": "GOOD DAY, X!"}
    assert reg.resolve("greet").handle(type("C", (), {"user": "b"})) == {
        "message": "Good day, b!"}


def test_check_and_invoke_accept_a_tenant_with_helpers(tmp_path: Path) -> None:
    root = write(tmp_path / "t", SERVICES)
    checked = mtp("check", "--tenant-dir", root, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "2 service(s)" in checked.stdout
    invoked = mtp("invoke", "greet", "--user", "ada", "--tenant-dir", root, cwd=tmp_path,
                  MTP_DATA_DIR=str(tmp_path / "data"))
    assert invoked.returncode == 0, invoked.stderr
    assert json.loads(invoked.stdout) == {"message": "Hello, ada!"}
    refused = mtp("invoke", "_text", "--tenant-dir", root, cwd=tmp_path,
                  MTP_DATA_DIR=str(tmp_path / "data"))
    assert refused.returncode == 1 and '"status": 404' in refused.stderr


def test_an_assembled_tenant_serves_services_that_use_helpers(tmp_path: Path) -> None:
    toml = tenant_toml().replace('service = "whoami"', 'service = "greet"')
    root = write(tmp_path / "t", SERVICES, toml)
    out = tmp_path / "runtime"
    assembled = mtp("assemble", "--tenant-dir", root, "--out", out, "--skip-tests",
                    cwd=tmp_path)
    assert assembled.returncode == 0, assembled.stderr
    assert (out / "services" / "_text.py").read_text() == HELPER
    assert "services/_text.py" in json.loads((out / "manifest.json").read_text())["files"]
    env = run_env(tmp_path, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET)
    stack = start_run(tmp_path, out, env)
    try:
        user = {"Authorization": f"Bearer {token('ada')}"}
        admin = {"Authorization": f"Bearer {token('root', roles=['admin'])}"}
        r = stack.call("POST", "/services/greet", user)
        assert r.status == 200 and r.json() == {"message": "Hello, ada!"}
        for path in ("/services/_text", "/services/_text/x"):
            r = stack.call("POST", path, admin)
            assert r.status == 404, r.body
            assert r.headers["Content-Type"].startswith("application/problem+json")
        listed = stack.call("GET", "/services", admin)
        assert listed.status == 200
        assert "_text" not in listed.body.decode()
        assert "greet" in listed.body.decode()
    finally:
        stop(stack.proc)
