"""tenant.toml is refused with file, key and reason; a good one becomes frozen settings."""

import textwrap
from pathlib import Path

import pytest

from framework.tenant_config import (
    ConfigError,
    apply_overlay,
    load_overlay,
    load_tenant,
    parse_tenant,
)

GOOD = """
[tenant]
id = "acme"
name = "Acme Corp"
framework_version = "0.1.0"

[services.orders]
enabled = true
mode = "both"
timeout = 10
config = { currency = "EUR", nested = { a = [1, 2] } }
breaker = { failures = 5, cooldown = 30 }

[auth.jwt]
algorithms = ["HS256"]
issuer = "https://idp"
audience = "mtp"

[auth.api_keys.ci-bot]
hash = "sha256:%s"
roles = ["deployer"]

[auth.ldap]
enabled = true
user_base = "ou=people,dc=example,dc=org"

[authz]
enabled = true
[[authz.rules]]
service = "orders"
operations = ["create"]
groups = ["sales"]

[limits]
rate = 50
burst = 10
delay = false
user_rate = 5

[flags.new_pricing]
enabled = true
rollout_percent = 20
users = ["alice"]

[billing]
currency = "USD"
per_call = 0.001
""" % ("ab" * 32)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenant.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_file_becomes_frozen_settings(tmp_path):
    cfg = load_tenant(write(tmp_path, GOOD))
    assert cfg.tenant_id == "acme"
    orders = cfg.service("orders")
    assert orders.timeout == 10 and orders.mode == "both"
    assert orders.config["nested"]["a"] == (1, 2)
    assert orders.breaker.failures == 5
    assert cfg.jwt.algorithms == ("HS256",) and cfg.jwt.issuer == "https://idp"
    assert cfg.api_keys[0].name == "ci-bot" and cfg.api_keys[0].digest == "ab" * 32
    assert cfg.api_keys[0].roles == ("deployer",)
    assert cfg.ldap.enabled and cfg.ldap.cache_ttl == 60
    assert cfg.authz.rules[0].groups == ("sales",)
    assert cfg.limits.rate == 50 and cfg.limits.delay is False and cfg.limits.user_rate == 5
    assert cfg.flags["new_pricing"].users == ("alice",)
    assert cfg.billing.currency == "USD"
    assert len(cfg.digest) == 64
    with pytest.raises(TypeError):
        orders.config["currency"] = "X"  # frozen mapping
    assert cfg.service("unknown").enabled  # defaults for services without a table


def test_minimal_file_gets_documented_defaults(tmp_path):
    cfg = load_tenant(write(tmp_path, '[tenant]\nid = "a"\n'))
    assert cfg.limits.rate == 100 and cfg.limits.burst == 100 and cfg.limits.delay
    assert cfg.authz.enabled is False
    assert cfg.jwt.tenant_claim == "tenant_id" and cfg.jwt.leeway == 30
    assert cfg.jwt.secret_env == "MTP_JWT_SECRET"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[tenant]\nid = "a"\ncolour = "red"\n', "tenant.colour", "unknown key"),
        ('[tenant]\nid = "A_B"\n', "tenant.id", "does not match"),
        ('[tenant]\nname = "x"\n', "tenant.id", "required key missing"),
        ('[tenant]\nid = "a"\n[limits]\nrate = "fast"\n', "limits.rate", "is not of type"),
        ('[tenant]\nid = "a"\n[limits]\nburst = true\n', "limits.burst", "is not of type"),
        ('[tenant]\nid = "a"\n[services.Bad]\n', "services.Bad", "invalid name"),
        ('[tenant]\nid = "a"\n[services.x]\nmode = "later"\n', "services.x.mode", "is not one of"),
        ('[tenant]\nid = "a"\n[auth.jwt]\nalgorithms = ["none"]\n', "auth.jwt.algorithms.0",
         "is not one of"),
        ('[tenant]\nid = "a"\n[auth.jwt]\nalgorithms = ["RS256"]\n', "auth.jwt.public_key_file",
         "needs public_key_file"),
        ('[tenant]\nid = "a"\n[auth.jwt]\nalgorithms = ["HS256", "RS256"]\npublic_key_file="k"\n',
         "auth.jwt.algorithms", "do not mix"),
        ('[tenant]\nid = "a"\n[auth.jwt]\nalgorithms = ["RS256"]\npublic_key_file = "k"\n'
         'jwks_url = "https://x"\n', "auth.jwt.jwks_url", "not both"),
        ('[tenant]\nid = "a"\n[auth.api_keys.k]\nhash = "md5:00"\n', "auth.api_keys.k.hash",
         "does not match"),
        ('[tenant]\nid = "a"\n[auth.ldap]\nenabled = true\n', "auth.ldap.user_base", "required"),
        ('[tenant]\nid = "a"\n[[authz.rules]]\noperations = ["*"]\n', "authz.rules.0.service",
         "required key missing"),
        ('[tenant]\nid = "a"\n[flags.f]\nrollout_percent = 101\n', "flags.f.rollout_percent",
         "maximum"),
        ('[tenant]\nid = "a"\n[services.x]\ntimeout = inf\n', "services.x.timeout", "finite"),
        ('[tenant]\nid = "a"\n[limits]\nrate = nan\n', "limits.rate", "finite"),
        ('[tenant]\nid = "a"\n[services.x]\nconfig = { a = [1.0, -inf] }\n',
         "services.x.config.a.1", "finite"),
    ],
)
def test_mistakes_name_file_key_and_reason(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_tenant(path)
    assert err.value.file == str(path)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(path) in str(err.value) and key in str(err.value)


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_tenant(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_tenant(write(tmp_path, "[tenant\nid="))
    (tmp_path / "latin1.toml").write_bytes(b'[tenant]\nid = "acme"\n# \xff\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_tenant(tmp_path / "latin1.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load_tenant(tmp_path / "dir.toml")


def test_overlay_merges_tables_and_replaces_arrays(tmp_path):
    base = load_tenant(write(tmp_path, GOOD))
    over = tmp_path / "overlay.toml"
    over.write_text(textwrap.dedent("""
        [limits]
        rate = 7
        [[authz.rules]]
        service = "*"
        [services.orders.config]
        currency = "CHF"
        [flags.beta]
        enabled = true
    """))
    merged = apply_overlay(base, load_overlay(over), str(over))
    assert merged.limits.rate == 7 and merged.limits.burst == 10  # merged key by key
    assert [r.service for r in merged.authz.rules] == ["*"]  # array replaced
    assert merged.service("orders").config["currency"] == "CHF"
    assert merged.service("orders").timeout == 10
    assert set(merged.flags) == {"new_pricing", "beta"}
    assert merged.digest != base.digest
    assert merged.source == str(over)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[tenant]\nid = "b"\n', "tenant"),
        ('[auth.jwt]\nalgorithms = ["HS512"]\n', "auth"),
        ("[services.orders]\ntimeout = 1\n", "services.orders.timeout"),
        ('[limits]\nrate = "x"\n', "limits.rate"),
    ],
)
def test_overlay_outside_its_sections_is_refused(tmp_path, text, key):
    over = tmp_path / "overlay.toml"
    over.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_overlay(over)
    assert err.value.key == key


def test_digest_ignores_key_order():
    a = parse_tenant({"tenant": {"id": "x", "name": "n"}, "limits": {"rate": 1, "burst": 2}})
    b = parse_tenant({"limits": {"burst": 2, "rate": 1}, "tenant": {"name": "n", "id": "x"}})
    assert a.digest == b.digest
