"""`mtp pool` end to end: identification, isolation, idle reaping (issue 16)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator

import pytest

from framework import signing
from tests.pool.support import DOMAIN, POOL_SECRET, Pool, Tenant, start_pool, stop_pool

pytestmark = pytest.mark.slow

ACME, GLOBEX, INITECH = Tenant("acme"), Tenant("globex"), Tenant("initech")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("pool")
    (tmp / "overlays").mkdir()
    running = start_pool(tmp, "alpha", [ACME, GLOBEX, INITECH], MTP_POOL_IDLE="3",
                         MTP_POOL_MAX_PROCS="3", MTP_CONFIG_OVERLAY=str(tmp / "overlays"))
    try:
        yield running
    finally:
        stop_pool(running)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def problem_type(reply) -> str:
    assert reply.headers["Content-Type"] == "application/problem+json"
    doc = reply.json()
    assert doc["request_id"]
    return doc["type"]


def gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


IDENTIFIED = {
    "jwt claim": ("/services/whoami", lambda: bearer(ACME.token()), "jwt"),
    "api key": ("/services/whoami", lambda: {"X-API-Key": ACME.api_key}, "api_key"),
    "host": ("/services/whoami", lambda: {"Host": f"acme.{DOMAIN}", "X-API-Key": ACME.api_key},
             "api_key"),
    "host with port": ("/services/whoami",
                       lambda: {"Host": f"acme.{DOMAIN}:8080", **bearer(ACME.token())}, "jwt"),
    "path prefix": ("/tenants/acme/services/whoami", lambda: bearer(ACME.token()), "jwt"),
    "header": ("/services/whoami", lambda: {"X-Tenant-ID": "acme", **bearer(ACME.token())},
               "jwt"),
    "all of them": ("/tenants/acme/services/whoami",
                    lambda: {"Host": f"acme.{DOMAIN}", "X-Tenant-ID": "acme",
                             **bearer(ACME.token())}, "jwt"),
}


@pytest.mark.parametrize("name", sorted(IDENTIFIED))
def test_every_identification_method_reaches_the_tenant(pool: Pool, name: str) -> None:
    path, headers, method = IDENTIFIED[name]
    r = pool.call("POST", path, headers(), b"{}")
    assert r.status == 200, r.body
    assert r.json()["tenant"] == "acme"
    assert r.json()["method"] == method


def test_a_named_tenant_without_credentials_is_401(pool: Pool) -> None:
    r = pool.call("POST", "/tenants/globex/services/whoami", {}, b"{}")
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # An API key the named tenant does not have (and the pool has not indexed): 401.
    r = pool.call("POST", "/services/whoami", {"X-Tenant-ID": "globex",
                                                 "X-API-Key": "not-a-known-key"}, b"{}")
    assert r.status == 401


def test_the_path_prefix_alone_is_the_tenant_root(pool: Pool) -> None:
    r = pool.call("GET", "/tenants/acme?x=1", bearer(ACME.token()))
    assert r.status == 404  # "/" of the tenant: no such route, answered by acme's framework
    r = pool.call("GET", "/tenants/acme/services", bearer(ACME.token()))
    assert r.status == 200
    assert "whoami" in {s["name"] for s in r.json()["services"]}


DISAGREE = {
    "host vs token": ("/services/whoami",
                      lambda: {"Host": f"globex.{DOMAIN}", **bearer(ACME.token())}),
    "path vs api key": ("/tenants/globex/services/whoami", lambda: {"X-API-Key": ACME.api_key}),
    "header vs host": ("/services/whoami", lambda: {"X-Tenant-ID": "globex",
                                                    "Host": f"acme.{DOMAIN}",
                                                    **bearer(ACME.token())}),
    "path vs header": ("/tenants/acme/services/whoami",
                       lambda: {"X-Tenant-ID": "globex", **bearer(ACME.token())}),
    "two X-Tenant-ID": ("/services/whoami", lambda: [("X-Tenant-ID", "acme"),
                                                     ("X-Tenant-ID", "globex")]),
}


@pytest.mark.parametrize("name", sorted(DISAGREE))
def test_methods_that_disagree_are_403(pool: Pool, name: str) -> None:
    # acme's key is indexed once acme's bundle was read (here by a key-only call).
    assert pool.call("POST", "/services/whoami", {"X-API-Key": ACME.api_key}, b"{}"
                     ).status == 200
    path, headers = DISAGREE[name]
    given = headers()
    if isinstance(given, list):
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=30)
        conn.putrequest("POST", path)
        for k, v in given:
            conn.putheader(k, v)
        conn.putheader("Content-Length", "2")
        conn.endheaders(b"{}")
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
        conn.close()
        assert status == 403
        assert json.loads(body)["type"].endswith("tenant-mismatch")
        return
    r = pool.call("POST", path, given, b"{}")
    assert r.status == 403, r.body
    assert problem_type(r).endswith("tenant-mismatch")


UNKNOWN = {
    "no tenant named": ("/services/whoami", lambda: {}),
    "header": ("/services/whoami", lambda: {"X-Tenant-ID": "nobody"}),
    "host": ("/services/whoami", lambda: {"Host": f"nobody.{DOMAIN}"}),
    "path": ("/tenants/nobody/services/whoami", lambda: {}),
    "token claim": ("/services/whoami", lambda: bearer(ACME.token(tenant="nobody"))),
    "malformed id": ("/services/whoami", lambda: {"X-Tenant-ID": "../acme"}),
    "unknown api key": ("/services/whoami", lambda: {"X-API-Key": "no-such-key"}),
    "encoded path prefix": ("/tenants/acm%65/services/whoami", lambda: bearer(ACME.token())),
    "garbage token": ("/services/whoami", lambda: {"Authorization": "Bearer not.a.jwt"}),
    "another scheme": ("/services/whoami", lambda: {"Authorization": "Basic Zm9vOmJhcg=="}),
}


@pytest.mark.parametrize("name", sorted(UNKNOWN))
def test_an_unknown_tenant_is_403_unknown_tenant(pool: Pool, name: str) -> None:
    path, headers = UNKNOWN[name]
    r = pool.call("POST", path, headers(), b"{}")
    assert r.status == 403, r.body
    assert problem_type(r).endswith("unknown-tenant")


def test_a_credential_is_checked_with_the_named_tenants_own_keys(pool: Pool) -> None:
    # A token claiming globex, signed with acme's secret: globex's own secret refuses it.
    forged = ACME.token(tenant="globex", key=ACME.jwt_secret)
    for headers in (bearer(forged), {"X-Tenant-ID": "globex", **bearer(forged)}):
        r = pool.call("POST", "/services/whoami", headers, b"{}")
        assert r.status == 401, r.body
    # acme's API key presented for globex (by header): globex has no such key.
    r = pool.call("POST", "/services/whoami", {"X-Tenant-ID": "globex",
                                                 "X-API-Key": ACME.api_key}, b"{}")
    assert r.status == 403  # the key names acme, the header globex


def test_pool_health_needs_no_tenant(pool: Pool) -> None:
    r = pool.call("GET", "/healthz")
    assert r.status == 200 and r.json()["pool"] == "alpha"
    r = pool.call("GET", "/readyz", {"Host": f"globex.{DOMAIN}"})
    assert r.status == 200 and r.json()["tenant"] == "globex"  # warms the tenant


def test_a_tenant_process_sees_only_its_own_secrets(pool: Pool) -> None:
    r = pool.call("POST", "/services/spy", bearer(ACME.token()), b"{}", timeout=120)
    assert r.status == 200, r.body
    seen = r.json()
    assert seen["tenant"] == "acme"
    found = set(seen["found"])
    # The scan works: acme's own signing key and webhook secret are in its memory.
    assert ACME.signing_key in found
    assert ACME.webhook_secret in found
    others = [GLOBEX.signing_key, GLOBEX.jwt_secret, GLOBEX.webhook_secret,
              INITECH.signing_key, INITECH.jwt_secret, INITECH.webhook_secret,
              POOL_SECRET, ACME.jwt_secret, GLOBEX.key_digest]
    environ = json.dumps(seen["environ"]) + seen["proc_environ"]
    for secret in others:
        assert secret not in found
        assert secret not in environ
    assert ACME.webhook_secret not in environ and ACME.signing_key not in environ
    assert "tenants/acme" in seen["environ"]["MTP_DATA_DIR"]


def _signed_call(sock: str, key: str, tenant: str) -> int:
    body = b"{}"
    ident = {signing.REQUEST_ID: "forge-1", signing.TENANT: tenant, signing.USER: "mallory",
             signing.GROUPS: "", signing.ROLES: "admin", signing.AUTH_METHOD: "jwt"}
    path = "/services/whoami"
    headers = {**ident, **signing.sign(key.encode(), "POST", path, ident, body=body),
               "Host": "framework", "Content-Type": "application/json",
               "Content-Length": str(len(body)), "Connection": "close"}
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sock)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        return int(s.recv(4096).split(b" ", 2)[1])


def test_a_tenant_cannot_forge_another_tenants_identity(pool: Pool) -> None:
    r = pool.call("POST", "/services/whoami", bearer(GLOBEX.token()), b"{}")
    assert r.status == 200
    sock = str(pool.socket_of("globex"))
    # What acme's code holds (its own derived key) does not sign for globex...
    assert _signed_call(sock, ACME.signing_key, "globex") == 401
    # ...nor does the pool secret itself; globex's own key does.
    assert _signed_call(sock, POOL_SECRET, "globex") == 401
    assert _signed_call(sock, GLOBEX.signing_key, "globex") == 200


def test_jobs_and_usage_stay_with_their_tenant(pool: Pool) -> None:
    r = pool.call("POST", "/services/slow?mode=async", bearer(ACME.token()),
                  json.dumps({"seconds": 0.1}).encode())
    assert r.status == 202, r.body
    job = r.json()["job_id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        mine = pool.call("GET", f"/jobs/{job}", bearer(ACME.token()))
        assert mine.status == 200
        if mine.json()["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert mine.json()["status"] == "succeeded"
    theirs = pool.call("GET", f"/jobs/{job}", bearer(GLOBEX.token()))
    assert theirs.status == 404
    deadline = time.monotonic() + 30
    rows: list = []
    while time.monotonic() < deadline and not any(x["service"] == "slow" for x in rows):
        rows = pool.call("GET", "/usage", bearer(ACME.token())).json()["rows"]
        time.sleep(0.2)
    assert any(x["service"] == "slow" for x in rows)
    other = pool.call("GET", "/usage", bearer(GLOBEX.token()))
    assert other.status == 200
    assert not any(x["service"] == "slow" for x in other.json()["rows"])


def test_an_idle_tenant_process_is_reaped_and_comes_back(pool: Pool) -> None:
    first = pool.call("POST", "/services/whoami", bearer(INITECH.token()), b"{}")
    assert first.status == 200
    master = first.json()["pid"]
    assert gone(master), "MTP_POOL_IDLE=3: the idle process stops"
    again = pool.call("POST", "/services/whoami", bearer(INITECH.token()), b"{}")
    assert again.status == 200
    assert again.json()["pid"] != master


def test_each_tenant_has_its_own_live_overlay(pool: Pool) -> None:
    overlay = pool.bundles.parent / "overlays" / "acme.toml"
    assert pool.call("POST", "/services/whoami", bearer(ACME.token()), b"{}").status == 200
    overlay.write_text('[authz]\nenabled = true\n\n[[authz.rules]]\nservice = "spy"\n'
                       'operations = ["*"]\n')
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = pool.call("POST", "/services/whoami", bearer(ACME.token()), b"{}")
            if r.status == 403:
                break
            time.sleep(0.05)
        assert r.status == 403  # acme's overlay allows only spy now
        assert pool.call("POST", "/services/whoami", bearer(GLOBEX.token()), b"{}"
                         ).status == 200  # globex is not touched
    finally:
        overlay.unlink()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = pool.call("POST", "/services/whoami", bearer(ACME.token()), b"{}")
        if r.status == 200:
            break
        time.sleep(0.05)
    assert r.status == 200


def test_metrics_of_a_tenant_name_that_tenant_only(pool: Pool) -> None:
    assert pool.call("POST", "/services/whoami", bearer(GLOBEX.token()), b"{}").status == 200
    r = pool.call("GET", "/metrics", bearer(ACME.token()))
    assert r.status == 200, r.body
    text = r.body.decode()
    assert 'tenant="acme"' in text and 'tenant="globex"' not in text
    assert "process_resident_memory_bytes" in text
