"""DESIGN.md's command line, run as a user runs it: tenant-dir resolution, version pins,
``mtp invoke`` with ``context.call``, and the documented tenant.toml keys."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from framework import __version__
from framework.tenant_config import load_tenant
from tests.helpers import base_env

MTP = [sys.executable, "-m", "framework"]

HELLO = '''"""Greets."""


def handle(context):
    return {"hello": (context.payload or {}).get("name", context.user)}
'''

CHAIN = '''"""Calls hello through context.call."""


def handle(context):
    return {"inner": context.call("hello", {"name": "nested"}), "rid": context.request_id}
'''

LOOP = '''"""Calls itself: context.call must stop the cycle."""


def handle(context):
    return context.call("loop")
'''

SYNC_ONLY = '''"""Sync only: --async is refused as ?mode=async is."""
MODE = "sync"


def handle(context):
    return {"sync": True}
'''

ASK_ADMIN = '''"""Calls a service its caller may not call."""


def handle(context):
    return context.call("secret")
'''


def write_tenant(root: Path, tenant_id: str, version: str = __version__,
                 extra: str = "") -> Path:
    (root / "services").mkdir(parents=True)
    (root / "tenant.toml").write_text(
        f'[tenant]\nid = "{tenant_id}"\nframework_version = "{version}"\n{extra}')
    for name, source in {"hello": HELLO, "chain": CHAIN, "loop": LOOP,
                         "ask_admin": ASK_ADMIN, "secret": HELLO, "sync_only": SYNC_ONLY}.items():
        (root / "services" / f"{name}.py").write_text(source)
    return root


def mtp(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MTP, *args], env=base_env(**env), cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def three(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Tenants 'opt', 'env' and 'cwd': one per way of naming the tenant dir."""
    return (write_tenant(tmp_path / "opt", "opt"), write_tenant(tmp_path / "env", "env"),
            write_tenant(tmp_path / "cwd", "cwd"))


def test_tenant_dir_option_then_environment_then_current_directory(three, tmp_path: Path):
    opt, env, cwd = three
    data = str(tmp_path / "data")
    for command in (["check"], ["invoke", "hello"]):
        picked = mtp([*command, "--tenant-dir", str(opt)], cwd, MTP_TENANT_DIR=str(env),
                     MTP_DATA_DIR=data)
        by_env = mtp(command, cwd, MTP_TENANT_DIR=str(env), MTP_DATA_DIR=data)
        by_cwd = mtp(command, cwd, MTP_DATA_DIR=data)
        assert picked.returncode == by_env.returncode == by_cwd.returncode == 0, (
            picked.stderr + by_env.stderr + by_cwd.stderr)
        if command == ["check"]:
            assert [p.stdout.split(",")[0] for p in (picked, by_env, by_cwd)] == [
                "ok: tenant opt", "ok: tenant env", "ok: tenant cwd"]
    # Nowhere to find one: a usage error, not a traceback.
    nowhere = mtp(["check"], tmp_path, MTP_DATA_DIR=data)
    assert nowhere.returncode == 2 and "--tenant-dir" in nowhere.stderr
    assert "Traceback" not in nowhere.stderr


