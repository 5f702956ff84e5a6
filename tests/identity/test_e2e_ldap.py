"""End to end through the real `mtp run`: LDAP Basic logins and groups, [authz] on LDAP groups,
slapd outage and recovery, and JWKS-verified RS256/ES256/EdDSA tokens with a key rotation."""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from framework import __version__
from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.identity.jwks_server import JwksServer, SigningKey, claims
from tests.servers import SlapdServer

pytestmark = pytest.mark.slow

TENANT = "acme"
JWKS_TTL = 1.0  # short, so a rotation is picked up within the test

SERVICES = {
    "whoami": '''"""Who is calling."""


def handle(context):
    return {"user": context.user, "groups": sorted(context.groups),
            "auth_method": context.auth_method}
''',
    "orders": '''"""Orders."""
OPERATIONS = ["create", "get"]


def handle(context):
    return {"operation": context.operation, "user": context.user}
''',
    "admin_panel": '''"""Admins only."""


def handle(context):
    return {"ok": True}
''',
}

AUTHZ = """
[authz]
enabled = true

[[authz.rules]]
service = "whoami"
operations = ["*"]

[[authz.rules]]
service = "orders"
operations = ["create"]
groups = ["sales"]

[[authz.rules]]
service = "orders"
operations = ["get"]
groups = ["sales", "support"]

[[authz.rules]]
service = "admin_panel"
groups = ["admins"]
"""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


@dataclass
class Stack:
    """`mtp run` for a tenant with LDAP and JWKS, plus the servers behind it."""

    port: int
    slapd: SlapdServer
    jwks: JwksServer
    keys: dict[str, SigningKey]
    log: Path
    audit: Path

    def audit_line(self, request_id: str) -> dict[str, Any]:
        """The audit record of one request (lines are flushed within a fraction of a second)."""
        deadline = time.monotonic() + 5
        while True:
            if self.audit.exists():
                for line in self.audit.read_text().splitlines():
                    record = json.loads(line)
                    if record["request_id"] == request_id:
                        return record
            assert time.monotonic() < deadline, f"no audit line for {request_id}"
            time.sleep(0.05)

    def call(self, path: str, auth: str | None = None, method: str = "POST") -> Reply:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = auth
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=b"{}" if method == "POST" else None, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return Reply(resp.status, dict(resp.headers), json.loads(resp.read() or b"null"))
        except urllib.error.HTTPError as err:
            raw = err.read()
            return Reply(err.code, dict(err.headers), json.loads(raw) if raw else None)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bearer(key: SigningKey, sub: str, **extra: Any) -> str:
    return "Bearer " + key.token(claims(sub, TENANT, **extra))


def write_tenant(root: Path, slapd: SlapdServer, jwks: JwksServer) -> Path:
    (root / "services").mkdir(parents=True)
    for name, source in SERVICES.items():
        (root / "services" / f"{name}.py").write_text(source)
    (root / "tenant.toml").write_text(
        f'[tenant]\nid = "{TENANT}"\nframework_version = "{__version__}"\n\n'
        f'[auth.jwt]\nalgorithms = ["RS256", "ES256", "EdDSA"]\njwks_url = "{jwks.url}"\n'
        f"jwks_cache_ttl = {JWKS_TTL}\n\n"
        # cache_ttl = 0: every request asks the directory, so an outage shows at once.
        + slapd.toml(cache_ttl=0) + AUTHZ
        + "\n[limits]\nrate = 10000\nburst = 10000\n")
    return root


