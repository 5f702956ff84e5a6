"""Header stripping and injection over arbitrary header sets (hypothesis)."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework import signing
from sidecar.headers import (
    IDENTITY,
    STRIPPED,
    STRIPPED_PREFIXES,
    identity_headers,
    normal,
    response_headers,
    upstream_headers,
)
from sidecar.principal import Principal

SECRET = b"0123456789abcdef0123456789abcdef"
ALICE = Principal.build("acme", "alice", ("sales",), ("admin",), "jwt")

# Names that try every spoofing trick: our prefixes and names in any case, with
# '_' for '-', plus ordinary headers that must survive.
SPOOF_BASES = ["X-Tenant-ID", "X-User-ID", "X-User-Groups", "X-User-Roles", "X-Auth-Method",
               "X-Sidecar-Signature", "X-Sidecar-Timestamp", "X-Forwarded-For",
               "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded", "X-Real-IP",
               "X-Request-ID", "Authorization", "X-API-Key", "Connection", "Keep-Alive", "TE",
               "Trailer", "Transfer-Encoding", "Upgrade", "Proxy-Authorization", "Host",
               "X-Tenant-Anything", "X-User-Whatever", "X-Auth-Token", "Content-Length"]
KEEP_BASES = ["Accept", "Content-Type", "User-Agent", "Prefer", "X-Custom", "X-Tenantless"]


@st.composite
def header_name(draw) -> str:
    base = draw(st.sampled_from(SPOOF_BASES + KEEP_BASES + ["X-Hop-A", "X-Hop-B"]))
    chars = [c.upper() if draw(st.booleans()) else c.lower() for c in base]
    name = "".join(chars)
    return name.replace("-", "_") if draw(st.booleans()) else name


values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(header_name(), values), max_size=25))
def test_nothing_spoofable_survives_and_identity_is_exactly_ours(headers) -> None:
    # Sometimes the client names extra hop-by-hop headers in Connection.
    headers = [*headers, ("Connection", "X-Hop-A, x_hop_b")]
    ident = identity_headers(ALICE, "rid-1")
    out = upstream_headers(headers, ident, secret=SECRET, method="POST",
                           path="/services/orders/create?x=1", peer="10.0.0.7", proto="https")
    ours = [(n, v) for n, v in out if n.lower() in IDENTITY]
    theirs = [(n, v) for n, v in out if n.lower() not in IDENTITY]
    for name, _ in theirs:
        n = normal(name)
        assert n not in STRIPPED and not n.startswith(STRIPPED_PREFIXES), name
        assert n not in ("x-hop-a", "x-hop-b")
        assert n.replace("-", "") not in {h.replace("-", "") for h in IDENTITY}
    got = dict(ours)
    assert len(ours) == len(got)  # each identity header exactly once
    assert {k: got[k] for k in ident} == ident
    assert got["X-Forwarded-For"] == "10.0.0.7" and got["X-Forwarded-Proto"] == "https"
    assert signing.verify(SECRET, "POST", "/services/orders/create?x=1", got)
    # Ordinary headers are kept, in order.
    kept = [(n, v) for n, v in headers if normal(n) in {k.lower() for k in KEEP_BASES}]
    assert [(n, v) for n, v in theirs] == kept


def test_identity_values() -> None:
    got = identity_headers(ALICE, "r")
    assert got == {"X-Request-ID": "r", "X-Tenant-ID": "acme", "X-User-ID": "alice",
                   "X-User-Groups": "sales", "X-User-Roles": "admin", "X-Auth-Method": "jwt"}
    anon = identity_headers(None, "r")
    assert anon["X-User-ID"] == "" and anon["X-Request-ID"] == "r"


def test_signature_binds_method_path_and_identity() -> None:
    ident = identity_headers(ALICE, "r")
    out = dict(upstream_headers([], ident, secret=SECRET, method="GET", path="/a", peer="p",
                                proto="http", now=time.time()))
    assert signing.verify(SECRET, "GET", "/a", out)
    assert not signing.verify(SECRET, "GET", "/b", out)
    assert not signing.verify(SECRET, "POST", "/a", out)
    assert not signing.verify(SECRET, "GET", "/a", {**out, "X-User-ID": "mallory"})


def test_signature_covers_the_body_sent() -> None:
    ident = identity_headers(ALICE, "r")
    out = dict(upstream_headers([("X-Sidecar-Body-SHA256", "0" * 64)], ident, secret=SECRET,
                                method="POST", path="/a", peer="p", proto="http",
                                body=b'{"n": 1}'))
    assert signing.verify(SECRET, "POST", "/a", out, body=b'{"n": 1}')
    assert not signing.verify(SECRET, "POST", "/a", out, body=b'{"n": 2}')
    assert not signing.verify(SECRET, "POST", "/a", out)  # nor without one


def test_response_headers_drop_hop_by_hop() -> None:
    out = response_headers([("Content-Type", "application/json"), ("Connection", "X-Secret"),
                            ("X-Secret", "1"), ("Keep-Alive", "timeout=5"), ("Date", "x"),
                            ("Server", "gunicorn"), ("Content-Length", "3"), ("Set-Cookie", "a"),
                            ("Set-Cookie", "b")])
    assert out == [("Content-Type", "application/json"), ("Set-Cookie", "a"),
                   ("Set-Cookie", "b")]
