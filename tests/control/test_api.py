"""The admin API of `mtp control` as a real process, on SQLite and on a real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from redis import Redis

from tests.control.fleet import (
    OPERATOR_KEY,
    TENANT_SECRET,
    ControlPlane,
    op_headers,
    operator_token,
)
from tests.control.seed import seed_redis, seed_sqlite
from tests.helpers import base_env

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def plane(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
    cp = ControlPlane(tmp_path_factory.mktemp(f"control-{request.param}"), redis_url=url)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def redis_of(cp: ControlPlane) -> Redis | None:
    return Redis.from_url(cp.redis_url, decode_responses=True) if cp.redis_url else None


def seed(cp: ControlPlane, tenant: str, calls: int = 7) -> None:
    client = redis_of(cp)
    if client is not None:
        seed_redis(client, tenant, calls)
    seed_sqlite(cp.data_dir, tenant, calls)


def create(cp: ControlPlane, tid: str, plan: str = "free", **extra: str) -> dict:
    reply = cp.call("POST", "/admin/tenants", {"id": tid, "name": tid.title(), "plan": plan,
                                               **extra})
    assert reply.status == 201, reply.body
    return reply.json()


def assert_problem(reply, status: int, kind: str | None = None) -> dict:
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith(PROBLEM)
    doc = reply.json()
    assert doc["status"] == status and doc["request_id"] == reply.headers["X-Request-ID"]
    assert "Traceback" not in reply.body.decode()
    if kind:
        assert doc["type"].endswith(kind), doc
    return doc


def test_create_returns_the_record_and_refuses_a_taken_id(plane: ControlPlane) -> None:
    reply = plane.call("POST", "/admin/tenants", {"id": "acme", "name": "Acme", "plan": "free"})
    assert reply.status == 201
    rec = reply.json()
    assert reply.headers["Location"] == "/admin/tenants/acme"
    assert {k: rec[k] for k in ("id", "name", "plan", "status", "placement")} == {
        "id": "acme", "name": "Acme", "plan": "free", "status": "active",
        "placement": "pool:shared"}  # the plan's isolation decides
    assert rec["created"] == rec["updated"] and rec["created"].endswith("Z")
    assert create(plane, "bigco", "pro")["placement"] == "dedicated"
    assert create(plane, "pinned", "free", placement="pool:eu")["placement"] == "pool:eu"
    doc = assert_problem(plane.call("POST", "/admin/tenants",
                                    {"id": "acme", "name": "Other", "plan": "pro"}),
                         409, "tenant-exists")
    assert "acme" in doc["detail"]
    assert plane.call("GET", "/admin/tenants/acme").json()["name"] == "Acme"  # untouched


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 400, "object"),
    ({"name": "x", "plan": "free"}, 400, "id is required"),
    ({"id": "Bad_ID", "name": "x", "plan": "free"}, 400, "id must match"),
    ({"id": "ok1", "name": "x", "plan": "free", "color": "red"}, 400, "color"),
    ({"id": "ok2", "name": 5, "plan": "free"}, 400, "name must be a string"),
    ({"id": "ok3", "name": "x", "plan": "free", "placement": "moon"}, 400, "placement"),
    ({"id": "ok4", "name": "x", "plan": "gold"}, 422, "gold"),
    ({"id": "ok5", "name": "x" * 70_000, "plan": "free"}, 413, "over 65536 bytes"),
])
def test_create_refuses_bad_bodies(plane: ControlPlane, body: object, status: int,
                                   words: str) -> None:
    doc = assert_problem(plane.call("POST", "/admin/tenants", body), status)
    assert words in doc["detail"]
    if status == 422:
        assert doc["type"].endswith("unknown-plan") and doc["plan"] == "gold"


def test_list_filters_and_pages_with_a_cursor(plane: ControlPlane) -> None:
    ids = [f"page-{i:02d}" for i in range(7)]
    for i, tid in enumerate(ids):
        create(plane, tid, "pro" if i % 2 else "free")
    plane.call("PATCH", "/admin/tenants/page-03", {"status": "suspended"})
    seen, cursor, pages = [], None, 0
    while True:
        query = "/admin/tenants?limit=3&plan=pro" + (f"&cursor={cursor}" if cursor else "")
        page = plane.call("GET", query).json()
        pages += 1
        seen += [t["id"] for t in page["tenants"]]
        assert all(t["plan"] == "pro" for t in page["tenants"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    pro = [t for i, t in enumerate(ids) if i % 2]
    assert [s for s in seen if s.startswith("page-")] == pro and len(seen) == len(set(seen))
    assert pages >= 2
    suspended = plane.call("GET", "/admin/tenants?status=suspended").json()["tenants"]
    assert [t["id"] for t in suspended] == ["page-03"]
    dedicated = plane.call("GET", "/admin/tenants?placement=dedicated&limit=1000").json()
    assert all(t["placement"] == "dedicated" for t in dedicated["tenants"])
    assert dedicated["next_cursor"] is None
    for bad in ("limit=0", "limit=abc", "limit=5000", "cursor=%%%", "cursor=Zm9vX2Jhcg",
                "status=gone", "colour=red"):
        assert_problem(plane.call("GET", f"/admin/tenants?{bad}"), 400)


def test_show_has_todays_calls_and_cost_of_that_tenant_only(plane: ControlPlane) -> None:
    create(plane, "metered", "free")
    create(plane, "neighbour", "free")
    seed(plane, "metered", calls=7)
    seed(plane, "neighbour", calls=1000)
    rec = plane.call("GET", "/admin/tenants/metered").json()
    assert rec["usage"]["calls"] == 7 and rec["usage"]["currency"] == "EUR"
    # 7 calls * 0.0002 + 0.5 CPU s * 0.03 + 2100 bytes * 0.08 / 1e9
    assert rec["usage"]["cost"] == pytest.approx(7 * 0.0002 + 0.5 * 0.03, abs=1e-6)
    fresh = create(plane, "quiet", "pro")
    assert plane.call("GET", "/admin/tenants/quiet").json()["usage"] == {
        "calls": 0, "cost": 0.0, "currency": "EUR"}
    assert fresh["id"] == "quiet"
    assert_problem(plane.call("GET", "/admin/tenants/nobody"), 404, "unknown-tenant")
    assert_problem(plane.call("GET", "/admin/tenants/NOT_AN_ID"), 404, "unknown-tenant")


def test_patch_changes_fields_and_refuses_bad_ones(plane: ControlPlane) -> None:
    create(plane, "mover", "free")
    reply = plane.call("PATCH", "/admin/tenants/mover",
                       {"plan": "pro", "name": "Mover Ltd", "placement": "pool:b"})
    assert reply.status == 200
    rec = reply.json()
    assert (rec["plan"], rec["name"], rec["placement"]) == ("pro", "Mover Ltd", "pool:b")
    assert rec["updated"] >= rec["created"]
    assert plane.call("PATCH", "/admin/tenants/mover",
                      {"status": "suspended"}).json()["status"] == "suspended"
    assert plane.call("PATCH", "/admin/tenants/mover",
                      {"status": "active"}).json()["status"] == "active"
    doc = assert_problem(plane.call("PATCH", "/admin/tenants/mover", {"plan": "platinum"}),
                         422, "unknown-plan")
    assert "platinum" in doc["detail"] and "free" in doc["detail"]
    assert_problem(plane.call("PATCH", "/admin/tenants/mover", {"status": "offboarding"}), 400)
    assert_problem(plane.call("PATCH", "/admin/tenants/mover", {}), 400)
    assert_problem(plane.call("PATCH", "/admin/tenants/mover", {"id": "x"}), 400)
    assert_problem(plane.call("PATCH", "/admin/tenants/mover", b"nope"), 400)
    assert_problem(plane.call("PATCH", "/admin/tenants/ghost", {"name": "x"}), 404,
                   "unknown-tenant")
    assert plane.call("GET", "/admin/tenants/mover").json()["plan"] == "pro"  # unchanged


def test_delete_offboards_keeps_the_export_and_purges(plane: ControlPlane) -> None:
    create(plane, "leaver", "free")
    create(plane, "stayer", "free")
    seed(plane, "leaver")
    seed(plane, "stayer")
    reply = plane.call("DELETE", "/admin/tenants/leaver")
    assert reply.status == 202 and reply.json()["status"] == "offboarding"
    plane.wait_offboarded("leaver")
    assert plane.call("GET", "/admin/tenants/leaver").json()["status"] == "offboarding"
    assert_problem(plane.call("PATCH", "/admin/tenants/leaver", {"status": "active"}), 409,
                   "tenant-offboarding")
    again = plane.call("DELETE", "/admin/tenants/leaver")
    assert again.status == 202
    export = plane.call("GET", "/admin/tenants/leaver/export")
    assert export.status == 200
    lines = [json.loads(x) for x in export.body.decode().splitlines()]
    kinds = {x["kind"] for x in lines}
    assert {"usage", "config_version", "job"} <= kinds
    assert all(x["tenant"] == "leaver" for x in lines)
    assert "stayer" not in export.body.decode()
    # The purge took the tenant's data; the other tenant's is still there.
    stayer_show = plane.call("GET", "/admin/tenants/stayer").json()
    assert stayer_show["usage"]["calls"] == 7
    assert plane.call("GET", "/admin/tenants/leaver").json()["usage"]["calls"] == 0
    assert_problem(plane.call("DELETE", "/admin/tenants/ghost"), 404, "unknown-tenant")


def test_export_is_json_lines_of_that_tenant_only(plane: ControlPlane) -> None:
    create(plane, "exporter", "pro")
    create(plane, "other-co", "pro")
    seed(plane, "exporter", calls=3)
    seed(plane, "other-co", calls=5)
    reply = plane.call("GET", "/admin/tenants/exporter/export")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in reply.body.decode().splitlines()]
    assert {x["kind"] for x in lines} == {"usage", "config_version", "job"}
    assert all(x["tenant"] == "exporter" for x in lines)
    assert sum(x["calls"] for x in lines if x["kind"] == "usage") == 3
    assert "result-of-other-co" not in reply.body.decode()
    assert "result-of-exporter" in reply.body.decode()  # the tenant's own job results
    assert_problem(plane.call("GET", "/admin/tenants/ghost/export"), 404, "unknown-tenant")


def test_plans_are_shown_and_reloaded_live(plane: ControlPlane) -> None:
    doc = plane.call("GET", "/admin/plans").json()
    assert set(doc["plans"]) == {"free", "pro"}
    free = doc["plans"]["free"]
    assert free["limits"]["daily_cpu_seconds"] == 60 and free["limits"]["degraded_rate"] == 1
    assert free["prices"]["per_call"] == 0.0002 and free["isolation"] == "shared"
    version = doc["version"]
    original = plane.plans_file.read_text()
    try:
        plane.plans_file.write_text(original + '\n[plans.team]\nisolation = "process"\n'
                                    'services = ["*"]\n')
        deadline = time.monotonic() + 10
        while "team" not in plane.call("GET", "/admin/plans").json()["plans"]:
            assert time.monotonic() < deadline, "plans not reloaded"
            time.sleep(0.1)
        new = plane.call("GET", "/admin/plans").json()
        assert new["version"] == version + 1 and new["hash"] != doc["hash"]
        assert create(plane, "teamco", "team")["placement"] == "pool:process"
        # A broken file is refused and the plans in force stay.
        plane.plans_file.write_text('[plans.free]\nisolation = "cloud"\nservices = []\n')
        while "reload_error" not in (cur := plane.call("GET", "/admin/plans").json()):
            assert time.monotonic() < deadline + 10, "bad plans file not noticed"
            time.sleep(0.1)
        assert "plans.free.isolation" in cur["reload_error"]
        assert "team" in cur["plans"] and cur["version"] == new["version"]
    finally:
        plane.plans_file.write_text(original)


def test_gateway_table_as_nginx_and_gateway_api(plane: ControlPlane) -> None:
    create(plane, "gw-pool", "free")
    create(plane, "gw-dedi", "pro")
    create(plane, "gw-gone", "free")
    plane.call("DELETE", "/admin/tenants/gw-gone")
    reply = plane.call("GET", "/admin/gateway?format=nginx")
    assert reply.status == 200
    conf = reply.body.decode()
    assert "gw-pool.fleet.test mtp-pool-shared;" in conf
    assert "gw-dedi.fleet.test mtp-gw-dedi;" in conf
    assert "~^/tenants/gw-dedi/ mtp-gw-dedi;" in conf
    assert "gw-gone" not in conf  # offboarding: no longer routed
    routes = plane.call("GET", "/admin/gateway?format=gateway-api").body.decode()
    docs = [json.loads(d) for d in routes.split("---\n") if d.strip()]
    by_name = {d["metadata"]["name"]: d for d in docs}
    dedi = by_name["mtp-tenant-gw-dedi"]
    assert dedi["kind"] == "HTTPRoute" and dedi["spec"]["hostnames"] == ["gw-dedi.fleet.test"]
    assert dedi["spec"]["rules"][0]["backendRefs"] == [{"name": "mtp-gw-dedi", "port": 8080}]
    assert "mtp-tenant-gw-gone" not in by_name
    assert plane.call("GET", "/admin/gateway").status == 200  # nginx by default
    assert_problem(plane.call("GET", "/admin/gateway?format=yaml"), 400)


def test_only_operators_pass(plane: ControlPlane) -> None:
    path = "/admin/tenants"
    doc = assert_problem(plane.call("GET", path, headers={}), 401)
    no_creds = plane.call("GET", path, headers={})
    assert no_creds.headers["WWW-Authenticate"].startswith("Bearer")
    assert doc["type"].endswith("unauthorized")
    tenant_token = operator_token(secret=TENANT_SECRET, tenant_id="acme")
    assert_problem(plane.call("GET", path, headers={"Authorization": f"Bearer {tenant_token}"}),
                   401)
    # Signed with the operator secret by mistake, but a tenant's token all the same.
    as_tenant = operator_token(tenant_id="acme")
    assert_problem(plane.call("GET", path, headers={"Authorization": f"Bearer {as_tenant}"}),
                   403, "not-operator")
    no_role = operator_token(roles=("admin",))
    assert_problem(plane.call("GET", path, headers={"Authorization": f"Bearer {no_role}"}),
                   403, "not-operator")
    expired = operator_token(exp=int(time.time()) - 60)
    assert_problem(plane.call("GET", path, headers={"Authorization": f"Bearer {expired}"}), 401)
    import jwt as pyjwt

    unsigned = pyjwt.encode({"sub": "x", "exp": int(time.time()) + 60,
                             "roles": ["platform-admin"]}, None, algorithm="none")
    assert_problem(plane.call("GET", path, headers={"Authorization": f"Bearer {unsigned}"}), 401)
    assert_problem(plane.call("GET", path, headers={"Authorization": "Basic YTpi"}), 401)
    assert plane.call("GET", path, headers={"X-API-Key": OPERATOR_KEY}).status == 200
    assert_problem(plane.call("GET", path, headers={"X-API-Key": "tenant-key-123"}), 401)
    both = {"X-API-Key": OPERATOR_KEY, **op_headers()}
    assert_problem(plane.call("GET", path, headers=both), 401)
    # Refused before anything happens: no tenant created.
    assert_problem(plane.call("POST", path, {"id": "sneaky", "name": "x", "plan": "free"},
                              headers={"Authorization": f"Bearer {no_role}"}), 403)
    assert plane.call("GET", "/admin/tenants/sneaky").status == 404


def test_unknown_routes_and_methods_are_problems(plane: ControlPlane) -> None:
    assert_problem(plane.call("GET", "/admin/nothing"), 404)
    doc = assert_problem(plane.call("PUT", "/admin/tenants/acme", {}), 405)
    assert doc["title"] == "Method Not Allowed"
    assert plane.call("GET", "/healthz", headers={}).json() == {"status": "ok"}
    rid = plane.call("GET", "/admin/plans", headers={**op_headers(), "X-Request-ID": "abc-1"})
    assert rid.headers["X-Request-ID"] == "abc-1"


def test_every_admin_action_is_one_audit_line(plane: ControlPlane) -> None:
    create(plane, "audited", "free")
    plane.call("PATCH", "/admin/tenants/audited", {"plan": "pro", "name": "Audited"},
               headers={"X-API-Key": OPERATOR_KEY, "Content-Type": "application/json"})
    plane.call("GET", "/admin/tenants", headers={})
    lines = plane.audit_lines()
    created = [x for x in lines if x["action"] == "tenant.create" and x["tenant"] == "audited"]
    assert created[-1]["operator"] == "ops-alice" and created[-1]["status"] == 201
    assert created[-1]["fields"] == {"name": "Audited", "plan": "free",
                                     "placement": "pool:shared"}
    patched = [x for x in lines if x["action"] == "tenant.update" and x["tenant"] == "audited"]
    assert patched[-1]["operator"] == "ci-robot"
    assert patched[-1]["fields"] == {"plan": "pro", "name": "Audited"}
    refused = [x for x in lines if x["status"] == 401]
    assert refused and refused[-1]["operator"] == "" and refused[-1]["action"] == "tenant.list"
    text = plane.audit_file.read_text()
    assert OPERATOR_KEY not in text and "Bearer" not in text  # never a credential


@pytest.mark.parametrize(("plans", "env", "words"), [
    (None, {}, "file not found"),
    ('[plans.free]\nisolation = "shared"\n', {}, "plans.free.services"),
    ('[plans.free]\nisolation = "shared"\nservices = ["*"]\nlimits = { rate = -1 }\n', {},
     "plans.free.limits.rate"),
    ('[plans.free]\nisolation = "shared"\nservices = ["*"]\n',
     {"MTP_OPERATOR_JWT_SECRET": "", "MTP_OPERATOR_KEYS_FILE": ""}, "MTP_OPERATOR_JWT_SECRET"),
    ('[plans.free]\nisolation = "shared"\nservices = ["*"]\n',
     {"MTP_OPERATOR_JWT_SECRET": "short", "MTP_OPERATOR_KEYS_FILE": ""}, "at least 32"),
    ('[plans.free]\nisolation = "shared"\nservices = ["*"]\n', {"MTP_PLANS_FILE": ""},
     "MTP_PLANS_FILE"),
    ('[plans.free]\nisolation = "shared"\nservices = ["*"]\n', {"MTP_LOG_LEVEL": "loud"},
     "MTP_LOG_LEVEL"),
    ('[plans.free]\nisolation = "shared"\nservices = ["*"]\n',
     {"MTP_CONTROL_LISTEN": "unix:/tmp/x.sock"}, "MTP_CONTROL_LISTEN"),
])
def test_control_refuses_to_start_with_bad_config(tmp_path, plans, env, words) -> None:
    cp = ControlPlane(tmp_path)
    if plans is not None:
        cp.plans_file.write_text(plans)
    full = {**cp.env(), **env}
    if plans is None:
        full["MTP_PLANS_FILE"] = str(tmp_path / "missing.toml")
    done = subprocess.run([sys.executable, "-m", "framework", "control"], env=full,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert words in done.stderr and "Traceback" not in done.stderr


def test_operator_keys_file_is_checked(tmp_path) -> None:
    cp = ControlPlane(tmp_path)
    cp.plans_file.write_text('[plans.free]\nisolation = "shared"\nservices = ["*"]\n')
    bad = tmp_path / "keys.toml"
    bad.write_text('[keys.ops]\nhash = "md5:abc"\n')
    env = {**cp.env(), "MTP_OPERATOR_KEYS_FILE": str(bad)}
    done = subprocess.run([sys.executable, "-m", "framework", "control"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "keys.ops.hash" in done.stderr
    assert base_env()  # the helper keeps MTP_* of the test run out


def test_a_store_outage_is_503_and_recovers(tmp_path) -> None:
    from tests.servers import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    cp = ControlPlane(tmp_path / "cp", redis_url=server.url).start()
    try:
        create(cp, "outage-co", "free")
        server.stop()
        doc = assert_problem(cp.call("GET", "/admin/tenants/outage-co"), 503,
                             "store-unavailable")
        assert "unavailable" in doc["detail"]
        assert_problem(cp.call("POST", "/admin/tenants",
                               {"id": "x1", "name": "x", "plan": "free"}), 503)
        server.start()  # an empty database (no persistence): the registry is gone too
        assert cp.call("GET", "/admin/tenants").status == 200
        client = Redis.from_url(server.url)
        deadline = time.monotonic() + 10
        while not client.exists("mtp:_fleet:plans"):  # published again: still a fleet
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        cp.stop()
        server.stop()


def test_a_chunked_body_over_the_cap_is_413(plane: ControlPlane) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", plane.port, timeout=10)
    try:
        conn.putrequest("POST", "/admin/tenants")
        for name, value in op_headers().items():
            conn.putheader(name, value)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for _ in range(5):
            part = b'{"x": "' + b"y" * 20000 + b'"}'
            conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        assert resp.status == 413
        assert json.loads(resp.read())["status"] == 413
    finally:
        conn.close()


def test_plan_versions_survive_a_restart(tmp_path) -> None:
    cp = ControlPlane(tmp_path).start()
    try:
        first = cp.call("GET", "/admin/plans").json()
        cp.plans_file.write_text(cp.plans + '\n[plans.team]\nisolation = "process"\n'
                                 'services = ["*"]\n')
        deadline = time.monotonic() + 10
        while cp.call("GET", "/admin/plans").json()["version"] == first["version"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = cp.call("GET", "/admin/plans").json()
        cp.stop()
        cp.start()  # the same file: the same version
        assert cp.call("GET", "/admin/plans").json()["version"] == second["version"]
        cp.stop()
        cp.plans_file.write_text(cp.plans)  # changed while it was down: the next version
        cp.start()
        third = cp.call("GET", "/admin/plans").json()
        assert third["version"] == second["version"] + 1 and third["hash"] == first["hash"]
    finally:
        cp.stop()
