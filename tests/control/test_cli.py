"""`mtp tenants ...` against a running `mtp control`: tables, --json, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control.fleet import OPERATOR_KEY, OPERATOR_SECRET, ControlPlane, operator_token
from tests.control.seed import seed_sqlite
from tests.helpers import base_env, free_port


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("control-cli")).start()
    try:
        yield cp
    finally:
        cp.stop()


def mtp(plane: ControlPlane, *args: str, env: dict[str, str] | None = None,
        token: bool = True) -> subprocess.CompletedProcess:
    full = base_env(MTP_CONTROL_URL=plane.url)
    if token:
        full["MTP_CONTROL_TOKEN"] = operator_token(sub="cli-op")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "framework", *args], env=full,
                          capture_output=True, text=True, timeout=60)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def fails(done: subprocess.CompletedProcess, words: str) -> None:
    assert done.returncode != 0, done.stdout
    assert words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_create_show_update_suspend_resume(plane: ControlPlane) -> None:
    out = ok(mtp(plane, "tenants", "create", "cli-acme", "--name", "Acme", "--plan", "free"))
    assert "id: cli-acme" in out and "status: active" in out and "placement: pool:shared" in out
    rec = json.loads(ok(mtp(plane, "tenants", "create", "cli-big", "--name", "Big",
                            "--plan", "pro", "--placement", "pool:eu", "--json")))
    assert rec["placement"] == "pool:eu" and rec["plan"] == "pro"
    seed_sqlite(plane.data_dir, "cli-acme", calls=4)
    shown = ok(mtp(plane, "tenants", "show", "cli-acme"))
    assert "usage today: 4 calls" in shown and "EUR" in shown
    assert json.loads(ok(mtp(plane, "tenants", "show", "cli-acme", "--json")))["usage"][
        "calls"] == 4
    updated = json.loads(ok(mtp(plane, "tenants", "update", "cli-acme", "--plan", "pro",
                                "--name", "Acme Inc", "--json")))
    assert (updated["plan"], updated["name"]) == ("pro", "Acme Inc")
    assert "status: suspended" in ok(mtp(plane, "tenants", "suspend", "cli-acme"))
    assert json.loads(ok(mtp(plane, "tenants", "resume", "cli-acme", "--json")))[
        "status"] == "active"
    audit = [x for x in plane.audit_lines() if x["tenant"] == "cli-acme"]
    assert {x["operator"] for x in audit} == {"cli-op"}


def test_list_as_table_and_json_and_all_pages(plane: ControlPlane) -> None:
    for i in range(5):
        ok(mtp(plane, "tenants", "create", f"cli-l{i}", "--name", f"L{i}", "--plan", "pro"))
    table = ok(mtp(plane, "tenants", "list", "--plan", "pro"))
    header = table.splitlines()[0].split()
    assert header == ["ID", "NAME", "PLAN", "STATUS", "PLACEMENT", "UPDATED"]
    assert any(line.startswith("cli-l3 ") for line in table.splitlines())
    page = json.loads(ok(mtp(plane, "tenants", "list", "--plan", "pro", "--limit", "2",
                             "--json")))
    assert len(page["tenants"]) == 2 and page["next_cursor"]
    assert "--cursor" in ok(mtp(plane, "tenants", "list", "--limit", "2"))
    every = json.loads(ok(mtp(plane, "tenants", "list", "--plan", "pro", "--limit", "2",
                              "--all", "--json")))
    ids = [t["id"] for t in every["tenants"]]
    assert {f"cli-l{i}" for i in range(5)} <= set(ids) and len(ids) == len(set(ids))
    assert every["next_cursor"] is None


def test_delete_and_export(plane: ControlPlane, tmp_path: Path) -> None:
    ok(mtp(plane, "tenants", "create", "cli-gone", "--name", "Gone", "--plan", "free"))
    seed_sqlite(plane.data_dir, "cli-gone", calls=2)
    live = ok(mtp(plane, "tenants", "export", "cli-gone"))
    assert all(json.loads(x)["tenant"] == "cli-gone" for x in live.splitlines())
    fails(mtp(plane, "tenants", "delete", "cli-gone"), "Aborted")  # asks; no tty: no
    assert "offboarding" in ok(mtp(plane, "tenants", "delete", "cli-gone", "--yes"))
    plane.wait_offboarded("cli-gone")
    out = tmp_path / "gone.jsonl"
    done = mtp(plane, "tenants", "export", "cli-gone", "--out", str(out))
    ok(done)
    kinds = {json.loads(x)["kind"] for x in out.read_text().splitlines()}
    assert {"usage", "job", "config_version"} <= kinds and "lines" in done.stderr


def test_clear_errors(plane: ControlPlane) -> None:
    ok(mtp(plane, "tenants", "create", "cli-dup", "--name", "Dup", "--plan", "free"))
    fails(mtp(plane, "tenants", "create", "cli-dup", "--name", "Dup", "--plan", "free"),
          "tenant id 'cli-dup' is taken (409 tenant-exists)")
    fails(mtp(plane, "tenants", "create", "cli-x", "--name", "X", "--plan", "gold"),
          "plan 'gold' is not in the plans file")
    fails(mtp(plane, "tenants", "show", "nobody"), "no tenant 'nobody' (404 unknown-tenant)")
    fails(mtp(plane, "tenants", "suspend", "nobody"), "unknown-tenant")
    fails(mtp(plane, "tenants", "update", "cli-dup"), "nothing to change")
    fails(mtp(plane, "tenants", "update", "cli-dup", "--status", "gone"), "Invalid value")
    fails(mtp(plane, "tenants", "list", "--status", "gone"), "status must be one of")
    fails(mtp(plane, "tenants", "list", token=False), "no operator credential")
    fails(mtp(plane, "tenants", "list", "--token", "not-a-jwt"), "(401")
    tenant_token = operator_token(tenant_id="acme")
    fails(mtp(plane, "tenants", "list", "--token", tenant_token), "(403 not-operator)")
    dead = f"http://127.0.0.1:{free_port()}"
    fails(mtp(plane, "tenants", "list", "--control", dead),
          f"cannot reach the control plane at {dead}")


def test_credentials_from_a_key_or_the_operator_secret(plane: ControlPlane) -> None:
    ok(mtp(plane, "tenants", "list", "--api-key", OPERATOR_KEY, token=False))
    ok(mtp(plane, "tenants", "list", token=False, env={"MTP_CONTROL_API_KEY": OPERATOR_KEY}))
    ok(mtp(plane, "tenants", "create", "cli-minted", "--name", "M", "--plan", "free",
           token=False, env={"MTP_OPERATOR_JWT_SECRET": OPERATOR_SECRET}))
    who = [x["operator"] for x in plane.audit_lines() if x["tenant"] == "cli-minted"]
    assert who and who[-1].startswith("cli:")


def test_control_and_tenants_are_registered(plane: ControlPlane) -> None:
    helptext = ok(mtp(plane, "--help"))
    assert "control" in helptext and "tenants" in helptext
    sub = ok(mtp(plane, "tenants", "--help"))
    for name in ("create", "list", "show", "update", "suspend", "resume", "delete", "export"):
        assert name in sub


def test_check_warns_what_the_fleet_overrides(plane: ControlPlane, tmp_path: Path) -> None:
    tdir = tmp_path / "t"
    (tdir / "services").mkdir(parents=True)
    (tdir / "services" / "echo.py").write_text('"""Echo."""\n\n\ndef handle(context):\n'
                                               '    return context.payload\n')
    (tdir / "tenant.toml").write_text(
        '[tenant]\nid = "cli-check"\nplan = "gold"\n\n[plans.gold]\nservices = ["*"]\n\n'
        '[billing]\nper_call = 0.5\ncurrency = "USD"\n\n[limits]\nrate = 5\n')
    alone = mtp(plane, "check", "--tenant-dir", str(tdir),
                env={"MTP_DATA_DIR": str(tmp_path / "own-data")})
    assert "ok: tenant cli-check" in ok(alone) and "warning" not in alone.stderr
    fleet = mtp(plane, "check", "--tenant-dir", str(tdir),
                env={"MTP_DATA_DIR": str(plane.data_dir)})
    assert "ok: tenant cli-check" in ok(fleet)
    assert "billing: prices (currency, per_call) are ignored in this fleet" in fleet.stderr
    assert "plans: ignored in this fleet" in fleet.stderr
    assert "limits: in this fleet each limit is the lower" in fleet.stderr


def test_mtp_usage_prices_with_the_plan(plane: ControlPlane, tmp_path: Path) -> None:
    tdir = tmp_path / "t"
    (tdir / "services").mkdir(parents=True)
    (tdir / "tenant.toml").write_text('[tenant]\nid = "cli-usage"\n\n[billing]\n'
                                      'currency = "USD"\nper_call = 9.0\n')
    ok(mtp(plane, "tenants", "create", "cli-usage", "--name", "U", "--plan", "pro"))
    seed_sqlite(plane.data_dir, "cli-usage", calls=10)
    env = {"MTP_DATA_DIR": str(plane.data_dir)}
    report = json.loads(ok(mtp(plane, "usage", "--tenant-dir", str(tdir), "--format", "json",
                               env=env)))
    assert report["currency"] == "EUR"  # plan pro: EUR 0.001 per call
    assert sum(r["cost"] for r in report["rows"]) == pytest.approx(10 * 0.001)


def test_a_placement_change_shows_its_migration(plane: ControlPlane) -> None:
    ok(mtp(plane, "tenants", "create", "cli-mover", "--name", "Mover", "--plan", "free",
           "--placement", "pool:alpha"))
    out = ok(mtp(plane, "tenants", "update", "cli-mover", "--placement", "pool:beta"))
    assert "placement: pool:beta" in out
    assert "migration: pool:alpha -> pool:beta, warming since " in out
    # Nobody answers for mtp-pool-beta here: the attempts and the reason are shown.
    deadline = time.monotonic() + 20
    while "attempts; last error: mtp-pool-beta:8080" not in (
            shown := ok(mtp(plane, "tenants", "show", "cli-mover"))):
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    out = ok(mtp(plane, "tenants", "update", "cli-mover", "--placement", "pool:alpha"))
    assert "placement: pool:alpha" in out and "migration" not in out  # cancelled