@pytest.fixture(scope="module")
def stack(slapd_server: SlapdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e-ldap")
    keys = {alg: SigningKey.generate(f"{alg.lower()}-1", alg)
            for alg in ("RS256", "ES256", "EdDSA")}
    keys["next"] = SigningKey.generate("rs256-2", "RS256")
    jwks = JwksServer()
    jwks.publish(keys["RS256"], keys["ES256"], keys["EdDSA"])
    jwks.start()
    tenant = write_tenant(tmp / "tenant", slapd_server, jwks)
    port = free_port()
    log = tmp / "run.log"
    audit = tmp / "audit.jsonl"
    env = base_env(MTP_AUDIT_FILE=str(audit), MTP_LISTEN=f"127.0.0.1:{port}",
                   MTP_DATA_DIR=str(tmp / "data"),
                   MTP_LDAP_PASSWORD=slapd_server.bind_password,
                   MTP_SIDECAR_SECRET="e2e-ldap-sidecar-secret-0123456789abcdef",
                   MTP_WORKERS="1", MTP_THREADS="4")
    proc = spawn([sys.executable, "-m", "framework", "run", "--tenant-dir", str(tenant)], env,
                 log=log)
    try:
        wait_for_port(port, proc, timeout=30)
        s = Stack(port, slapd_server, jwks, keys, log, audit)
        deadline = time.monotonic() + 30
        while s.call("/readyz", method="GET").status != 200:  # framework behind it is up
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        yield s
    finally:
        stop(proc)
        jwks.stop()


def assert_problem(reply: Reply, status: int) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert reply.body["status"] == status and reply.body["request_id"]
    assert "Traceback" not in json.dumps(reply.body)


def test_basic_login_gives_user_and_groups(stack: Stack) -> None:
    reply = stack.call("/services/whoami", basic("alice", "alice-pw"))
    assert reply.status == 200, reply.body
    assert reply.body == {"user": "alice", "groups": ["admins", "sales"], "auth_method": "ldap"}
    assert stack.call("/services/whoami", basic("carol", "carol-pw")).body["groups"] == []


@pytest.mark.parametrize("user, password", [
    ("alice", "wrong"), ("alice", "bob-pw"), ("nobody", "alice-pw"), ("twin", "twin-pw"),
    ("*", "alice-pw"), ("*)(uid=*", "alice-pw"), ("admin)(|(uid=*", "x"), ("al*", "alice-pw"),
])
def test_bad_basic_credentials_are_401(stack: Stack, user: str, password: str) -> None:
    reply = stack.call("/services/whoami", basic(user, password))
    assert_problem(reply, 401)
    assert "Basic" in reply.headers["WWW-Authenticate"]


@pytest.mark.parametrize("auth", [
    basic("alice", ""), "Basic " + base64.b64encode(b"alice").decode(), "Basic !!!",
])
def test_empty_or_malformed_basic_is_401(stack: Stack, auth: str) -> None:
    assert_problem(stack.call("/services/whoami", auth), 401)


@pytest.mark.parametrize("user, password, path, status", [
    ("alice", "alice-pw", "/services/orders/create", 200),
    ("alice", "alice-pw", "/services/orders/get", 200),
    ("alice", "alice-pw", "/services/admin_panel", 200),
    ("bob", "bob-pw", "/services/orders/create", 403),
    ("bob", "bob-pw", "/services/orders/get", 200),
    ("bob", "bob-pw", "/services/admin_panel", 403),
    ("carol", "carol-pw", "/services/orders/get", 403),
    ("carol", "carol-pw", "/services/whoami", 200),
])
def test_group_rules_per_service_and_operation(stack: Stack, user: str, password: str,
                                               path: str, status: int) -> None:
    reply = stack.call(path, basic(user, password))
    assert reply.status == status, reply.body
    if status != 200:
        assert_problem(reply, status)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_jwks_tokens_of_each_algorithm(stack: Stack, alg: str) -> None:
    reply = stack.call("/services/whoami", bearer(stack.keys[alg], "carol"))
    assert reply.status == 200, reply.body
    assert reply.body == {"user": "carol", "groups": [], "auth_method": "jwt"}


def test_ldap_groups_are_added_to_jwt_principals(stack: Stack) -> None:
    key = stack.keys["ES256"]
    mixed = stack.call("/services/whoami", bearer(key, "alice", groups=["from-token"]))
    assert mixed.body["groups"] == ["admins", "from-token", "sales"]
    # bob's directory group grants orders/get but not orders/create.
    assert stack.call("/services/orders/get", bearer(key, "bob")).status == 200
    assert stack.call("/services/orders/create", bearer(key, "bob")).status == 403
    # No directory entry: the token's own groups only.
    outsider = stack.call("/services/orders/create", bearer(key, "zed", groups=["sales"]))
    assert outsider.status == 200, outsider.body
    assert stack.call("/services/orders/get", bearer(key, "zed")).status == 403


def test_unknown_kid_is_401(stack: Stack) -> None:
    stray = SigningKey.generate("not-published", "RS256")
    assert_problem(stack.call("/services/whoami", bearer(stray, "alice")), 401)
    forged = stack.keys["RS256"].token(claims("alice", TENANT), kid="es256-1")  # wrong key type
    assert_problem(stack.call("/services/whoami", "Bearer " + forged), 401)


def test_jwks_rotation_without_restart(stack: Stack) -> None:
    new_key, old_key = stack.keys["next"], stack.keys["RS256"]
    hits = stack.jwks.hits
    stack.jwks.publish(new_key, stack.keys["ES256"], stack.keys["EdDSA"])
    try:
        time.sleep(JWKS_TTL + 0.2)  # past the refetch interval of the sidecar's JwksKeys
        reply = stack.call("/services/whoami", bearer(new_key, "bob"))
        assert reply.status == 200, reply.body
        assert reply.body["groups"] == ["support"]
        assert stack.jwks.hits > hits
        time.sleep(JWKS_TTL + 0.2)
        assert_problem(stack.call("/services/whoami", bearer(old_key, "bob")), 401)
    finally:
        stack.jwks.publish(old_key, stack.keys["ES256"], stack.keys["EdDSA"])


def test_slapd_outage_is_503_then_recovers_without_restart(stack: Stack) -> None:
    assert stack.call("/services/whoami", basic("bob", "bob-pw")).status == 200
    stack.slapd.stop()
    try:
        down = stack.call("/services/whoami", basic("bob", "bob-pw"))
        assert_problem(down, 503)
        record = stack.audit_line(down.headers["X-Request-ID"])
        assert record["status"] == 503 and record["outcome"] != "allow"
        # A JWT principal needs its directory groups too: fail closed, not fewer groups.
        assert_problem(stack.call("/services/whoami", bearer(stack.keys["ES256"], "bob")), 503)
    finally:
        stack.slapd.start()
    back = stack.call("/services/whoami", basic("bob", "bob-pw"))
    assert back.status == 200, back.body
    assert back.body["groups"] == ["support"]
    jwt_back = stack.call("/services/orders/get", bearer(stack.keys["ES256"], "bob"))
    assert jwt_back.status == 200, jwt_back.body


def test_jwks_outage_keeps_cached_keys(stack: Stack) -> None:
    key = stack.keys["EdDSA"]
    assert stack.call("/services/whoami", bearer(key, "carol")).status == 200
    stack.jwks.stop()
    try:
        time.sleep(JWKS_TTL + 0.2)  # the held keys are past their TTL and a refetch fails
        reply = stack.call("/services/whoami", bearer(key, "carol"))
        assert reply.status == 200, reply.body
        # A kid only the unreachable IdP could vouch for: 503, not 401.
        stray = SigningKey.generate("published-during-outage", "EdDSA")
        assert_problem(stack.call("/services/whoami", bearer(stray, "carol")), 503)
    finally:
        stack.jwks.start()


def test_no_password_reaches_logs_or_audit(stack: Stack) -> None:
    stack.call("/services/whoami", basic("alice", "alice-pw"))
    stack.call("/services/whoami", basic("alice", "wrong-secret-pw"))
    stack.audit_line(stack.call("/services/whoami", basic("bob", "bob-pw")).headers["X-Request-ID"])
    text = stack.log.read_text(errors="replace") + stack.audit.read_text()
    for secret in ("alice-pw", "wrong-secret-pw", "bob-pw", stack.slapd.bind_password):
        assert secret not in text
