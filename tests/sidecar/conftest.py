"""Fixtures for sidecar tests: a signed-request echo upstream and a real `mtp sidecar`."""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from tests.helpers import base_env, free_port, spawn, stop, wait_for_port, wait_for_unix

SIDECAR_SECRET = "sidecar-secret-for-tests-0123456789"
JWT_SECRET = "jwt-secret-for-tests-" + "0123456789" * 4
API_KEY = "ci-key-0123456789"

TENANT_TOML = f"""
[tenant]
id = "acme"

[auth.jwt]
algorithms = ["HS256"]
leeway = 0

[auth.api_keys.ci-bot]
hash = "sha256:{hashlib.sha256(API_KEY.encode()).hexdigest()}"
roles = ["deployer"]

[authz]
enabled = true

[[authz.rules]]
service = "orders"
operations = ["create"]
groups = ["sales"]

[[authz.rules]]
service = "hello"

[[authz.rules]]
service = "*"
roles = ["admin", "deployer"]

[limits]
rate = 10000
burst = 10000
"""


def token(sub: str = "alice", tenant: str = "acme", ttl: int = 300, key: str = JWT_SECRET,
          alg: str = "HS256", **extra: object) -> str:
    claims = {"sub": sub, "tenant_id": tenant, "exp": int(time.time()) + ttl, **extra}
    return jwt.encode(claims, key, algorithm=alg)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(port: int, method: str, path: str, headers: dict[str, str] | list | None = None,
         body: bytes | None = None) -> Reply:
    """One request with exactly the given headers (http.client adds only Host/length)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for name, value in items:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


@dataclass
class Stack:
    port: int
    dir: Path
    overlay: Path
    audit: Path
    upstream_socket: Path

    def call(self, method: str, path: str, headers=None, body: bytes | None = None) -> Reply:
        return call(self.port, method, path, headers, body)


def start_upstream(sock: Path, log: Path):
    proc = spawn([sys.executable, "-m", "tests.sidecar.echo_upstream", f"unix:{sock}"],
                 base_env(MTP_SIDECAR_SECRET=SIDECAR_SECRET), log=log)
    wait_for_unix(sock, proc)
    return proc


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
