"""Feature flag rollout: the share of users in a rollout is within 3 points of its percent."""

from __future__ import annotations

import pytest

from framework.flags import FlagSet
from framework.tenant_config import FlagSettings

USERS = [f"user-{i}" for i in range(10_000)]


@pytest.mark.parametrize("percent", [1, 5, 20, 50, 80, 99])
def test_rollout_share_within_three_points_over_10000_users(percent: int) -> None:
    flags = {"new_pricing": FlagSettings(enabled=True, rollout_percent=percent)}
    on = sum(FlagSet(flags, "acme", user).enabled("new_pricing") for user in USERS)
    assert abs(on / len(USERS) * 100 - percent) <= 3


def test_rollout_is_stable_per_user_and_differs_per_tenant_and_flag() -> None:
    flags = {"a": FlagSettings(enabled=True, rollout_percent=50),
             "b": FlagSettings(enabled=True, rollout_percent=50)}
    first = [FlagSet(flags, "acme", u).enabled("a") for u in USERS[:2000]]
    assert first == [FlagSet(flags, "acme", u).enabled("a") for u in USERS[:2000]]
    other_tenant = [FlagSet(flags, "globex", u).enabled("a") for u in USERS[:2000]]
    other_flag = [FlagSet(flags, "acme", u).enabled("b") for u in USERS[:2000]]
    assert first != other_tenant and first != other_flag


def test_growing_the_rollout_keeps_users_that_had_it() -> None:
    def on(percent: float) -> set[str]:
        flags = {"f": FlagSettings(enabled=True, rollout_percent=percent)}
        return {u for u in USERS if FlagSet(flags, "acme", u).enabled("f")}

    assert on(10) <= on(20) <= on(60)


def test_targeting_and_edges() -> None:
    flags = {"f": FlagSettings(enabled=True, rollout_percent=0, users=("vip",),
                               groups=("beta",), roles=("staff",)),
             "off": FlagSettings(enabled=False, rollout_percent=100, users=("vip",))}
    assert FlagSet(flags, "acme", "vip").enabled("f")
    assert FlagSet(flags, "acme", "x", groups=("beta",)).enabled("f")
    assert FlagSet(flags, "acme", "x", roles=("staff",)).enabled("f")
    assert not FlagSet(flags, "acme", "x").enabled("f")
    assert not FlagSet(flags, "acme", "vip").enabled("off")  # disabled wins over targeting
    assert not FlagSet(flags, "acme", "vip").enabled("unknown")
    full = {"all": FlagSettings(enabled=True, rollout_percent=100)}
    assert all(FlagSet(full, "acme", u).enabled("all") for u in USERS[:1000])
