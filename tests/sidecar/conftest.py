"""Fixtures for sidecar tests: a signed-request echo upstream and a real `mtp sidecar`."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.sidecar.support import (
    JWT_SECRET,
    SIDECAR_SECRET,
    TENANT_TOML,
    Stack,
    start_upstream,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("sidecar")
    (d / "tenant.toml").write_text(TENANT_TOML)
    sock = d / "up.sock"
    upstream = start_upstream(sock, d / "upstream.log")
    port = free_port()
    env = base_env(MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
                   MTP_TENANT_DIR=str(d), MTP_UPSTREAM=f"unix:{sock}",
                   MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(d / "data"),
                   MTP_AUDIT_FILE=str(d / "audit.log"), MTP_CONFIG_OVERLAY=str(d / "overlay.toml"),
                   MTP_MAX_BODY="4096", MTP_MAX_RESULT="100000")
    sidecar = spawn([sys.executable, "-m", "framework", "sidecar"], env, log=d / "sidecar.log")
    try:
        wait_for_port(port, sidecar)
        yield Stack(port, d, d / "overlay.toml", d / "audit.log", sock)
    finally:
        stop(sidecar)
        stop(upstream)
