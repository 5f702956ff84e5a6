"""LdapDirectory against a real slapd: logins, groups, injection, outage, recovery, cache TTL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar.ldap_directory import DirectoryUnavailable, LdapClient, LdapDirectory
from tests.helpers import free_port
from tests.servers import AMBIGUOUS_USER, SlapdServer

T = TypeVar("T")


def run(slapd: SlapdServer, scenario: Callable[[LdapDirectory], Awaitable[T]],
        password: str | None = None, **overrides: Any) -> T:
    """Run ``scenario`` with a fresh LdapDirectory on its own event loop, then close it."""
    async def main() -> T:
        directory = LdapDirectory(slapd.settings(**overrides),
                                  slapd.bind_password if password is None else password)
        try:
            return await scenario(directory)
        finally:
            await directory.close()
    return asyncio.run(main())


@pytest.fixture
def slapd(slapd_server: SlapdServer) -> Iterator[SlapdServer]:
    """The module's slapd, guaranteed running again after a test that stopped it."""
    yield slapd_server
    if slapd_server.proc is None:
        slapd_server.start()


@pytest.mark.parametrize("user", ["alice", "bob", "carol", "dee(ops)*,x"])
def test_login_returns_dn_and_groups(slapd: SlapdServer, user: str) -> None:
    answer = run(slapd, lambda d: d.login(user, slapd.password(user)))
    assert answer is not None
    dn, groups = answer
    assert dn.lower() == slapd.user_dn(user).lower().replace("\\,", "\\2c")
    assert groups == slapd.groups(user)


def test_wrong_password_and_unknown_user_are_refused(slapd: SlapdServer) -> None:
    async def scenario(d: LdapDirectory) -> list[Any]:
        return [await d.login("alice", "wrong"), await d.login("alice", "bob-pw"),
                await d.login("nobody", "alice-pw"), await d.login("ALICE ", "x")]
    assert run(slapd, scenario) == [None, None, None, None]


def test_empty_password_is_refused_before_any_bind() -> None:
    # A directory nobody listens on: a bind attempt would raise DirectoryUnavailable.
    nowhere = SlapdServer(Path("/nonexistent"), port=free_port())

    async def scenario(d: LdapDirectory) -> list[Any]:
        return [await d.login("alice", ""), await d.login("", "alice-pw"),
                await d.groups_for("")]
    assert run(nowhere, scenario) == [None, None, None]


@pytest.mark.parametrize("username", [
    "*", "*)(uid=*", "admin)(|(uid=*", "alice)(uid=*", "al*", "*lice", "alice)", "(uid=alice)",
    "alice\\", "\\2a", "alice\x00",
    # Filter operators escape_filter_chars leaves alone: still one equality value, no 503.
    "a=b", "alice~=x", "uid>=a", "a:dn:=b", "a&b", "a|b", "!", "{user_dn}",
])
def test_injection_usernames_never_match(slapd: SlapdServer, username: str) -> None:
    async def scenario(d: LdapDirectory) -> list[Any]:
        return [await d.login(username, "alice-pw"), await d.groups_for(username)]
    assert run(slapd, scenario) == [None, None]


@pytest.mark.parametrize("username", ["ALICE", "Alice", " alice", "alice "])
def test_username_variants_the_directory_would_match_are_refused(slapd: SlapdServer,
                                                                 username: str) -> None:
    # uid matching ignores case and outer spaces; one person must not get several user ids.
    async def scenario(d: LdapDirectory) -> list[Any]:
        return [await d.login(username, "alice-pw"), await d.groups_for(username)]
    assert run(slapd, scenario) == [None, None]


@pytest.mark.parametrize("user_filter, username", [
    ("(&(objectClass=inetOrgPerson)(uid={username}))", "alice"),
    ("(|(uid={username})(mail={username}))", "alice@example.org"),
    ("(|(uid={username})(mail={username}))", "alice"),
])
def test_other_user_filters(slapd: SlapdServer, user_filter: str, username: str) -> None:
    answer = run(slapd, lambda d: d.login(username, "alice-pw"), user_filter=user_filter)
    assert answer is not None and answer[1] == ("admins", "sales")


def test_ambiguous_user_is_refused(slapd: SlapdServer) -> None:
    async def scenario(d: LdapDirectory) -> list[Any]:
        return [await d.login(AMBIGUOUS_USER, "twin-pw"), await d.groups_for(AMBIGUOUS_USER)]
    assert run(slapd, scenario) == [None, None]


def test_ambiguous_beyond_the_size_limit_is_refused(slapd: SlapdServer) -> None:
    # Every person matches: the server stops at the size limit, which is "ambiguous" too.
    answer = run(slapd, lambda d: d.groups_for("any"),
                 user_filter="(|(uid={username})(objectClass=inetOrgPerson))")
    assert answer is None


