"""The real `mtp sidecar` in front of a signature-checking echo upstream."""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.sidecar.support import API_KEY, JWT_SECRET, Stack, token

PROBLEM = "application/problem+json"


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def echoed(stack: Stack, headers, path: str = "/services/hello", body: bytes | None = None):
    r = stack.call("POST" if body is not None else "GET", path, headers, body)
    assert r.status == 200, r.body
    return r, {k.lower(): v for k, v in r.json()["headers"]}


def assert_problem(r, status: int) -> dict:
    assert r.status == status
    assert r.headers["Content-Type"] == PROBLEM
    doc = json.loads(r.body)
    assert doc["status"] == status and doc["request_id"] == r.headers["X-Request-ID"]
    assert "Traceback" not in r.body.decode()
    return doc


def test_health_routes_need_no_credentials(stack: Stack) -> None:
    for path in ("/healthz", "/readyz"):
        r = stack.call("GET", path, {"X-User-ID": "mallory", "X-Request-ID": "probe-1"})
        assert r.status == 200 and r.json()["status"] == "ok"
        assert r.headers["X-Request-ID"] == "probe-1"


# Built when the test runs: a token made at collection could expire before a long
# suite gets here, and then each case would be refused for the same, wrong reason.
@pytest.mark.parametrize("headers", [
    lambda: {},
    lambda: bearer("garbage"),
    lambda: bearer(token(ttl=-10)),
    lambda: bearer(token(key="wrong-key-" * 5)),
    lambda: {"Authorization": "Bearer " + token().rsplit(".", 1)[0] + "."},
    lambda: {"Authorization": "Digest abc"},
    lambda: {"Authorization": "Bearer \xff\xfe.abc.def"},  # not UTF-8 on the wire
    lambda: {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()},  # LDAP off
    lambda: {"X-API-Key": "not-a-key"},
    lambda: {**bearer(token()), "X-API-Key": API_KEY},
])
def test_bad_credentials_get_one_generic_401(stack: Stack, headers) -> None:
    r = stack.call("GET", "/services/hello", headers())
    doc = assert_problem(r, 401)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert doc["detail"] == "valid credentials are required"


def test_alg_none_token_is_401(stack: Stack) -> None:
    import jwt as pyjwt

    tok = pyjwt.encode({"sub": "alice", "tenant_id": "acme", "exp": int(time.time()) + 60},
                       None, algorithm="none")
    assert_problem(stack.call("GET", "/services/hello", bearer(tok)), 401)


def test_other_tenant_is_403(stack: Stack) -> None:
    assert_problem(stack.call("GET", "/services/hello", bearer(token(tenant="globex"))), 403)


def test_spoofed_headers_and_credentials_never_reach_the_service(stack: Stack) -> None:
    tok = token(groups=["sales"], roles=["viewer"])
    spoof = [("Authorization", f"Bearer {tok}"), ("X-Tenant-ID", "globex"),
             ("X-User-ID", "root"), ("x-user-roles", "admin"), ("X_User_Groups", "admins"),
             ("X-Auth-Method", "ldap"), ("X-Sidecar-Signature", "v1=00"),
             ("X-Sidecar-Timestamp", "1"), ("X-Forwarded-For", "1.2.3.4"),
             ("Forwarded", "for=1.2.3.4"), ("Connection", "X-Secret-Hop"),
             ("X-Secret-Hop", "1"), ("X-Request-ID", "client-rid_1.2"), ("X-Custom", "kept")]
    r, seen = echoed(stack, spoof, "/services/orders/create", b'{"n": 1}')
    assert seen["x-tenant-id"] == "acme" and seen["x-user-id"] == "alice"
    assert seen["x-user-groups"] == "sales" and seen["x-user-roles"] == "viewer"
    assert seen["x-auth-method"] == "jwt" and seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-request-id"] == "client-rid_1.2" == r.headers["X-Request-ID"]
    assert seen["x-custom"] == "kept"
    for gone in ("authorization", "x-api-key", "forwarded", "x-secret-hop", "x_user_groups"):
        assert gone not in seen
    text = json.dumps(r.json())
    assert tok not in text and "root" not in text and "globex" not in text
    assert r.json()["body"] == '{"n": 1}' and r.json()["path"] == "/services/orders/create"


