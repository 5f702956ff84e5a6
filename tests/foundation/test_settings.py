"""MTP_* variables are read once, validated, and refused with the variable's name."""

from pathlib import Path

import pytest

from framework.settings import Settings, parse_address
from framework.tenant_config import ConfigError


def test_defaults(tmp_path):
    s = Settings.from_env({"HOME": str(tmp_path)}, tenant_dir=tmp_path)
    assert s.listen == ("0.0.0.0", 8080)
    assert s.data_dir == tmp_path / ".cache" / "mtp"
    assert s.upstream == str(s.data_dir / "framework.sock")
    assert s.upstream_url == "http://framework"
    assert (s.max_body, s.max_result) == (1 << 20, 10 << 20)
    assert (s.workers, s.threads, s.log_level) == (2, 8, "INFO")
    assert s.tenant_dir == tmp_path.resolve()


def test_values_from_environment(tmp_path):
    env = {
        "MTP_TENANT_DIR": str(tmp_path), "MTP_DATA_DIR": str(tmp_path / "d"),
        "MTP_LISTEN": "127.0.0.1:9000", "MTP_UPSTREAM": "127.0.0.1:9001",
        "MTP_WORKERS": "3", "MTP_THREADS": "4", "MTP_LOG_LEVEL": "debug",
        "MTP_MAX_BODY": "10", "MTP_MAX_RESULT": "20", "MTP_REDIS_URL": "redis://x",
        "MTP_CONFIG_OVERLAY": "/o.toml", "MTP_AUDIT_FILE": "/a.log", "XDG_CACHE_HOME": "/c",
        "MTP_SIDECAR_SECRET": "s" * 32, "MY_SECRET": "v", "MTP_DEV": "1",
    }
    s = Settings.from_env(env)
    assert s.tenant_dir == tmp_path.resolve() and s.data_dir == tmp_path / "d"
    assert s.listen == ("127.0.0.1", 9000) and s.upstream == ("127.0.0.1", 9001)
    assert s.upstream_url == "http://127.0.0.1:9001"
    assert (s.workers, s.threads, s.log_level, s.max_body, s.max_result) == (3, 4, "DEBUG", 10, 20)
    assert s.redis_url == "redis://x" and s.config_overlay == "/o.toml" and s.dev
    assert s.require_sidecar_secret() == b"s" * 32
    assert s.secret("MY_SECRET") == "v" and s.secret("NOPE") == ""
    assert "s" * 32 not in repr(s)  # secrets never show up in a repr or a log line


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("MTP_WORKERS", "many", "integer"),
        ("MTP_WORKERS", "0", "at least 1"),
        ("MTP_MAX_BODY", "-1", "at least 1"),
        ("MTP_LISTEN", "8080", "host:port"),
        ("MTP_LISTEN", "h:99999", "host:port"),
        ("MTP_UPSTREAM", "unix:", "socket path"),
        ("MTP_LOG_LEVEL", "LOUD", "unknown level"),
    ],
)
def test_bad_values_name_the_variable(name, value, reason):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    assert err.value.key == name and reason in err.value.reason


@pytest.mark.parametrize("secret", ["", "short"])
def test_sidecar_secret_is_required(secret):
    with pytest.raises(ConfigError, match="MTP_SIDECAR_SECRET"):
        Settings.from_env({"MTP_SIDECAR_SECRET": secret}).require_sidecar_secret()


def test_address_forms():
    assert parse_address("unix:/run/x.sock", "X") == "/run/x.sock"
    assert parse_address("[::1]:80", "X") == ("::1", 80)
    assert parse_address(":80", "X") == ("0.0.0.0", 80)


def test_load_tenant_reads_the_tenant_dir(tmp_path):
    (tmp_path / "tenant.toml").write_text('[tenant]\nid = "t1"\n')
    assert Settings.from_env({}, tenant_dir=tmp_path).load_tenant().tenant_id == "t1"
    with pytest.raises(ConfigError, match="file not found"):
        Settings.from_env({}, tenant_dir=Path(tmp_path / "none")).load_tenant()
