"""Identity values mean one thing in both processes (framework/identity.py).

The sidecar builds a principal and signs its headers; the framework verifies them
and parses them back. Whatever the credential holds, the framework must end up with
exactly the sidecar's user, groups and roles, never more (" admin" is not admin).
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from multidict import CIMultiDict

from framework import identity, signing
from framework.errors import Forbidden, Unauthenticated, Unavailable
from framework.tenant_config import ApiKeySettings, JwtSettings
from framework.verify import Identity, identify
from sidecar.apikeys import ApiKeys
from sidecar.authenticate import Authenticator
from sidecar.errors import Unauthenticated as SidecarUnauthenticated
from sidecar.headers import identity_headers, upstream_headers
from sidecar.principal import BadIdentity, Principal
from sidecar.tokens import TokenVerifier

SECRET = b"identity-test-secret-0123456789"

ODD_NAMES = [" admin", "admin ", "\tadmin", "admin\n", "ad,min", "admin,", ",admin", "",
             "ad\x00min", "ad\x7fmin", "r\u00f4le", "x" * (identity.MAX_NAME + 1), 7, None]


def through_the_framework(principal: Principal | None,
                          path: str = "/services/x") -> Identity | None:
    """What the framework reads from the headers the sidecar sends for ``principal``."""
    sent = dict(upstream_headers([], identity_headers(principal, "rid-1"), secret=SECRET,
                                 method="GET", path=path, peer="127.0.0.1", proto="http"))
    return identify(SECRET, "acme", "GET", path, sent, path)


@pytest.mark.parametrize("value", ["alice", "ci-bot", "dee(ops)*", "a b", "x" * 256])
def test_usable_values(value: str) -> None:
    assert identity.problem(value) is None and identity.usable(value)


@pytest.mark.parametrize("value, why", [
    (" alice", "whitespace"), ("alice ", "whitespace"), ("a,b", "comma"),
    ("a\x00", "control"), ("a\nb", "control"), ("\x7f", "control"), ("j\u00f6rg", "ASCII"),
    ("", "empty"), (None, "empty"), (["alice"], "empty"), ("x" * 257, "longer"),
])
def test_unusable_values_say_why(value: object, why: str) -> None:
    assert why in (identity.problem(value) or "")


def test_a_bad_user_id_is_refused_a_bad_name_is_dropped_and_noted() -> None:
    for user in (" alice", "alice\t", "a,b", "a\x00b"):
        with pytest.raises(BadIdentity):
            Principal.build("acme", user, (), (), "jwt")
    p = Principal.build("acme", "alice", ["sales", " sales", "sales"], [" admin", "ops"], "jwt")
    assert (p.groups, p.roles) == (("sales",), ("ops",))
    note = p.audit_note()
    assert note.startswith("dropped unusable identity values:")
    assert "group ' sales'" in note and "role ' admin'" in note
    assert Principal.build("acme", "alice", ["a"], ["b"], "jwt").audit_note() == ""


def test_the_audit_note_is_one_short_line() -> None:
    p = Principal.build("acme", "alice", ["x\n" * 100, " a", " b", " c", " d"], [], "jwt")
    note = p.audit_note()
    assert "\n" not in note and note.endswith("and 2 more") and len(note) < 250


def test_ldap_groups_merge_by_the_same_rule() -> None:
    p = Principal.build("acme", "alice", ["sales"], [], "jwt").with_groups(
        ["Domain Users", " admins", "sales", "ops,x"])
    assert p.groups == ("sales", "Domain Users")
    assert "group ' admins'" in p.audit_note() and "group 'ops,x'" in p.audit_note()


def test_too_many_groups_to_carry_is_refused() -> None:
    many = [f"group-{i:05d}" for i in range(identity.MAX_LIST // 10)]
    with pytest.raises(BadIdentity, match="groups"):
        Principal.build("acme", "alice", many, [], "jwt")
    with pytest.raises(BadIdentity, match="groups"):
        Principal.build("acme", "alice", [], [], "jwt").with_groups(many)


@pytest.mark.parametrize("odd", ODD_NAMES)
def test_the_framework_reads_exactly_what_the_sidecar_kept(odd: object) -> None:
    p = Principal.build("acme", "alice", ["sales", odd], ["viewer", odd], "jwt")
    got = through_the_framework(p)
    assert got is not None
    assert (got.user, got.groups, got.roles) == ("alice", ("sales",), ("viewer",))
    assert not got.is_admin


def test_framework_splits_without_stripping() -> None:
    assert identity.split("") == ()
    assert identity.split("a,b") == ("a", "b")
    assert identity.split(" admin,admin ,,b") == ("b",)


def _signed(**over: str) -> dict[str, str]:
    headers = {signing.REQUEST_ID: "r", signing.TENANT: "acme", signing.USER: "alice",
               signing.GROUPS: "", signing.ROLES: "", signing.AUTH_METHOD: "jwt", **over}
    headers.update(signing.sign(SECRET, "GET", "/services/x", headers))
    return headers


@pytest.mark.parametrize("over, error", [
    ({signing.USER: " alice"}, Unauthenticated), ({signing.USER: "a,b"}, Unauthenticated),
    ({signing.USER: ""}, Unauthenticated), ({signing.AUTH_METHOD: "JWT"}, Unauthenticated),
    ({signing.AUTH_METHOD: " jwt"}, Unauthenticated), ({signing.TENANT: " acme"}, Forbidden),
    ({signing.TENANT: "ACME"}, Forbidden),
])
def test_signed_values_are_read_exactly(over: dict[str, str], error: type) -> None:
    with pytest.raises(error):
        identify(SECRET, "acme", "GET", "/services/x", _signed(**over), "/services/x")


def test_signed_roles_with_outer_spaces_grant_nothing_in_the_framework() -> None:
    got = identify(SECRET, "acme", "GET", "/services/x",
                   _signed(**{signing.ROLES: " admin,ops"}), "/services/x")
    assert got is not None and got.roles == ("ops",) and not got.is_admin


def test_readiness_and_metrics_need_a_signature_but_no_caller() -> None:
    anonymous = through_the_framework(None, "/readyz")
    assert anonymous is None
    assert through_the_framework(None, "/metrics") is None
    with pytest.raises(Unauthenticated):
        identify(SECRET, "acme", "GET", "/readyz", {}, "/readyz")
    with pytest.raises(Forbidden):  # an anonymous signature opens no other route
        through_the_framework(None, "/usage")


def test_a_stale_valid_signature_is_503_a_stale_forged_one_401() -> None:
    import time

    headers = {signing.REQUEST_ID: "r", signing.TENANT: "acme", signing.USER: "alice",
               signing.GROUPS: "", signing.ROLES: "", signing.AUTH_METHOD: "jwt"}
    old = time.time() - 60
    held = {**headers, **signing.sign(SECRET, "GET", "/services/x", headers, now=old)}
    with pytest.raises(Unavailable) as caught:
        identify(SECRET, "acme", "GET", "/services/x", held, "/services/x")
    assert caught.value.headers() == {"Retry-After": "1"}
    forged = {**headers, **signing.sign(b"another-secret-0123456789", "GET", "/services/x",
                                        headers, now=old)}
    with pytest.raises(Unauthenticated):
        identify(SECRET, "acme", "GET", "/services/x", forged, "/services/x")


def _authenticator(*keys: ApiKeySettings) -> Authenticator:
    return Authenticator("acme", TokenVerifier(JwtSettings(algorithms=("HS256",)), secret="s" * 32),
                         ApiKeys(keys))


def test_api_key_roles_and_names_follow_the_same_rule() -> None:
    digest = hashlib.sha256(b"key-1").hexdigest()
    auth = _authenticator(ApiKeySettings("ci-bot", digest, roles=(" admin", "deployer"),
                                         groups=("ops,x", "ops")))
    p = asyncio.run(auth.authenticate(CIMultiDict({"X-API-Key": "key-1"})))
    assert (p.user, p.roles, p.groups) == ("ci-bot", ("deployer",), ("ops",))
    assert "role ' admin'" in p.audit_note() and "group 'ops,x'" in p.audit_note()
    # A key whose name is no usable user id (a quoted TOML table name) is refused.
    padded = _authenticator(ApiKeySettings(" ci-bot", hashlib.sha256(b"key-2").hexdigest()))
    with pytest.raises(SidecarUnauthenticated):
        asyncio.run(padded.authenticate(CIMultiDict({"X-API-Key": "key-2"})))


@pytest.mark.parametrize("headers", [
    [("Authorization", "Bearer a"), ("Authorization", "Bearer b")],
    [("X-API-Key", "key-1"), ("X-API-Key", "key-1")],
    [("x-api-key", "key-1"), ("X-API-Key", "key-1")],
])
def test_two_credentials_of_one_kind_are_refused(headers: list[tuple[str, str]]) -> None:
    auth = _authenticator(ApiKeySettings("ci-bot", hashlib.sha256(b"key-1").hexdigest()))
    with pytest.raises(SidecarUnauthenticated, match="headers"):
        asyncio.run(auth.authenticate(CIMultiDict(headers)))