def test_groups_for_a_token_user(slapd: SlapdServer) -> None:
    async def scenario(d: LdapDirectory) -> list[Any]:
        return [await d.groups_for("alice"), await d.groups_for("bob"),
                await d.groups_for("carol"), await d.groups_for("nobody")]
    assert run(slapd, scenario) == [("admins", "sales"), ("support",), (), None]


def test_group_filter_may_use_the_username(slapd: SlapdServer) -> None:
    groups = run(slapd, lambda d: d.groups_for("bob"),
                 group_filter="(|(member={user_dn})(cn={username}))", group_attr="cn")
    assert groups == ("support",)


def test_no_group_base_means_no_groups(slapd: SlapdServer) -> None:
    answer = run(slapd, lambda d: d.login("alice", "alice-pw"), group_base="")
    assert answer is not None and answer[1] == ()


def test_missing_user_base_finds_nobody(slapd: SlapdServer) -> None:
    answer = run(slapd, lambda d: d.login("alice", "alice-pw"),
                 user_base="ou=nowhere,dc=example,dc=org")
    assert answer is None


def test_malformed_base_dn_fails_closed(slapd: SlapdServer) -> None:
    # A broken config is not "no such user": it is a directory we cannot use (503).
    with pytest.raises(DirectoryUnavailable):
        run(slapd, lambda d: d.groups_for("alice"), user_base="this is not a DN")


def test_server_size_limit_on_groups_fails_closed(tmp_path: Path) -> None:
    # Partial group lists would silently drop permissions: an error, not fewer groups.
    small = SlapdServer(tmp_path, size_limit=2).setup()
    small.start()
    try:
        with pytest.raises(DirectoryUnavailable):
            run(small, lambda d: d.groups_for("alice"), group_filter="(objectClass=groupOfNames)")
        assert run(small, lambda d: d.groups_for("alice")) == ("admins", "sales")
    finally:
        small.stop()


def test_start_tls_refused_by_a_plain_server_fails_closed(slapd: SlapdServer) -> None:
    with pytest.raises(DirectoryUnavailable):
        run(slapd, lambda d: d.login("alice", "alice-pw"), start_tls=True)


def test_user_bind_checks(slapd: SlapdServer) -> None:
    client = LdapClient(slapd.settings(), slapd.bind_password)
    dn = client.find_user("alice")
    assert dn is not None
    assert client.check_password(dn, "alice-pw") is True
    assert client.check_password(dn, "nope") is False
    assert client.check_password(dn, "") is False
    client.close()
    nowhere = SlapdServer(Path("/nonexistent"), port=free_port())
    with pytest.raises(DirectoryUnavailable):
        LdapClient(nowhere.settings(), "x").check_password(dn, "alice-pw")


def test_concurrent_logins_share_the_pool(slapd: SlapdServer) -> None:
    async def scenario(d: LdapDirectory) -> list[Any]:
        calls = [d.login(u, slapd.password(u)) for u in ("alice", "bob", "carol") * 8]
        calls += [d.groups_for(u) for u in ("alice", "bob") * 8]
        return await asyncio.gather(*calls)
    answers = run(slapd, scenario, pool_size=2)
    assert [a[1] for a in answers[:3]] == [("admins", "sales"), ("support",), ()]
    assert answers[-2:] == [("admins", "sales"), ("support",)]
    assert all(a is not None for a in answers)


def test_wrong_service_account_password_is_unavailable(slapd: SlapdServer) -> None:
    with pytest.raises(DirectoryUnavailable):
        run(slapd, lambda d: d.groups_for("alice"), password="wrong")


def test_unreachable_directory_is_unavailable() -> None:
    nowhere = SlapdServer(Path("/nonexistent"), port=free_port())
    with pytest.raises(DirectoryUnavailable):
        run(nowhere, lambda d: d.login("alice", "alice-pw"))
    with pytest.raises(DirectoryUnavailable):
        run(nowhere, lambda d: d.groups_for("alice"))


