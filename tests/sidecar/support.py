"""Shared by sidecar and end-to-end tests: secrets, tokens, a raw HTTP client, the echo upstream."""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from tests.helpers import base_env, spawn, wait_for_unix

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


def token(sub: str = "alice", tenant: str = "acme", ttl: int = 3600, key: str = JWT_SECRET,
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
