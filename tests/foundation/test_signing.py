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


BODY = b'{"amount": 10}'


def signed(now=1000.0, body=BODY, **over):
    headers = dict(IDENTITY, **over)
    headers.update(signing.sign(SECRET, "POST", "/services/a?x=1", headers, now=now, body=body))
    return headers


def test_round_trip():
    assert signing.verify(SECRET, "post", "/services/a?x=1", signed(), now=1000.0, body=BODY)


def test_the_body_digest_is_signed_and_checked():
    headers = signed()
    assert headers[signing.BODY_SHA256] == signing.body_digest(BODY)
    assert headers[signing.SIGNATURE].startswith("v2=")
    # A captured request replayed with another body, or with the digest swapped too.
    other = b'{"amount": 10000}'
    assert not signing.verify(SECRET, "POST", "/services/a?x=1", headers, now=1000.0, body=other)
    swapped = {**headers, signing.BODY_SHA256: signing.body_digest(other)}
    assert signing.check(SECRET, "POST", "/services/a?x=1", swapped,
                         now=1000.0) is signing.Verdict.INVALID
    # No body and an empty body are the same thing on the wire.
    bodiless = signed(body=None)
    assert bodiless[signing.BODY_SHA256] == signing.EMPTY_BODY == signing.body_digest(b"")
    assert signing.verify(SECRET, "POST", "/services/a?x=1", bodiless, now=1000.0, body=b"")


@pytest.mark.parametrize("digest", ["", "0" * 63, "A" * 64, "g" * 64, signing.EMPTY_BODY + "0"])
def test_malformed_digests_are_invalid(digest):
    headers = {**signed(), signing.BODY_SHA256: digest}
    assert signing.check(SECRET, "POST", "/services/a?x=1", headers,
                         now=1000.0) is signing.Verdict.INVALID


def test_stale_is_told_apart_from_forged():
    headers = signed()
    late = 1000.0 + signing.MAX_SKEW + 1
    assert signing.check(SECRET, "POST", "/services/a?x=1", headers,
                         now=late) is signing.Verdict.STALE
    assert signing.check(b"other" * 8, "POST", "/services/a?x=1", headers,
                         now=late) is signing.Verdict.INVALID
    assert signing.check(SECRET, "POST", "/services/a?x=1", headers,
                         now=1000.0) is signing.Verdict.VALID


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
    assert not signing.verify(secret, method, path, signed(), now=now, body=BODY)


@pytest.mark.parametrize(
    "bad",
    [{signing.TIMESTAMP: "soon"}, {signing.SIGNATURE: "deadbeef"}, {signing.SIGNATURE: "v2="},
     {signing.TIMESTAMP: ""}, {signing.SIGNATURE: "\udcff"}, {signing.TIMESTAMP: "\u00b2"}],
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
    headers[signing.SIGNATURE] = "v2=" + forgery
    assert not signing.verify(SECRET, "POST", "/services/a?x=1", headers, now=1000.0)


def test_request_ids():
    assert request_id("abc-1.2_3") == "abc-1.2_3"
    for bad in (None, "", "a" * 129, "bad id", "x\r\ny", "ü", "abc\n", " abc"):
        new = request_id(bad)
        assert new != bad and len(new) == 32


def test_problem_document():
    doc = problem(429, "slow down", "r1", retry_after=3)
    assert doc == {"type": "urn:mtp:problem:too-many-requests", "title": "Too Many Requests",
                   "status": 429, "detail": "slow down", "request_id": "r1", "retry_after": 3}
    assert b'"kind-x"' not in problem_bytes(404, "no", "r", kind="no-service")
    assert b"urn:mtp:problem:no-service" in problem_bytes(404, "no", "r", kind="no-service")
