"""A whole tenant stack on the tenant's Redis ACL user, and its code kept to its own keys.

A real `mtp control` onboards acme and beta on a real redis-server; acme's `mtp run`
(sidecar, framework, job worker) is given only acme's ACL URL from the create answer.
Everything works (sync, async, events, usage, suspension from the registry), and a
service of acme, which can read the URL from its environment like any tenant code,
tries beta's keys and the registry: Redis itself refuses each attempt (NOPERM).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from framework.control.acl import AclUser
from tests.control.fleet import ControlPlane
from tests.control.test_data_plane import PLANS, echo, kind, start_replica, wait_until
from tests.redis.stack import Replica, auth, wait_job, write_tenant

# Tenant code with the data plane's Redis URL, trying to reach past its ACL user.
SNOOP = '''"""Try another tenant's keys and the registry with this data plane's Redis URL."""
import os

from redis import Redis
from redis.exceptions import NoPermissionError


def handle(context):
    other = context.payload["other"]
    r = Redis.from_url(os.environ["MTP_REDIS_URL"], decode_responses=True)
    mine = context.tenant_id
    attempts = {
        "own key": lambda: r.set(f"mtp:{mine}:snoop", "1"),
        "own record": lambda: r.get(f"mtp:_fleet:tenant:{mine}"),
        "other job": lambda: r.hgetall(f"mtp:{other}:job:j1"),
        "other rq job": lambda: r.hgetall(f"mtp:{other}:rq:job:j1"),
        "other rq queue": lambda: r.lrange(f"mtp:{other}:rq:queue:mtp-{other}", 0, -1),
        "other usage": lambda: r.zrange(f"mtp:{other}:usage:hours", 0, -1),
        "other delete": lambda: r.delete(f"mtp:{other}:job:j1"),
        "other in a script": lambda: r.eval(
            "return redis.call('HGETALL', 'mtp:' .. ARGV[1] .. ':job:j1')", 0, other),
        "other record": lambda: r.get(f"mtp:_fleet:tenant:{other}"),
        "registry hash": lambda: r.hgetall("mtp:_fleet:tenants"),
        "own record write": lambda: r.set(f"mtp:_fleet:tenant:{mine}", r.get(
            f"mtp:_fleet:tenant:{mine}").replace('"suspended"', '"active"')),
        "own record in hash": lambda: r.hset("mtp:_fleet:tenants", mine, "{}"),
        "own record delete": lambda: r.delete(f"mtp:_fleet:tenant:{mine}"),
        "plans write": lambda: r.set("mtp:_fleet:plans", "{}"),
        "other changes": lambda: r.publish(f"mtp:_fleet:changed:{other}", other),
        "key names": lambda: r.scan(0, count=1000),
        "flush": lambda: r.flushdb(),
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "allowed"
        except Exception as exc:
            # A command's NOPERM, or a script's ACL refusal (Redis words it so).
            refused = isinstance(exc, NoPermissionError) or \\
                "can't access at least one of the keys" in str(exc)
            out[name] = "NOPERM" if refused else f"{type(exc).__name__}: {exc}"
    r.close()
    return out
'''

# Writes each event it is given to the file named in its config.
RECORD = '''"""Record the event."""
import json


def handle(context):
    with open(context.config["out"], "a") as fh:
        fh.write(json.dumps(context.event) + "\\n")
    return {"ok": True}
'''

BETA_JOB = {"service": "echo", "status": "succeeded", "result": '{"secret": "beta"}'}


@pytest.fixture
def plane(redis_server, tmp_path: Path) -> Iterator[ControlPlane]:
    Redis.from_url(redis_server.url).flushdb()
    cp = ControlPlane(tmp_path / "control", redis_url=redis_server.url, plans=PLANS).start()
    try:
        yield cp
    finally:
        cp.stop()


def onboard(cp: ControlPlane, tid: str) -> str:
    """Create the tenant; the ACL URL its data plane is given."""
    reply = cp.call("POST", "/admin/tenants", {"id": tid, "name": tid, "plan": "std"})
    assert reply.status == 201, reply.body
    creds = reply.json()["redis"]
    return AclUser(creds["user"], creds["password"]).url(cp.redis_url)


def acme_tenant(root: Path) -> tuple[Path, Path]:
    tdir = write_tenant(root, "rate = 1000\nburst = 1000")
    (tdir / "services" / "snoop.py").write_text(SNOOP)
    (tdir / "services" / "record.py").write_text(RECORD)
    out = root / "events.jsonl"
    with (tdir / "tenant.toml").open("a") as fh:
        fh.write(f'\n[services.record.config]\nout = "{out}"\n\n'
                 '[[events.routes]]\ntypes = ["ping"]\nservice = "record"\n')
    return tdir, out


def test_a_whole_stack_runs_on_its_acl_user_and_only_on_its_keys(plane: ControlPlane,
                                                                 tmp_path: Path) -> None:
    admin = Redis.from_url(plane.redis_url, decode_responses=True)
    acme_url = onboard(plane, "acme")
    beta_url = onboard(plane, "beta")
    beta = Redis.from_url(beta_url, decode_responses=True)  # beta's own data, as beta
    beta.hset("mtp:beta:job:j1", mapping=BETA_JOB)
    beta.hset("mtp:beta:rq:job:j1", mapping={"origin": "mtp-beta", "status": "finished"})
    beta.rpush("mtp:beta:rq:queue:mtp-beta", "j1")
    beta_record = admin.get("mtp:_fleet:tenant:beta")
    tdir, events = acme_tenant(tmp_path)
    replica = Replica("acme", tmp_path, tdir, acme_url)
    try:
        start_replica(replica)
        wait_until(replica.workers_ready)
        # Sync, async (RQ on acme's keys), an event delivered by the job workers.
        assert echo(replica).status == 200
        job = replica.call("POST", "/services/echo?mode=async", auth(), {"n": 1})
        assert job.status == 202, job.body
        done = wait_job(replica, job.json()["job_id"])
        assert done["status"] == "succeeded" and done["result"]["echo"] == {"n": 1}
        event = {"specversion": "1.0", "id": "e1", "source": "/test", "type": "ping",
                 "data": {"n": 2}}
        sent = replica.call("POST", "/events", {**auth(), "Content-Type":
                                                "application/cloudevents+json"},
                            json.dumps(event).encode())
        assert sent.status == 202, sent.body
        wait_until(lambda: events.is_file() and '"e1"' in events.read_text(), timeout=30)
        # Usage, flushed each second into acme's keys, charged at the plan's prices.
        wait_until(lambda: sum(r["calls"] for r in replica.call(
            "GET", "/usage", auth(roles=("admin",))).json()["rows"]) >= 2, timeout=20)
        assert replica.call("GET", "/usage", auth(roles=("admin",))).json()["currency"] == "USD"
        rq_keys = [k for k in admin.scan_iter(match="*rq:*", count=1000)]
        assert rq_keys and all(k.startswith(("mtp:acme:rq:", "mtp:beta:rq:")) for k in rq_keys)

        # Suspension reaches it through acme's own record key and channel.
        assert plane.call("PATCH", "/admin/tenants/acme", {"status": "suspended"}).status == 200
        wait_until(lambda: kind(echo(replica)) == "403 tenant-suspended")
        assert plane.call("PATCH", "/admin/tenants/acme", {"status": "active"}).status == 200
        wait_until(lambda: echo(replica).status == 200)

        # acme's code: its own keys yes; beta's, the registry and the plans: NOPERM.
        reply = replica.call("POST", "/services/snoop", auth(), {"other": "beta"})
        assert reply.status == 200, reply.body
        tried = reply.json()
        assert tried.pop("own key") == "allowed" and tried.pop("own record") == "allowed"
        assert tried == dict.fromkeys(tried, "NOPERM"), tried
        assert len(tried) == 15
    finally:
        replica.stop()
    log = replica.log.read_text(errors="replace")
    assert "no permissions" not in log and "NOPERM" not in log, log[-3000:]  # no part refused
    assert admin.hgetall("mtp:beta:job:j1") == BETA_JOB
    assert admin.lrange("mtp:beta:rq:queue:mtp-beta", 0, -1) == ["j1"]
    assert admin.get("mtp:_fleet:tenant:beta") == beta_record
    record = json.loads(admin.get("mtp:_fleet:tenant:acme"))
    assert (record["status"], record["plan"]) == ("active", "std")
    assert json.loads(admin.hget("mtp:_fleet:tenants", "acme")) == record
    assert admin.dbsize() > 0  # nothing was flushed


def test_a_suspended_tenant_cannot_lift_its_own_suspension(plane: ControlPlane,
                                                           tmp_path: Path) -> None:
    url = onboard(plane, "acme")
    assert plane.call("PATCH", "/admin/tenants/acme", {"status": "suspended"}).status == 200
    tenant = Redis.from_url(url, decode_responses=True)
    doc = tenant.get("mtp:_fleet:tenant:acme")
    assert json.loads(doc)["status"] == "suspended"  # it may read its record ...
    from redis.exceptions import NoPermissionError

    with pytest.raises(NoPermissionError):  # ... never write it
        tenant.set("mtp:_fleet:tenant:acme", doc.replace("suspended", "active"))
    with pytest.raises(NoPermissionError):
        tenant.set("mtp:_fleet:plans", "{}")
    assert json.loads(tenant.get("mtp:_fleet:tenant:acme"))["status"] == "suspended"
