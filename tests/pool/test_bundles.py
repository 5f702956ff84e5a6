"""The pool's bundle directory, key index, derived keys and command line, in process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework.pool import bundles as bundles_mod
from framework.pool.bundles import BundleDir
from framework.pool.keys import derive_key, secret_name, tenant_secret
from framework.tenant_config import ConfigError
from tests.helpers import base_env


def bundle(root: Path, tid: str, *keys: str, declared: str | None = None) -> Path:
    d = root / tid
    d.mkdir(parents=True, exist_ok=True)
    tables = "".join(
        f'[auth.api_keys.k{i}]\nhash = "sha256:{hashlib.sha256(k.encode()).hexdigest()}"\n'
        for i, k in enumerate(keys))
    (d / "tenant.toml").write_text(f'[tenant]\nid = "{declared or tid}"\nname = "x"\n{tables}')
    return d


def test_configs_are_read_lazily_cached_and_evicted(tmp_path: Path) -> None:
    for tid in ("a", "b", "c"):
        bundle(tmp_path, tid)
    (tmp_path / "Not-A-Tenant").mkdir()
    found = BundleDir(tmp_path, cache_size=2)
    assert found.names() == ["a", "b", "c"]
    assert found.cached_stamp("a") is None  # nothing read at start
    first = found.get("a")
    assert first is not None and found.get("a") is first  # cached
    found.get("b")
    found.get("c")
    assert found.cached_stamp("a") is None  # evicted: least recently used
    assert found.get("nobody") is None and found.get("../a") is None
    assert BundleDir(tmp_path / "missing").names() == []


def test_a_replaced_bundle_is_read_again_and_a_removed_one_is_gone(tmp_path: Path) -> None:
    bundle(tmp_path, "a")
    found = BundleDir(tmp_path)
    old = found.get("a")
    new = bundle(tmp_path / "releases", "a")
    link = tmp_path / ".a.new"
    link.symlink_to(new)
    os.rename(tmp_path / "a", tmp_path / "a.old")
    os.replace(link, tmp_path / "a")
    replaced = found.get("a")
    assert replaced is not None and replaced.stamp != old.stamp
    assert replaced.path == new.resolve()
    (tmp_path / "a").unlink()
    assert found.get("a") is None


def test_a_bundle_naming_another_tenant_is_refused(tmp_path: Path) -> None:
    bundle(tmp_path, "a", declared="b")
    with pytest.raises(ConfigError, match="holds tenant 'b'"):
        BundleDir(tmp_path).get("a")


def test_a_placement_decides_which_bundles_are_served(tmp_path: Path) -> None:
    bundle(tmp_path, "a")
    bundle(tmp_path, "b")

    class OnlyA:
        def placed_here(self, tenant_id: str) -> bool:
            return tenant_id == "a"

    found = BundleDir(tmp_path, OnlyA())
    assert found.get("a") is not None and found.get("b") is None


def test_api_keys_are_indexed_across_tenants(tmp_path: Path, monkeypatch) -> None:
    bundle(tmp_path, "a", "key-a", "shared")
    bundle(tmp_path, "b", "key-b", "shared")
    bundle(tmp_path, "broken").joinpath("tenant.toml").write_text("[tenant\n")
    found = BundleDir(tmp_path)
    assert found.tenant_of_key("key-b") == "b"  # a miss reads every bundle once
    assert found.tenant_of_key("key-a") == "a"
    assert found.tenant_of_key("shared") is None  # configured by two tenants: names neither
    # A key added to a bundle is found once the bundle is read again.
    bundle(tmp_path, "a", "key-a", "key-a2")
    monkeypatch.setattr(bundles_mod, "REFRESH_SECONDS", 0.0)
    assert found.tenant_of_key("key-a2") == "a"
    assert found.tenant_of_key("key-b", refresh=False) == "b"
    # A removed bundle's keys name no tenant any more.
    for f in (tmp_path / "b").iterdir():
        f.unlink()
    (tmp_path / "b").rmdir()
    assert found.tenant_of_key("key-b") is None
    assert found.tenant_of_key("nope") is None


def test_unknown_keys_re_read_bundles_at_most_once_a_second(tmp_path: Path) -> None:
    found = BundleDir(tmp_path)
    assert found.tenant_of_key("nope") is None
    bundle(tmp_path, "a", "key-a")
    assert found.tenant_of_key("key-a") is None  # within the second: not re-read
    assert found.tenant_of_key("key-a", refresh=False) is None


def test_derived_keys_are_per_tenant_and_stable() -> None:
    a, b = derive_key(b"p" * 32, "acme"), derive_key(b"p" * 32, "globex")
    assert a != b and len(a) == 64 and a == derive_key(b"p" * 32, "acme")
    assert a != derive_key(b"q" * 32, "acme")
    assert secret_name("MTP_JWT_SECRET", "acme-eu") == "MTP_JWT_SECRET__ACME_EU"
    env = {"X__ACME": "1", "X": "shared"}
    assert tenant_secret(env, "X", "acme") == "1"
    assert tenant_secret(env, "X", "globex") == ""  # never the bare name
    assert tenant_secret(env, "", "acme") == ""


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--name", "Bad Name", "--bundles", "."], {"MTP_SIDECAR_SECRET": "s" * 32}, "--name"),
    (["--name", "p", "--bundles", "/no/such/dir"], {"MTP_SIDECAR_SECRET": "s" * 32},
     "--bundles"),
    (["--name", "p", "--bundles", "."], {}, "MTP_SIDECAR_SECRET"),
    (["--name", "p", "--bundles", "."], {"MTP_SIDECAR_SECRET": "s" * 32,
                                         "MTP_POOL_IDLE": "soon"}, "MTP_POOL_IDLE"),
    (["--name", "p", "--bundles", "."], {"MTP_SIDECAR_SECRET": "s" * 32,
                                         "MTP_POOL_SHARED_APPS": "0"}, "MTP_POOL_SHARED_APPS"),
])
def test_the_command_refuses_a_wrong_setup_in_one_line(args, env, message) -> None:
    r = subprocess.run([sys.executable, "-m", "framework", "pool", *args],
                       env=base_env(**env), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