def test_check_refuses_another_pinned_version_naming_both(tmp_path: Path):
    tenant = write_tenant(tmp_path / "t", "acme", version="9.9.9")
    done = mtp(["check", "--tenant-dir", str(tenant)], tmp_path,
               MTP_DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 1
    assert "9.9.9" in done.stderr and __version__ in done.stderr
    assert "tenant.framework_version" in done.stderr and "Traceback" not in done.stderr


def test_version_is_what_a_tenant_pins(tmp_path: Path):
    done = mtp(["--version"], tmp_path)
    assert done.stdout == f"mtp {__version__}\n"
    tenant = write_tenant(tmp_path / "t", "acme", version=done.stdout.split()[1])
    assert mtp(["check", "--tenant-dir", str(tenant)], tmp_path,
               MTP_DATA_DIR=str(tmp_path / "d")).returncode == 0


def test_invoke_gives_services_context_call(tmp_path: Path):
    tenant = write_tenant(tmp_path / "t", "acme")
    done = mtp(["invoke", "chain", "--tenant-dir", str(tenant)], tmp_path,
               MTP_DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["inner"] == {"hello": "nested"} and answer["rid"]
    as_job = mtp(["invoke", "chain", "--async", "--tenant-dir", str(tenant)], tmp_path,
                 MTP_DATA_DIR=str(tmp_path / "data"))
    assert as_job.returncode == 0 and json.loads(as_job.stdout)["inner"] == {"hello": "nested"}


def test_invoke_context_call_keeps_authz_and_stops_cycles(tmp_path: Path):
    rules = ('[authz]\nenabled = true\n[[authz.rules]]\nservice = "*"\noperations = ["*"]\n'
             'roles = ["admin"]\n[[authz.rules]]\nservice = "ask_admin"\noperations = ["*"]\n'
             '[[authz.rules]]\nservice = "loop"\noperations = ["*"]\n')
    tenant = write_tenant(tmp_path / "t", "acme", extra=rules)
    data = str(tmp_path / "data")
    refused = mtp(["invoke", "ask_admin", "--tenant-dir", str(tenant)], tmp_path,
                  MTP_DATA_DIR=data)
    assert refused.returncode == 1
    assert json.loads(refused.stderr.splitlines()[-1])["status"] == 403
    allowed = mtp(["invoke", "ask_admin", "--roles", "admin", "--tenant-dir", str(tenant)],
                  tmp_path, MTP_DATA_DIR=data)
    assert allowed.returncode == 0 and json.loads(allowed.stdout) == {"hello": "dev"}
    cycle = mtp(["invoke", "loop", "--tenant-dir", str(tenant)], tmp_path, MTP_DATA_DIR=data)
    assert cycle.returncode == 1
    assert json.loads(cycle.stderr.splitlines()[-1])["status"] == 508


# DESIGN.md's tenant.toml example, every key as written there (a real hash for the key).
DESIGN_TOML = '''
[tenant]
id = "acme"
name = "Acme Corp"
framework_version = "0.1.0"

[services.orders]
enabled = true
mode = "both"
timeout = 10
config = { currency = "EUR" }
breaker = { failures = 5, cooldown = 30 }

[auth.jwt]
algorithms = ["HS256"]
secret_env = "MTP_JWT_SECRET"
public_key_file = ""
jwks_url = ""
issuer = ""
audience = ""
tenant_claim = "tenant_id"
leeway = 30

[auth.api_keys.ci-bot]
hash = "sha256:1b1e59ec2fbd24f8e413e97b5fbcaee75e9a7e9d2a4a15047c146d4a8fc85c0b"
roles = ["deployer"]

[auth.ldap]
enabled = false
url = "ldap://127.0.0.1:389"
bind_dn = "cn=reader,dc=example,dc=org"
bind_password_env = "MTP_LDAP_PASSWORD"
user_base = "ou=people,dc=example,dc=org"
user_filter = "(uid={username})"
group_base = "ou=groups,dc=example,dc=org"
group_filter = "(member={user_dn})"
group_attr = "cn"
cache_ttl = 60

[authz]
enabled = true
[[authz.rules]]
service = "orders"
operations = ["create"]
groups = ["sales"]
roles = ["admin"]
users = ["alice"]

[limits]
rate = 100
burst = 50
delay = true
user_rate = 20
user_burst = 10
concurrency = 0
daily_quota = 0

[flags.new_pricing]
enabled = true
rollout_percent = 20
users = []
groups = []
roles = []

[billing]
currency = "EUR"
per_call = 0.0001
per_cpu_second = 0.02
per_gb = 0.05
webhook_url = ""
webhook_secret_env = "MTP_BILLING_SECRET"
'''


def test_every_documented_tenant_toml_key_loads(tmp_path: Path):
    path = tmp_path / "tenant.toml"
    path.write_text(DESIGN_TOML)
    cfg = load_tenant(path)
    orders = cfg.service("orders")
    assert (cfg.tenant_id, cfg.name, cfg.framework_version) == ("acme", "Acme Corp", "0.1.0")
    assert (orders.enabled, orders.mode, orders.timeout) == (True, "both", 10)
    assert dict(orders.config) == {"currency": "EUR"}
    assert (orders.breaker.failures, orders.breaker.cooldown) == (5, 30)
    assert cfg.jwt.algorithms == ("HS256",) and cfg.jwt.tenant_claim == "tenant_id"
    assert cfg.jwt.leeway == 30 and cfg.jwt.secret_env == "MTP_JWT_SECRET"
    assert cfg.api_keys[0].name == "ci-bot" and cfg.api_keys[0].roles == ("deployer",)
    assert cfg.ldap.user_filter == "(uid={username})" and cfg.ldap.cache_ttl == 60
    rule = cfg.authz.rules[0]
    assert (rule.service, rule.operations, rule.users) == ("orders", ("create",), ("alice",))
    assert (cfg.limits.rate, cfg.limits.burst, cfg.limits.user_rate) == (100, 50, 20)
    assert cfg.flags["new_pricing"].rollout_percent == 20
    assert (cfg.billing.per_gb, cfg.billing.webhook_secret_env) == (0.05, "MTP_BILLING_SECRET")
    # Unknown keys are refused with the file and key, in any table.
    path.write_text(DESIGN_TOML.replace("leeway = 30", "leeway = 30\nleway = 3"))
    done = mtp(["check", "--tenant-dir", str(tmp_path)], tmp_path,
               MTP_DATA_DIR=str(tmp_path / "d"))
    assert done.returncode == 1 and "auth.jwt.leway" in done.stderr
    assert str(path) in done.stderr and "Traceback" not in done.stderr


def test_invoke_async_follows_the_service_mode(tmp_path: Path):
    tenant = write_tenant(tmp_path / "t", "acme")
    data = str(tmp_path / "data")
    sync = mtp(["invoke", "sync_only", "--tenant-dir", str(tenant)], tmp_path, MTP_DATA_DIR=data)
    assert sync.returncode == 0 and json.loads(sync.stdout) == {"sync": True}
    refused = mtp(["invoke", "sync_only", "--async", "--tenant-dir", str(tenant)], tmp_path,
                  MTP_DATA_DIR=data)
    assert refused.returncode == 1 and refused.stdout == ""
    document = json.loads(refused.stderr.splitlines()[-1])
    assert document["status"] == 400 and "synchronously" in document["detail"]


@pytest.mark.parametrize("command", [
    ["token", "--user", "alice"],  # the template: its development secret lives in the data dir
    ["invoke", "hello", "--async", "--tenant-dir", "{tenant}"],
    ["usage", "--tenant-dir", "{tenant}"],
    ["config", "versions", "--tenant-dir", "{tenant}"],
    ["config", "rollback", "1", "--tenant-dir", "{tenant}"],
])
def test_an_unusable_data_dir_is_one_line_not_a_traceback(command, tmp_path: Path):
    tenant = write_tenant(tmp_path / "t", "acme")
    (tmp_path / "file").write_text("not a directory")
    data = tmp_path / "file" / "data"
    done = mtp([arg.format(tenant=tenant) for arg in command], tmp_path,
               MTP_DATA_DIR=str(data), MTP_CONFIG_OVERLAY=str(tmp_path / "overlay.toml"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("mtp: error: ") and str(tmp_path / "file") in done.stderr


@pytest.mark.parametrize("name", ["ci-bot", "ci.bot", "deploy_2"])
def test_apikey_table_pastes_into_tenant_toml_as_printed(name: str, tmp_path: Path):
    tenant = write_tenant(tmp_path / "t", "acme")
    done = mtp(["apikey", "create", "--name", name, "--roles", 'ops, on"call'], tmp_path)
    assert done.returncode == 0, done.stderr
    key, *table = done.stdout.splitlines()
    with (tenant / "tenant.toml").open("a") as toml:
        toml.write("\n" + "\n".join(table) + "\n")
    cfg = load_tenant(tenant / "tenant.toml")
    [api_key] = cfg.api_keys
    assert api_key.name == name and api_key.roles == ("ops", 'on"call')
    assert api_key.digest == hashlib.sha256(key.encode()).hexdigest()
