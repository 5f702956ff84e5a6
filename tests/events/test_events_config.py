"""``[events]`` and the ``events`` key of authz rules in tenant.toml: validated like the rest."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from framework.authz import decide, decide_event
from framework.events.binding import BadEvent, Event, new_event, parse_http, to_http
from framework.events.config import EventRoute
from framework.tenant_config import ConfigError, parse_tenant

ALICE = SimpleNamespace(user="alice", groups=("sales",), roles=())


def tenant(**tables):
    return parse_tenant({"tenant": {"id": "acme"}, **tables})


def test_routes_are_parsed_with_defaults() -> None:
    t = tenant(events={"routes": [{"types": ["order.*"], "subject": "eu/*",
                                   "service": "billing", "operation": "charge",
                                   "retries": 5}]})
    route = t.events.routes[0]
    assert route == EventRoute(("order.*",), "eu/*", "billing", "charge", 5)
    assert t.events.matching("order.created", "eu/1") == [route]
    assert t.events.matching("order.created", "us/1") == []
    assert t.events.matching("order.created", None) == []
    assert t.events.matching("invoice.created", "eu/1") == []
    assert route.delay(1) == 1.0 and route.delay(3) == 4.0 and route.delay(40) == 300.0


@pytest.mark.parametrize(("routes", "key", "reason"), [
    ([{"types": ["a"], "service": "x", "bogus": 1}], "events.routes.0.bogus", "unknown key"),
    ([{"service": "x"}], "events.routes.0.types", "required key missing"),
    ([{"types": ["a"]}], "events.routes.0.service", "name a service or a sink"),
    ([{"types": ["a"], "service": "x", "sink": "https://b.example/events",
       "sink_token_env": "T"}], "events.routes.0.service", "name a service or a sink"),
    ([{"types": ["a"], "sink": "https://b.example/events"}],
     "events.routes.0.sink_token_env", "required with sink"),
    ([{"types": ["a"], "sink": "https://b.example/events", "sink_token_env": "T",
       "operation": "x"}], "events.routes.0.operation", "only with service"),
    # No syntax names another tenant's service: only a bare service name is valid.
    ([{"types": ["a"], "service": "globex/billing"}], "events.routes.0.service", "match"),
    ([{"types": ["a"], "service": "x", "retries": -1}], "events.routes.0.retries", "minimum"),
    ([{"types": ["a"], "sink": "file:///etc/passwd", "sink_token_env": "T"}],
     "events.routes.0.sink", "match"),
])
def test_invalid_routes_name_file_key_and_reason(routes, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        tenant(events={"routes": routes})
    assert info.value.file == "tenant.toml"
    assert info.value.key == key
    assert reason in info.value.reason


def test_unknown_key_under_events_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        tenant(events={"route": []})
    assert info.value.key == "events.route"


def test_an_events_rule_grants_types_and_no_service() -> None:
    t = tenant(authz={"enabled": True, "rules": [
        {"events": ["order.*"], "groups": ["sales"]},
        {"events": ["audit.*"], "roles": ["admin"]}]})
    assert decide_event(t.authz, ALICE, "order.created").allowed
    assert not decide_event(t.authz, ALICE, "audit.read").allowed
    assert not decide_event(t.authz, ALICE, "payroll").allowed
    assert not decide(t.authz, ALICE, "order", None).allowed  # grants no service
    assert decide_event(tenant().authz, ALICE, "anything").allowed  # authz disabled


def test_a_rule_needs_a_service_or_events() -> None:
    with pytest.raises(ConfigError) as info:
        tenant(authz={"enabled": True, "rules": [{"users": ["alice"]}]})
    assert info.value.key == "authz.rules.0.service"


def test_events_are_allowed_in_the_overlay() -> None:
    from framework.tenant_config import apply_overlay

    base = tenant(events={"routes": [{"types": ["a"], "service": "x"}]})
    new = apply_overlay(base, {"events": {"routes": [{"types": ["b"], "service": "y"}]}}, "o")
    assert [r.service for r in new.events.routes] == ["y"]


def test_a_sink_event_round_trips_through_the_binding() -> None:
    event = Event("1", "/s", "order.x", "eu/1", "2026-01-01T00:00:00Z", {"a": 1})
    headers, body = to_http(event)
    parsed = parse_http({k.lower(): v for k, v in headers.items()}, body)
    assert parsed.public() == event.public()


@pytest.mark.parametrize(("kind", "subject", "attribute"), [
    ("", None, "type"), ("with space", None, "type"), ("x" * 300, None, "type"),
    ("ok", "", "subject"), ("ok", "a\nb", "subject")])
def test_emit_checks_its_attributes(kind: str, subject, attribute: str) -> None:
    with pytest.raises(BadEvent) as info:
        new_event(kind, None, subject, "/acme/services/x")
    assert info.value.attribute == attribute


def test_context_emit_in_process_is_checked_and_recorded(tmp_path) -> None:
    from framework.local import Caller, LocalRunner, outcome_value
    from framework.settings import Settings
    from tests.events.stack import EMITTER

    (tmp_path / "services").mkdir()
    (tmp_path / "tenant.toml").write_text('[tenant]\nid = "acme"\n')
    (tmp_path / "services" / "emitter.py").write_text(EMITTER)
    settings = Settings.from_env({"MTP_DATA_DIR": str(tmp_path / "data")}, tenant_dir=tmp_path)
    runner = LocalRunner(settings, settings.load_tenant())
    try:
        out = outcome_value(runner.run("emitter", {"type": "order.x", "data": {"a": 1},
                                                   "subject": "s"}, caller=Caller("eve")))
        assert runner.emitted == [{"id": out["id"], "source": "/acme/services/emitter",
                                   "type": "order.x", "subject": "s",
                                   "time": runner.emitted[0]["time"], "data": {"a": 1}}]
        bad = runner.run("emitter", {"type": "has space"})
        assert bad.status == 500 and not runner.emitted[1:]
    finally:
        runner.close()


def test_trace_context_travels_through_the_binding() -> None:
    parent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    event = Event("1", "/s", "order.x", None, "2026-01-01T00:00:00Z", None,
                  {"traceparent": parent, "tracestate": "k=v"})
    headers, body = to_http(event)
    parsed = parse_http({k.lower(): v for k, v in headers.items()}, body)
    assert parsed.extra == {"traceparent": parent, "tracestate": "k=v"}
    # A malformed traceparent is dropped, never stored.
    bad = parse_http({"ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-specversion": "1.0",
                      "ce-traceparent": "nonsense"}, b"")
    assert bad.extra == {}


def test_prune_forgets_delivered_events_and_keeps_dedup_for_a_day(tmp_path) -> None:
    from framework.events.store import DONE, EventStore, Publisher

    store = EventStore(tmp_path / "events.sqlite3")
    who = Publisher("u", (), (), "jwt", "rid")
    route = EventRoute(("a.*",), service="x")
    event = Event("1", "/s", "a.b", None, "2026-01-01T00:00:00Z", None)
    assert store.publish(event, who, [route])
    (delivery,) = store.claim("me", 10, 30.0)
    store.finish(delivery.did, "me", DONE)
    store.prune(0.0)
    assert store.counts() == {}
    assert not store.publish(event, who, [route])  # still a duplicate after the prune
    # A graceful stop hands a running delivery back, its attempt not counted.
    assert store.publish(Event("2", "/s", "a.b", None, "2026-01-01T00:00:00Z", None), who,
                         [route])
    (running,) = store.claim("me", 10, 30.0)
    assert store.release("me") == 1
    (again,) = store.claim("other", 10, 30.0)
    assert again.did == running.did and again.attempts == 1


def test_claiming_walks_the_due_index_and_never_sorts_the_backlog(tmp_path) -> None:
    """A claim reads LIMIT rows of the due index in order: its cost does not grow with
    the backlog (a sort of every pending row did, and throughput collapsed under load)."""
    import sqlite3

    from framework.events.store import DUE, EventStore

    EventStore(tmp_path / "events.sqlite3")  # the schema and its indexes
    with sqlite3.connect(tmp_path / "events.sqlite3") as conn:
        plan = " ".join(str(row[-1]) for row in conn.execute(
            "EXPLAIN QUERY PLAN " + DUE, ("pending", 0.0, "pending", "running", 4)))
    assert "deliveries_due" in plan and "TEMP B-TREE" not in plan