def test_api_key_principal_and_key_not_forwarded(stack: Stack) -> None:
    r, seen = echoed(stack, {"X-API-Key": API_KEY}, "/services/anything")
    assert seen["x-user-id"] == "ci-bot" and seen["x-user-roles"] == "deployer"
    assert seen["x-auth-method"] == "api_key"
    assert API_KEY not in r.body.decode()


def test_authz_denies_what_no_rule_grants(stack: Stack) -> None:
    assert_problem(stack.call("GET", "/services/orders/create", bearer(token())), 403)
    assert_problem(stack.call("GET", "/services/nonexistent", bearer(token())), 403)
    r = stack.call("GET", "/services/orders/create", bearer(token(groups=["sales"])))
    assert r.status == 200


def test_malformed_service_paths_are_404(stack: Stack) -> None:
    for path in ("/services/Bad", "/services/a/b/c", "/services/a/%20x", "/services/..%2Fjobs",
                 "/x/../services/secret", "/jobs/%2E%2E/services/secret", "/./services/a",
                 "/services/hello%0A", "/services/hello/get%0A", "/services/hello%0A?x=1",
                 # The framework merges slashes: these would run /services/orders unchecked.
                 "//services/orders/create", "///services/orders/create",
                 "/%2Fservices/orders/create", "/jobs//x", "http://x//services/orders/create"):
        assert_problem(stack.call("GET", path, bearer(token(roles=["admin"]))), 404)


def test_query_string_and_other_routes_are_forwarded(stack: Stack) -> None:
    r, _ = echoed(stack, bearer(token()), "/services/hello?mode=async&x=%20")
    assert r.json()["path"] == "/services/hello?mode=async&x=%20"
    r, _seen = echoed(stack, bearer(token()), "/jobs/abc")
    assert r.json()["path"] == "/jobs/abc"


def test_request_id_invalid_is_replaced(stack: Stack) -> None:
    r = stack.call("GET", "/services/hello", {**bearer(token()), "X-Request-ID": "bad id!"})
    assert r.status == 200 and r.headers["X-Request-ID"] != "bad id!"
    assert len(r.headers["X-Request-ID"]) == 32


