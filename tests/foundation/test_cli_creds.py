"""`mtp token`, `mtp apikey create` and `mtp --version` as a user runs them."""

import hashlib
import subprocess
import sys
import tomllib

import jwt
import pytest

from framework import __version__
from tests.helpers import base_env

MTP = [sys.executable, "-m", "framework"]


def run(*args, env=None, cwd=None):
    return subprocess.run([*MTP, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60)


@pytest.fixture
def tenant(tmp_path):
    (tmp_path / "tenant.toml").write_text(
        '[tenant]\nid = "acme"\nframework_version = "0.1.0"\n'
        '[auth.jwt]\nalgorithms = ["HS384"]\nsecret_env = "ACME_SECRET"\n'
        'issuer = "iss"\naudience = "aud"\ntenant_claim = "org"\n')
    return tmp_path


def test_version():
    out = run("--version", env=base_env())
    assert out.returncode == 0 and out.stdout.strip() == f"mtp {__version__}"


def test_token_uses_the_configured_secret_and_claims(tenant):
    env = base_env(ACME_SECRET="s" * 48)
    out = run("token", "--user", "alice", "--groups", "a, b", "--roles", "admin", "--ttl", "60",
              "--tenant-dir", str(tenant), env=env)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert "\n" not in token
    claims = jwt.decode(token, "s" * 48, algorithms=["HS384"], audience="aud", issuer="iss")
    assert claims["sub"] == "alice" and claims["org"] == "acme"
    assert claims["groups"] == ["a", "b"] and claims["roles"] == ["admin"]
    assert claims["exp"] - claims["iat"] == 60


def test_token_tenant_dir_from_environment_and_cwd(tenant):
    env = base_env(ACME_SECRET="s" * 48, MTP_TENANT_DIR=str(tenant))
    assert run("token", "-u", "bob", "--tenant", "other", env=env).returncode == 0
    out = run("token", "-u", "bob", env=base_env(ACME_SECRET="s" * 48), cwd=tenant)
    assert jwt.decode(out.stdout.strip(), "s" * 48, algorithms=["HS384"],
                      options={"verify_aud": False})["org"] == "acme"


def test_token_without_secret_is_a_clear_error(tenant):
    out = run("token", "--user", "alice", "--tenant-dir", str(tenant), env=base_env())
    assert out.returncode == 2
    assert "ACME_SECRET" in out.stderr and "Traceback" not in out.stderr


def test_token_for_template_uses_the_dev_secret(tmp_path):
    env = base_env(MTP_DATA_DIR=str(tmp_path))
    first = run("token", "--user", "alice", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    secret = (tmp_path / "dev-jwt-secret").read_text()
    assert (tmp_path / "dev-jwt-secret").stat().st_mode & 0o777 == 0o600
    assert jwt.decode(first.stdout.strip(), secret, algorithms=["HS256"])["tenant_id"] == "demo"


def test_token_refuses_asymmetric_tenant(tmp_path):
    (tmp_path / "tenant.toml").write_text(
        '[tenant]\nid = "a"\n[auth.jwt]\nalgorithms = ["RS256"]\npublic_key_file = "k.pem"\n')
    out = run("token", "-u", "x", "--tenant-dir", str(tmp_path), env=base_env())
    assert out.returncode == 2 and "auth.jwt.algorithms" in out.stderr


def test_apikey_create_prints_key_then_table():
    out = run("apikey", "create", "--name", "ci-bot", "--roles", "deployer,ops", env=base_env())
    assert out.returncode == 0
    key, table = out.stdout.split("\n", 1)
    doc = tomllib.loads(table)["auth"]["api_keys"]["ci-bot"]
    assert doc["hash"] == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert doc["roles"] == ["deployer", "ops"]
    other = run("apikey", "create", env=base_env()).stdout.split("\n", 1)[0]
    assert other != key and len(other) > 40


def test_apikey_bad_name():
    out = run("apikey", "create", "--name", "bad name", env=base_env())
    assert out.returncode == 2 and "--name" in out.stderr
