"""The sidecar signature: valid only for the same secret, request, identity and time window."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from framework import signing
from framework.problem import problem, problem_bytes, request_id

SECRET = b"k" * 32
IDENTITY = {
    signing.REQUEST_ID: "req-1", signing.TENANT: "acme", signing.USER: "alice",
    signing.GROUPS: "sales,ops", signing.ROLES: "admin", signing.AUTH_METHOD: "jwt",
}


def signed(now=1000.0, **over):
    headers = dict(IDENTITY, **over)
    headers.update(signing.sign(SECRET, "POST", "/services/a?x=1", headers, now=now))
    return headers


def test_round_trip():
    assert signing.verify(SECRET, "post", "/services/a?x=1", signed(), now=1000.0)


@pytest.mark.parametrize("header", signing.SIGNED_HEADERS)
def test_any_changed_identity_header_breaks_it(header):
    headers = signed()
    headers[header] = headers[header] + "x"
    assert not signing.verify(SECRET, "POST", "/services/a?x=1", headers, now=1000.0)


@pytest.mark.parametrize(
    ("secret", "method", "path", "now"),
    [
        (b"other" * 8, "POST", "/services/a?x=1", 1000.0),
        (SECRET, "GET", "/services/a?x=1", 1000.0),
        (SECRET, "POST", "/services/a?x=2", 1000.0),
        (SECRET, "POST", "/services/a?x=1", 1000.0 + signing.MAX_SKEW + 1),
        (SECRET, "POST", "/services/a?x=1", 1000.0 - signing.MAX_SKEW - 1),
        (b"", "POST", "/services/a?x=1", 1000.0),
    ],
)
def test_wrong_secret_request_or_time_fails(secret, method, path, now):
    assert not signing.verify(secret, method, path, signed(), now=now)


@pytest.mark.parametrize(
    "bad",
    [{signing.TIMESTAMP: "soon"}, {signing.SIGNATURE: "deadbeef"}, {signing.SIGNATURE: "v1="},
     {signing.TIMESTAMP: ""}],
)
def test_malformed_signature_headers_fail(bad):
    headers = signed()
    headers.update(bad)
    assert not signing.verify(SECRET, "POST", "/services/a?x=1", headers, now=1000.0)


def test_unsigned_request_fails():
    assert not signing.verify(SECRET, "POST", "/", dict(IDENTITY))


@given(st.text(min_size=1, max_size=64))
def test_forged_signatures_never_verify(forgery):
    headers = signed()
    headers[signing.SIGNATURE] = "v1=" + forgery
    assert not signing.verify(SECRET, "POST", "/services/a?x=1", headers, now=1000.0)


def test_request_ids():
    assert request_id("abc-1.2_3") == "abc-1.2_3"
    for bad in (None, "", "a" * 129, "bad id", "x\r\ny", "ü"):
        new = request_id(bad)
        assert new != bad and len(new) == 32


def test_problem_document():
    doc = problem(429, "slow down", "r1", retry_after=3)
    assert doc == {"type": "urn:mtp:problem:too-many-requests", "title": "Too Many Requests",
                   "status": 429, "detail": "slow down", "request_id": "r1", "retry_after": 3}
    assert b'"kind-x"' not in problem_bytes(404, "no", "r", kind="no-service")
    assert b"urn:mtp:problem:no-service" in problem_bytes(404, "no", "r", kind="no-service")
