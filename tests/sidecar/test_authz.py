"""The pure authz decision and API key lookup."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from framework.authz import decide
from framework.tenant_config import ApiKeySettings, AuthzRule, AuthzSettings
from sidecar.apikeys import ApiKeys


@dataclass
class Who:
    user: str
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


RULES = AuthzSettings(enabled=True, rules=(
    AuthzRule(service="orders", operations=("create",), groups=("sales",)),
    AuthzRule(service="orders", operations=("get",), roles=("viewer",), users=("bob",)),
    AuthzRule(service="hello"),
    AuthzRule(service="*", operations=("*",), roles=("admin",)),
    AuthzRule(service="report", operations=("*",), users=("*",)),
))


@pytest.mark.parametrize("who, service, op, allowed, rule", [
    (Who("alice", groups=("sales",)), "orders", "create", True, 0),
    (Who("alice", groups=("sales",)), "orders", "get", False, None),
    (Who("bob"), "orders", "get", True, 1),
    (Who("carol", roles=("viewer",)), "orders", "get", True, 1),
    (Who("carol"), "orders", "get", False, None),
    (Who("carol"), "orders", None, False, None),  # specific operations need an operation
    (Who("anyone"), "hello", None, True, 2),      # a rule naming nobody grants everyone
    (Who("anyone"), "hello", "op", True, 2),      # default operations = ["*"]
    (Who("root", roles=("admin",)), "secret", "x", True, 3),
    (Who("anyone"), "missing", None, False, None),  # unknown and ungranted look the same
    (Who("anyone"), "report", "daily", True, 4),
])
def test_decision_matrix(who: Who, service: str, op: str | None, allowed: bool,
                         rule: int | None) -> None:
    d = decide(RULES, who, service, op)
    assert (d.allowed, d.rule_index) == (allowed, rule)
    assert d.reason


def test_disabled_allows_everything() -> None:
    d = decide(AuthzSettings(enabled=False), Who("x"), "anything", None)
    assert d.allowed and d.rule_index is None


def test_enabled_without_rules_denies_everything() -> None:
    assert not decide(AuthzSettings(enabled=True), Who("x", roles=("admin",)), "a", None).allowed


def _key(name: str, secret: str) -> ApiKeySettings:
    return ApiKeySettings(name=name, digest=hashlib.sha256(secret.encode()).hexdigest(),
                          roles=("r",))


def test_api_key_lookup_by_hash() -> None:
    keys = ApiKeys([_key("ci-bot", "key-one"), _key("ops", "key-two")])
    assert keys.lookup("key-one").name == "ci-bot"
    assert keys.lookup("key-two").name == "ops"
    assert keys.lookup("key-three") is None
    assert keys.lookup("") is None
    assert keys.lookup("\udcff\ud800") is None  # undecodable header text does not crash
    assert ApiKeys([]).lookup("key-one") is None
