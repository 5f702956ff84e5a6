"""The sidecar's overlay watcher keeps watching after a file it must refuse."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from framework.tenant_config import TenantConfig, parse_tenant
from sidecar import overlay
from sidecar.overlay import OverlayWatcher

BASE = parse_tenant({"tenant": {"id": "acme"}, "auth": {"jwt": {"algorithms": ["HS256"]}}})


@dataclass
class Holder:
    tenant: TenantConfig


def watch_until(path: Path, holder: Holder, done) -> bool:
    async def go() -> bool:
        watcher = OverlayWatcher(str(path), BASE, holder)
        watcher.start()
        try:
            deadline = time.monotonic() + 10
            while not done() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return done()
        finally:
            await watcher.close()
    return asyncio.run(go())


@pytest.mark.parametrize("bad", [b"[limits]\nrate = 5\n# \xff\xfe not UTF-8\n", None])
def test_a_refused_or_unreadable_file_does_not_stop_the_watching(tmp_path: Path, monkeypatch,
                                                                 bad: bytes | None) -> None:
    path = tmp_path / "overlay.toml"
    holder = Holder(BASE)
    calls = {"n": 0}
    real = overlay.load_overlay

    def counted(p):
        calls["n"] += 1
        if bad is None and calls["n"] == 1:
            # Something the file checks do not expect at all: logged, the loop goes on.
            raise RuntimeError("unexpected")
        return real(p)

    monkeypatch.setattr(overlay, "load_overlay", counted)
    path.write_bytes(bad or b"[limits]\nrate = 5\n")
    good = b"[limits]\nrate = 70\n"  # another size: a change whatever the mtime resolution

    def then_good() -> bool:
        if calls["n"] and path.read_bytes() != good:  # the first file was seen: replace it
            path.write_bytes(good)
        return holder.tenant.limits.rate == 70

    assert watch_until(path, holder, then_good)
