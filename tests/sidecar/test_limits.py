"""The framework's (gunicorn's) limits as the sidecar checks them (sidecar/headers.py)."""

from __future__ import annotations

import pytest

from sidecar.errors import HeadersTooLarge, UriTooLong
from sidecar.headers import (
    MAX_FIELD_LINE,
    MAX_FIELDS,
    MAX_REQUEST_LINE,
    OWN_FIELDS,
    check_request,
    check_upstream,
    identity_headers,
    upstream_headers,
)
from sidecar.principal import Principal


def sent(groups: tuple[str, ...]) -> list[tuple[str, str]]:
    who = Principal(tenant="acme", user="alice", groups=groups, roles=(), auth_method="ldap")
    return upstream_headers((), identity_headers(who, "rid"), secret=b"s" * 32, method="GET",
                            path="/services/x", peer="127.0.0.1", proto="http")


def test_long_identity_values_count_like_any_header() -> None:
    # LDAP can give a user more groups than one gunicorn header line holds.
    few = sent(("sales",))
    check_upstream("GET", "/services/x", few)
    many = sent(tuple(f"group-{i:05d}" for i in range(800)))
    with pytest.raises(HeadersTooLarge):
        check_upstream("GET", "/services/x", many)


def test_sizes_are_bytes_on_the_wire_not_characters() -> None:
    name = "X-Utf8"
    fits = "é" * ((MAX_FIELD_LINE - len(name) - 4) // 2)  # two bytes each in UTF-8
    check_upstream("GET", "/", [(name, fits)])
    with pytest.raises(HeadersTooLarge):
        check_upstream("GET", "/", [(name, fits + "é")])
    target = "/" + "é" * ((MAX_REQUEST_LINE - len("GET / HTTP/1.1")) // 2)
    check_upstream("GET", target, [])
    with pytest.raises(UriTooLong):
        check_upstream("GET", target + "é", [])


def test_the_client_check_leaves_room_for_the_sidecars_headers() -> None:
    forwarded = [(f"X-H{i}", "v") for i in range(MAX_FIELDS - OWN_FIELDS)]
    stripped = [("Authorization", "Bearer t"), ("X-User-ID", "spoof"), ("Host", "h")]
    check_request("GET", "/", forwarded + stripped)
    with pytest.raises(HeadersTooLarge, match="header fields"):
        check_request("GET", "/", [*forwarded, ("X-More", "v")])
