"""Redis ACL users per tenant: tenant A's connection is refused B's keys by Redis itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import NoPermissionError

from framework.control.acl import AclUser
from tests.control.fleet import ControlPlane


@pytest.fixture
def plane(redis_server, tmp_path: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path, redis_url=redis_server.url).start()
    try:
        yield cp
    finally:
        cp.stop()


def onboard(cp: ControlPlane, tid: str) -> Redis:
    reply = cp.call("POST", "/admin/tenants", {"id": tid, "name": tid, "plan": "free"})
    assert reply.status == 201, reply.body
    creds = reply.json()["redis"]
    assert creds["user"] == f"t-{tid}" and len(creds["password"]) >= 40
    url = AclUser(creds["user"], creds["password"]).url(cp.redis_url)
    return Redis.from_url(url, decode_responses=True)


def test_a_tenant_connection_cannot_touch_another_tenants_keys(plane: ControlPlane) -> None:
    alpha = onboard(plane, "acl-alpha")
    beta = onboard(plane, "acl-beta")
    beta.hset("mtp:acl-beta:job:j1", mapping={"result": "beta's secret"})
    alpha.hset("mtp:acl-alpha:job:j1", mapping={"result": "alpha's own"})
    assert alpha.hgetall("mtp:acl-alpha:job:j1") == {"result": "alpha's own"}
    alpha.set("mtp:rl:acl-alpha", "1.0")
    alpha.set("mtp:rl:acl-alpha\x00alice", "1.0")
    for attempt in (lambda: alpha.hgetall("mtp:acl-beta:job:j1"),
                    lambda: alpha.delete("mtp:acl-beta:job:j1"),
                    lambda: alpha.get("mtp:rl:acl-beta"),
                    lambda: alpha.set("mtp:rl:acl-alpha-x", "1"),  # a prefix is not enough
                    lambda: alpha.set("mtp:rl:acl-alpha-x\x00bob", "1"),
                    lambda: alpha.get("mtp:_fleet:tenants"),  # nor the registry
                    lambda: alpha.publish("mtp:acl-beta:events", "x"),
                    lambda: alpha.flushall()):
        with pytest.raises(NoPermissionError, match=r"NOPERM|permission"):
            attempt()
    assert beta.hgetall("mtp:acl-beta:job:j1") == {"result": "beta's secret"}
    text = plane.audit_file.read_text()
    assert "password" not in text  # the audit names fields, never credentials


def test_offboarding_removes_the_user_and_onboarding_again_rotates(plane: ControlPlane) -> None:
    gone = onboard(plane, "acl-gone")
    gone.set("mtp:acl-gone:x", "1")
    assert plane.call("DELETE", "/admin/tenants/acl-gone").status == 202
    plane.wait_offboarded("acl-gone")
    admin = Redis.from_url(plane.redis_url, decode_responses=True)
    assert "t-acl-gone" not in admin.acl_users()
    from framework.control.acl import set_user

    first = set_user(admin, "acl-rot")
    second = set_user(admin, "acl-rot")
    assert first and second and first.password != second.password
    with pytest.raises(Exception, match=r"WRONGPASS|invalid"):
        Redis.from_url(first.url(plane.redis_url)).ping()
    assert Redis.from_url(second.url(plane.redis_url)).ping()


def test_a_control_plane_upgrade_gives_older_records_and_users_what_data_planes_read(
        redis_server, tmp_path: Path) -> None:
    """Records and ACL users made before the per-tenant keys: the next control plane start
    copies each record into its key and lets the user (password kept) read it."""
    import json

    admin = Redis.from_url(redis_server.url, decode_responses=True)
    admin.flushdb()
    doc = {"id": "acl-old", "name": "Old", "plan": "free", "status": "suspended",
           "placement": "shared", "created": "2026-01-01T00:00:00.000Z",
           "updated": "2026-01-01T00:00:00.000Z"}
    admin.hset("mtp:_fleet:tenants", "acl-old", json.dumps(doc))
    admin.zadd("mtp:_fleet:ids", {"acl-old": 0})
    admin.execute_command("ACL", "SETUSER", "t-acl-old", "reset", "on", ">old-password",
                          "~mtp:acl-old:*", "&mtp:acl-old:*", "+@all", "-@dangerous")
    old = Redis.from_url(redis_server.url.replace("redis://", "redis://t-acl-old:old-password@"),
                         decode_responses=True)
    with pytest.raises(NoPermissionError):
        old.get("mtp:_fleet:tenant:acl-old")
    cp = ControlPlane(tmp_path, redis_url=redis_server.url).start()
    try:
        assert json.loads(old.get("mtp:_fleet:tenant:acl-old")) == doc
        assert old.get("mtp:_fleet:plans") and old.get("mtp:usage:store_id")
        with pytest.raises(NoPermissionError):
            old.set("mtp:_fleet:tenant:acl-old", "{}")
        assert cp.call("GET", "/admin/tenants/acl-old").json()["status"] == "suspended"
    finally:
        cp.stop()
