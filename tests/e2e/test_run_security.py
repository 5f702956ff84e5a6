"""`mtp run` end to end: identity, credentials and signatures (issue 3, points 1-3, 5-7)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from framework import signing
from tests.helpers import stop
from tests.sidecar.run_stack import RunStack, start_default
from tests.sidecar.support import API_KEY, JWT_SECRET, SIDECAR_SECRET, token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[RunStack]:
    stack = start_default(tmp_path_factory.mktemp("run-security"))
    try:
        yield stack
    finally:
        stop(stack.proc)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def _rs_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _hs256_with_raw_key(claims: dict, key: bytes) -> str:
    import base64
    import hashlib
    import hmac

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _claims(**over) -> dict:
    return {"sub": "alice", "tenant_id": "acme", "exp": int(time.time()) + 300, **over}


BAD_TOKENS = {
    "expired": lambda: token(ttl=-30),
    "not yet valid": lambda: jwt.encode(_claims(nbf=int(time.time()) + 600), JWT_SECRET, "HS256"),
    "wrong signature": lambda: token(key="some-other-secret-" * 3),
    "alg none": lambda: jwt.encode(_claims(), None, algorithm="none"),
    "HS/RS confusion": lambda: _hs256_with_raw_key(_claims(), _rs_pem()),
    "disallowed alg": lambda: jwt.encode(_claims(), JWT_SECRET * 2, "HS512"),
    "missing sub": lambda: jwt.encode({k: v for k, v in _claims().items() if k != "sub"},
                                      JWT_SECRET, "HS256"),
    "missing exp": lambda: jwt.encode({k: v for k, v in _claims().items() if k != "exp"},
                                      JWT_SECRET, "HS256"),
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_bad_tokens_are_401_with_one_message(run: RunStack, name: str) -> None:
    r = run.call("POST", "/services/whoami", bearer(BAD_TOKENS[name]()), b"{}")
    assert r.status == 401, name
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.headers["Content-Type"] == "application/problem+json"
    assert json.loads(r.body)["detail"] == "valid credentials are required"


def test_wrong_tenant_is_403(run: RunStack) -> None:
    r = run.call("POST", "/services/whoami", bearer(token(tenant="globex")), b"{}")
    assert r.status == 403 and json.loads(r.body)["request_id"] == r.headers["X-Request-ID"]


def test_spoofed_identity_never_reaches_the_service(run: RunStack) -> None:
    tok = token(groups=["sales"], roles=["viewer"])
    r = run.call("POST", "/services/whoami", [
        ("Authorization", f"Bearer {tok}"), ("X-Tenant-ID", "globex"), ("X-User-ID", "root"),
        ("X-User-Roles", "admin"), ("X-User-Groups", "admins"), ("X_Auth_Method", "ldap"),
        ("X-Sidecar-Signature", "v1=" + "0" * 64), ("X-Sidecar-Timestamp", str(int(time.time()))),
        ("Content-Type", "application/json")], b'{"x": 1}')
    assert r.status == 200, r.body
    ctx = r.json()
    assert (ctx["tenant_id"], ctx["user"], ctx["groups"], ctx["roles"], ctx["auth_method"]) == (
        "acme", "alice", ["sales"], ["viewer"], "jwt")
    assert ctx["payload"] == {"x": 1}
    assert tok not in r.body.decode() and "root" not in ctx["everything"]


def test_the_service_never_sees_the_api_key(run: RunStack) -> None:
    r = run.call("POST", "/services/whoami", {"X-API-Key": API_KEY,
                                              "Content-Type": "application/json"}, b"{}")
    assert r.status == 200, r.body
    assert r.json()["user"] == "ci-bot" and r.json()["auth_method"] == "api_key"
    assert API_KEY not in r.body.decode()


def test_authz_refuses_ungranted_services(run: RunStack) -> None:
    assert run.call("POST", "/services/hidden", bearer(token()), b"{}").status == 403
    r = run.call("POST", "/services/hidden", bearer(token(roles=["admin"])), b"{}")
    assert r.status == 404  # granted by the admin rule, and then it does not exist


def _until(run: RunStack, status: int) -> None:
    deadline = time.monotonic() + 10
    while run.call("POST", "/services/whoami", bearer(token()), b"{}").status != status:
        assert time.monotonic() < deadline, f"overlay not applied (want {status})"
        time.sleep(0.05)


def test_paths_the_framework_would_merge_cannot_skip_authz(run: RunStack) -> None:
    # whoami granted to admins only, live; gunicorn + Werkzeug route //services/x as
    # /services/x, so the sidecar must not take such a path for some other route.
    run.overlay.write_text('[authz]\nenabled = true\n\n[[authz.rules]]\nservice = "*"\n'
                           'roles = ["admin"]\n')
    try:
        _until(run, 403)
        for path in ("//services/whoami", "///services/whoami", "/%2Fservices/whoami",
                     "http://x//services/whoami"):
            r = run.call("POST", path, bearer(token()), b"{}")
            assert r.status == 404 and b"alice" not in r.body, path
    finally:
        run.overlay.unlink()
    _until(run, 200)


def test_requests_over_gunicorns_limits_get_problems_not_its_html(run: RunStack) -> None:
    def problem(r, status: int) -> None:
        assert r.status == status and r.headers["Content-Type"] == "application/problem+json"
        assert json.loads(r.body)["request_id"] == r.headers["X-Request-ID"]

    many = [*bearer(token()).items(), *((f"X-H{i}", "v") for i in range(100))]
    problem(run.call("GET", "/jobs/x", many), 431)
    # gunicorn's request line limit is 4094 bytes: "GET " + target + " HTTP/1.1".
    fits = "/jobs/" + "a" * (4094 - len("GET  HTTP/1.1") - len("/jobs/"))
    problem(run.call("GET", fits, bearer(token())), 404)  # the framework's: no such job
    problem(run.call("GET", fits + "a", bearer(token())), 414)
    r = run.call("GET", "/jobs/x", {**bearer(token()), "X-Big": "v" * 8100})
    problem(r, 404)


def _raw_to_framework(run: RunStack, headers: dict[str, str]) -> bytes:
    lines = ["GET /services/whoami HTTP/1.1", "Host: framework", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(run.socket))
        s.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_framework_refuses_direct_unsigned_and_forged_requests(run: RunStack) -> None:
    ident = {"X-Request-ID": "direct-1", "X-Tenant-ID": "acme", "X-User-ID": "root",
             "X-User-Groups": "", "X-User-Roles": "admin", "X-Auth-Method": "jwt"}
    assert _raw_to_framework(run, ident).startswith(b"HTTP/1.1 401")
    forged = {**ident, **signing.sign(b"not-the-sidecar-secret-123", "GET", "/services/whoami",
                                      ident)}
    assert _raw_to_framework(run, forged).startswith(b"HTTP/1.1 401")
    signed = {**ident, **signing.sign(SIDECAR_SECRET.encode(), "GET", "/services/whoami",
                                      ident)}
    assert _raw_to_framework(run, signed).startswith(b"HTTP/1.1 200")  # the control


def test_health_and_request_ids(run: RunStack) -> None:
    r = run.call("GET", "/healthz", {"X-Request-ID": "abc.DEF_1-2", "X-User-ID": "x"})
    assert r.status == 200 and r.headers["X-Request-ID"] == "abc.DEF_1-2"
    r = run.call("POST", "/services/whoami", {**bearer(token()), "X-Request-ID": "trace-42"},
                 b"{}")
    assert r.json()["request_id"] == "trace-42" == r.headers["X-Request-ID"]


def test_services_list_and_metrics_through_the_sidecar(run: RunStack) -> None:
    r = run.call("GET", "/services", bearer(token()))
    assert r.status == 200
    names = {s["name"] for s in r.json()["services"]}
    assert "whoami" in names
    m = run.call("GET", "/metrics", bearer(token(roles=["admin"])))
    assert m.status == 200 and b"mtp_sidecar_requests_total" in m.body


def test_head_through_the_sidecar_reports_the_get_size(run: RunStack) -> None:
    got = run.call("GET", "/services", bearer(token()))
    head = run.call("HEAD", "/services", bearer(token()))
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(got.body)) != "0"
    assert head.headers["Content-Type"] == got.headers["Content-Type"]


def test_audit_has_every_decision_and_no_credentials(run: RunStack) -> None:
    tok = token(sub="audited")
    run.call("POST", "/services/whoami", bearer(tok), b"{}")
    run.call("POST", "/services/hidden", bearer(tok), b"{}")
    time.sleep(0.5)
    text = run.audit.read_text()
    mine = [json.loads(x) for x in text.splitlines() if '"audited"' in x]
    assert [(m["service"], m["outcome"], m["status"]) for m in mine] == [
        ("whoami", "allowed", 200), ("hidden", "denied", 403)]
    for secret in (tok, API_KEY, JWT_SECRET, SIDECAR_SECRET):
        assert secret not in text


def _framework(run: RunStack, method: str, target: str, headers: dict[str, str],
               body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request straight to the framework's socket: (status, headers, body)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: framework", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    data = _send_raw(run, "\r\n".join(lines).encode() + body)
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    return (int(status_line.split()[1]),
            {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}, rest)


def _send_raw(run: RunStack, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(run.socket))
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def _ident(**over: str) -> dict[str, str]:
    return {"X-Request-ID": "direct-2", "X-Tenant-ID": "acme", "X-User-ID": "alice",
            "X-User-Groups": "", "X-User-Roles": "", "X-Auth-Method": "jwt", **over}


@pytest.mark.parametrize("path", ["/usage", "/config/versions"])
def test_a_role_with_outer_spaces_is_not_admin_anywhere(run: RunStack, path: str) -> None:
    assert run.call("GET", path, bearer(token(roles=["admin"]))).status == 200  # the control
    for roles in ([" admin"], ["admin "], ["\tadmin"], ["admin\n"]):
        r = run.call("GET", path, bearer(token(roles=roles)))
        assert r.status == 403, (roles, r.body)
    # Nor when the framework is handed such a member, signed, directly. (Outer spaces of
    # the whole value are HTTP's to strip: that breaks the signature instead, 401.)
    padded = _ident(**{"X-User-Roles": "ops, admin"})
    padded.update(signing.sign(SIDECAR_SECRET.encode(), "GET", path, padded))
    assert _framework(run, "GET", path, padded)[0] == 403
    outer = _ident(**{"X-User-Roles": " admin"})
    outer.update(signing.sign(SIDECAR_SECRET.encode(), "GET", path, outer))
    assert _framework(run, "GET", path, outer)[0] == 401


def test_the_service_sees_exactly_the_names_the_sidecar_kept(run: RunStack) -> None:
    tok = token(roles=[" admin", "viewer"], groups=["sales ", "ops"])
    r = run.call("POST", "/services/whoami", bearer(tok), b"{}")
    assert r.status == 200, r.body
    assert (r.json()["roles"], r.json()["groups"]) == (["viewer"], ["ops"])


def test_two_authorization_headers_are_401(run: RunStack) -> None:
    r = run.call("POST", "/services/whoami", [("Authorization", f"Bearer {token()}"),
                                              ("Authorization", "Bearer x")], b"{}")
    assert r.status == 401


def test_a_captured_request_cannot_carry_another_body(run: RunStack) -> None:
    body = b'{"amount": 1}'
    ident = _ident()
    ident.update(signing.sign(SIDECAR_SECRET.encode(), "POST", "/services/whoami", ident,
                              body=body))
    status, _, answer = _framework(run, "POST", "/services/whoami", ident, body)
    assert status == 200 and json.loads(answer)["payload"] == {"amount": 1}  # the control
    for other in (b'{"amount": 1000}', b"", b'{"amount": 1} '):
        status, headers, answer = _framework(run, "POST", "/services/whoami", ident, other)
        assert status == 401, other
        assert headers["content-type"] == "application/problem+json"
        assert b"Traceback" not in answer
    # A digest swapped to match the new body breaks the signature itself.
    forged = {**ident, signing.BODY_SHA256: signing.body_digest(b'{"amount": 1000}')}
    assert _framework(run, "POST", "/services/whoami", forged, b'{"amount": 1000}')[0] == 401


def test_only_healthz_answers_unsigned(run: RunStack) -> None:
    assert _framework(run, "GET", "/healthz", {})[0] == 200
    for path in ("/readyz", "/metrics", "/usage", "/nowhere"):
        status, headers, _answer = _framework(run, "GET", path, {})
        assert status == 401 and headers["content-type"] == "application/problem+json", path
    # The sidecar's own checks sign an empty identity: that is enough for these two.
    for path in ("/readyz", "/metrics"):
        anonymous = _ident(**{h: "" for h in ("X-Tenant-ID", "X-User-ID", "X-Auth-Method")})
        anonymous.update(signing.sign(SIDECAR_SECRET.encode(), "GET", path, anonymous))
        assert _framework(run, "GET", path, anonymous)[0] == 200, path
    assert run.call("GET", "/readyz").status == 200  # and through the sidecar


def test_a_request_held_too_long_is_503_a_forged_one_401(run: RunStack) -> None:
    ident = _ident()
    old = time.time() - 60
    held = {**ident, **signing.sign(SIDECAR_SECRET.encode(), "GET", "/services/whoami", ident,
                                    now=old)}
    status, headers, answer = _framework(run, "GET", "/services/whoami", held)
    assert status == 503 and headers["retry-after"] == "1"
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(answer)["request_id"] == "direct-2"
    forged = {**ident, **signing.sign(b"not-the-sidecar-secret-123", "GET", "/services/whoami",
                                      ident, now=old)}
    assert _framework(run, "GET", "/services/whoami", forged)[0] == 401
    forged_fresh = {**ident, **signing.sign(b"not-the-sidecar-secret-123", "GET",
                                            "/services/whoami", ident)}
    assert _framework(run, "GET", "/services/whoami", forged_fresh)[0] == 401
