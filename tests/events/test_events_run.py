"""Events end to end through a real `mtp run` (sidecar + framework), embedded engine.

DESIGN.md "Events: tenant-aware routing": both content modes, 400 naming the attribute,
403 for a type no rule grants, duplicates, routing by type and subject globs,
``context.event`` as the publisher, per-subject order under concurrency, retries then
dead letter then replay (role admin), refused targets dead at once, ``context.emit``,
audit lines and metrics, and SIGTERM losing nothing.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Iterator

import pytest

from tests.events.stack import (
    audit_events,
    binary,
    lines,
    structured,
    wait_lines,
    write_events_tenant,
)
from tests.helpers import eventually as wait_for
from tests.helpers import free_port, stop
from tests.sidecar.run_stack import RunStack, run_env, start_run
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, token

pytestmark = pytest.mark.slow


def jwt(sub: str = "alice", **claims: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub=sub, **claims)}"}


ADMIN = {"Authorization": f"Bearer {token(sub='root', roles=['admin'])}"}


def start(root, extra_routes: str = "") -> RunStack:
    tdir = write_events_tenant(root, extra_routes)
    env = run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET, MTP_JOB_WORKERS="4")
    return start_run(root, tdir, env)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[RunStack]:
    stack = start(tmp_path_factory.mktemp("events"))
    try:
        yield stack
    finally:
        stop(stack.proc)


def test_structured_event_is_routed_by_type_and_subject_as_the_publisher(run: RunStack) -> None:
    eid = uuid.uuid4().hex
    answer = structured(run, jwt("alice"), {"id": eid, "source": "/shop", "type": "order.created",
                                            "subject": "eu/42", "data": {"n": 1}},
                        {"X-Request-ID": "req-structured-1"})
    assert answer.status == 202, answer.body
    assert answer.json() == {"id": eid}
    record = next(r for r in wait_lines(run.root / "eu.jsonl", 1) if r["event"]["id"] == eid)
    assert record["event"]["type"] == "order.created"
    assert record["event"]["subject"] == "eu/42"
    assert record["event"]["source"] == "/shop"
    assert record["payload"] == {"n": 1} == record["event"]["data"]
    assert record["user"] == "alice"
    assert record["request_id"] == "req-structured-1"  # the request id travels
    # The generic order.* route got it too; a subject outside eu/* reaches only that one.
    wait_for(lambda: any(r["event"]["id"] == eid for r in lines(run.root / "record.jsonl")))
    other = uuid.uuid4().hex
    assert structured(run, jwt(), {"id": other, "source": "/shop", "type": "order.created",
                                   "subject": "us/1"}).status == 202
    wait_for(lambda: any(r["event"]["id"] == other for r in lines(run.root / "record.jsonl")))
    assert not any(r["event"]["id"] == other for r in lines(run.root / "eu.jsonl"))


def test_binary_event_with_json_data(run: RunStack) -> None:
    eid = uuid.uuid4().hex
    answer = binary(run, jwt("bob"), {"id": eid, "source": "/pos", "type": "order.paid",
                                      "specversion": "1.0", "subject": "s-1"}, {"total": 7})
    assert answer.status == 202, answer.body
    assert answer.json() == {"id": eid}
    wait_for(lambda: any(r["event"]["id"] == eid for r in lines(run.root / "record.jsonl")))
    record = next(r for r in lines(run.root / "record.jsonl") if r["event"]["id"] == eid)
    assert record["payload"] == {"total": 7}
    assert record["user"] == "bob"


@pytest.mark.parametrize(("mode", "missing"), [
    ("structured", "id"), ("structured", "source"), ("structured", "type"),
    ("structured", "specversion"), ("binary", "id"), ("binary", "source"),
    ("binary", "type"), ("binary", "specversion")])
def test_a_missing_required_attribute_is_400_naming_it(run: RunStack, mode: str,
                                                       missing: str) -> None:
    attrs = {"id": uuid.uuid4().hex, "source": "/x", "type": "order.created",
             "specversion": "1.0"}
    del attrs[missing]
    if mode == "structured":
        body = json.dumps(attrs).encode()
        answer = run.call("POST", "/events", {**jwt(), "Content-Type":
                                              "application/cloudevents+json"}, body)
    else:
        answer = binary(run, jwt(), attrs, {"a": 1})
    assert answer.status == 400, answer.body
    assert answer.headers["Content-Type"] == "application/problem+json"
    problem = answer.json()
    assert problem["attribute"] == missing
    assert missing in problem["detail"]
    assert problem["request_id"]


@pytest.mark.parametrize(("headers", "body", "attribute"), [
    ({"Content-Type": "application/cloudevents+json"}, b"{not json", "data"),
    ({"Content-Type": "application/cloudevents+json"}, b"[1]", "data"),
    ({"Content-Type": "application/json"}, b"{}", "content-type"),
    ({"Content-Type": "application/cloudevents+json"},
     b'{"specversion":"0.3","id":"1","source":"/s","type":"order.x"}', "specversion"),
    ({"Content-Type": "application/cloudevents+json"},
     b'{"specversion":"1.0","id":"","source":"/s","type":"order.x"}', "id"),
    ({"Content-Type": "application/cloudevents+json"},
     b'{"specversion":"1.0","id":"1","source":"/s","type":"order x"}', "type"),
    ({"Content-Type": "application/cloudevents+json"},
     b'{"specversion":"1.0","id":"1","source":"/s","type":"order.x","time":"yesterday"}',
     "time"),
])
def test_an_invalid_event_is_400_naming_the_attribute(run: RunStack, headers, body,
                                                      attribute: str) -> None:
    answer = run.call("POST", "/events", {**jwt(), **headers}, body)
    assert answer.status == 400, answer.body
    assert answer.json()["attribute"] == attribute


def test_a_type_no_rule_grants_is_403(run: RunStack) -> None:
    answer = structured(run, jwt(), {"id": "x1", "source": "/s", "type": "payroll.run"})
    assert answer.status == 403, answer.body
    assert answer.headers["Content-Type"] == "application/problem+json"
    # A rule naming role admin: refused to others, granted to admins.
    assert structured(run, jwt(), {"id": "x2", "source": "/s",
                                   "type": "admin.reset"}).status == 403
    assert structured(run, ADMIN, {"id": "x3", "source": "/s",
                                   "type": "admin.reset"}).status == 202


def test_another_tenants_token_and_no_token_are_refused(run: RunStack) -> None:
    event = {"id": uuid.uuid4().hex, "source": "/s", "type": "order.created"}
    assert structured(run, jwt("mallory", tenant_id="globex"), event).status in (401, 403)
    assert structured(run, {}, event).status == 401


def test_a_body_over_the_cap_is_413(run: RunStack) -> None:
    # The sidecar answers from the declared length, before any of the body is read.
    import socket

    auth = jwt()["Authorization"]
    with socket.create_connection(("127.0.0.1", run.port), timeout=10) as sock:
        sock.sendall(f"POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                     f"Content-Type: application/cloudevents+json\r\n"
                     f"Content-Length: {(1 << 20) + 1}\r\n\r\n".encode())
        head = sock.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head


def test_a_repeated_id_and_source_is_accepted_and_delivered_once(run: RunStack) -> None:
    eid = uuid.uuid4().hex
    event = {"id": eid, "source": "/dup", "type": "order.deduped"}
    for _ in range(3):
        answer = structured(run, jwt(), event)
        assert answer.status == 202 and answer.json() == {"id": eid}
    # The same id from another source is another event.
    assert structured(run, jwt(), {**event, "source": "/dup2"}).status == 202
    wait_for(lambda: sum(r["event"]["id"] == eid for r in lines(run.root / "record.jsonl")) == 2)
    marker = uuid.uuid4().hex  # a later event: once it is delivered, the duplicates were not
    structured(run, jwt(), {"id": marker, "source": "/dup", "type": "order.deduped"})
    wait_for(lambda: any(r["event"]["id"] == marker for r in lines(run.root / "record.jsonl")))
    assert sum(r["event"]["id"] == eid for r in lines(run.root / "record.jsonl")) == 2
    outcomes = [a["outcome"] for a in audit_events(run) if a["event_id"] == eid]
    assert outcomes.count("duplicate") == 2


def test_same_subject_one_at_a_time_in_publish_order_under_concurrency(run: RunStack) -> None:
    subjects = [f"cart-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    per_subject = 8
    errors: list[str] = []

    def publish(subject: str) -> None:
        for n in range(per_subject):
            answer = structured(run, jwt(), {"id": uuid.uuid4().hex, "source": "/cart",
                                             "type": "slow.step", "subject": subject,
                                             "data": {"n": n, "sleep": 0.02}})
            if answer.status != 202:
                errors.append(answer.body.decode())

    threads = [threading.Thread(target=publish, args=(s,)) for s in subjects]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    wait_for(lambda: sum(r["event"]["subject"] in subjects
                         for r in lines(run.root / "record.jsonl")) >= 3 * per_subject)
    records = [r for r in lines(run.root / "record.jsonl") if r["event"]["subject"] in subjects]
    for subject in subjects:
        mine = [r for r in records if r["event"]["subject"] == subject]
        assert [r["payload"]["n"] for r in mine] == list(range(per_subject))
        for before, after in itertools.pairwise(mine):
            assert after["started"] >= before["ended"]  # never two at once
    # Different subjects did run side by side (the order is per subject only).
    spans = sorted((r["started"], r["ended"]) for r in records)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def in_order(outcomes: list[str]) -> list[str]:
    """The one "published" first, then the delivery outcomes in their order.

    The publisher's audit line and the deliverer's come from two processes: "published"
    may land after the first "retry" (seen with two test workers on two cores).
    """
    return ["published"] * outcomes.count("published") + [
        o for o in outcomes if o != "published"]


def test_failures_are_retried_then_dead_then_replayed_by_an_admin(run: RunStack) -> None:
    marker = run.root / "failing"
    marker.write_text("1")
    eid = uuid.uuid4().hex
    assert structured(run, jwt("carol"), {"id": eid, "source": "/f", "type": "flaky.job",
                                          "data": {"k": 1}}).status == 202
    letter = wait_for(lambda: next((d for d in dead(run) if d["event"]["id"] == eid), None))
    assert letter["attempts"] == 3  # the first try and retries = 2
    assert letter["target"] == "flaky"
    outcomes = [a["outcome"] for a in audit_events(run) if a["event_id"] == eid]
    assert in_order(outcomes) == ["published", "retry", "retry", "dead"]
    # Only admins see and replay dead letters.
    assert run.call("GET", "/events/dead", jwt()).status == 403
    replay = f"/events/dead/{letter['id']}/replay"
    assert run.call("POST", replay, jwt()).status == 403
    marker.unlink()
    answer = run.call("POST", replay, ADMIN)
    assert answer.status == 202, answer.body
    wait_for(lambda: any(r["event"]["id"] == eid for r in lines(run.root / "flaky.jsonl")))
    assert not any(d["event"]["id"] == eid for d in dead(run))
    assert run.call("POST", replay, ADMIN).status == 404  # not dead any more
    assert run.call("POST", "/events/dead/999999/replay", ADMIN).status == 404


def test_a_target_the_publisher_may_not_call_is_dead_at_once(run: RunStack) -> None:
    eid = uuid.uuid4().hex
    assert structured(run, jwt("dave"), {"id": eid, "source": "/s",
                                         "type": "secret.read"}).status == 202
    letter = wait_for(lambda: next((d for d in dead(run) if d["event"]["id"] == eid), None))
    assert letter["attempts"] == 1  # no retry loop
    assert "no rule" in letter["error"]
    assert not (run.root / "secret.jsonl").exists()
    # The same route delivers for a publisher that may call the service.
    admin_event = uuid.uuid4().hex
    assert structured(run, ADMIN, {"id": admin_event, "source": "/s",
                                   "type": "secret.read"}).status == 202
    wait_for(lambda: any(r["event"]["id"] == admin_event
                         for r in lines(run.root / "secret.jsonl")))


def test_context_emit_publishes_as_the_caller(run: RunStack) -> None:
    answer = run.call("POST", "/services/emitter", {**jwt("erin"), "Content-Type":
                                                     "application/json",
                                                     "X-Request-ID": "req-emit-1"},
                      json.dumps({"type": "emitted.hello", "data": {"x": 1},
                                  "subject": "e/1"}).encode())
    assert answer.status == 200, answer.body
    eid = answer.json()["id"]
    wait_for(lambda: any(r["event"]["id"] == eid for r in lines(run.root / "record.jsonl")))
    record = next(r for r in lines(run.root / "record.jsonl") if r["event"]["id"] == eid)
    assert record["user"] == "erin"
    assert record["request_id"] == "req-emit-1"
    assert record["event"]["source"] == "/acme/services/emitter"
    assert record["event"]["subject"] == "e/1"


def test_metrics_count_events_by_tenant_and_type(run: RunStack) -> None:
    eid = uuid.uuid4().hex
    structured(run, jwt(), {"id": eid, "source": "/m", "type": "order.metered"})
    wait_for(lambda: any(r["event"]["id"] == eid for r in lines(run.root / "record.jsonl")))
    text = run.call("GET", "/metrics", ADMIN).body.decode()
    assert 'mtp_events_published_total{tenant="acme",type="order.metered"}' in text
    assert 'mtp_events_delivered_total{tenant="acme",type="order.metered"}' in text
    assert "mtp_events_delivery_lag_seconds_bucket" in text


def test_sigterm_loses_no_accepted_event(tmp_path) -> None:
    stack = start(tmp_path)
    subject = "one-at-a-time"
    ids = []
    try:
        for n in range(12):
            eid = uuid.uuid4().hex
            answer = structured(stack, jwt(), {"id": eid, "source": "/t", "type": "slow.t",
                                               "subject": subject,
                                               "data": {"n": n, "sleep": 0.3}})
            assert answer.status == 202
            ids.append(eid)
    finally:
        assert stop(stack.proc) is not None
    done_before = {r["event"]["id"] for r in lines(tmp_path / "record.jsonl")}
    assert len(done_before) < len(ids)  # the stop came mid-way
    env = run_env(tmp_path, stack.port, MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET)
    again = start_run(tmp_path, tmp_path / "tenant", env)
    try:
        wait_for(lambda: {r["event"]["id"] for r in lines(tmp_path / "record.jsonl")}
                 >= set(ids), timeout=60)
        delivered = [r["payload"]["n"] for r in lines(tmp_path / "record.jsonl")]
        # At least once, in order: a delivery cut short may run again, never out of order.
        assert sorted(set(delivered)) == list(range(12))
        assert [n for i, n in enumerate(delivered) if n not in delivered[:i]] == list(range(12))
    finally:
        stop(again.proc)


def dead(run: RunStack) -> list[dict]:
    answer = run.call("GET", "/events/dead", ADMIN)
    assert answer.status == 200, answer.body
    return answer.json()["dead"]



def test_the_overlay_changes_routes_live(tmp_path) -> None:
    stack = start(tmp_path)
    try:
        first = uuid.uuid4().hex
        structured(stack, jwt(), {"id": first, "source": "/o", "type": "order.live"})
        wait_for(lambda: any(r["event"]["id"] == first for r in lines(tmp_path / "record.jsonl")))
        # Arrays are replaced: the overlay's routes are now the only ones.
        stack.overlay.write_text('[[events.routes]]\ntypes = ["order.*"]\nservice = "eu"\n')
        moved = wait_for(lambda: _published_to(stack, tmp_path / "eu.jsonl"))
        assert not any(r["event"]["id"] == moved for r in lines(tmp_path / "record.jsonl"))
        # An overlay naming an unknown key is refused; the last good routes stay.
        stack.overlay.write_text('[[events.routes]]\ntypes = ["order.*"]\nservice = "eu"\n'
                                 'bogus = 1\n')
        wait_for(lambda: _published_to(stack, tmp_path / "eu.jsonl"))
    finally:
        stop(stack.proc)


def _published_to(stack: RunStack, path) -> str | None:
    """Publish one order event; its id once it reached ``path`` within a second, else None."""
    import time

    eid = uuid.uuid4().hex
    assert structured(stack, jwt(), {"id": eid, "source": "/o", "type": "order.live"}).status == 202
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if any(r["event"]["id"] == eid for r in lines(path)):
            return eid
        time.sleep(0.05)
    return None


def test_a_service_that_fails_to_import_is_retried_not_dead_at_once(tmp_path) -> None:
    route = ('\n[[events.routes]]\ntypes = ["admin.broken"]\nservice = "broken"\nretries = 2\n'
             'backoff = 0.05\n')
    stack = start(tmp_path, route)
    try:
        (tmp_path / "tenant" / "services" / "broken.py").write_text("def handle(:\n")
        eid = uuid.uuid4().hex
        assert structured(stack, ADMIN, {"id": eid, "source": "/b",
                                         "type": "admin.broken"}).status == 202
        letter = wait_for(lambda: next((d for d in dead(stack) if d["event"]["id"] == eid),
                                       None))
        assert letter["attempts"] == 3  # retried like any failure (a deploy may fix it)
        outcomes = [a["outcome"] for a in audit_events(stack) if a["event_id"] == eid]
        assert in_order(outcomes) == ["published", "retry", "retry", "dead"]
    finally:
        stop(stack.proc)
