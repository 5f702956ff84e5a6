"""Events in a pool never cross tenants (issue 17, "Isolation"; DESIGN.md "Events").

Two tenants of one `mtp pool` have the same route (``order.*`` to their ``record``
service): an event published by one, from outside (POST /events) or from its code
(``context.emit``), is delivered to that tenant's service only; a publisher naming
another tenant is refused, and dead letters are listed per tenant.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from framework.assemble import assemble
from tests.events.stack import EMITTER, FLAKY, RECORD, binary, lines, structured
from tests.pool.support import DOMAIN, Pool, Tenant, start_pool, stop_pool, write_source

pytestmark = pytest.mark.slow

ACME, GLOBEX = Tenant("acme"), Tenant("globex")


def events_source(root: Path, tenant: Tenant) -> Path:
    """The pool's test tenant plus a route ``order.*`` -> record, ``fail.*`` -> a
    service that always fails, ``later.*`` -> one that fails while a marker file
    exists and is retried 3 s later, and an emitter."""
    src = write_source(root / "src" / tenant.id, tenant)
    out = root / f"{tenant.id}.jsonl"
    with (src / "tenant.toml").open("a") as toml:
        toml.write(f'''
[services.record]
config = {{ out = "{out}" }}

[services.flaky.config]
out = "{root / f'{tenant.id}-later.jsonl'}"
marker = "{root / f'{tenant.id}-failing'}"

[[events.routes]]
types = ["later.*"]
service = "flaky"
retries = 3
backoff = 3

[[authz.rules]]
service = "*"
roles = ["admin"]

[[authz.rules]]
events = ["order.*", "fail.*", "later.*"]
roles = ["admin"]

[[events.routes]]
types = ["order.*"]
service = "record"

[[events.routes]]
types = ["fail.*"]
service = "broken"
retries = 0
''')
    (src / "services" / "record.py").write_text(RECORD)
    (src / "services" / "broken.py").write_text("def handle(context):\n"
                                                "    raise RuntimeError('always')\n")
    (src / "services" / "emitter.py").write_text(EMITTER)
    (src / "services" / "flaky.py").write_text(FLAKY)
    return src


def publish_bundle(bundles: Path, src: Path, tenant: Tenant) -> None:
    release = bundles.parent / "releases" / tenant.id
    assemble(src, release, run_tests=False, when=datetime.now(UTC), report=lambda _l: None)
    os.symlink(release, bundles / tenant.id)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Iterator[tuple[Pool, Path]]:
    root = tmp_path_factory.mktemp("pool-events")
    running = start_pool(root, "events", [], **ACME.env(), **GLOBEX.env())
    try:
        for tenant in (ACME, GLOBEX):
            publish_bundle(running.bundles, events_source(root, tenant), tenant)
        yield running, root
    finally:
        stop_pool(running)


def bearer(tenant: Tenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.token()}"}


def wait_for_id(path: Path, eid: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in lines(path) if (r.get("event") or {}).get("id") == eid]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"event {eid} never reached {path.name}")


def test_an_event_reaches_its_publishers_tenant_only(pool) -> None:
    running, root = pool
    acme_id, globex_id = uuid.uuid4().hex, uuid.uuid4().hex
    r = structured(running, bearer(ACME), {"id": acme_id, "source": "/shop",
                                           "type": "order.created", "data": {"n": 1}})
    assert r.status == 202, r.body
    r = binary(running, {**bearer(GLOBEX), "Host": f"globex.{DOMAIN}"},
               {"id": globex_id, "source": "/shop", "type": "order.created",
                "specversion": "1.0"}, {"n": 2})
    assert r.status == 202, r.body
    acme = wait_for_id(root / "acme.jsonl", acme_id)
    globex = wait_for_id(root / "globex.jsonl", globex_id)
    assert acme["payload"] == {"n": 1} and globex["payload"] == {"n": 2}
    time.sleep(0.5)  # a misrouted copy would have been delivered by now as well
    assert [r["event"]["id"] for r in lines(root / "acme.jsonl")] == [acme_id]
    assert [r["event"]["id"] for r in lines(root / "globex.jsonl")] == [globex_id]


def test_context_emit_stays_in_the_emitting_tenant(pool) -> None:
    running, root = pool
    before = len(lines(root / "globex.jsonl"))
    r = running.call("POST", "/services/emitter", {**bearer(ACME), "X-Tenant-ID": "acme"},
                     json.dumps({"type": "order.emitted", "data": {"from": "code"}}).encode())
    assert r.status == 200, r.body
    eid = r.json()["id"]
    record = wait_for_id(root / "acme.jsonl", eid)
    assert record["event"]["type"] == "order.emitted" and record["user"] == "alice"
    time.sleep(0.5)
    assert len(lines(root / "globex.jsonl")) == before


@pytest.mark.parametrize("naming", [{"X-Tenant-ID": "globex"}, {"Host": f"globex.{DOMAIN}"}])
def test_a_publisher_naming_another_tenant_is_refused(pool, naming: dict[str, str]) -> None:
    running, root = pool
    eid = uuid.uuid4().hex
    r = structured(running, {**bearer(ACME), **naming},
                   {"id": eid, "source": "/x", "type": "order.created"})
    assert r.status == 403, r.body
    assert r.headers["Content-Type"] == "application/problem+json"
    # A token of acme's signed with globex's key names acme, and acme's key refuses it.
    forged = {"Authorization": f"Bearer {ACME.token(key=GLOBEX.jwt_secret)}"}
    assert structured(running, forged, {"id": eid, "source": "/x",
                                        "type": "order.created"}).status == 401
    time.sleep(0.5)
    for tenant in ("acme", "globex"):
        seen = {(r.get("event") or {}).get("id") for r in lines(root / f"{tenant}.jsonl")}
        assert eid not in seen


def dead_ids(running: Pool, tenant: Tenant) -> set[str]:
    r = running.call("GET", "/events/dead", bearer(tenant))
    assert r.status == 200, r.body
    return {d["event"]["id"] for d in r.json()["dead"]}


def test_dead_letters_are_listed_and_replayed_per_tenant(pool) -> None:
    running, _root = pool
    eid = uuid.uuid4().hex
    assert structured(running, bearer(ACME), {"id": eid, "source": "/x",
                                              "type": "fail.now"}).status == 202
    deadline = time.monotonic() + 30
    while eid not in dead_ids(running, ACME):
        assert time.monotonic() < deadline, "no dead letter"
        time.sleep(0.1)
    assert eid not in dead_ids(running, GLOBEX)
    # globex's admin cannot replay acme's letter: in globex's store it does not exist.
    r = running.call("POST", f"/events/dead/{eid}/replay", bearer(GLOBEX))
    assert r.status == 404, r.body


# -- a tenant's process stopped with deliveries to make: woken when they are due ----------

def test_a_reaped_tenant_is_woken_for_its_retry_and_delivers_it(tmp_path: Path) -> None:
    running = start_pool(tmp_path, "wake", [], MTP_POOL_IDLE="1", MTP_LOG_LEVEL="INFO",
                         **ACME.env())
    try:
        publish_bundle(running.bundles, events_source(tmp_path, ACME), ACME)
        marker = tmp_path / "acme-failing"
        marker.write_text("1")
        eid = uuid.uuid4().hex
        assert structured(running, bearer(ACME), {"id": eid, "source": "/w",
                                                  "type": "later.x"}).status == 202
        # The first attempt fails; its retry is due in 3 s, after the 1 s idle time, so
        # the process is reaped meanwhile instead of being kept for it.
        log = running.log
        deadline = time.monotonic() + 20
        while "tenant process stopped" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        marker.unlink()
        # No request names acme again: the pool wakes it for the retry.
        record = wait_for_id(tmp_path / "acme-later.jsonl", eid)
        assert record["event"]["type"] == "later.x"
        assert "woken for its event deliveries" in log.read_text()
    finally:
        stop_pool(running)


def test_a_pool_started_again_wakes_tenants_with_deliveries_to_make(tmp_path: Path) -> None:
    marker = tmp_path / "acme-failing"
    marker.write_text("1")
    eid = uuid.uuid4().hex
    first = start_pool(tmp_path, "wake", [], **ACME.env())
    try:
        publish_bundle(first.bundles, events_source(tmp_path, ACME), ACME)
        assert structured(first, bearer(ACME), {"id": eid, "source": "/w",
                                                "type": "later.x"}).status == 202
        time.sleep(0.5)  # the first attempt fails at once; the retry is 3 s away
    finally:
        stop_pool(first)  # with the retry (or the first attempt) still to make
    marker.unlink()
    again = start_pool(tmp_path, "wake", [], **ACME.env())  # the same bundles and data
    try:
        assert wait_for_id(tmp_path / "acme-later.jsonl", eid)["event"]["id"] == eid
    finally:
        stop_pool(again)
