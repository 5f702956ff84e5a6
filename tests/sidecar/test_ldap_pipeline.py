"""LDAP through the real sidecar: Basic logins, groups merged into tokens, directory down."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator

import pytest

from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.servers import SlapdServer
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, Stack, start_upstream, token


@pytest.fixture(scope="module")
def ldap_stack(tmp_path_factory, slapd_server: SlapdServer) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("sidecar-ldap")
    (d / "tenant.toml").write_text(
        '[tenant]\nid = "acme"\n\n[auth.jwt]\nalgorithms = ["HS256"]\n\n'
        + slapd_server.toml(cache_ttl=0) + "\n")
    sock = d / "up.sock"
    upstream = start_upstream(sock, d / "upstream.log")
    port = free_port()
    env = base_env(MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
                   MTP_LDAP_PASSWORD=slapd_server.bind_password, MTP_TENANT_DIR=str(d),
                   MTP_UPSTREAM=f"unix:{sock}", MTP_LISTEN=f"127.0.0.1:{port}",
                   MTP_AUDIT_FILE=str(d / "audit.log"))
    sidecar = spawn([sys.executable, "-m", "framework", "sidecar"], env, log=d / "sidecar.log")
    try:
        wait_for_port(port, sidecar)
        yield Stack(port, d, d / "overlay.toml", d / "audit.log", sock)
    finally:
        stop(sidecar)
        stop(upstream)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def seen(reply) -> dict[str, str]:
    return {k.lower(): v for k, v in reply.json()["headers"]}


def test_basic_login_gives_directory_groups(ldap_stack: Stack, slapd_server) -> None:
    r = ldap_stack.call("GET", "/services/hello", basic("alice", slapd_server.password("alice")))
    assert r.status == 200, r.body
    h = seen(r)
    assert h["x-user-id"] == "alice" and h["x-auth-method"] == "ldap"
    assert set(h["x-user-groups"].split(",")) == set(slapd_server.groups("alice"))
    assert "authorization" not in h


@pytest.mark.parametrize("user, password", [("alice", "wrong"), ("nobody", "x"),
                                            ("alice", ""), ("twin", "twin-pw")])
def test_bad_logins_are_401_offering_basic(ldap_stack: Stack, user: str, password: str) -> None:
    r = ldap_stack.call("GET", "/services/hello", basic(user, password))
    assert r.status == 401
    assert "Basic" in r.headers["WWW-Authenticate"] and "Bearer" in r.headers["WWW-Authenticate"]


def test_malformed_basic_is_401(ldap_stack: Stack) -> None:
    for credential in ("%%%", "\xff\xfe",  # the second is not UTF-8 on the wire
                       base64.b64encode(b"\xff\xfe:\xc3(").decode(),  # decodes to no UTF-8
                       base64.b64encode(b"alice").decode(), "YWxpY2U6cHc", "=" * 7000,
                       base64.b64encode(b"a" * 300 + b":pw").decode()):
        r = ldap_stack.call("GET", "/services/hello", {"Authorization": f"Basic {credential}"})
        assert r.status == 401


@pytest.mark.parametrize("user", ["j\u00f6rg", "tab\tuser"])
def test_basic_user_ids_headers_cannot_carry_are_401_before_any_bind(
        ldap_stack: Stack, user: str) -> None:
    r = ldap_stack.call("GET", "/services/hello", basic(user, "pw"))
    assert r.status == 401
    rid = r.headers["X-Request-ID"]
    deadline = time.monotonic() + 5  # the audit log is flushed every 0.2 s
    while rid not in ldap_stack.audit.read_text():
        assert time.monotonic() < deadline, "no audit line"
        time.sleep(0.05)
    line = next(json.loads(x) for x in ldap_stack.audit.read_text().splitlines() if rid in x)
    assert line["status"] == 401 and line["reason"].startswith("identity: user id:")


def test_jwt_principal_gets_directory_groups_merged(ldap_stack: Stack, slapd_server) -> None:
    r = ldap_stack.call("GET", "/services/hello",
                        {"Authorization": f"Bearer {token(sub='bob', groups=['from-token'])}"})
    assert r.status == 200
    assert seen(r)["x-user-groups"].split(",") == ["from-token",
                                                   *slapd_server.groups("bob")]


@pytest.mark.parametrize("user, password", [
    ("alice", "alice-pw\x00"), ("alice", "\x00"), ("alice", "a\nb"), ("alice", "\x7f"),
    ("alice", "a\u0085b"), ("alice", "\u200b\u00ad"), ("alice", "\ue000"),
    ("alice", "a\u05d0"), ("alice\x00", "alice-pw"), ("al\nice", "alice-pw"),
])
def test_control_characters_in_basic_credentials_are_401_never_503(
        ldap_stack: Stack, user: str, password: str) -> None:
    # ldap3 refuses to send such a password (RFC 4013): that was taken for a directory
    # outage, so anyone who knew a username could make the directory look down.
    r = ldap_stack.call("GET", "/services/hello", basic(user, password))
    assert r.status == 401, r.body
    assert r.headers["Content-Type"] == "application/problem+json"
    good = ldap_stack.call("GET", "/services/hello", basic("alice", "alice-pw"))
    assert good.status == 200  # and the directory is fine


def test_directory_groups_with_outer_spaces_or_commas_grant_nothing(
        ldap_stack: Stack, slapd_server: SlapdServer) -> None:
    import ldap3
    from ldap3.utils.dn import escape_rdn

    names = [" admin", "helpdesk ", "ops,x"]  # the directory matches " admin" as admin
    conn = ldap3.Connection(ldap3.Server(slapd_server.url), slapd_server.admin_dn,
                            slapd_server.admin_password, auto_bind=True)
    dns = [f"cn={escape_rdn(n)},{slapd_server.group_base}" for n in names]
    try:
        for dn, name in zip(dns, names, strict=True):
            assert conn.add(dn, ["groupOfNames"], {"cn": name,
                                                   "member": slapd_server.user_dn("bob")}), \
                conn.result
        r = ldap_stack.call("GET", "/services/hello",
                            {**basic("bob", slapd_server.password("bob")),
                             "X-Request-ID": "ldap-padded"})
        assert r.status == 200, r.body
        assert seen(r)["x-user-groups"].split(",") == list(slapd_server.groups("bob"))
        deadline = time.monotonic() + 5
        while "ldap-padded" not in ldap_stack.audit.read_text():
            assert time.monotonic() < deadline, "no audit line"
            time.sleep(0.05)
        line = next(json.loads(x) for x in ldap_stack.audit.read_text().splitlines()
                    if "ldap-padded" in x)
        assert "dropped unusable identity values" in line["reason"]
        assert "group ' admin'" in line["reason"]
    finally:
        for dn in dns:
            conn.delete(dn)
        conn.unbind()


def test_directory_down_fails_closed_with_503(ldap_stack: Stack, slapd_server) -> None:
    slapd_server.stop()
    try:
        r = ldap_stack.call("GET", "/services/hello", basic("carol", "carol-pw"))
        assert r.status == 503 and r.headers["Content-Type"] == "application/problem+json"
        r = ldap_stack.call("GET", "/services/hello",
                            {"Authorization": f"Bearer {token(sub='carol')}"})
        assert r.status == 503
    finally:
        slapd_server.start()