def test_outage_serves_cache_hits_fails_misses_and_recovers(slapd: SlapdServer) -> None:
    async def scenario(d: LdapDirectory) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        await d.login("alice", "alice-pw")
        await d.groups_for("bob")
        seen["no entry"] = await d.groups_for("ci-bot")
        slapd.stop()
        seen["cached login"] = await d.login("alice", "alice-pw")
        seen["cached groups"] = await d.groups_for("bob")
        seen["cached no entry"] = await d.groups_for("ci-bot")
        seen["groups via login"] = await d.groups_for("alice")
        for name, call in [("uncached login", d.login("carol", "carol-pw")),
                           ("other password", d.login("alice", "guess")),
                           ("uncached groups", d.groups_for("carol"))]:
            try:
                seen[name] = await call
            except DirectoryUnavailable:
                seen[name] = "unavailable"
        slapd.start()
        seen["after restart"] = await d.login("carol", "carol-pw")
        seen["groups after restart"] = await d.groups_for("carol")
        return seen

    seen = run(slapd, scenario, cache_ttl=300)
    assert seen["cached login"][1] == ("admins", "sales")
    assert seen["cached groups"] == ("support",)
    assert seen["no entry"] is None and seen["cached no entry"] is None  # not "unavailable"
    assert seen["groups via login"] == ("admins", "sales")
    assert seen["uncached login"] == "unavailable"
    assert seen["other password"] == "unavailable"
    assert seen["uncached groups"] == "unavailable"
    assert seen["after restart"] is not None and seen["after restart"][1] == ()
    assert seen["groups after restart"] == ()


def test_no_cache_when_ttl_is_zero(slapd: SlapdServer) -> None:
    async def scenario(d: LdapDirectory) -> None:
        assert await d.login("alice", "alice-pw") is not None
        assert await d.groups_for("alice") == ("admins", "sales")
        slapd.stop()
        with pytest.raises(DirectoryUnavailable):
            await d.login("alice", "alice-pw")
        with pytest.raises(DirectoryUnavailable):
            await d.groups_for("alice")
    run(slapd, scenario, cache_ttl=0)


def test_password_change_takes_effect_after_the_ttl(slapd: SlapdServer) -> None:
    ttl = 1.0

    async def scenario(d: LdapDirectory) -> None:
        assert await d.login("carol", "carol-new") is None  # a failure ...
        assert await d.login("carol", "carol-pw") is not None
        slapd.set_password("carol", "carol-new")
        try:
            assert await d.login("carol", "carol-new") is not None  # ... was not cached
            assert await d.login("carol", "carol-pw") is not None  # cached until the TTL
            await asyncio.sleep(ttl + 0.3)
            assert await d.login("carol", "carol-pw") is None
            assert await d.login("carol", "carol-new") is not None
        finally:
            slapd.set_password("carol", "carol-pw")
    run(slapd, scenario, cache_ttl=ttl)


def test_a_dropped_connection_is_replaced(slapd: SlapdServer) -> None:
    """A pooled connection broken by a restart is retried on a fresh one: no error at all."""
    async def scenario(d: LdapDirectory) -> tuple[Any, Any]:
        first = await d.groups_for("alice")
        slapd.stop()
        slapd.start()
        return first, await d.groups_for("bob")
    assert run(slapd, scenario, cache_ttl=0) == (("admins", "sales"), ("support",))


@pytest.fixture(scope="module")
def tls_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlapdServer]:
    server = SlapdServer(tmp_path_factory.mktemp("slapd-tls"), tls=True).setup()
    server.start()
    yield server
    server.stop()


def test_ldaps_with_ca_file(tls_slapd: SlapdServer) -> None:
    answer = run(tls_slapd, lambda d: d.login("alice", "alice-pw"),
                 url=tls_slapd.ldaps_url, ca_file=str(tls_slapd.ca_file))
    assert answer is not None and answer[1] == ("admins", "sales")


def test_start_tls_with_ca_file(tls_slapd: SlapdServer) -> None:
    answer = run(tls_slapd, lambda d: d.login("bob", "bob-pw"),
                 start_tls=True, ca_file=str(tls_slapd.ca_file))
    assert answer is not None and answer[1] == ("support",)


def test_untrusted_certificate_fails_closed(tls_slapd: SlapdServer, tmp_path: Path) -> None:
    from tests.servers import write_test_ca_and_cert

    write_test_ca_and_cert(tmp_path)  # another CA: the server's certificate is not trusted
    with pytest.raises(DirectoryUnavailable):
        run(tls_slapd, lambda d: d.login("alice", "alice-pw"),
            url=tls_slapd.ldaps_url, ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(DirectoryUnavailable):
        run(tls_slapd, lambda d: d.login("alice", "alice-pw"),
            start_tls=True, ca_file=str(tmp_path / "ca.pem"))


@pytest.mark.parametrize("password", ["alice-pw\x00", "\n", "a\x7fb", "a\u0085b", "\u00ad",
                                      "\ue000", "a\u05d0", "\ufffe"])
def test_passwords_ldap_cannot_send_are_refused_not_an_outage(slapd: SlapdServer,
                                                             password: str) -> None:
    # RFC 4013 (SASLprep) prohibits them: ldap3 raises before any bind. That is a wrong
    # password, not a directory that is down (which would be 503 for the client).
    async def scenario(d: LdapDirectory) -> list[Any]:
        return [await d.login("alice", password),
                await d.login("alice", slapd.password("alice"))]
    refused, accepted = run(slapd, scenario)
    assert refused is None and accepted is not None
