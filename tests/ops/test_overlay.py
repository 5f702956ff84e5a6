"""Live overlay: valid changes swap the config and make a version; invalid ones are refused."""

from __future__ import annotations

import logging
import os
import sqlite3
import textwrap
import time
from pathlib import Path

import pytest

from framework.overlay import ConfigHolder, OverlayWatcher, live_config
from framework.tenant_config import load_tenant
from framework.versions import (
    RollbackError,
    VersionStore,
    diff,
    flatten,
    rollback,
    rollback_source,
)

TENANT = """
[tenant]
id = "acme"

[services.orders]
config = { currency = "EUR" }

[limits]
rate = 100
burst = 50

[flags.beta]
enabled = false
"""


def write(path: Path, text: str) -> None:
    """Replace a file the way editors and ConfigMaps do: a new inode in one step."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, path)


@pytest.fixture
def env(tmp_path: Path):
    (tmp_path / "tenant.toml").write_text(TENANT)
    base = load_tenant(tmp_path / "tenant.toml")
    versions = VersionStore(tmp_path / "data" / "config.db")
    return base, versions, tmp_path / "overlay.toml"


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_no_overlay_configured_records_the_base(env) -> None:
    base, versions, _ = env
    holder, watcher = live_config(base, "", versions)
    assert watcher is None and holder.current is base
    assert [v.hash for v in versions.list()] == [base.digest]
    again, _ = live_config(base, "", versions)  # a second process: same version
    assert again.version_id == holder.version_id and len(versions.list()) == 1


def test_change_is_applied_and_versioned(env) -> None:
    base, versions, path = env
    write(path, '[flags.beta]\nenabled = true\n')
    holder, watcher = live_config(base, str(path), versions, interval=0.01)
    try:
        assert holder.current.flags["beta"].enabled
        first = holder.current
        write(path, '[limits]\nrate = 5\nburst = 0\n[services.orders.config]\ncurrency = "USD"\n')
        wait_for(lambda: holder.current is not first)
        wait_for(lambda: len(versions.list()) == 2)  # recorded just after the swap
        now = holder.current
        # a new overlay replaces the previous one: beta is back to tenant.toml's value
        assert not now.flags["beta"].enabled
        assert now.limits.rate == 5 and now.limits.burst == 0
        assert now.service("orders").config["currency"] == "USD"
        assert first.flags["beta"].enabled  # the object a request holds never changes
        listed = versions.list()
        assert [v.hash for v in listed] == [now.digest, first.digest]
        assert listed[0].id == holder.version_id
        changed = {c["key"]: (c["old"], c["new"]) for c in listed[0].diff}
        assert changed["limits.rate"] == (100, 5)
        assert changed["flags.beta.enabled"] == (True, False)
        assert changed["services.orders.config.currency"] == ("EUR", "USD")
        d = listed[0].as_dict()
        assert set(d) == {"id", "hash", "time", "source"} and d["time"].endswith("Z")
        assert d["source"] == str(path)
        assert "diff" in listed[0].as_dict(with_diff=True)
    finally:
        watcher.stop()


def test_invalid_overlay_keeps_the_running_config(env, caplog) -> None:
    base, versions, path = env
    write(path, "[limits]\nrate = 7\n")
    holder, watcher = live_config(base, str(path), versions, interval=0.01)
    watcher.stop()  # drive polls by hand
    good = holder.current
    bad_docs = [
        "[limits]\nrate = 'fast'\n",  # wrong type
        "[auth.jwt]\nissuer = 'x'\n",  # a key outside the overlay's sections
        "[limits\nrate = 1\n",  # not TOML
        "[limits]\nburst = -1\n",
    ]
    with caplog.at_level(logging.ERROR, logger="mtp.overlay"):
        for doc in bad_docs:
            write(path, doc)
            assert watcher.poll() is False
            assert holder.current is good
    assert str(path) in caplog.text and "limits.rate" in caplog.text
    assert "auth" in caplog.text
    assert len(versions.list()) == 1
    # the same bad content is not re-parsed and re-logged on every poll
    caplog.clear()
    assert watcher.poll(force=True) is False and caplog.text == ""
    write(path, "[limits]\nrate = 8\n")
    assert watcher.poll() is True and holder.current.limits.rate == 8


def test_same_content_or_same_effect_is_not_a_new_version(env) -> None:
    base, versions, path = env
    write(path, "[limits]\nrate = 7\n")
    _holder, watcher = live_config(base, str(path), versions, interval=60)
    watcher.stop()
    write(path, "[limits]\nrate = 7\n")  # new inode, same bytes
    assert watcher.poll() is False
    write(path, "# a comment only changes the bytes\n[limits]\nrate = 7\n")
    assert watcher.poll() is False
    assert len(versions.list()) == 1


def test_in_place_write_with_same_size_is_seen_by_the_periodic_rehash(env) -> None:
    base, versions, path = env
    write(path, "[limits]\nrate = 7\n")
    holder, watcher = live_config(base, str(path), versions, interval=60)
    watcher.stop()
    stat = os.stat(path)
    with open(path, "r+") as fh:  # same inode, same size
        fh.write("[limits]\nrate = 8\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert watcher.poll() is False
    assert watcher.poll(force=True) is True and holder.current.limits.rate == 8


def test_configmap_symlink_swap(env) -> None:
    base, versions, path = env
    root = path.parent / "cm"
    (root / "..v1").mkdir(parents=True)
    (root / "..v1" / "overlay.toml").write_text("[limits]\nrate = 1\n")
    (root / "..data").symlink_to("..v1")
    link = root / "overlay.toml"
    link.symlink_to("..data/overlay.toml")
    holder, watcher = live_config(base, str(link), versions, interval=0.01)
    try:
        assert holder.current.limits.rate == 1
        (root / "..v2").mkdir()
        (root / "..v2" / "overlay.toml").write_text("[limits]\nrate = 2\n")
        (root / "..data_tmp").symlink_to("..v2")
        os.replace(root / "..data_tmp", root / "..data")  # what the kubelet does
        wait_for(lambda: holder.current.limits.rate == 2)
    finally:
        watcher.stop()


def test_removed_overlay_means_tenant_toml_alone(env) -> None:
    base, versions, path = env
    write(path, "[limits]\nrate = 7\n")
    holder, watcher = live_config(base, str(path), versions, interval=60)
    watcher.stop()
    path.unlink()
    assert watcher.poll() is True
    assert holder.current is base
    assert versions.list()[0].source == base.source


def test_invalid_at_start_runs_the_last_good_overlay(env, caplog) -> None:
    base, versions, path = env
    write(path, "[limits]\nrate = 7\n")
    _, first = live_config(base, str(path), versions, interval=60)
    first.stop()
    write(path, "[limits]\nrate = 'x'\n")
    with caplog.at_level(logging.ERROR, logger="mtp.overlay"):
        holder, second = live_config(base, str(path), versions, interval=60)
    second.stop()
    assert holder.current.limits.rate == 7  # what the running processes still run
    assert "refused at start" in caplog.text
    assert len(versions.list()) == 1


def test_invalid_at_start_without_history_runs_tenant_toml(env) -> None:
    base, _versions, path = env
    write(path, "[limits]\nrate = 'x'\n")
    holder, watcher = live_config(base, str(path), None, interval=60)
    watcher.stop()
    assert holder.current is base and holder.version_id is None


def test_last_good_that_no_longer_fits_tenant_toml(env, tmp_path: Path, caplog) -> None:
    base, versions, path = env
    write(path, "[services.orders.config]\ncurrency = 'USD'\n")
    _, watcher = live_config(base, str(path), versions, interval=60)
    watcher.stop()
    # a new image whose tenant.toml no longer allows that merge is unlikely but possible:
    # the stored text itself is broken here to stand for it
    conn = sqlite3.connect(versions.path)
    with conn:
        conn.execute("UPDATE config_versions SET overlay = '[limits'")
    conn.close()
    write(path, "[limits]\nrate = 'x'\n")
    with caplog.at_level(logging.ERROR, logger="mtp.overlay"):
        holder, again = live_config(base, str(path), versions, interval=60)
    again.stop()
    assert holder.current.digest == base.digest
    assert "does not fit" in caplog.text


def test_several_processes_make_one_version_per_change(env) -> None:
    base, versions, path = env
    write(path, "[limits]\nrate = 7\n")
    holders, watchers = [], []
    for _ in range(3):
        h, w = live_config(base, str(path), versions, interval=60)
        w.stop()
        holders.append(h)
        watchers.append(w)
    write(path, "[limits]\nrate = 8\n")
    for w in watchers:
        assert w.poll()
    write(path, "[limits]\nrate = 7\n")  # back to the first document: a new version
    for w in watchers:
        assert w.poll()
    listed = versions.list()
    assert len(listed) == 3 and listed[0].hash == listed[2].hash
    assert {h.version_id for h in holders} == {listed[0].id}


def test_listener_errors_do_not_stop_the_swap(env, caplog) -> None:
    base, versions, path = env
    holder = ConfigHolder(base)
    watcher = OverlayWatcher(base, path, holder, versions, interval=60)
    seen = []
    watcher.on_change(lambda old, new: 1 / 0)
    watcher.on_change(lambda old, new: seen.append((old.limits.rate, new.limits.rate)))
    watcher.load()
    write(path, "[limits]\nrate = 3\n")
    with caplog.at_level(logging.ERROR, logger="mtp.overlay"):
        assert watcher.poll()
    assert seen[-1] == (100, 3) and "listener failed" in caplog.text


def test_rollback_writes_the_version_back_and_watchers_converge(env) -> None:
    base, versions, path = env
    write(path, "[limits]\nrate = 7\n")
    holder, watcher = live_config(base, str(path), versions, interval=0.01)
    try:
        v1 = holder.version_id
        write(path, "[limits]\nrate = 9\n")
        wait_for(lambda: holder.current.limits.rate == 9)
        assert rollback(versions, v1, str(path)).id == v1
        wait_for(lambda: holder.current.limits.rate == 7)
        wait_for(lambda: len(versions.list()) == 3)
        newest = versions.list()[0]
        assert newest.source == f"{path} (rollback to version {v1})"
        assert newest.hash == versions.get(v1).hash
        # rolling back to the rollback keeps a single mark line
        rollback(versions, newest.id, str(path))
        assert path.read_text().count("# mtp: rollback") == 1
        assert rollback_source(path.read_text()) == newest.id
    finally:
        watcher.stop()


def test_rollback_to_a_version_without_overlay_empties_the_file(env) -> None:
    base, versions, path = env
    holder, _ = live_config(base, "", versions)
    write(path, "[limits]\nrate = 9\n")
    rollback(versions, holder.version_id, str(path))
    assert path.read_text() == f"# mtp: rollback to version {holder.version_id}\n"


def test_rollback_refusals(env, tmp_path: Path) -> None:
    base, versions, path = env
    holder, _ = live_config(base, "", versions)
    with pytest.raises(RollbackError, match="no config version 99"):
        rollback(versions, 99, str(path))
    with pytest.raises(RollbackError, match="MTP_CONFIG_OVERLAY is not set"):
        rollback(versions, holder.version_id, "")
    with pytest.raises(RollbackError, match="cannot write next to"):
        rollback(versions, holder.version_id, str(tmp_path / "no-such-dir" / "o.toml"))
    target = tmp_path / "a-dir.toml"
    (target / "sub").mkdir(parents=True)  # a directory cannot be replaced by a file
    with pytest.raises(RollbackError, match="cannot replace"):
        rollback(versions, holder.version_id, str(target))
    assert not list(tmp_path.glob(".mtp-overlay-*"))


def test_watcher_survives_errors_and_restarts_after_fork(env, monkeypatch) -> None:
    base, versions, path = env
    holder = ConfigHolder(base)
    watcher = OverlayWatcher(base, path, holder, versions, interval=0.01)
    watcher.load()
    calls = []

    def broken(force: bool = False) -> bool:
        calls.append(force)
        raise OSError("disk full")

    monkeypatch.setattr(watcher, "poll", broken)
    watcher.start()
    watcher.start()  # idempotent
    wait_for(lambda: len(calls) >= 2)
    watcher._after_fork()  # what os.fork runs in the child: a fresh thread
    assert watcher._thread is not None
    watcher.stop()
    watcher._after_fork()  # stopped watchers stay stopped
    assert watcher._thread is None


def test_unreadable_or_binary_overlay_is_refused(env, caplog) -> None:
    base, versions, path = env
    path.mkdir()  # reading a directory fails: refused at start, tenant.toml runs
    with caplog.at_level(logging.ERROR, logger="mtp.overlay"):
        holder, watcher = live_config(base, str(path), versions, interval=60)
    watcher.stop()
    assert holder.current is base and "cannot read" in caplog.text
    path.rmdir()
    write(path, "[limits]\nrate = 3\n")
    assert watcher.poll() and holder.current.limits.rate == 3
    path.write_bytes(b"[limits]\nrate = 4 # \xff\xfe\n")
    with caplog.at_level(logging.ERROR, logger="mtp.overlay"):
        assert watcher.poll() is False
    assert holder.current.limits.rate == 3 and "not UTF-8" in caplog.text


def test_a_file_changing_while_parsed_is_read_again(env, monkeypatch) -> None:
    base, versions, path = env
    write(path, "[limits]\nrate = 3\n")
    holder, watcher = live_config(base, str(path), versions, interval=60)
    watcher.stop()
    import framework.overlay as overlay

    original = overlay.load_overlay

    def racing(p):
        data = original(p)
        write(path, "[limits]\nrate = 5\n")  # the writer was faster than the parser
        monkeypatch.setattr(overlay, "load_overlay", original)
        return data

    monkeypatch.setattr(overlay, "load_overlay", racing)
    write(path, "[limits]\nrate = 4\n")
    assert watcher.poll() is False and holder.current.limits.rate == 3
    assert watcher.poll() is True and holder.current.limits.rate == 5


def test_diff_and_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}
    assert diff(None, {"a": 1}) == [{"key": "a", "old": None, "new": 1}]
    assert diff({"a": 1, "b": 2}, {"a": 1}) == [{"key": "b", "old": 2, "new": None}]
