"""Issue 14, HTTP: bytes on the wire through the real `mtp run` (sidecar + gunicorn).

Every answer here is checked to be the sidecar's problem+json (or the service's JSON),
never gunicorn's HTML error page.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import front, headers
from tests.framework.client import signed_headers
from tests.helpers import free_port, stop
from tests.sidecar.run_stack import RunStack, run_env, start_run, tenant_toml, write_tenant
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, token

pytestmark = pytest.mark.slow

MARK = '''"""Leaves one file per run, named by the request id."""
import pathlib


def handle(context):
    pathlib.Path(context.config["dir"], context.request_id).write_text(context.user)
    return {"marked": context.request_id}
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[RunStack]:
    root: Path = tmp_path_factory.mktemp("http-hardening")
    marks = root / "marks"
    marks.mkdir()
    toml = tenant_toml() + (f'\n[[authz.rules]]\nservice = "mark"\n\n'
                            f'[services.mark]\nconfig = {{ dir = "{marks}" }}\n')
    tdir = write_tenant(root, toml)
    (tdir / "services" / "mark.py").write_text(MARK)
    stack = start_run(root, tdir, run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                                          MTP_JWT_SECRET=JWT_SECRET))
    try:
        yield stack
    finally:
        stop(stack.proc)


def raw(run: RunStack, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` in one write; everything the sidecar sends until it closes."""
    with socket.create_connection(("127.0.0.1", run.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The answers in ``data`` (each with a Content-Length, as the sidecar writes them)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        size = int(fields.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), fields, rest[:size]))
        data = rest[size:]
    return out


