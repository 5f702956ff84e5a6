"""`mtp assemble`: the runtime tree, its manifest and hash, and every refusal.

The command runs as a real subprocess (`python -m framework assemble`), the way the
pipeline runs it; tenants are copies of tenant_template in a temp dir.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import framework.assemble as assemble_module
from framework import __version__
from framework.assemble import MANIFEST, AssembleError, content_hash, prepare_out, runtime_files
from tests.helpers import ROOT, base_env

TEMPLATE = ROOT / "tenant_template"


def mtp(*args: str | Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framework", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, timeout=120,
                          env=base_env(**env), check=False)


@pytest.fixture
def tenant(tmp_path: Path) -> Path:
    """A fresh copy of the template tenant (services, tests, tenant.toml)."""
    dest = tmp_path / "tenant"
    shutil.copytree(TEMPLATE, dest, ignore=shutil.ignore_patterns("__pycache__", ".github"))
    return dest


def refused(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def assembled(tmp_path_factory) -> tuple[Path, dict]:
    """The template assembled once (tests run), shared by the happy-path checks."""
    out = tmp_path_factory.mktemp("asm") / "runtime"
    proc = mtp("assemble", "--tenant-dir", TEMPLATE, "--out", out, SOURCE_DATE_EPOCH="1700000000")
    assert proc.returncode == 0, proc.stderr
    assert "tenant tests passed" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == str(out / MANIFEST)
    return out, json.loads((out / MANIFEST).read_text())


def test_runtime_tree_holds_services_config_and_requirements(assembled):
    out, _ = assembled
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["manifest.json", "requirements.txt", "services/hello.py",
                     "services/orders.py", "services/report.py", "tenant.toml"]
    for rel in ("services/orders.py", "tenant.toml", "requirements.txt"):
        assert (out / rel).read_bytes() == (TEMPLATE / rel).read_bytes()


def test_manifest_names_tenant_version_hash_and_time(assembled):
    out, manifest = assembled
    assert manifest["tenant_id"] == "demo"
    assert manifest["tenant_name"] == "Demo Tenant"
    assert manifest["framework_version"] == __version__
    assert manifest["assembled_at"] == "2023-11-14T22:13:20+00:00"  # SOURCE_DATE_EPOCH
    assert manifest["content_hash"].startswith("sha256:")
    digest, per_file = content_hash(out, runtime_files(out))
    assert manifest["content_hash"] == digest
    assert manifest["files"] == per_file
    assert set(per_file) == {"requirements.txt", "services/hello.py", "services/orders.py",
                             "services/report.py", "tenant.toml"}


def test_hash_is_stable_and_follows_content(assembled, tenant, tmp_path):
    _, manifest = assembled
    again = mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "again", "--skip-tests")
    assert again.returncode == 0, again.stderr
    second = json.loads((tmp_path / "again" / MANIFEST).read_text())
    assert second["content_hash"] == manifest["content_hash"]  # other dir, other time

    (tenant / "services/hello.py").write_text(
        (tenant / "services/hello.py").read_text() + "\n# changed\n")
    changed = mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "again",
                  "--skip-tests")
    assert changed.returncode == 0, changed.stderr
    third = json.loads((tmp_path / "again" / MANIFEST).read_text())
    assert third["content_hash"] != manifest["content_hash"]
    assert third["files"]["services/orders.py"] == manifest["files"]["services/orders.py"]


def test_missing_requirements_become_an_empty_file(tenant, tmp_path):
    (tenant / "requirements.txt").unlink()
    proc = mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "rt", "--skip-tests")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "rt/requirements.txt").read_text().splitlines()
    assert all(not line or line.startswith("#") for line in lines)


def test_tenant_dir_from_environment_and_cwd(tenant, tmp_path):
    by_env = mtp("assemble", "--out", tmp_path / "a", "--skip-tests", cwd=tmp_path,
                 MTP_TENANT_DIR=str(tenant))
    assert by_env.returncode == 0, by_env.stderr
    by_cwd = mtp("assemble", "--out", tmp_path / "b", "--skip-tests", cwd=tenant)
    assert by_cwd.returncode == 0, by_cwd.stderr
    no_tenant = mtp("assemble", "--out", tmp_path / "c", cwd=tmp_path)
    assert "no tenant" in refused(no_tenant, code=2)


def test_reassembling_replaces_an_earlier_tree(tenant, tmp_path):
    out = tmp_path / "rt"
    assert mtp("assemble", "--tenant-dir", tenant, "--out", out, "--skip-tests").returncode == 0
    (tenant / "services/report.py").unlink()
    text = (tenant / "tenant.toml").read_text().replace('[services.report]\nmode = "async"\n'
                                                        'timeout = 60\n', "")
    (tenant / "tenant.toml").write_text(text)
    assert mtp("assemble", "--tenant-dir", tenant, "--out", out, "--skip-tests").returncode == 0
    assert not (out / "services/report.py").exists()
    assert not list(tmp_path.glob(".assemble-*"))  # no staging dir left behind


def test_refuses_to_overwrite_a_folder_that_is_not_a_runtime_tree(tenant, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    err = refused(mtp("assemble", "--tenant-dir", tenant, "--out", precious, "--skip-tests"))
    assert "refusing to overwrite" in err
    assert (precious / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in refused(
        mtp("assemble", "--tenant-dir", tenant, "--out", a_file, "--skip-tests"), code=2)
    with pytest.raises(AssembleError, match="is a file"):
        prepare_out(a_file)  # the library refuses too, not only click's option check


def test_bad_toml_names_the_key(tenant, tmp_path):
    toml = tenant / "tenant.toml"
    toml.write_text(toml.read_text().replace('name = "Demo Tenant"', 'colour = "blue"'))
    err = refused(mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "rt"), code=2)
    assert "tenant.colour" in err and "unknown key" in err
    assert str(toml) in err
    assert not (tmp_path / "rt").exists()


def test_wrong_framework_version_names_both(tenant, tmp_path):
    toml = tenant / "tenant.toml"
    toml.write_text(toml.read_text().replace(f'framework_version = "{__version__}"',
                                             'framework_version = "9.9.9"'))
    err = refused(mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "rt"), code=2)
    assert "9.9.9" in err and __version__ in err
    assert "tenant.framework_version" in err


def test_a_failing_tenant_test_refuses(tenant, tmp_path):
    (tenant / "tests/test_broken.py").write_text(
        "def test_the_answer():\n    assert 6 * 7 == 41\n")
    out = tmp_path / "rt"
    err = refused(mtp("assemble", "--tenant-dir", tenant, "--out", out))
    assert "test_the_answer" in err  # pytest's report says which test
    assert err.strip().splitlines()[-1].startswith("mtp assemble: tenant tests failed")
    assert not out.exists()
    skipped = mtp("assemble", "--tenant-dir", tenant, "--out", out, "--skip-tests")
    assert skipped.returncode == 0, skipped.stderr


def test_an_empty_tests_folder_is_not_a_failure(tenant, tmp_path):
    shutil.rmtree(tenant / "tests")
    (tenant / "tests").mkdir()
    proc = mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "rt")
    assert proc.returncode == 0, proc.stderr
    assert "no tests collected" in proc.stdout


BROKEN = {
    "Bad-Name.py": "def handle(context):\n    return 1\n",
    "nohandle.py": '"""No entry point."""\nVALUE = 1\n',
    "syntax.py": "def handle(context:\n    return 1\n",
    "imports.py": "import no_such_module_here\n\ndef handle(context):\n    return 1\n",
    "exits.py": "raise SystemExit(3)\n",
}


def test_every_service_problem_is_named_in_one_run(tenant, tmp_path):
    for name, source in BROKEN.items():
        (tenant / "services" / name).write_text(source)
    (tenant / "services/orders.py").unlink()  # still configured in tenant.toml
    out = tmp_path / "rt"
    err = refused(mtp("assemble", "--tenant-dir", tenant, "--out", out, "--skip-tests"))
    lines = err.strip().splitlines()
    assert all(line.startswith("mtp assemble: ") for line in lines)

    def reason(fragment: str) -> str:
        return next(line for line in lines if fragment in line)

    assert "not a valid service name" in reason("services/Bad-Name.py")
    assert "handle" in reason("services/nohandle.py")
    assert "SyntaxError" in reason("services/syntax.py") and "line 1" in reason("syntax.py")
    assert "ModuleNotFoundError" in reason("services/imports.py")
    assert "SystemExit" in reason("services/exits.py")
    assert "no module services/orders.py" in reason("services.orders")
    assert len(lines) == 6
    assert not out.exists()


@pytest.mark.parametrize(("source", "code"), [
    ("import os\nos._exit(7)\n", 7),
    ("import atexit\natexit.register(print, 'junk')\n\ndef handle(context):\n    return 1\n", 0),
])
def test_module_that_ends_the_check_refuses(tenant, source, code):
    (tenant / "services/killer.py").write_text(source)
    with pytest.raises(AssembleError, match=rf"ended the check without a report \(exit {code}\)"):
        assemble_module.probe_services(tenant)


def test_slow_imports_and_slow_tests_time_out(tenant, monkeypatch):
    (tenant / "services/slow.py").write_text(
        "import time\ntime.sleep(60)\n\ndef handle(context):\n    return 1\n")
    monkeypatch.setattr(assemble_module, "PROBE_TIMEOUT", 1.0)
    with pytest.raises(AssembleError, match="importing the services took longer than 1s"):
        assemble_module.probe_services(tenant)
    (tenant / "tests/test_slow.py").write_text("import time\n\ndef test_slow():\n"
                                               "    time.sleep(60)\n")
    monkeypatch.setattr(assemble_module, "TEST_TIMEOUT", 1.0)
    with pytest.raises(AssembleError, match="tenant tests took longer than 1s"):
        assemble_module.run_tenant_tests(tenant)


def test_configured_service_without_module_refuses(tenant, tmp_path):
    (tenant / "services/orders.py").unlink()
    err = refused(mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "rt",
                      "--skip-tests"))
    assert "services.orders" in err and "no module services/orders.py" in err


def test_no_services_refuses(tenant, tmp_path):
    for path in (tenant / "services").glob("*.py"):
        path.unlink()
    text = (tenant / "tenant.toml").read_text()
    text = text[:text.index("[services.orders]")] + text[text.index("[auth.jwt]"):]
    (tenant / "tenant.toml").write_text(text)
    assert "no service modules" in refused(
        mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "rt", "--skip-tests"))
    shutil.rmtree(tenant / "services")
    assert "no services/ folder" in refused(
        mtp("assemble", "--tenant-dir", tenant, "--out", tmp_path / "rt", "--skip-tests"))


def test_probe_entry_point_needs_its_argument():
    proc = subprocess.run([sys.executable, "-m", "framework.assemble"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 1
    assert "usage" in proc.stderr