def test_body_too_large_is_413(stack: Stack) -> None:
    assert_problem(stack.call("POST", "/services/hello", bearer(token()), b"x" * 5000), 413)
    # Chunked, without a declared length: caught while reading.
    chunks = b"1000\r\n" + b"x" * 4096 + b"\r\n10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n"
    import socket

    with socket.create_connection(("127.0.0.1", stack.port)) as s:
        s.sendall(b"POST /services/hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + token().encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("head", [
    b"GET /services/hello HTTP/1.1\r\nAuthorization Bearer SECRET-tok\r\n",
    b"GET /services/hello HTTP/1.1\r\nX-API-Key: SECRET-key\x01\r\n",
    b"POST /services/hello HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
    b"X-Api-Key: SECRET-dup\r\n",
    b"POST /services/hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nSECRET-chunk\r\n",
])
def test_requests_the_parser_refuses_are_never_echoed_nor_logged(stack: Stack, head) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as s:
        s.sendall(head + b"Host: x\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert status.split()[1] == b"400" and b"SECRET" not in answer
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"application/problem+json" in headers
    doc = json.loads(body)
    assert doc["status"] == 400 and f"X-Request-ID: {doc['request_id']}".encode() in headers
    assert "SECRET" not in (stack.dir / "sidecar.log").read_text()


def test_a_client_gone_mid_body_is_its_mistake_not_an_internal_error(stack: Stack) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as s:
        s.sendall(b"POST /services/hello HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone-mid-body\r\n"
                  b"Authorization: Bearer " + token().encode()
                  + b"\r\nContent-Length: 100\r\n\r\nonly part")
    deadline = time.monotonic() + 10
    line = None
    while line is None:
        assert time.monotonic() < deadline, "no audit line"
        time.sleep(0.05)  # the audit log is flushed every 0.2 s
        found = [json.loads(x) for x in stack.audit.read_text().splitlines()
                 if '"gone-mid-body"' in x]
        line = found[0] if found else None
    assert (line["status"], line["outcome"]) == (400, "bad_request")
    assert "gone-mid-body" not in (stack.dir / "sidecar.log").read_text()


def test_result_over_cap_is_500(stack: Stack) -> None:
    admin = bearer(token(roles=["admin"]))
    assert stack.call("GET", "/big?n=1000", admin).body == b"x" * 1000
    assert_problem(stack.call("GET", "/big?n=200000", admin), 500)
    assert_problem(stack.call("GET", "/big?n=200000&chunked=1", admin), 500)
    r = stack.call("GET", "/big?n=5000&chunked=1", admin)
    assert r.status == 200 and r.body == b"x" * 5000


def test_upstream_errors_pass_through(stack: Stack) -> None:
    r = stack.call("GET", "/fail", bearer(token()))
    assert r.status == 503


def test_metrics_joins_sidecar_and_framework(stack: Stack) -> None:
    stack.call("GET", "/services/hello", bearer(token()))
    assert_problem(stack.call("GET", "/metrics"), 401)
    assert_problem(stack.call("GET", "/metrics", bearer(token())), 403)
    r = stack.call("GET", "/metrics", bearer(token(roles=["metrics"])))
    text = r.body.decode()
    assert r.status == 200 and "mtp_sidecar_requests_total" in text
    # This tenant dir has no services/hello.py: the name is not a label of its own.
    assert 'service="_unknown"' in text and "mtp_sidecar_authz_decisions_total" in text
    assert "framework_up 1" in text


def test_overlay_rate_limit_applies_live_and_429_is_complete(stack: Stack) -> None:
    stack.overlay.write_text("[limits]\nrate = 0.5\nburst = 0\n")
    try:
        deadline = time.monotonic() + 5
        r = None
        while time.monotonic() < deadline:
            r = stack.call("GET", "/services/hello", bearer(token(sub="limited")))
            if r.status == 429:
                break
            time.sleep(0.05)
        doc = assert_problem(r, 429)
        assert doc["detail"] == "rate limit exceeded"
        assert 1 <= int(r.headers["Retry-After"]) <= 2
        assert r.headers["RateLimit-Limit"] == "1" and r.headers["RateLimit-Remaining"] == "0"
        assert int(r.headers["RateLimit-Reset"]) >= 0
        assert stack.call("GET", "/healthz").status == 200  # never limited
        stack.overlay.write_text("[limits]\nrate = oops\n")  # refused: running config kept
        time.sleep(0.4)
        assert stack.call("GET", "/services/hello", bearer(token())).status == 429
    finally:
        stack.overlay.unlink()
    deadline = time.monotonic() + 5
    while stack.call("GET", "/services/hello", bearer(token())).status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_audit_lines_have_decisions_and_no_secrets(stack: Stack) -> None:
    tok = token(sub="auditee")
    stack.call("GET", "/services/hello", bearer(tok))
    stack.call("GET", "/services/orders/create", bearer(tok))
    stack.call("GET", "/services/hello", {"X-API-Key": API_KEY})
    stack.call("GET", "/services/hello", {"X-API-Key": "wrong-key-material"})
    stack.call("GET", "/services/hello", {"Authorization": API_KEY})  # a key sent without scheme
    basic = base64.b64encode(b"alice:hunter2-password").decode()
    stack.call("GET", "/services/hello", {"Authorization": f"Basic {basic}"})
    time.sleep(0.5)  # the audit log is flushed every 0.2 s
    text = stack.audit.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    mine = [line for line in lines if line["user"] == "auditee"]
    assert [(m["service"], m["operation"], m["outcome"], m["status"]) for m in mine] == [
        ("hello", None, "allowed", 200), ("orders", "create", "denied", 403)]
    assert mine[0]["rule"] == 1 and mine[1]["reason"].startswith("no rule")
    assert {"time", "request_id", "tenant", "method", "reason"} <= set(mine[0])
    assert any(line["reason"] == "unknown API key" for line in lines)
    for secret in (tok, API_KEY, "wrong-key-material", basic, "hunter2", JWT_SECRET):
        assert secret not in text
    assert API_KEY[:8] not in text
    assert any(line["reason"] == "unsupported Authorization scheme (unrecognised)"
               for line in lines)


@pytest.mark.parametrize("method, target, status", [
    ("OPTIONS", "*", 404), ("CONNECT", "example.org:443", 404),
    ("GET", "*", 400),  # refused by the HTTP parser itself, still a problem
])
def test_targets_that_are_not_paths_get_a_problem_with_a_request_id(
        stack: Stack, method: str, target: str, status: int) -> None:
    # aiohttp's router answered these with a plain-text 404 without a request id.
    assert_problem(stack.call(method, target, bearer(token())), status)


def audit_line(stack: Stack, request_id: str) -> dict:
    deadline = time.monotonic() + 5  # the audit log is flushed every 0.2 s
    while True:
        for line in stack.audit.read_text().splitlines():
            if request_id in line:
                return json.loads(line)
        assert time.monotonic() < deadline, "no audit line"
        time.sleep(0.05)


@pytest.mark.parametrize("headers", [
    lambda: [("Authorization", f"Bearer {token()}"), ("Authorization", "Bearer garbage")],
    lambda: [("Authorization", "Bearer garbage"), ("Authorization", f"Bearer {token()}")],
    lambda: [("Authorization", f"Bearer {token()}"), ("authorization", f"Bearer {token()}")],
    lambda: [("X-API-Key", API_KEY), ("X-API-Key", "not-a-key")],
    lambda: [("X-API-Key", API_KEY), ("x-api-key", API_KEY)],
])
def test_two_credential_headers_are_ambiguous_401(stack: Stack, headers) -> None:
    r = stack.call("GET", "/services/hello", [*headers(), ("X-Request-ID", "dup-cred")])
    assert assert_problem(r, 401)["detail"] == "valid credentials are required"
    assert "headers" in audit_line(stack, "dup-cred")["reason"]


def test_roles_and_groups_with_outer_spaces_grant_nothing_and_are_audited(stack: Stack) -> None:
    # " admin" is not admin: the admin rule grants orders/create, the sales group too.
    tok = token(roles=[" admin", "admin ", "viewer"], groups=["sales\t", " sales"])
    r = stack.call("GET", "/services/orders/create", {**bearer(tok), "X-Request-ID": "pad-1"})
    assert_problem(r, 403)
    line = audit_line(stack, "pad-1")
    assert line["outcome"] == "denied" and "dropped unusable identity values" in line["reason"]
    assert "role ' admin'" in line["reason"] and "group ' sales'" in line["reason"]
    r, seen = echoed(stack, {**bearer(tok), "X-Request-ID": "pad-2"})
    assert seen["x-user-roles"] == "viewer" and seen["x-user-groups"] == ""
    assert "dropped" in audit_line(stack, "pad-2")["reason"]


@pytest.mark.parametrize("sub", [" alice", "alice ", "al,ice", "al\u0000ice", "x" * 300])
def test_user_ids_with_outer_spaces_commas_or_controls_are_401(stack: Stack, sub: str) -> None:
    assert_problem(stack.call("GET", "/services/hello", bearer(token(sub=sub))), 401)


def test_roles_given_as_one_string_are_one_name(stack: Stack) -> None:
    # Not split on commas (that would be a second reading): "admin,viewer" is dropped.
    _r, seen = echoed(stack, bearer(token(roles="admin,viewer")))
    assert seen["x-user-roles"] == ""
    _r, seen = echoed(stack, bearer(token(roles="viewer")))
    assert seen["x-user-roles"] == "viewer"


def test_more_groups_than_a_header_can_carry_is_401_not_an_upstream_error(stack: Stack) -> None:
    # 5 KB joined, in a token that still fits one 8190-byte header line.
    many = [f"group-number-{i:08d}" for i in range(250)]
    assert_problem(stack.call("GET", "/services/hello", bearer(token(groups=many))), 401)


@pytest.mark.parametrize("headers", [
    {"Authorization": "Basic"}, {"Authorization": "Basic ="}, {"Authorization": "Bearer"},
    {"Authorization": "Bearer \u00e9\u00e9.\u00e9.\u00e9"}, {"Authorization": " "},
    {"Authorization": "Bearer " + "a" * 7000}, {"X-API-Key": "\u00e9\u00e8\u00ff"},
    {"X-API-Key": ""}, {"X-API-Key": "k" * 7000},
    {"Authorization": "Bearer a.b.c", "X-API-Key": "k"},
])
def test_odd_credentials_are_401_never_5xx(stack: Stack, headers) -> None:
    assert_problem(stack.call("GET", "/services/hello", headers), 401)


def test_the_body_sent_is_the_body_signed(stack: Stack) -> None:
    # The echo upstream verifies the signature over the body it received (else 401).
    for body in (b"", b"{}", b'{"n": "\xc3\xa9"}', b"\x00\xff" * 100):
        r = stack.call("POST", "/services/hello", bearer(token()), body)
        assert r.status == 200, r.body
