"""mtp framework (start-up refusals), mtp check, mtp invoke, mtp new-service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from framework.cli import cli
from framework.cli.serve import bind_address
from tests.framework.client import Client
from tests.framework.tenant import SECRET, TENANT_TOML, make_tenant
from tests.helpers import ROOT, base_env, free_port, spawn, stop, wait_for_unix

MTP = [sys.executable, "-m", "framework"]


def run_mtp(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MTP, *args], env=base_env(**env), capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.fixture
def tenant(tmp_path: Path) -> Path:
    return make_tenant(tmp_path / "t")


def test_framework_refuses_a_bad_tenant_toml_naming_file_and_key(tmp_path: Path):
    root = make_tenant(tmp_path / "t", TENANT_TOML + "\n[limits]\nspeed = 3\n", {})
    done = run_mtp(["framework", "--tenant-dir", str(root)], MTP_SIDECAR_SECRET=SECRET,
                   MTP_DATA_DIR=str(tmp_path / "d"), MTP_UPSTREAM=f"127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert "tenant.toml" in done.stderr and "limits.speed" in done.stderr
    assert "unknown key" in done.stderr and "Traceback" not in done.stderr


def test_framework_refuses_to_start_without_the_sidecar_secret(tenant: Path, tmp_path: Path):
    done = run_mtp(["framework", "--tenant-dir", str(tenant)], MTP_DATA_DIR=str(tmp_path))
    assert done.returncode == 2 and "MTP_SIDECAR_SECRET" in done.stderr
    assert "Traceback" not in done.stderr


def test_framework_refuses_an_unusable_data_dir(tenant: Path, tmp_path: Path):
    (tmp_path / "file").write_text("not a directory")
    done = run_mtp(["framework", "--tenant-dir", str(tenant)], MTP_SIDECAR_SECRET=SECRET,
                   MTP_DATA_DIR=str(tmp_path / "file" / "data"))
    assert done.returncode == 2 and "MTP_DATA_DIR" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_mtp(["framework", "--tenant-dir", str(tenant)], MTP_SIDECAR_SECRET=SECRET,
                   MTP_DATA_DIR=str(tmp_path / "d"),
                   MTP_UPSTREAM=f"unix:{tmp_path / 'file' / 'fw.sock'}")
    assert done.returncode == 2 and "MTP_UPSTREAM" in done.stderr
    assert "Traceback" not in done.stderr


def test_framework_refuses_another_pinned_version(tmp_path: Path):
    root = make_tenant(tmp_path / "t", TENANT_TOML.replace('"0.1.0"', '"9.9.9"'), {})
    done = run_mtp(["framework", "--tenant-dir", str(root)], MTP_SIDECAR_SECRET=SECRET,
                   MTP_DATA_DIR=str(tmp_path / "d"))
    assert done.returncode == 2 and "9.9.9" in done.stderr and "framework_version" in done.stderr


def test_framework_serves_on_a_unix_socket(tenant: Path, tmp_path: Path):
    sock = tmp_path / "run" / "fw.sock"
    env = base_env(MTP_SIDECAR_SECRET=SECRET, MTP_DATA_DIR=str(tmp_path / "d"),
                   MTP_UPSTREAM=f"unix:{sock}", MTP_WORKERS="1", MTP_THREADS="2")
    proc = spawn([*MTP, "framework", "--tenant-dir", str(tenant)], env,
                 log=tmp_path / "fw.log")
    try:
        wait_for_unix(sock, proc)
        client = Client(unix=str(sock))
        assert client.get("/healthz", sign=False).json() == {"status": "ok"}
        assert client.post("/services/echo", {"u": 1}).json()["payload"] == {"u": 1}
        assert oct(sock.stat().st_mode & 0o777) == "0o770"  # umask 007: not world-open
    finally:
        assert stop(proc) == 0
    assert "Traceback" not in (tmp_path / "fw.log").read_text()


def test_bind_addresses():
    assert bind_address("/x/fw.sock") == "unix:/x/fw.sock"
    assert bind_address(("127.0.0.1", 8000)) == "127.0.0.1:8000"
    assert bind_address(("::1", 8000)) == "[::1]:8000"


def test_check_passes_the_template_and_names_every_broken_module(tenant: Path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["check", "--tenant-dir", str(ROOT / "tenant_template")])
    assert ok.exit_code == 0, ok.output
    assert "ok: tenant" in ok.output
    bad = runner.invoke(cli, ["check", "--tenant-dir", str(tenant)])
    assert bad.exit_code == 1
    assert "services/broken.py, line 3: SyntaxError" in bad.output
    assert "services/nohandle.py: no callable handle" in bad.output
    assert "services/Hello.py: not a valid service name" in bad.output
    assert "__init__" not in bad.output


def test_check_reports_config_errors_and_missing_modules(tmp_path: Path):
    runner = CliRunner()
    root = make_tenant(tmp_path / "a", TENANT_TOML.replace('id = "acme"', 'id = "Bad Id"'), {})
    done = runner.invoke(cli, ["check", "--tenant-dir", str(root)])
    assert done.exit_code == 1 and "tenant.id" in done.output
    root = make_tenant(tmp_path / "b", TENANT_TOML, {"echo": "def handle(c):\n    return 1\n"})
    done = runner.invoke(cli, ["check", "--tenant-dir", str(root)])
    assert done.exit_code == 1 and "services.hang: no module services/hang.py" in done.output


def test_check_without_a_tenant_dir_is_a_usage_error(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MTP_TENANT_DIR", raising=False)
    done = CliRunner().invoke(cli, ["check"])
    assert done.exit_code == 2 and "no tenant dir" in done.output


def test_invoke_runs_sync_operations_and_jobs_in_process(tenant: Path, tmp_path: Path):
    runner = CliRunner()
    env = {"MTP_DATA_DIR": str(tmp_path / "d"), "MTP_LOG_LEVEL": "WARNING"}
    done = runner.invoke(cli, ["invoke", "echo", "--data", '{"a": 1}', "--user", "zoe",
                               "--groups", "g1,g2", "--roles", "admin", "--tenant-dir",
                               str(tenant)], env=env)
    assert done.exit_code == 0, done.output
    body = json.loads(done.stdout)
    assert body["user"] == "zoe" and body["groups"] == ["g1", "g2"] and body["payload"] == {"a": 1}
    done = runner.invoke(cli, ["invoke", "ops/create", "--data", '{"qty": 3}',
                               "--tenant-dir", str(tenant)], env=env)
    assert json.loads(done.stdout) == {"op": "create", "payload": {"qty": 3}}
    done = runner.invoke(cli, ["invoke", "slow", "--async", "--data", '{"seconds": 0}',
                               "--tenant-dir", str(tenant)], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"done": True, "by": "dev"}


@pytest.mark.parametrize(("target", "data", "status"), [
    ("boom", None, 500), ("ops", None, 404), ("ops/create", '{"qty": 0}', 400),
    ("missing", None, 404), ("disabled", None, 403), ("slow", '{"fail": true}', 500),
])
def test_invoke_errors_are_problem_documents_and_exit_1(tenant: Path, tmp_path: Path,
                                                        target: str, data: str | None,
                                                        status: int):
    args = ["invoke", target, "--tenant-dir", str(tenant)]
    if data:
        args += ["--data", data]
    if target == "slow":
        args.append("--async")
    done = CliRunner().invoke(cli, args, env={"MTP_DATA_DIR": str(tmp_path),
                                              "MTP_LOG_LEVEL": "CRITICAL"})
    assert done.exit_code == 1
    problem = json.loads(done.stderr.strip().splitlines()[-1])
    assert problem["status"] == status and "Traceback" not in done.output


def test_invoke_refuses_data_that_is_not_json(tenant: Path):
    done = CliRunner().invoke(cli, ["invoke", "echo", "--data", "{", "--tenant-dir",
                                    str(tenant)])
    assert done.exit_code == 2 and "not JSON" in done.output


def test_new_service_writes_a_module_and_a_passing_test(tmp_path: Path):
    root = make_tenant(tmp_path / "t", TENANT_TOML, {})
    runner = CliRunner()
    done = runner.invoke(cli, ["new-service", "greeter", "--tenant-dir", str(root)])
    assert done.exit_code == 0, done.output
    module, test = root / "services" / "greeter.py", root / "tests" / "test_greeter.py"
    assert module.read_text().startswith('"""The greeter service."""')
    assert "def handle(context)" in module.read_text()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(test)], capture_output=True, text=True, timeout=60,
                            cwd=root, env=base_env(MTP_DATA_DIR=str(tmp_path / "d"),
                                                   MTP_LOG_LEVEL="WARNING"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    again = runner.invoke(cli, ["new-service", "greeter", "--tenant-dir", str(root)])
    assert again.exit_code == 1 and "not overwriting" in again.output
    for bad in ("Greeter", "os.path", "_x", "a" * 65, "../evil"):
        refused = runner.invoke(cli, ["new-service", bad, "--tenant-dir", str(root)])
        assert refused.exit_code == 2, bad
    assert sorted(p.name for p in (root / "services").iterdir()) == ["greeter.py"]
