"""Feature flags: targeting, stable rollout, unknown and disabled flags."""

from __future__ import annotations

from framework.flags import FlagSet, rollout_bucket
from framework.tenant_config import FlagSettings

FLAGS = {
    "off": FlagSettings(enabled=False, users=("alice",)),
    "targeted": FlagSettings(enabled=True, rollout_percent=0, users=("alice",),
                             groups=("beta",), roles=("staff",)),
    "half": FlagSettings(enabled=True, rollout_percent=50),
    "all": FlagSettings(enabled=True),
}


def flags(user: str, groups=(), roles=(), tenant: str = "acme") -> FlagSet:
    return FlagSet(FLAGS, tenant, user, groups, roles)


def test_unknown_and_disabled_flags_are_off_even_for_targeted_users():
    assert not flags("alice").enabled("nope")
    assert not flags("alice").enabled("off")


def test_targeting_by_user_group_or_role():
    assert flags("alice").enabled("targeted")
    assert flags("bob", groups=["beta"]).enabled("targeted")
    assert flags("bob", roles=["staff"]).enabled("targeted")
    assert not flags("bob", groups=["other"]).enabled("targeted")


def test_rollout_is_stable_per_tenant_and_user_and_near_its_percentage():
    users = [f"user{i}" for i in range(4000)]
    on = [u for u in users if flags(u).enabled("half")]
    assert 0.45 < len(on) / len(users) < 0.55
    assert on == [u for u in users if flags(u).enabled("half")]
    other_tenant = [u for u in users if flags(u, tenant="globex").enabled("half")]
    assert other_tenant != on
    assert all(flags(u).enabled("all") for u in users[:50])
    assert rollout_bucket("acme", "half", "x") == rollout_bucket("acme", "half", "x")


def test_as_dict_lists_every_flag():
    assert flags("alice").as_dict() == {"off": False, "targeted": True,
                                        "half": flags("alice").enabled("half"), "all": True}
