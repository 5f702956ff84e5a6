"""Migration's rules without processes: what a PATCH of placement records, where the
gateway routes meanwhile, the backoff, the gateway file (MTP_GATEWAY_FILE) and its
checks at start, and the table's ETag. The moves themselves, with real pools, nginx
and a dedicated stack: tests/pool/test_migration.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.control.backends import Backends, backend_name, load_backends
from framework.control.gateway import nginx
from framework.control.migration import (
    BACKOFF_MAX,
    SWITCHED,
    WARMING,
    MigrationBusy,
    backoff,
    elapsed,
    placement_change,
    probe,
    routed_placement,
    same_move,
)
from framework.control.store import SqliteRegistry, TenantRecord, iso_now
from framework.tenant_config import ConfigError
from tests.control.fleet import ControlPlane
from tests.helpers import free_port

NOW = "2026-01-01T00:00:00.000Z"


def record(placement: str = "pool:alpha", migration: dict | None = None,
           tenant: str = "acme") -> TenantRecord:
    return TenantRecord(id=tenant, name=tenant, plan="std", status="active",
                        placement=placement, created=NOW, updated=NOW, migration=migration)


def moving(source: str, target: str, state: str = WARMING) -> TenantRecord:
    return record(target, {"from": source, "to": target, "state": state, "since": NOW,
                           "attempts": 0, "last_error": ""})


def test_a_new_placement_starts_a_migration_that_routes_to_the_source_while_warming() -> None:
    rec = record()
    assert placement_change(rec, "pool:alpha", NOW) == {}  # the same: nothing to do
    change = placement_change(rec, "pool:beta", NOW)
    assert change == {"placement": "pool:beta", "migration": {
        "from": "pool:alpha", "to": "pool:beta", "state": WARMING, "since": NOW,
        "attempts": 0, "last_error": ""}}
    warming = moving("pool:alpha", "pool:beta")
    assert routed_placement(warming) == "pool:alpha"
    assert routed_placement(moving("pool:alpha", "pool:beta", SWITCHED)) == "pool:beta"
    assert routed_placement(rec) == "pool:alpha"


def test_while_warming_a_patch_cancels_or_redirects_and_while_draining_it_is_refused() -> None:
    warming = moving("pool:alpha", "pool:beta")
    assert placement_change(warming, "pool:alpha", NOW) == {"placement": "pool:alpha",
                                                            "migration": None}
    assert placement_change(warming, "pool:beta", NOW) == {}
    redirect = placement_change(warming, "dedicated", NOW)
    assert redirect["placement"] == "dedicated"
    assert redirect["migration"]["from"] == "pool:alpha"  # the gateway still routes there
    draining = moving("pool:alpha", "pool:beta", SWITCHED)
    with pytest.raises(MigrationBusy, match="draining"):
        placement_change(draining, "pool:alpha", NOW)
    assert placement_change(draining, "pool:beta", NOW) == {}  # where it is going anyway


def test_backoff_elapsed_and_the_compare() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff(30) == BACKOFF_MAX
    assert elapsed(iso_now(100.0), now=106.5) == pytest.approx(6.5)
    assert elapsed("not a time") == float("inf")
    warming = moving("pool:alpha", "pool:beta")
    assert same_move(warming, "pool:beta", warming.migration)
    assert not same_move(record("pool:beta"), "pool:beta", warming.migration)


def test_the_record_keeps_its_migration_and_updates_compare_and_set(tmp_path: Path) -> None:
    registry = SqliteRegistry(tmp_path / "fleet.db")
    try:
        assert registry.create(record())
        assert "migration" not in registry.get("acme").as_dict()  # the DESIGN fields only
        move = moving("pool:alpha", "pool:beta").migration
        changed = registry.update("acme", {"placement": "pool:beta", "migration": move},
                                  lambda r: r.migration is None)
        assert changed is not None and registry.get("acme").migration == move
        # The compare fails: nothing written.
        assert registry.update("acme", {"migration": None}, lambda r: r.migration is None) \
            is None
        assert registry.get("acme").migration == move
        assert registry.update("nobody", {"migration": None}) is None
    finally:
        registry.close()


def test_the_gateway_file_maps_backends_and_the_table_uses_it(tmp_path: Path) -> None:
    assert backend_name("pool:alpha", "acme") == "mtp-pool-alpha"
    assert backend_name("dedicated", "acme") == "mtp-acme"
    assert Backends().address("mtp-pool-alpha") == "mtp-pool-alpha:8080"  # the Service
    path = tmp_path / "gateway.toml"
    path.write_text('listen = "127.0.0.1:8088"\n[backends]\nmtp-pool-alpha = "10.0.0.5:81"\n')
    backends = load_backends(str(path))
    text = nginx([moving("pool:alpha", "pool:beta"), record("dedicated", tenant="globex")],
                 "fleet.test", backends)
    assert "acme.fleet.test mtp-pool-alpha;" in text  # warming: still the source
    assert "server 10.0.0.5:81;" in text and "server mtp-globex:8080;" in text
    assert "listen 127.0.0.1:8088;" in text
    assert load_backends("") == Backends()


@pytest.mark.parametrize(("text", "key"), [
    ("[backends\n", ""),
    ('colour = "blue"\n', "colour"),
    ('listen = "everywhere"\n', "listen"),
    ('listen = "99999"\n', "listen"),
    ('backends = "mtp-pool-a=1.2.3.4:80"\n', "backends"),
    ('[backends]\n"x; include /etc/passwd" = "1.2.3.4:80"\n', "backends.x; include"),
    ('[backends]\nmtp-pool-a = "1.2.3.4:80; include /etc/passwd"\n', "backends.mtp-pool-a"),
    ('[backends]\nmtp-pool-a = 8080\n', "backends.mtp-pool-a"),
])
def test_a_bad_gateway_file_names_the_file_and_the_key(tmp_path: Path, text: str,
                                                       key: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_backends(str(path))
    assert caught.value.file == str(path) and caught.value.key.startswith(key)
    with pytest.raises(ConfigError, match="cannot read"):
        load_backends(str(tmp_path / "missing.toml"))


def test_control_refuses_to_start_with_a_bad_gateway_file(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    cp.plans_file.write_text('[plans.free]\nisolation = "shared"\nservices = ["*"]\n')
    bad = tmp_path / "gateway.toml"
    bad.write_text('[backends]\nmtp-pool-a = "nowhere"\n')
    done = subprocess.run([sys.executable, "-m", "framework", "control"],
                          env={**cp.env(), "MTP_GATEWAY_FILE": str(bad)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert f"{bad}: backends.mtp-pool-a: expected" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_table_has_an_etag_and_a_poll_with_it_is_304(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path).start()
    try:
        first = cp.call("GET", "/admin/gateway?format=nginx")
        etag = first.headers["ETag"]
        again = cp.call("GET", "/admin/gateway?format=nginx",
                        headers={**_op(), "If-None-Match": etag})
        assert again.status == 304 and again.body == b""
        assert cp.call("POST", "/admin/tenants", {"id": "acme", "name": "A", "plan": "free",
                                                  "placement": "pool:alpha"}).status == 201
        changed = cp.call("GET", "/admin/gateway?format=nginx",
                          headers={**_op(), "If-None-Match": etag})
        assert changed.status == 200 and changed.headers["ETag"] != etag
        assert "acme.fleet.test mtp-pool-alpha;" in changed.body.decode()
        # A target nobody answers for: the record shows the attempts and the reason.
        assert cp.call("PATCH", "/admin/tenants/acme", {"placement": "pool:beta"}).status == 200
        deadline = time.monotonic() + 20
        while cp.call("GET", "/admin/tenants/acme").json()["migration"]["attempts"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        move = cp.call("GET", "/admin/tenants/acme").json()["migration"]
        assert move["state"] == WARMING and move["last_error"].startswith("mtp-pool-beta:8080")
        assert "acme.fleet.test mtp-pool-alpha;" in cp.call(
            "GET", "/admin/gateway?format=nginx").body.decode()
        # An answer other than 200 is not ready, and says what it was.
        error = asyncio.run(probe(f"127.0.0.1:{cp.port}", "acme", pool=True))
        assert error.startswith(f"127.0.0.1:{cp.port} answered 401: ")
    finally:
        cp.stop()


def _op() -> dict[str, str]:
    from tests.control.fleet import op_headers

    return op_headers()


def test_a_probe_says_why_a_target_is_not_ready() -> None:
    port = free_port()
    error = asyncio.run(probe(f"127.0.0.1:{port}", "acme", pool=True, timeout=2))
    assert error.startswith(f"127.0.0.1:{port}: ")