def request(method: str, target: str, *lines: str, body: bytes = b"",
            version: str = "HTTP/1.1", close: bool = True) -> bytes:
    head = [f"{method} {target} {version}", "Host: acme.example",
            f"Authorization: Bearer {token()}", *lines]
    if body:
        head.append(f"Content-Length: {len(body)}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def problem(answer: tuple[int, dict[str, str], bytes], status: int) -> dict:
    got, fields, body = answer
    assert got == status, (got, body[:200])
    assert fields["content-type"] == "application/problem+json"
    doc = json.loads(body)
    assert doc["status"] == status and doc["request_id"] == fields["x-request-id"]
    return doc


def one(run: RunStack, data: bytes) -> tuple[int, dict[str, str], bytes]:
    [answer] = answers(raw(run, data))
    return answer


# -- 1. the framework's (gunicorn's) limits, answered by the sidecar --------------------

def test_a_header_line_over_gunicorns_field_size_is_a_431_problem(run: RunStack) -> None:
    # gunicorn's limit_request_field_size (8190) counts "Name: value\r\n"; llhttp's limit
    # counts name + value only, so 8187..8190 of those passed the sidecar and came back
    # as gunicorn's HTML 431.
    fits = "v" * (headers.MAX_FIELD_LINE - len("X-Big: \r\n"))
    ok = one(run, request("POST", "/services/whoami", f"X-Big: {fits}", body=b"{}"))
    assert ok[0] == 200 and json.loads(ok[2])["user"] == "alice"
    for extra in (1, 4):  # one byte over gunicorn's; at llhttp's limit
        problem(one(run, request("POST", "/services/whoami", f"X-Big: {fits}{'v' * extra}",
                                 body=b"{}")), 431)
    # Over llhttp's limit too: the sidecar's parser answers, still problem+json.
    problem(one(run, request("POST", "/services/whoami", f"X-Big: {'v' * 9000}")), 431)


def test_header_count_counts_the_sidecars_own_headers(run: RunStack) -> None:
    # The sidecar adds identity, signature, forwarding headers, Host and Content-Length:
    # MAX_CLIENT_HEADERS forwarded ones make exactly gunicorn's 100 fields.
    assert headers.MAX_CLIENT_HEADERS + headers.OWN_FIELDS == headers.MAX_FIELDS == 100
    many = [f"X-H{i}: v" for i in range(headers.MAX_CLIENT_HEADERS - 1)]
    ok = one(run, request("POST", "/services/whoami", "Content-Type: application/json",
                          *many, body=b"{}"))
    assert ok[0] == 200, ok
    problem(one(run, request("POST", "/services/whoami", "Content-Type: application/json",
                             *many, "X-One-More: v", body=b"{}")), 431)
    # Stripped headers (credentials, spoofed identity) do not count: they are not sent.
    stripped = [f"X-User-Spoof{i}: v" for i in range(20)]
    assert one(run, request("POST", "/services/whoami", "Content-Type: application/json",
                            *many, *stripped, body=b"{}"))[0] == 200
    # More than the sidecar's parser takes at all: its own 431.
    lots = [f"X-H{i}: v" for i in range(front.MAX_HEADERS + 1)]
    problem(one(run, request("GET", "/services/whoami", *lots)), 431)


def test_request_line_over_gunicorns_limit_is_a_414_problem(run: RunStack) -> None:
    def target(line: int) -> str:
        base = "/services/whoami?pad="
        return base + "p" * (line - len(f"GET {base} HTTP/1.1"))
    assert one(run, request("GET", target(headers.MAX_REQUEST_LINE)))[0] == 200
    problem(one(run, request("GET", target(headers.MAX_REQUEST_LINE + 1))), 414)
    problem(one(run, request("GET", target(front.MAX_LINE + 100))), 414)  # the parser's


def test_unknown_methods_are_501_problems(run: RunStack) -> None:
    for method in ("BREW", "PROPFIND", "QUERY", "get"):
        doc = problem(one(run, request(method, "/services/whoami")), 501)
        assert "whoami" not in json.dumps(doc)


# -- 2. HEAD never runs a service -------------------------------------------------------

def marks(run: RunStack) -> set[str]:
    return {p.name for p in (run.root / "marks").iterdir()}


def test_head_on_a_service_is_405_and_creates_no_job(run: RunStack) -> None:
    before = marks(run)
    for path in ("/services/mark", "/services/mark?mode=async", "/services/whoami/x"):
        status, fields, body = one(run, request("HEAD", path, "Prefer: respond-async",
                                                "X-Request-ID: head-1"))
        assert status == 405 and fields["allow"] == "GET, POST" and body == b""
        assert fields["content-type"] == "application/problem+json"
    for method in ("PUT", "DELETE", "OPTIONS"):
        refused = problem(one(run, request(method, "/services/mark")), 405)
        assert refused["status"] == 405
    # The control: the same call with GET runs the service, asynchronously.
    status, fields, body = one(run, request("GET", "/services/mark", "Prefer: respond-async",
                                            "X-Request-ID: get-1"))
    assert status == 202, body
    deadline = time.monotonic() + 10
    while "get-1" not in marks(run):
        assert time.monotonic() < deadline, "the async job never ran"
        time.sleep(0.05)
    assert marks(run) - before == {"get-1"}  # nothing from any HEAD
    # HEAD on the health routes still works.
    for path in ("/healthz", "/readyz"):
        status, fields, body = one(run, request("HEAD", path))
        assert status == 200 and body == b"" and int(fields["content-length"]) > 0


def _to_framework(run: RunStack, method: str, path: str, extra: dict[str, str]) -> bytes:
    sent = {**signed_headers(method, path, SIDECAR_SECRET, tenant="acme", user="alice",
                             request_id="direct-head"), **extra}
    lines = [f"{method} {path} HTTP/1.1", "Host: framework", "Connection: close",
             *(f"{k}: {v}" for k, v in sent.items()), "", ""]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(run.socket))
        s.sendall("\r\n".join(lines).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_a_signed_head_reaching_the_framework_is_405_too(run: RunStack) -> None:
    data = _to_framework(run, "HEAD", "/services/mark", {"Prefer": "respond-async"})
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 405"), head
    assert "\r\nAllow: GET, POST" in head and "application/problem+json" in head
    time.sleep(0.5)  # an async job, had one been queued, runs at once
    assert "direct-head" not in marks(run)
    # The control: the same signed request as GET is served (200 from the list route).
    assert _to_framework(run, "GET", "/services", {}).startswith(b"HTTP/1.1 200")


# -- 3. framing: data after close, HTTP/1.0, absolute form ------------------------------

def test_data_after_connection_close_in_the_same_packet_is_ignored(run: RunStack) -> None:
    first = request("POST", "/services/whoami", "X-Request-ID: first", body=b"{}")
    for after in (request("POST", "/services/whoami", "X-Request-ID: second", body=b"{}"),
                  b"\x00garbage"):
        [(status, fields, body)] = answers(raw(run, first + after))
        assert status == 200 and json.loads(body)["request_id"] == "first"
        assert fields["connection"] == "close"


def test_two_http10_requests_in_one_packet_answer_the_first(run: RunStack) -> None:
    two = b"".join(request("POST", "/services/whoami", f"X-Request-ID: ten-{i}", body=b"{}",
                           version="HTTP/1.0", close=False) for i in (1, 2))
    [(status, fields, body)] = answers(raw(run, two))
    assert status == 200 and json.loads(body)["request_id"] == "ten-1"
    assert fields["connection"] == "close"


def test_http10_with_transfer_encoding_closes_after_the_answer(run: RunStack) -> None:
    head = request("POST", "/services/whoami", "Connection: keep-alive",
                   "Transfer-Encoding: chunked", "X-Request-ID: te-10", version="HTTP/1.0",
                   close=False)
    data = raw(run, head + b"2\r\n{}\r\n0\r\n\r\n"
               + request("GET", "/healthz", version="HTTP/1.0", close=False))
    [(status, fields, body)] = answers(data)
    assert status == 200 and json.loads(body)["request_id"] == "te-10"
    assert fields["connection"] == "close"


def test_absolute_form_target_is_routed_on_its_path(run: RunStack) -> None:
    status, _, body = one(run, request("POST", "http://acme.example/services/whoami?x=1",
                                       body=b"{}"))
    assert status == 200, body
    assert json.loads(body)["user"] == "alice"
    # The path checks apply to the path of an absolute-form target as to any other.
    problem(one(run, request("POST", "http://acme.example//services/whoami", body=b"{}")),
            404)


# -- 4. RateLimit fields of the current draft beside the older three ---------------------

def test_answers_carry_the_drafts_ratelimit_fields(run: RunStack) -> None:
    status, fields, _ = one(run, request("POST", "/services/whoami", body=b"{}"))
    assert status == 200
    # tenant_toml(): rate 10000, burst 10000 -> 10000 per 1 s window (not burst + 1).
    assert fields["ratelimit-limit"] == "10000"
    assert fields["ratelimit-policy"] == '"tenant";q=10000;w=1'
    assert re.fullmatch(r'"tenant";r=(\d+);t=(\d+)', fields["ratelimit"])
    remaining = fields["ratelimit"].split(";")[1]
    assert remaining == f"r={fields['ratelimit-remaining']}"
